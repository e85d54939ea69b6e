//! The writecache vbdev end to end (issue 5): every `bdev_writecache_*`
//! method through SPDK's `spdk-rpc` with our plugin on a real stack (a pmem
//! cache file and an io_uring origin file), bad input, pending creation,
//! the safe-removal sequence, restarts (SIGKILL at random moments during a
//! qemu-io workload, and SIGTERM) with data intact, and origin faults
//! through an `error` bdev.
//!
//! ssd mode (issue 13) runs the restarts, save_config, safe removal, stats
//! and delete with and without drain over a uring cache file
//! (`writecache_ssd_*`, the pmem tests' bodies with the mode as a
//! parameter where they share them), plus a cache-bdev error through an
//! `error` bdev over the cache.
//!
//! Data goes through the target's NBD export with `qemu-io` (and is read
//! back whole with `nbdcopy`); what reached the origin is checked by
//! reading the origin FILE directly.
//!
//! `WC_KILL_SEED=<n>` replays the random kill moments of
//! `writecache_sigkill_during_workload_keeps_flushed_writes`.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{
    run_bounded, signal, unique_dir, wait_timeout, workspace_root, Out, Target, EXIT_TIMEOUT,
};

const PLUGIN: [&str; 2] = ["--plugin", "writecache_rpc"];
/// How long one NBD client run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// Size of every origin file here (8192 blocks of 4 KiB).
const ORIGIN_BYTES: u64 = 32 * MIB;
/// The writecache block size used throughout (the default).
const BS: u64 = 4096;

/// Every field §3.10 of the design and the README promise in
/// `bdev_writecache_get_stats` (dm-writecache's status first).
const STAT_FIELDS: [&str; 22] = [
    "error",
    "blocks",
    "free_blocks",
    "writeback_blocks",
    "read_blocks",
    "read_hits",
    "write_blocks",
    "write_hits_uncommitted",
    "write_hits_committed",
    "writes_around",
    "writes_allocate",
    "writes_blocked_on_freelist",
    "flushes",
    "discards",
    "dirty",
    "dirty_uncommitted",
    "commits",
    "seq_count",
    "writeback_ios",
    "writeback_bytes",
    "writeback_completed_blocks",
    "writeback_retries",
];

// ------------------------------------------------------------------ helpers

/// A directory for the device files, independent of any one target (it
/// outlives restarts). Removed on drop unless the test failed.
struct DataDir(PathBuf);

impl DataDir {
    fn new(tag: &str) -> DataDir {
        DataDir(unique_dir(tag))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn path_str(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf-8 path").to_string()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("data kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `spdk-rpc --plugin writecache_rpc <args>`.
fn wc(t: &Target, args: &[&str]) -> Out {
    t.rpc_with(&PLUGIN, args)
}

/// [`wc`] that must succeed; returns stdout trimmed.
fn ok(t: &Target, args: &[&str]) -> String {
    let out = wc(t, args);
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
fn okj(t: &Target, args: &[&str]) -> Value {
    let s = ok(t, args);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {s}"))
}

/// [`wc`] that must fail with a JSON-RPC error: its (code, message).
fn err(t: &Target, args: &[&str]) -> (i64, String) {
    let out = wc(t, args);
    assert_eq!(out.code, 1, "spdk-rpc {args:?} should fail: {out:?}");
    let all = out.all();
    let at = all
        .rfind("response:")
        .unwrap_or_else(|| panic!("{args:?}: no error response in {all}"));
    let body = all[at + "response:".len()..].trim();
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{args:?}: error response not JSON ({e}): {body}"));
    (
        v["code"].as_i64().expect("integer code"),
        v["message"].as_str().unwrap_or_default().to_string(),
    )
}

/// Asserts that `args` fails with `code` and a message containing every
/// one of `words`.
fn expect_err(t: &Target, args: &[&str], code: i64, words: &[&str]) {
    let (c, m) = err(t, args);
    assert_eq!(c, code, "{args:?}: code {c}, message {m:?}");
    for w in words {
        assert!(
            m.to_lowercase().contains(&w.to_lowercase()),
            "{args:?}: message {m:?} should mention {w:?}"
        );
    }
}

/// A raw call that must fail: (code, message).
fn raw_err(t: &Target, method: &str, params: Value) -> (i64, String) {
    let mut c = t.client();
    match c.call(method, Some(params.clone())) {
        Ok(v) => panic!("{method} {params} should fail, got {v}"),
        Err(e) => (i64::from(e.code), e.message),
    }
}

/// Polls `f` every 20 ms until it is true; panics with `what` after `limit`.
fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// An empty file of `len` bytes.
fn sparse_file(path: &Path, len: u64) {
    File::create(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// Creates `<data>/<file>` (32 MiB) and `bdev_uring_create`s it as `name`
/// with 4096-byte blocks.
fn uring_origin(t: &Target, data: &DataDir, file: &str, name: &str, block_size: u64) {
    let p = data.path(file);
    if !p.exists() {
        sparse_file(&p, ORIGIN_BYTES);
    }
    let bs = block_size.to_string();
    assert_eq!(
        ok(t, &["bdev_uring_create", &data.path_str(file), name, &bs]),
        name
    );
}

/// `bdev_pmem_create <data>/<file> -n name --size-mb mb` (4096-byte blocks).
fn pmem_cache(t: &Target, data: &DataDir, file: &str, name: &str, mb: &str) {
    assert_eq!(
        ok(
            t,
            &[
                "bdev_pmem_create",
                &data.path_str(file),
                "-n",
                name,
                "--size-mb",
                mb
            ]
        ),
        name
    );
}

/// `bdev_get_bdevs -b name` → the bdev object.
fn bdev(t: &Target, name: &str) -> Value {
    let v = t.rpc_json(&["bdev_get_bdevs", "-b", name]);
    v[0].clone()
}

/// The `driver_specific.writecache` object of `name`.
fn driver(t: &Target, name: &str) -> Value {
    bdev(t, name)["driver_specific"]["writecache"].clone()
}

/// Whether a bdev called `name` is registered.
fn exists(t: &Target, name: &str) -> bool {
    t.rpc_json(&["bdev_get_bdevs"])
        .as_array()
        .expect("array")
        .iter()
        .any(|b| b["name"] == name)
}

/// `bdev_writecache_get_stats name` → the one object.
fn stats(t: &Target, name: &str) -> Value {
    let v = okj(t, &["bdev_writecache_get_stats", name]);
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    v[0].clone()
}

fn stat(t: &Target, name: &str, field: &str) -> u64 {
    let s = stats(t, name);
    s[field]
        .as_u64()
        .unwrap_or_else(|| panic!("stats field {field} missing or not a count: {s}"))
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

/// Everything the bad-input cases must leave unchanged: the bdevs (name,
/// geometry, claims, writecache state and options), every instance's
/// stats and the bdev part of `save_config`.
fn snapshot(t: &Target) -> Value {
    // Over the raw socket: this runs after every bad-input case.
    let mut c = t.client();
    let mut call = |m: &str, p: Option<Value>| {
        c.call(m, p)
            .unwrap_or_else(|e| panic!("{m}: {e:?}\n{}", t.log()))
    };
    let bdevs: Vec<Value> = call("bdev_get_bdevs", None)
        .as_array()
        .expect("array")
        .iter()
        .map(|b| {
            json!({
                "name": b["name"], "claimed": b["claimed"], "block_size": b["block_size"],
                "num_blocks": b["num_blocks"], "writecache": b["driver_specific"]["writecache"],
            })
        })
        .collect();
    let stats = call("bdev_writecache_get_stats", None);
    // What save_config writes for the bdev subsystem.
    let config = call("framework_get_config", Some(json!({"name": "bdev"})));
    json!({"bdevs": bdevs, "stats": stats, "config": config})
}

// ----------------------------------------------------------------- NBD I/O

fn nbd_uri(export: &str, sock: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// Starts the NBD server on `sock` and exports `bdev` as `export`.
fn nbd_export(t: &Target, sock: &Path, bdev: &str, export: &str) -> String {
    let s = sock.to_str().expect("utf-8");
    if !okj(t, &["nbd_get_servers"])
        .as_array()
        .expect("array")
        .iter()
        .any(|v| v["listen"] == s)
    {
        assert_eq!(ok(t, &["nbd_server_start", s]), s);
    }
    assert_eq!(ok(t, &["nbd_export_create", bdev, export]), export);
    nbd_uri(export, sock)
}

fn qemu_io_args<'a>(uri: &'a str, cmds: &'a [String]) -> Vec<&'a str> {
    // qemu-io defaults to writethrough (a FLUSH after every write): ask
    // for writeback so only the explicit `flush` commands (and the close)
    // flush.
    let mut a = vec!["-f", "raw", "-t", "writeback", uri];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a
}

/// Runs `qemu-io -f raw URI -c ...` (bounded).
fn qio(uri: &str, cmds: &[String]) -> Out {
    let mut cmd = Command::new("qemu-io");
    cmd.args(qemu_io_args(uri, cmds));
    run_bounded(cmd, CLIENT_TIMEOUT)
}

/// [`qio`] where every command must succeed.
fn qio_ok(t: &Target, uri: &str, cmds: &[String]) {
    let out = qio(uri, cmds);
    assert!(
        out.code == 0 && !out.all().contains("failed"),
        "qemu-io {cmds:?}: {out:?}\n--- target log ---\n{}",
        t.log()
    );
}

fn cmds(c: &[&str]) -> Vec<String> {
    c.iter().map(|s| s.to_string()).collect()
}

/// `write -P pat off len` for each region, then `flush` when asked.
fn writes(regions: &[(u8, u64, u64)], flush: bool) -> Vec<String> {
    let mut v: Vec<String> = regions
        .iter()
        .map(|(p, off, len)| format!("write -P 0x{p:02x} {off} {len}"))
        .collect();
    if flush {
        v.push("flush".into());
    }
    v
}

/// `read -P pat off len` for each region.
fn reads(regions: &[(u8, u64, u64)]) -> Vec<String> {
    regions
        .iter()
        .map(|(p, off, len)| format!("read -P 0x{p:02x} {off} {len}"))
        .collect()
}

/// Asserts that the origin FILE holds each region's pattern.
fn assert_file_holds(path: &Path, regions: &[(u8, u64, u64)]) {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for &(p, off, len) in regions {
        let got = &data[off as usize..(off + len) as usize];
        if let Some(i) = got.iter().position(|&b| b != p) {
            panic!(
                "{}: byte {} is 0x{:02x}, expected 0x{p:02x} (region {off}+{len})",
                path.display(),
                off as usize + i,
                got[i]
            );
        }
    }
}

/// Whether the origin FILE already holds all of `region`.
fn file_holds(path: &Path, (p, off, len): (u8, u64, u64)) -> bool {
    let data = std::fs::read(path).expect("read origin");
    data[off as usize..(off + len) as usize]
        .iter()
        .all(|&b| b == p)
}

/// Reads the whole export with `nbdcopy` into a file and returns it.
fn dump(t: &Target, uri: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new("nbdcopy");
    cmd.args([uri, out.to_str().expect("utf-8")]);
    let r = run_bounded(cmd, CLIENT_TIMEOUT);
    assert_eq!(r.code, 0, "nbdcopy {uri}: {r:?}\n{}", t.log());
    std::fs::read(out).expect("read dump")
}

/// A `qemu-io` running in the background, output to a file.
struct Background {
    child: Child,
    out: PathBuf,
}

impl Background {
    fn spawn(uri: &str, cmds: &[String], out: PathBuf) -> Background {
        let f = File::create(&out).expect("create output file");
        let child = Command::new("qemu-io")
            .args(qemu_io_args(uri, cmds))
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn qemu-io");
        Background { child, out }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits (≤ `limit`) for the exit: (exit code, output).
    fn wait(&mut self, limit: Duration) -> (i32, String) {
        let st = wait_timeout(&mut self.child, limit)
            .unwrap_or_else(|| panic!("qemu-io still running after {limit:?}"));
        (
            st.code().unwrap_or(-1),
            std::fs::read_to_string(&self.out).unwrap_or_default(),
        )
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A small deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// -------------------------------------------------------------- the stack

/// The writecache mode of a test stack and the cache bdev it brings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// pmem mode over a pmem file bdev.
    Pmem,
    /// ssd mode over a uring file bdev (4096-byte blocks).
    Ssd,
}

impl Kind {
    /// `mode` as `bdev_get_bdevs` and `save_config` spell it.
    fn mode(self) -> &'static str {
        match self {
            Kind::Pmem => "pmem",
            Kind::Ssd => "ssd",
        }
    }
}

/// Creates the cache bdev `name` over `<data>/<file>` (`mb` MiB) for
/// `kind`: pmem, or uring on a sparse file (ssd mode). Returns the
/// `bdev_writecache_create` arguments the mode needs.
fn cache_bdev(
    kind: Kind,
    t: &Target,
    data: &DataDir,
    file: &str,
    name: &str,
    mb: &str,
) -> &'static [&'static str] {
    match kind {
        Kind::Pmem => {
            pmem_cache(t, data, file, name, mb);
            &[]
        }
        Kind::Ssd => {
            let p = data.path(file);
            if !p.exists() {
                sparse_file(&p, mb.parse::<u64>().expect("MiB") * MIB);
            }
            assert_eq!(
                ok(
                    t,
                    &["bdev_uring_create", &data.path_str(file), name, "4096"]
                ),
                name
            );
            &["--mode", "ssd"]
        }
    }
}

/// A target with `Origin0` (uring over `<data>/origin.img`, 4096-byte
/// blocks), `Cache0` (pmem over `<data>/cache.img`, `cache_mb` MiB) and
/// writecache `wc0` created with `extra` options.
fn stack(tag: &str, data: &DataDir, cache_mb: &str, extra: &[&str]) -> Target {
    stack_of(Kind::Pmem, tag, data, cache_mb, extra)
}

/// [`stack`] with the cache of `kind` (ssd: a uring file, `--mode ssd`).
fn stack_of(kind: Kind, tag: &str, data: &DataDir, cache_mb: &str, extra: &[&str]) -> Target {
    let t = Target::start(tag, &[]);
    uring_origin(&t, data, "origin.img", "Origin0", BS);
    let mode_args = cache_bdev(kind, &t, data, "cache.img", "Cache0", cache_mb);
    let mut args = vec![
        "bdev_writecache_create",
        "wc0",
        "-o",
        "Origin0",
        "-c",
        "Cache0",
    ];
    args.extend_from_slice(mode_args);
    args.extend_from_slice(extra);
    assert_eq!(ok(&t, &args), "wc0");
    assert_eq!(driver(&t, "wc0")["mode"], kind.mode());
    t
}

// ------------------------------------------------------------------- tests

/// Test 1: every method through the plugin, on pmem file + uring file.
#[test]
fn writecache_every_method_through_the_plugin() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let data = DataDir::new("wcall-data");
    let t = stack(
        "wcall",
        &data,
        "16",
        &[
            "--mode",
            "pmem",
            "--block-size",
            "4096",
            "--start-sector",
            "0",
            "--high-watermark",
            "90",
            "--low-watermark",
            "80",
            "--writeback-jobs",
            "64",
            "--autocommit-blocks",
            "32",
            "--autocommit-time-ms",
            "200",
            "--max-age-ms",
            "0",
            "--pause-writeback-ms",
            "1000",
        ],
    );
    let origin = data.path("origin.img");

    // bdev_get_bdevs: geometry, claims and the driver_specific object.
    let b = bdev(&t, "wc0");
    assert_eq!(b["block_size"], 4096, "{b}");
    assert_eq!(b["num_blocks"], ORIGIN_BYTES / BS, "{b}");
    crate::bdev::check_bdev_schema(&b);
    for base in ["Origin0", "Cache0"] {
        assert_eq!(bdev(&t, base)["claimed"], true, "{base} is claimed");
    }
    let d = driver(&t, "wc0");
    assert_eq!(d["mode"], "pmem", "{d}");
    assert_eq!(d["origin"], "Origin0", "{d}");
    assert_eq!(d["cache"], "Cache0", "{d}");
    assert_eq!(d["block_size"], 4096, "{d}");
    let blocks = d["blocks"].as_u64().expect("blocks");
    // 16 MiB of 4096-byte blocks with 16 bytes of metadata each.
    assert!((3900..4096).contains(&blocks), "{d}");
    assert_eq!(d["free_blocks"], blocks, "{d}");
    assert_eq!(d["dirty"], 0, "{d}");
    assert_eq!(d["writeback_blocks"], 0, "{d}");
    assert_eq!(d["error"], 0, "{d}");
    assert_eq!(
        d["options"],
        json!({
            "high_watermark": 90, "low_watermark": 80, "writeback_jobs": 64,
            "autocommit_blocks": 32, "autocommit_time_ms": 200, "fua": true,
            "cleaner": false, "max_age_ms": 0, "pause_writeback_ms": 1000,
            "writeback_retry_ms": 310,
        }),
        "{d}"
    );

    // get_stats: all instances, or one; every field present.
    let all = okj(&t, &["bdev_writecache_get_stats"]);
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
    assert_eq!(all[0]["name"], "wc0", "{all}");
    let s = stats(&t, "wc0");
    for f in STAT_FIELDS {
        assert!(s[f].is_u64() || s[f].is_i64(), "stats lack {f}: {s}");
    }
    assert_eq!(s["error"], 0, "{s}");
    assert_eq!(s["blocks"], blocks, "{s}");

    // I/O through NBD shows in the counters.
    let sock = data.path("nbd.sock");
    let uri = nbd_export(&t, &sock, "wc0", "wc0");
    let first = [(0xa1, 0, 256 * KIB), (0xa2, MIB, 64 * KIB)];
    let mut c = writes(&first, true);
    c.extend(reads(&first[..1]));
    qio_ok(&t, &uri, &c);
    let s = stats(&t, "wc0");
    let n = (256 + 64) * KIB / BS;
    assert!(s["write_blocks"].as_u64() >= Some(n), "{s}");
    assert!(s["writes_allocate"].as_u64() >= Some(n), "{s}");
    assert!(s["read_blocks"].as_u64() >= Some(64), "{s}");
    assert!(s["read_hits"].as_u64() >= Some(64), "{s}");
    assert!(s["flushes"].as_u64() >= Some(1), "{s}");
    assert!(s["commits"].as_u64() >= Some(1), "{s}");
    assert_eq!(
        s["dirty"], n,
        "below the high watermark nothing is written back: {s}"
    );
    assert_eq!(s["dirty_uncommitted"], 0, "flushed: {s}");

    // clear_stats zeroes the counters, not the state.
    assert_eq!(ok(&t, &["bdev_writecache_clear_stats", "wc0"]), "true");
    wait_until(Duration::from_secs(5), "cleared counters", || {
        let s = stats(&t, "wc0");
        s["write_blocks"] == 0 && s["read_blocks"] == 0 && s["flushes"] == 0
    });
    assert_eq!(stat(&t, "wc0", "dirty"), n);

    // set_options: only what is given changes; bdev_get_bdevs and
    // save_config show it.
    assert_eq!(
        ok(
            &t,
            &[
                "bdev_writecache_set_options",
                "wc0",
                "--high-watermark",
                "95",
                "--low-watermark",
                "85",
                "--writeback-jobs",
                "16",
                "--autocommit-blocks",
                "8",
                "--autocommit-time-ms",
                "100",
                "--max-age-ms",
                "600000",
                "--pause-writeback-ms",
                "500",
                "--nofua",
            ]
        ),
        "true"
    );
    let want = json!({
        "high_watermark": 95, "low_watermark": 85, "writeback_jobs": 16,
        "autocommit_blocks": 8, "autocommit_time_ms": 100, "fua": false,
        "cleaner": false, "max_age_ms": 600000, "pause_writeback_ms": 500,
        "writeback_retry_ms": 310,
    });
    assert_eq!(driver(&t, "wc0")["options"], want);
    assert_eq!(
        ok(&t, &["bdev_writecache_set_options", "wc0", "--fua"]),
        "true"
    );
    assert_eq!(driver(&t, "wc0")["options"]["fua"], true);
    assert_eq!(driver(&t, "wc0")["options"]["high_watermark"], 95);
    let entry = bdev_config(&t)
        .into_iter()
        .find(|e| e["method"] == "bdev_writecache_create")
        .expect("save_config has bdev_writecache_create");
    for (k, v) in [
        ("name", json!("wc0")),
        ("base_bdev", json!("Origin0")),
        ("cache_bdev", json!("Cache0")),
        ("high_watermark", json!(95)),
        ("low_watermark", json!(85)),
        ("writeback_jobs", json!(16)),
        ("autocommit_blocks", json!(8)),
        ("fua", json!(true)),
        ("pause_writeback_ms", json!(500)),
    ] {
        assert_eq!(entry["params"][k], v, "save_config {k}: {entry}");
    }

    // set_flush_on_suspend on and off.
    assert_eq!(
        ok(&t, &["bdev_writecache_set_flush_on_suspend", "wc0"]),
        "true"
    );
    assert_eq!(driver(&t, "wc0")["flush_on_suspend"], true);
    assert_eq!(
        ok(
            &t,
            &["bdev_writecache_set_flush_on_suspend", "wc0", "--disable"]
        ),
        "true"
    );
    assert_eq!(driver(&t, "wc0")["flush_on_suspend"], false);

    // flush: everything written back before it replies.
    assert!(!file_holds(&origin, first[0]), "the origin has no copy yet");
    assert_eq!(ok(&t, &["bdev_writecache_flush", "wc0"]), "true");
    let s = stats(&t, "wc0");
    assert_eq!(s["dirty"], 0, "{s}");
    assert_eq!(s["error"], 0, "{s}");
    assert_eq!(s["free_blocks"], blocks, "{s}");
    assert!(s["writeback_completed_blocks"].as_u64() >= Some(n), "{s}");
    assert!(s["writeback_bytes"].as_u64() >= Some(n * BS), "{s}");
    assert!(s["writeback_ios"].as_u64() >= Some(1), "{s}");
    assert_file_holds(&origin, &first);

    // delete --flush writes back what came after the last flush.
    let second = [(0xa3, 2 * MIB, 64 * KIB)];
    qio_ok(&t, &uri, &writes(&second, false));
    assert!(stat(&t, "wc0", "dirty") > 0);
    assert_eq!(
        ok(&t, &["bdev_writecache_delete", "wc0", "--flush"]),
        "true"
    );
    assert!(!exists(&t, "wc0"));
    for base in ["Origin0", "Cache0"] {
        assert_eq!(bdev(&t, base)["claimed"], false, "{base} is released");
    }
    expect_err(&t, &["bdev_writecache_get_stats", "wc0"], -19, &["wc0"]);
    assert_eq!(okj(&t, &["bdev_writecache_get_stats"]), json!([]));
    assert!(
        !bdev_config(&t)
            .iter()
            .any(|e| e["method"] == "bdev_writecache_create"),
        "a deleted cache is not saved"
    );
    assert_file_holds(&origin, &first);
    assert_file_holds(&origin, &second);
    t.stop();
}

/// Test 1 (suspend/resume): a suspended writecache holds new I/O — an NBD
/// write and read started during suspend complete only after resume, and
/// successfully.
#[test]
fn writecache_suspend_holds_io_until_resume() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let data = DataDir::new("wcsusp-data");
    let t = stack("wcsusp", &data, "16", &[]);
    let uri = nbd_export(&t, &data.path("nbd.sock"), "wc0", "wc0");
    let before = [(0xb1, 0, 64 * KIB)];
    qio_ok(&t, &uri, &writes(&before, false));

    assert_eq!(ok(&t, &["bdev_writecache_suspend", "wc0"]), "true");
    assert_eq!(driver(&t, "wc0")["suspended"], true);
    // Suspend committed what was written.
    assert_eq!(stat(&t, "wc0", "dirty_uncommitted"), 0);
    let written = stat(&t, "wc0", "write_blocks");

    let during = [(0xb2, 64 * KIB, 64 * KIB)];
    let mut c = writes(&during, false);
    c.extend(reads(&before));
    c.extend(reads(&during));
    let mut bg = Background::spawn(&uri, &c, data.path("held.out"));
    thread::sleep(Duration::from_millis(1500));
    assert!(
        bg.running(),
        "I/O completed while suspended: {:?}",
        std::fs::read_to_string(&bg.out)
    );
    assert_eq!(
        stat(&t, "wc0", "write_blocks"),
        written,
        "nothing written while suspended"
    );

    assert_eq!(ok(&t, &["bdev_writecache_resume", "wc0"]), "true");
    let (code, out) = bg.wait(Duration::from_secs(30));
    assert!(
        code == 0 && !out.contains("failed"),
        "held I/O must succeed after resume: {code} {out}\n{}",
        t.log()
    );
    assert_eq!(driver(&t, "wc0")["suspended"], false);
    assert!(stat(&t, "wc0", "write_blocks") >= written + 16);
    qio_ok(&t, &uri, &reads(&during));
    t.stop();
}

/// Test 2: bad input to create and set_options, each refused with a
/// precise error and nothing changed.
#[test]
fn writecache_bad_input_is_refused_precisely() {
    require_spdk_rpc!();
    let data = DataDir::new("wcbad-data");
    let t = stack("wcbad", &data, "16", &[]);
    // Spare bases for the would-be second instance.
    uring_origin(&t, &data, "origin1.img", "Origin1", BS);
    pmem_cache(&t, &data, "cache1.img", "Cache1", "8");
    // 4096 bytes: one pmem block, no room for a superblock and a block.
    pmem_cache(&t, &data, "tiny.img", "Tiny", "0.00390625");
    assert_eq!(bdev(&t, "Tiny")["num_blocks"], 1);
    t.rpc_ok(&["bdev_malloc_create", "-b", "Mal0", "8", "512"]);
    let cache1 = std::fs::read(data.path("cache1.img")).expect("read cache1");

    let before = snapshot(&t);
    let create = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "bdev_writecache_create",
            "wc1",
            "-o",
            "Origin1",
            "-c",
            "Cache1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let cases: Vec<(Vec<String>, i64, Vec<&str>)> = vec![
        (
            create(&["--block-size", "1000"]),
            -22,
            vec!["block size", "1000"],
        ),
        (
            create(&["--block-size", "8192"]),
            -22,
            vec!["block size", "8192"],
        ),
        (
            create(&["--block-size", "256"]),
            -22,
            vec!["block size", "256"],
        ),
        (
            create(&["--high-watermark", "101"]),
            -22,
            vec!["high_watermark", "101"],
        ),
        (
            create(&["--low-watermark", "101"]),
            -22,
            vec!["low_watermark", "101"],
        ),
        (
            create(&["--high-watermark", "40", "--low-watermark", "50"]),
            -22,
            vec!["low_watermark", "50", "40"],
        ),
        (
            create(&["--writeback-jobs", "0"]),
            -22,
            vec!["writeback_jobs"],
        ),
        (
            create(&["--autocommit-blocks", "0"]),
            -22,
            vec!["autocommit_blocks"],
        ),
        // ssd mode refuses a cache too small the same way, touching nothing.
        (
            cmds(&[
                "bdev_writecache_create",
                "wc1",
                "-o",
                "Origin1",
                "-c",
                "Tiny",
                "--mode",
                "ssd",
            ]),
            -28,
            vec!["too small"],
        ),
        // The same bdev as origin and cache.
        (
            cmds(&[
                "bdev_writecache_create",
                "wc1",
                "-o",
                "Cache1",
                "-c",
                "Cache1",
            ]),
            -22,
            vec!["Cache1", "different"],
        ),
        // A cache too small for one block.
        (
            cmds(&[
                "bdev_writecache_create",
                "wc1",
                "-o",
                "Origin1",
                "-c",
                "Tiny",
            ]),
            -28,
            vec!["too small"],
        ),
        // A block size the origin (4096-byte blocks) cannot do.
        (
            create(&["--block-size", "512"]),
            -22,
            vec!["block size", "4096"],
        ),
        // A cache without a persistent memory mapping in pmem mode.
        (
            cmds(&[
                "bdev_writecache_create",
                "wc1",
                "-o",
                "Origin1",
                "-c",
                "Mal0",
            ]),
            -22,
            vec!["Mal0", "pmem"],
        ),
        // Names in use: an instance, a base bdev.
        (
            cmds(&[
                "bdev_writecache_create",
                "wc0",
                "-o",
                "Origin1",
                "-c",
                "Cache1",
            ]),
            -17,
            vec!["wc0"],
        ),
        (
            cmds(&[
                "bdev_writecache_create",
                "Mal0",
                "-o",
                "Origin1",
                "-c",
                "Cache1",
            ]),
            -17,
            vec!["Mal0"],
        ),
        // Already-claimed bases: a second writecache on wc0's cache, or on
        // its origin.
        (
            cmds(&[
                "bdev_writecache_create",
                "wc1",
                "-o",
                "Origin1",
                "-c",
                "Cache0",
            ]),
            -16,
            vec!["Cache0"],
        ),
        (
            cmds(&[
                "bdev_writecache_create",
                "wc1",
                "-o",
                "Origin0",
                "-c",
                "Cache1",
            ]),
            -16,
            vec!["Origin0"],
        ),
        // set_options: out of range, inconsistent, a valid value next to an
        // invalid one (nothing changes).
        (
            cmds(&[
                "bdev_writecache_set_options",
                "wc0",
                "--high-watermark",
                "101",
            ]),
            -22,
            vec!["high_watermark", "101"],
        ),
        (
            cmds(&[
                "bdev_writecache_set_options",
                "wc0",
                "--low-watermark",
                "60",
            ]),
            -22,
            vec!["low_watermark", "60", "50"],
        ),
        (
            cmds(&[
                "bdev_writecache_set_options",
                "wc0",
                "--writeback-jobs",
                "0",
            ]),
            -22,
            vec!["writeback_jobs"],
        ),
        (
            cmds(&[
                "bdev_writecache_set_options",
                "wc0",
                "--autocommit-blocks",
                "0",
            ]),
            -22,
            vec!["autocommit_blocks"],
        ),
        (
            cmds(&[
                "bdev_writecache_set_options",
                "wc0",
                "--high-watermark",
                "70",
                "--writeback-jobs",
                "0",
            ]),
            -22,
            vec!["writeback_jobs"],
        ),
        // Unknown instances.
        (
            cmds(&[
                "bdev_writecache_set_options",
                "nope",
                "--high-watermark",
                "60",
            ]),
            -19,
            vec!["nope"],
        ),
        (cmds(&["bdev_writecache_flush", "nope"]), -19, vec!["nope"]),
        (cmds(&["bdev_writecache_delete", "nope"]), -19, vec!["nope"]),
        (
            cmds(&["bdev_writecache_get_stats", "nope"]),
            -19,
            vec!["nope"],
        ),
        (
            cmds(&["bdev_writecache_clear_stats", "nope"]),
            -19,
            vec!["nope"],
        ),
        (
            cmds(&["bdev_writecache_set_flush_on_suspend", "nope"]),
            -19,
            vec!["nope"],
        ),
    ];
    for (args, code, words) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_err(&t, &a, *code, words);
        assert_eq!(snapshot(&t), before, "{a:?} changed the running state");
    }

    // Wrong types and unknown keys, sent raw: malformed params.
    let base = json!({"name": "wc1", "base_bdev": "Origin1", "cache_bdev": "Cache1"});
    let with = |k: &str, v: Value| {
        let mut p = base.clone();
        p[k] = v;
        p
    };
    let raw: Vec<(&str, Value)> = vec![
        ("bdev_writecache_create", with("colour", json!("blue"))),
        ("bdev_writecache_create", with("block_size", json!("4096"))),
        ("bdev_writecache_create", with("high_watermark", json!(-1))),
        ("bdev_writecache_create", with("high_watermark", json!(1.5))),
        (
            "bdev_writecache_create",
            with("writeback_jobs", json!("many")),
        ),
        ("bdev_writecache_create", with("fua", json!("yes"))),
        ("bdev_writecache_create", with("mode", json!("dram"))),
        ("bdev_writecache_create", with("start_sector", json!(-8))),
        (
            "bdev_writecache_create",
            json!({"name": "wc1", "cache_bdev": "Cache1"}),
        ),
        (
            "bdev_writecache_create",
            json!(["wc1", "Origin1", "Cache1"]),
        ),
        (
            "bdev_writecache_set_options",
            json!({"name": "wc0", "high_watermark": "60"}),
        ),
        (
            "bdev_writecache_set_options",
            json!({"name": "wc0", "block_size": 512}),
        ),
        (
            "bdev_writecache_set_options",
            json!({"name": "wc0", "cleaner": 1}),
        ),
        (
            "bdev_writecache_delete",
            json!({"name": "wc0", "flush": "yes"}),
        ),
        (
            "bdev_writecache_delete",
            json!({"name": "wc0", "force": true}),
        ),
        ("bdev_writecache_flush", json!({"name": 7})),
        ("bdev_writecache_get_stats", json!({"name": "wc0", "x": 1})),
        (
            "bdev_writecache_set_flush_on_suspend",
            json!({"name": "wc0", "enable": "on"}),
        ),
    ];
    for (m, p) in &raw {
        let (code, msg) = raw_err(&t, m, p.clone());
        assert_eq!(code, -32602, "{m} {p}: {code} {msg}");
        assert_eq!(snapshot(&t), before, "{m} {p} changed the running state");
    }
    // The plugin refuses a non-number before sending anything.
    let out = wc(
        &t,
        &[
            "bdev_writecache_create",
            "wc1",
            "-o",
            "Origin1",
            "-c",
            "Cache1",
            "--block-size",
            "big",
        ],
    );
    assert_eq!(out.code, 2, "{out:?}");
    let out = wc(
        &t,
        &[
            "bdev_writecache_set_options",
            "wc0",
            "--high-watermark",
            "x",
        ],
    );
    assert_eq!(out.code, 2, "{out:?}");

    // No failed create touched the spare cache, and none left anything
    // behind: the same name on the same bases now works.
    assert_eq!(
        std::fs::read(data.path("cache1.img")).expect("read cache1"),
        cache1,
        "a refused create wrote to the cache"
    );
    assert_eq!(snapshot(&t), before);
    assert_eq!(
        ok(
            &t,
            &[
                "bdev_writecache_create",
                "wc1",
                "-o",
                "Origin1",
                "-c",
                "Cache1"
            ]
        ),
        "wc1"
    );
    assert_eq!(driver(&t, "wc1")["formatted_on_create"], true);
    assert_eq!(ok(&t, &["bdev_writecache_delete", "wc1"]), "true");
    assert_eq!(driver(&t, "wc0")["options"]["high_watermark"], 50);
    t.stop();
}

/// Test 2 (suspend/resume/delete state errors): suspend twice, resume
/// without suspend, delete while suspended.
#[test]
fn writecache_suspend_resume_delete_state_errors() {
    require_spdk_rpc!();
    let data = DataDir::new("wcsst-data");
    let t = stack("wcsst", &data, "16", &[]);
    let before = snapshot(&t);
    expect_err(&t, &["bdev_writecache_suspend", "nope"], -19, &["nope"]);
    expect_err(&t, &["bdev_writecache_resume", "nope"], -19, &["nope"]);
    for (m, p) in [
        ("bdev_writecache_suspend", json!({})),
        ("bdev_writecache_suspend", json!({"name": 1})),
        (
            "bdev_writecache_resume",
            json!({"name": "wc0", "now": true}),
        ),
    ] {
        let (code, msg) = raw_err(&t, m, p.clone());
        assert_eq!(code, -32602, "{m} {p}: {code} {msg}");
    }
    assert_eq!(snapshot(&t), before);
    expect_err(
        &t,
        &["bdev_writecache_resume", "wc0"],
        -22,
        &["wc0", "not suspended"],
    );
    assert_eq!(
        snapshot(&t),
        before,
        "resume without suspend changed the state"
    );

    assert_eq!(ok(&t, &["bdev_writecache_suspend", "wc0"]), "true");
    let suspended = snapshot(&t);
    assert_eq!(driver(&t, "wc0")["suspended"], true);
    expect_err(
        &t,
        &["bdev_writecache_suspend", "wc0"],
        -22,
        &["wc0", "already suspended"],
    );
    assert_eq!(snapshot(&t), suspended, "suspend twice changed the state");
    expect_err(
        &t,
        &["bdev_writecache_delete", "wc0"],
        -22,
        &["wc0", "suspended"],
    );
    expect_err(
        &t,
        &["bdev_writecache_delete", "wc0", "--flush"],
        -22,
        &["wc0", "suspended"],
    );
    assert_eq!(
        snapshot(&t),
        suspended,
        "delete while suspended changed the state"
    );
    assert!(exists(&t, "wc0"));

    assert_eq!(ok(&t, &["bdev_writecache_resume", "wc0"]), "true");
    assert_eq!(snapshot(&t), before);
    assert_eq!(ok(&t, &["bdev_writecache_delete", "wc0"]), "true");
    t.stop();
}

/// Test 3: creation naming a base that does not exist yet is pending,
/// saved, and starts when the base appears.
#[test]
fn writecache_pending_creation_starts_when_the_base_appears() {
    require_spdk_rpc!();
    let data = DataDir::new("wcpend-data");
    let t = Target::start("wcpend", &[]);
    uring_origin(&t, &data, "origin.img", "Origin0", BS);
    pmem_cache(&t, &data, "cacheq.img", "CacheQ", "8");

    // The cache is missing.
    assert_eq!(
        ok(
            &t,
            &[
                "bdev_writecache_create",
                "wcP",
                "-o",
                "Origin0",
                "-c",
                "CacheP",
                "--high-watermark",
                "70"
            ]
        ),
        "wcP"
    );
    let s = stats(&t, "wcP");
    assert_eq!(s["state"], "pending", "{s}");
    assert!(
        okj(&t, &["bdev_writecache_get_stats"])
            .as_array()
            .expect("array")
            .iter()
            .any(|s| s["name"] == "wcP"),
        "get_stats lists the pending instance"
    );
    assert!(!exists(&t, "wcP"), "a pending instance has no bdev yet");
    assert_eq!(bdev(&t, "Origin0")["claimed"], false);
    let entry = bdev_config(&t)
        .into_iter()
        .find(|e| e["method"] == "bdev_writecache_create" && e["params"]["name"] == "wcP")
        .expect("save_config includes the pending creation");
    assert_eq!(entry["params"]["base_bdev"], "Origin0", "{entry}");
    assert_eq!(entry["params"]["cache_bdev"], "CacheP", "{entry}");
    assert_eq!(entry["params"]["high_watermark"], 70, "{entry}");
    // Its name is taken.
    expect_err(
        &t,
        &[
            "bdev_writecache_create",
            "wcP",
            "-o",
            "Origin0",
            "-c",
            "CacheQ",
        ],
        -17,
        &["wcP"],
    );
    // Bad parameters are refused even when the bases are missing.
    expect_err(
        &t,
        &[
            "bdev_writecache_create",
            "wcX",
            "-o",
            "Nope1",
            "-c",
            "Nope2",
            "--high-watermark",
            "101",
        ],
        -22,
        &["high_watermark"],
    );

    // The base appears: the instance starts.
    pmem_cache(&t, &data, "cachep.img", "CacheP", "8");
    wait_until(Duration::from_secs(5), "wcP to start", || exists(&t, "wcP"));
    let d = driver(&t, "wcP");
    assert_eq!(d["origin"], "Origin0", "{d}");
    assert_eq!(d["cache"], "CacheP", "{d}");
    assert_eq!(d["options"]["high_watermark"], 70, "{d}");
    assert_ne!(stats(&t, "wcP")["state"], "pending");
    assert_eq!(bdev(&t, "Origin0")["claimed"], true);

    // A pending creation waiting for its origin is cancelled by delete.
    assert_eq!(
        ok(
            &t,
            &[
                "bdev_writecache_create",
                "wcQ",
                "-o",
                "OriginQ",
                "-c",
                "CacheQ"
            ]
        ),
        "wcQ"
    );
    assert_eq!(stats(&t, "wcQ")["state"], "pending");
    assert_eq!(ok(&t, &["bdev_writecache_delete", "wcQ"]), "true");
    expect_err(&t, &["bdev_writecache_get_stats", "wcQ"], -19, &["wcQ"]);
    assert!(!bdev_config(&t).iter().any(|e| e["params"]["name"] == "wcQ"));
    uring_origin(&t, &data, "originq.img", "OriginQ", BS);
    thread::sleep(Duration::from_millis(300));
    assert!(!exists(&t, "wcQ"), "a cancelled creation does not start");
    assert_eq!(bdev(&t, "CacheQ")["claimed"], false);
    t.stop();
}

/// The README documents the safe-removal sequence with suspend.
#[test]
fn readme_documents_safe_removal() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README");
    let lines: Vec<&str> = readme.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("Removing a cache"))
        .expect("README has a 'Removing a cache' paragraph");
    let para = lines[at..(at + 10).min(lines.len())].join("\n");
    for w in [
        "bdev_writecache_set_flush_on_suspend",
        "bdev_writecache_suspend",
        "bdev_writecache_get_stats",
        "bdev_writecache_delete",
    ] {
        assert!(
            para.contains(w),
            "the safe-removal paragraph lacks {w}:\n{para}"
        );
    }
}

/// Test 4: set flush-on-suspend → suspend → stats show dirty 0, error 0 →
/// (resume, as delete refuses a suspended instance) delete → the origin
/// file alone holds every write.
#[test]
fn writecache_safe_removal_leaves_the_origin_complete() {
    safe_removal(Kind::Pmem);
}

/// [`writecache_safe_removal_leaves_the_origin_complete`] in ssd mode.
#[test]
fn writecache_ssd_safe_removal_leaves_the_origin_complete() {
    safe_removal(Kind::Ssd);
}

fn safe_removal(kind: Kind) {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let data = DataDir::new(&format!("wcsafe{}-data", kind.mode()));
    // No writeback by watermark: everything stays in the cache until the
    // removal sequence.
    let t = stack_of(
        kind,
        &format!("wcsafe{}", kind.mode()),
        &data,
        "16",
        &["--high-watermark", "100", "--low-watermark", "90"],
    );
    let origin = data.path("origin.img");
    let uri = nbd_export(&t, &data.path("nbd.sock"), "wc0", "wc0");
    let flushed = [
        (0x11, 0, 128 * KIB),
        (0x22, 4 * MIB, 4 * KIB),
        (0x33, 31 * MIB, MIB),
    ];
    let unflushed = [(0x44, 10 * MIB, 256 * KIB), (0x55, 64 * KIB, 64 * KIB)];
    qio_ok(&t, &uri, &writes(&flushed, true));
    qio_ok(&t, &uri, &writes(&unflushed, false));
    // Overwrite part of a flushed region: the newest version must win.
    let over = [(0x66, 0, 16 * KIB)];
    qio_ok(&t, &uri, &writes(&over, false));
    let s = stats(&t, "wc0");
    assert!(s["dirty"].as_u64() > Some(0), "{s}");
    assert!(
        !file_holds(&origin, unflushed[0]),
        "the origin has no copy yet"
    );

    assert_eq!(
        ok(&t, &["bdev_writecache_set_flush_on_suspend", "wc0"]),
        "true"
    );
    assert_eq!(ok(&t, &["bdev_writecache_suspend", "wc0"]), "true");
    let s = stats(&t, "wc0");
    assert_eq!(s["dirty"], 0, "{s}");
    assert_eq!(s["error"], 0, "{s}");
    assert_eq!(s["writeback_blocks"], 0, "{s}");
    // Suspended with flush-on-suspend: the origin is complete already.
    let expect = |f: &Path| {
        assert_file_holds(f, &flushed[1..]);
        // 0x11 survives where no later write covered it (0x66 below 16K,
        // 0x55 from 64K).
        assert_file_holds(f, &[(0x11, 16 * KIB, 48 * KIB)]);
        assert_file_holds(f, &unflushed);
        assert_file_holds(f, &over);
    };
    expect(&origin);

    assert_eq!(ok(&t, &["bdev_writecache_resume", "wc0"]), "true");
    assert_eq!(ok(&t, &["bdev_writecache_delete", "wc0"]), "true");
    assert!(!exists(&t, "wc0"));
    assert_eq!(bdev(&t, "Origin0")["claimed"], false);
    expect(&origin);
    // The origin alone, read through the target, serves the same data.
    ok(&t, &["nbd_export_create", "Origin0", "raw"]);
    let raw = nbd_uri("raw", &data.path("nbd.sock"));
    qio_ok(&t, &raw, &reads(&unflushed));
    qio_ok(&t, &raw, &reads(&over));
    t.stop();
}

/// The parsed outcome of one background qemu-io workload.
#[derive(Debug, Clone)]
enum Op {
    Write {
        pat: u8,
        block: u64,
        blocks: u64,
    },
    /// A flush, followed by a marker read at `marker` (its success proves
    /// the connection was alive after the flush completed).
    Flush {
        marker: u64,
    },
    Sleep(u64),
}

fn op_cmds(ops: &[Op]) -> Vec<String> {
    let mut v = Vec::new();
    for op in ops {
        match op {
            Op::Write { pat, block, blocks } => v.push(format!(
                "write -P 0x{pat:02x} {} {}",
                block * BS,
                blocks * BS
            )),
            Op::Flush { marker } => {
                v.push("flush".into());
                v.push(format!("read {marker} 512"));
            }
            Op::Sleep(ms) => v.push(format!("sleep {ms}")),
        }
    }
    v
}

/// How many of `ops` completed, in order, according to qemu-io's output
/// (each write/read prints one success or failure line; flush and sleep
/// print nothing). A flush counts as completed only if its marker read
/// succeeded.
fn completed_prefix(ops: &[Op], output: &str) -> usize {
    let mut lines = output.lines().filter(|l| {
        l.starts_with("wrote ")
            || l.starts_with("read ")
            || l.starts_with("write failed")
            || l.starts_with("read failed")
    });
    for (i, op) in ops.iter().enumerate() {
        let want = match op {
            Op::Write { block, blocks, .. } => {
                format!("wrote {0}/{0} bytes at offset {1}", blocks * BS, block * BS)
            }
            Op::Flush { marker } => format!("read 512/512 bytes at offset {marker}"),
            Op::Sleep(_) => continue,
        };
        match lines.next() {
            Some(l) if l == want => {}
            _ => return i,
        }
    }
    ops.len()
}

/// Checks the device image against the model: every 4 KiB block is
/// uniform and one of its allowed values. Returns the observed values.
fn check_image(img: &[u8], allowed: &[BTreeSet<u8>], what: &str) -> Vec<u8> {
    assert_eq!(img.len() as u64, ORIGIN_BYTES, "{what}: image size");
    let mut seen = Vec::with_capacity(allowed.len());
    for (b, chunk) in img.chunks(BS as usize).enumerate() {
        let v = chunk[0];
        if let Some(i) = chunk.iter().position(|&x| x != v) {
            panic!(
                "{what}: block {b} is torn: byte 0 is 0x{v:02x}, byte {i} is 0x{:02x}",
                chunk[i]
            );
        }
        assert!(
            allowed[b].contains(&v),
            "{what}: block {b} reads 0x{v:02x}, allowed {:02x?}",
            allowed[b]
        );
        seen.push(v);
    }
    seen
}

/// Test 5: SIGKILL at random moments of a qemu-io workload (writes,
/// flushes); after each restart with the saved config every write that
/// completed before the last completed flush reads back, and every block
/// reads as a version written to it.
#[test]
fn writecache_sigkill_during_workload_keeps_flushed_writes() {
    sigkill_during_workload(Kind::Pmem, 5, Duration::from_secs(120));
}

/// [`writecache_sigkill_during_workload_keeps_flushed_writes`] in ssd mode
/// (a uring cache file; metadata committed by dirty regions).
#[test]
fn writecache_ssd_sigkill_during_workload_keeps_flushed_writes() {
    sigkill_during_workload(Kind::Ssd, 3, Duration::from_secs(60));
}

/// Up to `rounds` kill/restart rounds, no new round after `bound`.
fn sigkill_during_workload(kind: Kind, rounds: u64, bound: Duration) {
    require_spdk_rpc!();
    require_clients!("qemu-io", "nbdcopy");
    let seed = std::env::var("WC_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("WC_KILL_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let tag = format!("wckill{}", kind.mode());
    let data = DataDir::new(&format!("{tag}-data"));
    // A small cache (about 1000 blocks) with low watermarks, so writeback
    // runs during the workload and across restarts.
    let t = stack_of(
        kind,
        &tag,
        &data,
        "4",
        &["--high-watermark", "20", "--low-watermark", "10"],
    );
    let sock = data.path("nbd.sock");
    let uri = nbd_export(&t, &sock, "wc0", "wc0");
    let cfg = data.path("config.json");
    std::fs::write(&cfg, t.rpc_ok(&["save_config"])).expect("save config");
    let cfg = cfg.to_str().expect("utf-8").to_string();
    let nblocks = ORIGIN_BYTES / BS;
    let mut state = vec![0u8; nblocks as usize];
    let mut t = Some(t);
    let started = Instant::now();
    for round in 0..rounds {
        let tgt = t.take().expect("a running target");
        // Half of the rounds rely on flushes alone (no autocommit).
        if round % 2 == 1 {
            ok(
                &tgt,
                &[
                    "bdev_writecache_set_options",
                    "wc0",
                    "--autocommit-blocks",
                    "1000000",
                    "--autocommit-time-ms",
                    "600000",
                ],
            );
        }
        let mut ops = Vec::new();
        let mut flushes = 0;
        for i in 0..200u64 {
            if rng.below(5) == 0 {
                flushes += 1;
                ops.push(Op::Flush {
                    marker: flushes * 512,
                });
            } else {
                let blocks = 1 + rng.below(16);
                ops.push(Op::Write {
                    pat: (1 + (round * 200 + i) % 255) as u8,
                    block: rng.below(nblocks - blocks),
                    blocks,
                });
            }
            ops.push(Op::Sleep(rng.below(20)));
        }
        let kill_after = Duration::from_millis(100 + rng.below(1900));
        let mut bg = Background::spawn(&uri, &op_cmds(&ops), data.path("workload.out"));
        thread::sleep(kill_after);
        let mut tgt = tgt;
        signal(tgt.pid(), libc::SIGKILL);
        tgt.wait_exit(EXIT_TIMEOUT);
        drop(tgt);
        let (_, out) = bg.wait(CLIENT_TIMEOUT);
        let done = completed_prefix(&ops, &out);
        let last_flush = ops[..done]
            .iter()
            .rposition(|o| matches!(o, Op::Flush { .. }));
        // Allowed values: the newest write completed before the last
        // completed flush (or the previous state), plus anything written
        // after it, the one write in flight at the kill included.
        let mut durable = state.clone();
        let mut allowed: Vec<BTreeSet<u8>> = Vec::new();
        if let Some(f) = last_flush {
            for op in &ops[..f] {
                if let Op::Write { pat, block, blocks } = op {
                    for b in *block..block + blocks {
                        durable[b as usize] = *pat;
                    }
                }
            }
        }
        for &v in &durable {
            allowed.push(BTreeSet::from([v]));
        }
        let from = last_flush.map_or(0, |f| f + 1);
        for op in &ops[from..(done + 1).min(ops.len())] {
            if let Op::Write { pat, block, blocks } = op {
                for b in *block..block + blocks {
                    allowed[b as usize].insert(*pat);
                }
            }
        }
        let writes_done = ops[..done]
            .iter()
            .filter(|o| matches!(o, Op::Write { .. }))
            .count();
        println!(
            "round {round}: killed after {kill_after:?}: {writes_done} writes completed, \
             last completed flush at op {last_flush:?}"
        );

        let dir = Target::new_dir(&format!("{tag}{round}"));
        let mut nt = Target::spawn_in(dir, &["--json", &cfg]);
        nt.wait_ready();
        let img = dump(&nt, &uri, &data.path("dump.img"));
        state = check_image(
            &img,
            &allowed,
            &format!("round {round} (WC_KILL_SEED={seed}, killed after {kill_after:?})"),
        );
        let s = stats(&nt, "wc0");
        assert_eq!(s["error"], 0, "{s}");
        assert_eq!(driver(&nt, "wc0")["mode"], kind.mode());
        t = Some(nt);
        if started.elapsed() > bound {
            println!("stopping after {} rounds (time bound)", round + 1);
            break;
        }
    }
    t.take().expect("target").stop();
}

/// Test 5 (clean stop): writes completed without any flush (nothing even
/// autocommitted) survive SIGTERM and a restart with the saved config.
#[test]
fn writecache_sigterm_keeps_every_completed_write() {
    sigterm_keeps_every_completed_write(Kind::Pmem);
}

/// [`writecache_sigterm_keeps_every_completed_write`] in ssd mode: the
/// clean stop commits the metadata kept in RAM; `save_config` keeps
/// `mode: "ssd"` and the restart re-attaches in ssd mode.
#[test]
fn writecache_ssd_sigterm_and_save_config_keep_every_completed_write() {
    sigterm_keeps_every_completed_write(Kind::Ssd);
}

fn sigterm_keeps_every_completed_write(kind: Kind) {
    require_spdk_rpc!();
    require_clients!("qemu-io", "nbdcopy");
    let tag = format!("wcterm{}", kind.mode());
    let data = DataDir::new(&format!("{tag}-data"));
    let t = stack_of(
        kind,
        &tag,
        &data,
        "16",
        &[
            "--autocommit-blocks",
            "1000000",
            "--autocommit-time-ms",
            "600000",
        ],
    );
    let sock = data.path("nbd.sock");
    let uri = nbd_export(&t, &sock, "wc0", "wc0");
    let cfg = data.path("config.json");
    std::fs::write(&cfg, t.rpc_ok(&["save_config"])).expect("save config");
    let entry = bdev_config(&t)
        .into_iter()
        .find(|e| e["method"] == "bdev_writecache_create")
        .expect("save_config has bdev_writecache_create");
    // pmem is the default: saved only when it was given.
    let saved_mode = &entry["params"]["mode"];
    assert!(
        saved_mode == kind.mode() || (kind == Kind::Pmem && saved_mode.is_null()),
        "{entry}"
    );
    ok(&t, &["bdev_writecache_clear_stats", "wc0"]);

    let regions = [
        (0x71, 0, 64 * KIB),
        (0x72, 5 * MIB, 4 * KIB),
        (0x73, 20 * MIB, 512 * KIB),
        (0x74, 32 * KIB, 8 * KIB), // overwrites part of the first
    ];
    let expected_blocks: u64 = regions.iter().map(|r| r.2 / BS).sum();
    // qemu-io flushes when it closes the export: keep it connected (sleep)
    // and kill it once the writes are done, so no FLUSH ever arrives.
    let mut c = writes(&regions, false);
    c.push("sleep 60000".into());
    let mut bg = Background::spawn(&uri, &c, data.path("writes.out"));
    wait_until(Duration::from_secs(30), "the writes to complete", || {
        stat(&t, "wc0", "write_blocks") >= expected_blocks
    });
    thread::sleep(Duration::from_millis(200));
    assert!(bg.running(), "qemu-io still connected");
    let _ = bg.child.kill();
    let _ = bg.wait(Duration::from_secs(10));
    let s = stats(&t, "wc0");
    assert_eq!(s["flushes"], 0, "no flush reached the cache: {s}");
    assert_eq!(s["commits"], 0, "nothing committed before the stop: {s}");
    assert!(s["dirty_uncommitted"].as_u64() > Some(0), "{s}");
    t.stop();

    let mut nt = Target::spawn_in(
        Target::new_dir(&format!("{tag}2")),
        &["--json", cfg.to_str().expect("utf-8")],
    );
    nt.wait_ready();
    let img = dump(&nt, &uri, &data.path("dump.img"));
    let mut allowed = vec![BTreeSet::from([0u8]); (ORIGIN_BYTES / BS) as usize];
    for &(p, off, len) in &regions {
        for b in off / BS..(off + len) / BS {
            allowed[b as usize] = BTreeSet::from([p]);
        }
    }
    check_image(&img, &allowed, "after SIGTERM and restart");
    let d = driver(&nt, "wc0");
    assert_eq!(d["formatted_on_create"], false, "{d}");
    assert_eq!(d["mode"], kind.mode(), "{d}");
    nt.stop();
}

/// The fault scenario up to the error state: origin `EE_Origin0` over a
/// uring file, `wc0` over it and a pmem cache, data written and flushed
/// through NBD, then persistent origin write failures and writeback forced
/// (watermarks 0) until the cache is in its error state.
struct Faulted {
    t: Target,
    uri: String,
    sock: PathBuf,
    regions: [(u8, u64, u64); 3],
    /// Blocks cached.
    n: u64,
}

fn faulted(tag: &str, data: &DataDir) -> Faulted {
    let t = Target::start(tag, &[]);
    uring_origin(&t, data, "origin.img", "Origin0", BS);
    assert_eq!(t.rpc_ok(&["bdev_error_create", "Origin0"]).trim(), "true");
    pmem_cache(&t, data, "cache.img", "Cache0", "16");
    assert_eq!(
        ok(
            &t,
            &[
                "bdev_writecache_create",
                "wc0",
                "-o",
                "EE_Origin0",
                "-c",
                "Cache0"
            ]
        ),
        "wc0"
    );
    let sock = data.path("nbd.sock");
    let uri = nbd_export(&t, &sock, "wc0", "wc0");
    let regions = [
        (0x81, 0, 256 * KIB),
        (0x82, 3 * MIB, 64 * KIB),
        (0x83, 17 * MIB, 4 * KIB),
    ];
    qio_ok(&t, &uri, &writes(&regions, true));
    let n: u64 = regions.iter().map(|r| r.2 / BS).sum();
    assert_eq!(stat(&t, "wc0", "dirty"), n);

    // Persistent write failures on the origin, then force writeback.
    t.rpc_ok(&[
        "bdev_error_inject_error",
        "EE_Origin0",
        "write",
        "failure",
        "-n",
        "1000000000",
    ]);
    assert_eq!(
        ok(
            &t,
            &[
                "bdev_writecache_set_options",
                "wc0",
                "--high-watermark",
                "0",
                "--low-watermark",
                "0"
            ]
        ),
        "true"
    );
    wait_until(Duration::from_secs(20), "the error state", || {
        stat(&t, "wc0", "error") != 0
    });
    Faulted {
        t,
        uri,
        sock,
        regions,
        n,
    }
}

/// Test 6: origin = `EE_<uring>`; persistent origin write failures during
/// writeback retry, then put the cache in its error state (stats and
/// bdev_get_bdevs); writes and flush fail, reads still return the data;
/// after delete, clearing the fault and re-creating from the same devices
/// the data writes back.
#[test]
fn writecache_origin_faults_end_to_end() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let data = DataDir::new("wcfault-data");
    let Faulted {
        t,
        uri,
        sock,
        regions,
        n,
    } = faulted("wcfault", &data);
    let origin = data.path("origin.img");
    let s = stats(&t, "wc0");
    assert!(s["error"].as_i64().is_some_and(|e| e != 0), "{s}");
    assert!(
        s["writeback_retries"].as_u64() >= Some(1),
        "retried first: {s}"
    );
    assert_eq!(s["dirty"], n, "nothing cached is dropped: {s}");
    let d = driver(&t, "wc0");
    assert!(d["error"].as_i64().is_some_and(|e| e != 0), "{d}");
    assert!(
        !file_holds(&origin, regions[0]),
        "nothing reached the origin"
    );

    // Writes and flushes fail; reads still return the data.
    let out = qio(&uri, &cmds(&["write -P 0x99 8M 4k"]));
    assert!(
        out.code != 0 || out.all().contains("failed"),
        "a write to a cache in the error state must fail: {out:?}"
    );
    expect_err(&t, &["bdev_writecache_flush", "wc0"], -5, &["wc0", "error"]);
    assert_eq!(
        stat(&t, "wc0", "dirty"),
        n,
        "a refused flush changes nothing"
    );
    qio_ok(&t, &uri, &reads(&regions));

    // Delete without flush: the cached data stays on the cache device.
    // (What the delete replies is checked by
    // writecache_delete_in_the_error_state_replies_true.)
    let _ = wc(&t, &["bdev_writecache_delete", "wc0"]);
    assert!(!exists(&t, "wc0"));
    assert_eq!(bdev(&t, "EE_Origin0")["claimed"], false);
    assert_eq!(bdev(&t, "Cache0")["claimed"], false);
    assert!(
        !file_holds(&origin, regions[0]),
        "nothing reached the origin"
    );
    t.rpc_ok(&["bdev_error_inject_error", "EE_Origin0", "clear", "failure"]);

    // Re-created from the same devices: recovered, then written back.
    assert_eq!(
        ok(
            &t,
            &[
                "bdev_writecache_create",
                "wc0",
                "-o",
                "EE_Origin0",
                "-c",
                "Cache0"
            ]
        ),
        "wc0"
    );
    let d = driver(&t, "wc0");
    assert_eq!(
        d["formatted_on_create"], false,
        "recovered, not formatted: {d}"
    );
    assert_eq!(d["error"], 0, "{d}");
    assert_eq!(d["dirty"], n, "every cached block recovered: {d}");
    assert_eq!(ok(&t, &["bdev_writecache_flush", "wc0"]), "true");
    let s = stats(&t, "wc0");
    assert_eq!(s["dirty"], 0, "{s}");
    assert_eq!(s["error"], 0, "{s}");
    assert_file_holds(&origin, &regions);
    let uri = nbd_export(&t, &sock, "wc0", "wc0b");
    qio_ok(&t, &uri, &reads(&regions));
    assert_eq!(ok(&t, &["bdev_writecache_delete", "wc0"]), "true");
    assert_file_holds(&origin, &regions);
    t.stop();
}

/// Test 6 (the delete's reply): deleting an instance in the error state
/// (no flush) removes it and says so — not an error reply for an
/// operation that was carried out.
#[test]
fn writecache_delete_in_the_error_state_replies_true() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let data = DataDir::new("wcfdel-data");
    let f = faulted("wcfdel", &data);
    let out = wc(&f.t, &["bdev_writecache_delete", "wc0"]);
    let gone = !exists(&f.t, "wc0");
    assert!(
        out.code == 0 && out.stdout.trim() == "true",
        "delete in the error state (instance removed: {gone}): {out:?}"
    );
    assert!(gone);
    f.t.stop();
}

/// Stats carry the instance state and the latency percentiles of §3.10.
#[test]
fn writecache_stats_report_state_and_latency() {
    stats_report_state_and_latency(Kind::Pmem);
}

/// [`writecache_stats_report_state_and_latency`] in ssd mode, with every
/// field of §3.10 present.
#[test]
fn writecache_ssd_stats_report_state_and_latency() {
    stats_report_state_and_latency(Kind::Ssd);
}

fn stats_report_state_and_latency(kind: Kind) {
    require_spdk_rpc!();
    let tag = format!("wcstat{}", kind.mode());
    let data = DataDir::new(&format!("{tag}-data"));
    let t = stack_of(kind, &tag, &data, "8", &[]);
    let s = stats(&t, "wc0");
    for f in STAT_FIELDS {
        assert!(s[f].is_u64() || s[f].is_i64(), "stats lack {f}: {s}");
    }
    assert_eq!(s["free_blocks"], s["blocks"], "{s}");
    assert!(s["state"].is_string(), "stats lack state: {s}");
    assert_ne!(s["state"], "pending", "{s}");
    assert!(
        s.as_object()
            .expect("object")
            .keys()
            .any(|k| k.contains("latency")),
        "stats lack latency percentiles: {s}"
    );
    t.stop();
}

/// ssd mode, delete without and with a drain, and the base bdevs under
/// it: deleting the cache or the origin bdev while the writecache holds
/// them is refused (EBUSY, naming the claim), nothing changes; delete
/// without a drain leaves the data committed on the cache file (nothing
/// reaches the origin), the cache bdev can then go and come back, and a
/// re-create over the same files recovers it; with `--flush`, the origin
/// alone holds every write afterwards.
#[test]
fn writecache_ssd_delete_with_and_without_drain() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let data = DataDir::new("wcdelssd-data");
    let t = stack_of(
        Kind::Ssd,
        "wcdelssd",
        &data,
        "16",
        &["--high-watermark", "100", "--low-watermark", "90"],
    );
    let origin = data.path("origin.img");
    let sock = data.path("nbd.sock");
    let uri = nbd_export(&t, &sock, "wc0", "wc0");
    let regions = [
        (0x91, 0, 64 * KIB),
        (0x92, 7 * MIB, 4 * KIB),
        (0x93, 30 * MIB, 256 * KIB),
    ];
    qio_ok(&t, &uri, &writes(&regions, true));
    let n: u64 = regions.iter().map(|r| r.2 / BS).sum();
    assert_eq!(stat(&t, "wc0", "dirty"), n);

    for base in ["Cache0", "Origin0"] {
        expect_err(
            &t,
            &["bdev_uring_delete", base],
            -16,
            &[base, "claimed", "writecache"],
        );
    }
    qio_ok(&t, &uri, &reads(&regions));
    assert_eq!(stat(&t, "wc0", "dirty"), n);

    assert_eq!(ok(&t, &["bdev_writecache_delete", "wc0"]), "true");
    assert!(!exists(&t, "wc0"));
    assert_eq!(bdev(&t, "Cache0")["claimed"], false);
    assert!(
        !file_holds(&origin, regions[0]),
        "no drain: origin untouched"
    );
    // The cache bdev goes away and comes back over the same file.
    ok(&t, &["bdev_uring_delete", "Cache0"]);
    assert!(!exists(&t, "Cache0"));
    cache_bdev(Kind::Ssd, &t, &data, "cache.img", "Cache0", "16");

    let create = [
        "bdev_writecache_create",
        "wc0",
        "-o",
        "Origin0",
        "-c",
        "Cache0",
        "--mode",
        "ssd",
        "--high-watermark",
        "100",
        "--low-watermark",
        "90",
    ];
    assert_eq!(ok(&t, &create), "wc0");
    let d = driver(&t, "wc0");
    assert_eq!(d["formatted_on_create"], false, "recovered: {d}");
    assert_eq!(
        (d["mode"].clone(), d["dirty"].clone()),
        (json!("ssd"), json!(n)),
        "{d}"
    );
    let uri = nbd_export(&t, &sock, "wc0", "wc0b");
    qio_ok(&t, &uri, &reads(&regions));

    assert_eq!(
        ok(&t, &["bdev_writecache_delete", "wc0", "--flush"]),
        "true"
    );
    assert!(!exists(&t, "wc0"));
    assert_file_holds(&origin, &regions);
    t.stop();
}

/// ssd mode, a cache-bdev error (an `error` bdev over the uring cache
/// file): writes fail and the instance enters its error state (stats and
/// bdev_get_bdevs), flush is refused, reads still return the cached data;
/// after delete, clearing the fault and re-creating, nothing was lost and
/// it writes back.
#[test]
fn writecache_ssd_cache_bdev_error_enters_the_error_state() {
    require_spdk_rpc!();
    require_clients!("qemu-io");
    let data = DataDir::new("wccerr-data");
    let t = Target::start("wccerr", &[]);
    uring_origin(&t, &data, "origin.img", "Origin0", BS);
    cache_bdev(Kind::Ssd, &t, &data, "cache.img", "Cache0", "16");
    assert_eq!(t.rpc_ok(&["bdev_error_create", "Cache0"]).trim(), "true");
    let create = [
        "bdev_writecache_create",
        "wc0",
        "-o",
        "Origin0",
        "-c",
        "EE_Cache0",
        "--mode",
        "ssd",
        "--high-watermark",
        "100",
        "--low-watermark",
        "90",
    ];
    assert_eq!(ok(&t, &create), "wc0");
    let origin = data.path("origin.img");
    let sock = data.path("nbd.sock");
    let uri = nbd_export(&t, &sock, "wc0", "wc0");
    let regions = [(0xA1, 0, 32 * KIB), (0xA2, 9 * MIB, 8 * KIB)];
    qio_ok(&t, &uri, &writes(&regions, true));
    let n: u64 = regions.iter().map(|r| r.2 / BS).sum();

    t.rpc_ok(&[
        "bdev_error_inject_error",
        "EE_Cache0",
        "write",
        "failure",
        "-n",
        "1000000000",
    ]);
    let out = qio(&uri, &cmds(&["write -P 0x99 12M 4k"]));
    assert!(
        out.code != 0 || out.all().contains("failed"),
        "a write the cache bdev fails must fail: {out:?}"
    );
    let s = stats(&t, "wc0");
    assert_eq!(s["error"], libc::EIO, "{s}");
    assert_eq!(s["dirty"], n, "nothing cached is dropped: {s}");
    assert_eq!(driver(&t, "wc0")["error"], libc::EIO);
    expect_err(&t, &["bdev_writecache_flush", "wc0"], -5, &["wc0", "error"]);
    qio_ok(&t, &uri, &reads(&regions));

    let _ = wc(&t, &["bdev_writecache_delete", "wc0"]);
    assert!(!exists(&t, "wc0"));
    t.rpc_ok(&["bdev_error_inject_error", "EE_Cache0", "clear", "failure"]);
    assert_eq!(ok(&t, &create), "wc0");
    let d = driver(&t, "wc0");
    assert_eq!(
        (d["error"].clone(), d["dirty"].clone()),
        (json!(0), json!(n)),
        "{d}"
    );
    assert_eq!(ok(&t, &["bdev_writecache_flush", "wc0"]), "true");
    assert_file_holds(&origin, &regions);
    assert_eq!(ok(&t, &["bdev_writecache_delete", "wc0"]), "true");
    t.stop();
}
