//! Set-up shared by the NVMe-oF tests (`nvmf.rs`: the target's RPCs;
//! `nvme.rs`: the initiator across processes and in one): free ports,
//! calls that must succeed or fail with their SPDK error, a bdev exported
//! over NVMe/TCP through the stock CLI, the attach command line, the
//! controller's state, `save_config`'s bdev entries, `qemu-io` over NBD
//! and a writecache's counters.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{run_bounded, Out, Target};

pub const PLUGIN: [&str; 2] = ["--plugin", "writecache_rpc"];
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// A TCP port nothing listens on right now (the kernel's pick).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// `spdk-rpc --plugin writecache_rpc ARGS` must succeed: its trimmed output.
pub fn ok(t: &Target, args: &[&str]) -> String {
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

/// [`ok`], parsed as JSON.
pub fn okj(t: &Target, args: &[&str]) -> Value {
    let s = ok(t, args);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {s}"))
}

/// The (code, message) of the JSON-RPC error in `spdk-rpc`'s output.
pub fn rpc_error(all: &str) -> (i64, String) {
    let at = all
        .rfind("response:")
        .unwrap_or_else(|| panic!("no error response in {all}"));
    let v: Value = serde_json::from_str(all[at + 9..].trim()).expect("error JSON");
    (
        v["code"].as_i64().expect("code"),
        v["message"].as_str().expect("message").to_string(),
    )
}

/// The (code, message) of a call that must fail.
pub fn err(t: &Target, args: &[&str]) -> (i64, String) {
    let out = t.rpc(args);
    assert_eq!(out.code, 1, "spdk-rpc {args:?} should fail: {out:?}");
    rpc_error(&out.all())
}

pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Exports `bdev` as the only namespace of a new subsystem `nqn` (any
/// host, serial `SPDK0001`) on 127.0.0.1:`port`, creating the TCP
/// transport first when `new_transport`.
pub fn export_over_tcp(t: &Target, bdev: &str, nqn: &str, port: u16, new_transport: bool) {
    if new_transport {
        ok(t, &["nvmf_create_transport", "-t", "TCP"]);
    }
    ok(t, &["nvmf_create_subsystem", nqn, "-a", "-s", "SPDK0001"]);
    ok(t, &["nvmf_subsystem_add_ns", nqn, bdev]);
    let port = port.to_string();
    ok(
        t,
        &[
            "nvmf_subsystem_add_listener",
            nqn,
            "-t",
            "tcp",
            "-a",
            "127.0.0.1",
            "-s",
            &port,
        ],
    );
}

/// `bdev_nvme_attach_controller -b NAME` to `nqn` at 127.0.0.1:`port`,
/// then `extra`.
pub fn attach_args(name: &str, port: &str, nqn: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "bdev_nvme_attach_controller",
        "-b",
        name,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-f",
        "ipv4",
        "-s",
        port,
        "-n",
        nqn,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The `bdev` subsystem entries of `save_config`.
pub fn bdev_config(t: &Target) -> Vec<Value> {
    let saved = t.rpc_json(&["save_config"]);
    saved["subsystems"]
        .as_array()
        .expect("subsystems")
        .iter()
        .filter(|s| s["subsystem"] == "bdev")
        .flat_map(|s| s["config"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The state `bdev_nvme_get_controllers` reports for controller `name`.
pub fn ctrlr_state(t: &Target, name: &str) -> String {
    let v = t.rpc_json(&["bdev_nvme_get_controllers", "-n", name]);
    v[0]["ctrlrs"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `qemu-io` over `uri` with these commands.
pub fn qio(uri: &str, cmds: &[String]) -> Out {
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", "-t", "writeback", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run_bounded(cmd, Duration::from_secs(60))
}

/// [`qio`]; every command must succeed.
pub fn qio_ok(t: &Target, uri: &str, cmds: &[String]) {
    let out = qio(uri, cmds);
    assert!(
        out.code == 0 && !out.all().contains("failed"),
        "qemu-io {cmds:?}: {out:?}\n--- target log ---\n{}",
        t.log()
    );
}

/// Pattern writes of (byte, offset, length) regions, then a flush.
pub fn writes(regions: &[(u8, u64, u64)]) -> Vec<String> {
    let mut v: Vec<String> = regions
        .iter()
        .map(|(p, off, len)| format!("write -P 0x{p:02x} {off} {len}"))
        .collect();
    v.push("flush".into());
    v
}

/// Pattern-checking reads of (byte, offset, length) regions.
pub fn reads(regions: &[(u8, u64, u64)]) -> Vec<String> {
    regions
        .iter()
        .map(|(p, off, len)| format!("read -P 0x{p:02x} {off} {len}"))
        .collect()
}

/// The file holds every region's pattern.
pub fn file_holds(path: &Path, regions: &[(u8, u64, u64)]) -> bool {
    let data = std::fs::read(path).expect("read origin");
    regions.iter().all(|&(p, off, len)| {
        data[off as usize..(off + len) as usize]
            .iter()
            .all(|&b| b == p)
    })
}

/// One counter of `bdev_writecache_get_stats wc`.
pub fn wc_stat(t: &Target, wc: &str, field: &str) -> u64 {
    let v = okj(t, &["bdev_writecache_get_stats", wc]);
    v[0][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

/// An NBD export of bdev `bdev` on a socket in `dir`: its `qemu-io` URI.
pub fn nbd_export(t: &Target, dir: &Path, bdev: &str) -> String {
    let nbd = dir.join("nbd.sock");
    ok(t, &["nbd_server_start", nbd.to_str().unwrap()]);
    ok(t, &["nbd_export_create", bdev, bdev]);
    format!("nbd+unix:///{bdev}?socket={}", nbd.display())
}
