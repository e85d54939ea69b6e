//! Issue 12: a burst of bad RPC clients never locks the operator out of a
//! running target, and logs written to a file or pipe carry no colour codes.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{run_bounded, unique_dir, workspace_binary, Target};

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Threads and open descriptors of process `pid`.
fn threads_and_fds(pid: u32) -> (usize, usize) {
    (
        count_entries(&format!("/proc/{pid}/task")),
        count_entries(&format!("/proc/{pid}/fd")),
    )
}

/// Bad inputs: noise, a mutated request, a truncated one, an invalid envelope.
fn bad_input(i: usize) -> Vec<u8> {
    const REQ: &[u8] = br#"{"jsonrpc":"2.0","method":"spdk_get_version","id":1}"#;
    match i % 4 {
        0 => b"\xff{]\"garbage".to_vec(),
        1 => {
            let mut v = REQ.to_vec();
            let at = (i * 7) % v.len();
            v[at] = b'}';
            v
        }
        2 => REQ[..(i * 13) % REQ.len()].to_vec(),
        _ => br#"{"jsonrpc":"1.0","id":{}}"#.to_vec(),
    }
}

#[test]
fn target_serves_a_good_client_through_5000_bad_ones() {
    require_spdk_rpc!();
    let t = Target::start("burst", &[]);
    let pid = t.pid();
    // One served client first, so that lazily created state exists.
    assert!(t.client().call("spdk_get_version", None).is_ok());
    let wait_for_start = |what: &str, start: (usize, usize)| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while threads_and_fds(pid) != start {
            assert!(
                Instant::now() < deadline,
                "{what}: threads/fds {:?}, started at {start:?}",
                threads_and_fds(pid)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    std::thread::sleep(Duration::from_millis(100));
    let start = threads_and_fds(pid);
    let mut answered = 0;
    for i in 1..=5000 {
        if i % 100 == 0 {
            let mut c = t.client();
            let v = c
                .call("spdk_get_version", None)
                .unwrap_or_else(|e| panic!("good client {i} not answered: {e:?}\n{}", t.log()));
            assert!(v["version"].is_string(), "{v}");
            answered += 1;
            continue;
        }
        let mut s = UnixStream::connect(&t.sock).expect("a bad client connects");
        let _ = s.write_all(&bad_input(i));
    }
    assert_eq!(answered, 50);
    wait_for_start("after the burst", start);
    assert!(
        !t.log().contains("too many open connections"),
        "{}",
        t.log()
    );
    t.stop();
}

fn assert_no_escape_codes(what: &str, log: &str) {
    assert!(
        log.contains(" INFO ") || log.contains(" ERROR "),
        "{what}: no log lines to check:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "{what}: log written to a file or pipe has escape codes:\n{log:?}"
    );
}

#[test]
fn target_log_to_a_file_has_no_colour_codes() {
    require_spdk_rpc!();
    let t = Target::start("nocolour", &["--log-level=INFO"]);
    // An error line too.
    let _ = t
        .client()
        .call("bdev_get_bdevs", Some(json!({"name": "nope"})));
    assert_no_escape_codes("writecache_tgt", &t.log());
    t.stop();
}

#[test]
fn bdevperf_log_to_a_pipe_has_no_colour_codes() {
    let dir = unique_dir("bp-nocolour");
    let cfg = dir.join("bdev.json");
    let doc = json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_malloc_create",
         "params": {"name": "Malloc0", "num_blocks": 256, "block_size": 4096}}]}]});
    std::fs::write(&cfg, doc.to_string()).expect("write config");
    let mut cmd = Command::new(workspace_binary("BDEVPERF", "bdevperf", "wc-perf"));
    cmd.current_dir(&dir).args([
        "--idle",
        "sleep",
        "--no-pin",
        "--log-level=INFO",
        "--json",
        cfg.to_str().expect("utf-8"),
        "-m",
        "0x1",
        "-q",
        "1",
        "-o",
        "4k",
        "-w",
        "read",
        "-t",
        "1",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{}", out.all());
    assert_no_escape_codes("bdevperf", &out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 12 part 3: after `bdev_writecache_create` recovers a pmem cache of
/// 4 Mi blocks (1.9 Mi committed, some superseded, some uncommitted), the
/// target's RssAnon has grown by at most 32 B per cache block, and by at
/// most 64 B at its peak during the recovery. `wc_recovery_rss` (perf/)
/// writes the image, drives this build's `writecache_tgt` and measures it
/// through `/proc/PID/status`. 4 Mi blocks, not fewer: the allocator's
/// arena is backed by transparent huge pages, so a few MiB of 2 MiB
/// rounding are fixed costs that would dominate a smaller cache.
#[test]
fn recovered_cache_keeps_at_most_32_bytes_per_block() {
    let mut cmd = Command::new(workspace_binary(
        "WC_RECOVERY_RSS",
        "wc_recovery_rss",
        "wc-perf",
    ));
    cmd.env("WRITECACHE_TGT", crate::harness::tgt_binary())
        .args(["--check-steady", "32", "--check-peak", "64", "4"]);
    let out = run_bounded(cmd, Duration::from_secs(300));
    println!("{}", out.stdout);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("4Mi"), "{}", out.all());
}
