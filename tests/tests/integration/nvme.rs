//! The NVMe/TCP initiator (`bdev_nvme_*`, issue 15) across two
//! `writecache_tgt` processes: one exports the origin over NVMe/TCP
//! (`nvmf_*`), the other attaches it with `bdev_nvme_attach_controller`
//! and caches it with a writecache. Driven by the stock `spdk-rpc`; data
//! goes in and out with `qemu-io` over the cache target's NBD export.
//!
//! * `nvme_rpcs_errors_and_config_restore`: every method and its errors,
//!   SPDK's result shapes, digests, `save_config` and `--json` restore.
//! * `nvme_writecache_over_remote_origin_survives_origin_loss`: the
//!   origin's target is killed while the cache target keeps taking writes;
//!   after the origin comes back (from its saved config) the controller
//!   reconnects, the writeback drains and the origin holds every write.

use std::fs::File;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{run_bounded, signal, unique_dir, Out, Target};

const NQN: &str = "nqn.2016-06.io.spdk:origin";
const PLUGIN: [&str; 2] = ["--plugin", "writecache_rpc"];
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A TCP port nothing listens on right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn ok(t: &Target, args: &[&str]) -> String {
    let out = t.rpc_with(&PLUGIN, args);
    assert_eq!(
        out.code,
        0,
        "spdk-rpc {args:?} failed: {}\n--- target log ---\n{}",
        out.all(),
        t.log()
    );
    out.stdout.trim().to_string()
}

fn okj(t: &Target, args: &[&str]) -> Value {
    let s = ok(t, args);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {s}"))
}

/// The (code, message) of a call that must fail.
fn err(t: &Target, args: &[&str]) -> (i64, String) {
    let out = t.rpc(args);
    assert_eq!(out.code, 1, "spdk-rpc {args:?} should fail: {out:?}");
    let all = out.all();
    let at = all
        .rfind("response:")
        .unwrap_or_else(|| panic!("{args:?}: no error response in {all}"));
    let v: Value = serde_json::from_str(all[at + 9..].trim()).expect("error JSON");
    (
        v["code"].as_i64().expect("code"),
        v["message"].as_str().expect("message").to_string(),
    )
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// An origin target: a uring bdev over `<dir>/origin.img` (32 MiB, 4 KiB
/// blocks) exported as NQN on 127.0.0.1:`port`.
fn origin_target(tag: &str, dir: &Path, port: u16) -> Target {
    let img = dir.join("origin.img");
    if !img.exists() {
        File::create(&img)
            .and_then(|f| f.set_len(32 * MIB))
            .expect("origin file");
    }
    let t = Target::start(tag, &[]);
    let port = port.to_string();
    ok(
        &t,
        &[
            "bdev_uring_create",
            img.to_str().unwrap(),
            "Origin0",
            "4096",
        ],
    );
    ok(&t, &["nvmf_create_transport", "-t", "TCP"]);
    ok(&t, &["nvmf_create_subsystem", NQN, "-a", "-s", "SPDK0001"]);
    ok(&t, &["nvmf_subsystem_add_ns", NQN, "Origin0"]);
    ok(
        &t,
        &[
            "nvmf_subsystem_add_listener",
            NQN,
            "-t",
            "tcp",
            "-a",
            "127.0.0.1",
            "-s",
            &port,
        ],
    );
    t
}

fn attach_args(port: &str, extra: &[&'static str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "bdev_nvme_attach_controller",
        "-b",
        "Nv0",
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-f",
        "ipv4",
        "-s",
        port,
        "-n",
        NQN,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The `bdev` subsystem entries of `save_config`.
fn bdev_config(t: &Target) -> Vec<Value> {
    let saved = t.rpc_json(&["save_config"]);
    saved["subsystems"]
        .as_array()
        .expect("subsystems")
        .iter()
        .filter(|s| s["subsystem"] == "bdev")
        .flat_map(|s| s["config"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn ctrlr_state(t: &Target) -> String {
    let v = t.rpc_json(&["bdev_nvme_get_controllers", "-n", "Nv0"]);
    v[0]["ctrlrs"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn nvme_rpcs_errors_and_config_restore() {
    require_spdk_rpc!();
    let data = unique_dir("nvme-rpc-data");
    let port = free_port();
    let ps = port.to_string();
    let a = origin_target("nvme-rpc-origin", &data, port);
    let b = Target::start("nvme-rpc-host", &[]);

    // pcie: the precise pointer to bdev_uring_create.
    let (code, msg) = err(
        &b,
        &[
            "bdev_nvme_attach_controller",
            "-b",
            "P0",
            "-t",
            "pcie",
            "-a",
            "0000:01:00.0",
        ],
    );
    assert_eq!(code, -95, "{msg}");
    assert!(msg.contains("bdev_uring_create"), "{msg}");
    // SPDK's timer rules.
    let (code, msg) = err(&b, &strs(&attach_args(&ps, &["-l", "0", "-o", "1"])));
    assert_eq!(code, -22, "{msg}");
    assert!(msg.contains("reconnect_delay_sec"), "{msg}");
    // Nothing listens there.
    let (code, _) = err(&b, &strs(&attach_args(&free_port().to_string(), &[])));
    assert_eq!(code, -111);
    let (code, _) = err(&b, &["bdev_nvme_detach_controller", "Nope"]);
    assert_eq!(code, -19);

    // With both digests, through the stock CLI.
    let names = ok(
        &b,
        &strs(&attach_args(&ps, &["-e", "-d", "-l", "-1", "-o", "2"])),
    );
    assert_eq!(names, "Nv0n1");
    let (code, _) = err(&b, &strs(&attach_args(&ps, &[])));
    assert_eq!(code, -17, "a second controller named Nv0");
    let c = okj(&b, &["bdev_nvme_get_controllers"]);
    assert_eq!(c[0]["name"], "Nv0");
    let ctrlr = &c[0]["ctrlrs"][0];
    assert_eq!(ctrlr["state"], "enabled");
    assert_eq!(ctrlr["trid"]["trtype"], "TCP");
    assert_eq!(ctrlr["trid"]["adrfam"], "IPv4");
    assert_eq!(ctrlr["trid"]["trsvcid"], ps.as_str());
    assert_eq!(ctrlr["trid"]["subnqn"], NQN);
    let bdev = &b.rpc_json(&["bdev_get_bdevs", "-b", "Nv0n1"])[0];
    assert_eq!(bdev["block_size"], 4096);
    assert_eq!(bdev["num_blocks"], 32 * MIB / 4096);
    assert_eq!(bdev["product_name"], "NVMe disk");
    assert_eq!(
        bdev["driver_specific"]["nvme"][0]["ctrlr_data"]["serial_number"],
        "SPDK0001"
    );
    // The origin target sees one controller from us.
    let hosts = a.rpc_json(&["nvmf_subsystem_get_controllers", NQN]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");

    // save_config → a new host target restores the controller from --json.
    let cfg = bdev_config(&b);
    let attach: Vec<&Value> = cfg
        .iter()
        .filter(|e| e["method"] == "bdev_nvme_attach_controller")
        .collect();
    assert_eq!(attach.len(), 1, "{cfg:?}");
    let p = &attach[0]["params"];
    assert_eq!(p["hdgst"], true);
    assert_eq!(p["ddgst"], true);
    assert_eq!(p["ctrlr_loss_timeout_sec"], -1);
    assert_eq!(p["reconnect_delay_sec"], 2);
    let saved = b.rpc_ok(&["save_config"]);
    let dir = Target::new_dir("nvme-rpc-restore");
    std::fs::write(dir.join("config.json"), saved).expect("write config");
    // (The CLI prints nothing for this method.)
    ok(&b, &["bdev_nvme_detach_controller", "Nv0"]);
    assert!(b
        .rpc_json(&["bdev_get_bdevs"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        okj(&b, &["bdev_nvme_get_controllers"]),
        Value::Array(vec![])
    );
    b.stop();
    let cfg_path = dir.join("config.json");
    let mut c = Target::spawn_in(dir.clone(), &["--json", cfg_path.to_str().unwrap()]);
    c.wait_ready();
    assert_eq!(ctrlr_state(&c), "enabled");
    assert_eq!(
        c.rpc_json(&["bdev_get_bdevs", "-b", "Nv0n1"])[0]["num_blocks"],
        8192
    );
    c.stop();
    a.stop();
    let _ = std::fs::remove_dir_all(&data);
}

/// `qemu-io` over `uri` with these commands; all must succeed.
fn qio(uri: &str, cmds: &[String]) -> Out {
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", "-t", "writeback", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run_bounded(cmd, Duration::from_secs(60))
}

fn qio_ok(t: &Target, uri: &str, cmds: &[String]) {
    let out = qio(uri, cmds);
    assert!(
        out.code == 0 && !out.all().contains("failed"),
        "qemu-io {cmds:?}: {out:?}\n--- target log ---\n{}",
        t.log()
    );
}

fn writes(regions: &[(u8, u64, u64)]) -> Vec<String> {
    let mut v: Vec<String> = regions
        .iter()
        .map(|(p, off, len)| format!("write -P 0x{p:02x} {off} {len}"))
        .collect();
    v.push("flush".into());
    v
}

fn reads(regions: &[(u8, u64, u64)]) -> Vec<String> {
    regions
        .iter()
        .map(|(p, off, len)| format!("read -P 0x{p:02x} {off} {len}"))
        .collect()
}

fn file_holds(path: &Path, regions: &[(u8, u64, u64)]) -> bool {
    let data = std::fs::read(path).expect("read origin");
    regions.iter().all(|&(p, off, len)| {
        data[off as usize..(off + len) as usize]
            .iter()
            .all(|&b| b == p)
    })
}

fn wc_stat(t: &Target, field: &str) -> u64 {
    let v = okj(t, &["bdev_writecache_get_stats", "wc0"]);
    v[0][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

#[test]
fn nvme_writecache_over_remote_origin_survives_origin_loss() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let data = unique_dir("nvme-wc-data");
    let origin_img = data.join("origin.img");
    let port = free_port();
    let ps = port.to_string();
    let a = origin_target("nvme-wc-origin", &data, port);
    let a_cfg = data.join("origin.json");
    std::fs::write(&a_cfg, a.rpc_ok(&["save_config"])).expect("origin config");

    let b = Target::start("nvme-wc-host", &[]);
    // Reconnect every second for ever; queued I/O never fails early (the
    // writecache's own retry budget is short: I/O must wait, not fail).
    assert_eq!(
        ok(&b, &strs(&attach_args(&ps, &["-l", "-1", "-o", "1"]))),
        "Nv0n1"
    );
    let cache = data.join("cache.img");
    ok(
        &b,
        &[
            "bdev_pmem_create",
            cache.to_str().unwrap(),
            "-n",
            "Cache0",
            "--size-mb",
            "16",
        ],
    );
    ok(
        &b,
        &[
            "bdev_writecache_create",
            "wc0",
            "-o",
            "Nv0n1",
            "-c",
            "Cache0",
            "--max-age-ms",
            "100",
        ],
    );
    let nbd = data.join("nbd.sock");
    ok(&b, &["nbd_server_start", nbd.to_str().unwrap()]);
    ok(&b, &["nbd_export_create", "wc0", "wc0"]);
    let uri = format!("nbd+unix:///wc0?socket={}", nbd.display());

    // Before the outage: written back to the remote origin.
    let before = [(0x11, 0, 256 * KIB), (0x22, 5 * MIB, 64 * KIB)];
    qio_ok(&b, &uri, &writes(&before));
    wait_until(Duration::from_secs(20), "writeback to the origin", || {
        wc_stat(&b, "dirty") == 0
    });
    assert!(file_holds(&origin_img, &before));

    // The origin's target dies.
    signal(a.pid(), libc::SIGKILL);
    drop(a);
    let during = [(0x33, 8 * MIB, 512 * KIB), (0x44, MIB, 16 * KIB)];
    let t0 = Instant::now();
    qio_ok(&b, &uri, &writes(&during));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "writes must land in the cache while the origin is away"
    );
    wait_until(Duration::from_secs(10), "the controller to notice", || {
        ctrlr_state(&b) != "enabled"
    });
    thread::sleep(Duration::from_millis(2500));
    assert!(wc_stat(&b, "dirty") > 0, "nothing can be written back yet");
    assert_eq!(wc_stat(&b, "error"), 0, "the writecache must not give up");
    // Reads of cached data are served meanwhile.
    qio_ok(&b, &uri, &reads(&during));

    // The origin comes back from its saved config: the controller
    // reconnects and the writeback drains.
    let a2 = Target::start("nvme-wc-origin2", &["--json", a_cfg.to_str().unwrap()]);
    wait_until(Duration::from_secs(20), "reconnect", || {
        ctrlr_state(&b) == "enabled"
    });
    wait_until(Duration::from_secs(30), "writeback after reconnect", || {
        wc_stat(&b, "dirty") == 0
    });
    assert_eq!(wc_stat(&b, "error"), 0);
    qio_ok(&b, &uri, &reads(&before));
    qio_ok(&b, &uri, &reads(&during));
    // The attach is saved before the writecache that stacks on it.
    let cfg = bdev_config(&b);
    let pos = |m: &str| cfg.iter().position(|e| e["method"] == m);
    assert!(
        pos("bdev_nvme_attach_controller") < pos("bdev_writecache_create"),
        "{cfg:?}"
    );
    b.stop();
    a2.stop();
    assert!(
        file_holds(&origin_img, &before),
        "origin lost pre-outage data"
    );
    assert!(
        file_holds(&origin_img, &during),
        "origin lost data written during the outage"
    );
    let _ = std::fs::remove_dir_all(&data);
}
