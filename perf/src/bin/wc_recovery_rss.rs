//! Benchmark: the RAM a `writecache_tgt` process keeps per cache block once
//! `bdev_writecache_create` has recovered a full pmem cache, and its peak
//! during the recovery, as the process sees it (`/proc/PID/status`).
//!
//! For each size it writes a cache image (superblock and entries only; the
//! data area stays a hole) with about 45 % of the blocks committed, 3 %
//! superseded by a newer committed copy and 2 % written but uncommitted,
//! starts `writecache_tgt` (`$WRITECACHE_TGT`, else next to this binary),
//! creates the origin (null) and the cache (pmem) bdevs, then times
//! `bdev_writecache_create` while sampling the target's `RssAnon`:
//!
//! * steady: `RssAnon` growth once the call returned, per cache block;
//! * create: the call's wall time, and the target's CPU time during it
//!   (user + system, all threads: the figure that holds on a loaded
//!   machine; `--check-time` bounds it);
//! * peak: the highest `RssAnon` during the call (from `VmHWM`, reset just
//!   before it through `/proc/PID/clear_refs`, less the file and shared
//!   pages, which do not change during the call; the 1 ms samples are a
//!   lower bound shown beside it).
//!
//! Usage: `wc_recovery_rss [--check-steady B] [--check-peak B]
//! [--check-time S] [--dir DIR] [--empty] [BLOCKS...]` (blocks in Mi,
//! default 1 4 16; the image lives in DIR, default /dev/shm; `--empty`
//! measures the format of a blank cache instead). With a `--check-*`
//! bound it exits 1 when a size exceeds it (the integration test runs it
//! that way).

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wc_rpc::client::Client;
use wc_writecache_format::{Entry, Geometry, Superblock, ENTRY_SIZE, SECTOR_SIZE};

const BLOCK_SIZE: u32 = 512;

/// splitmix64 of `x`: the deterministic pattern of the image.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What block `b` of `n` holds: committed winners have sequence `n + b`,
/// their superseded copies `b`, uncommitted blocks `2n + 1 + b`.
fn entry_for(b: u64, n: u64, spb: u64) -> Entry {
    let winner = |t: u64| mix(t) % 1000 < 450;
    let h = mix(b) % 1000;
    let (lba, seq) = if h < 450 {
        (b, n + b)
    } else if h < 480 {
        let t = mix(b ^ 0x5555) % n;
        if !winner(t) || t == b {
            return Entry::UNUSED;
        }
        (t, b.min(n - 1))
    } else if h < 500 {
        (b, 2 * n + 1 + b)
    } else {
        return Entry::UNUSED;
    };
    Entry {
        original_sector: lba * spb,
        seq_count: seq,
    }
}

/// Writes a cache image of `n` blocks to `path` (`empty`: no superblock,
/// so the create formats it); returns its size.
fn write_image(path: &Path, n: u64, empty: bool) -> std::io::Result<u64> {
    let bs = u64::from(BLOCK_SIZE);
    let meta = (64 + ENTRY_SIZE as u64 * n).div_ceil(bs) * bs;
    let size = meta + n * bs;
    let geo = Geometry::compute(size, 0, BLOCK_SIZE).map_err(std::io::Error::other)?;
    assert_eq!(geo.n_blocks(), n, "image geometry");
    let f = File::create(path)?;
    f.set_len(size)?;
    if empty {
        return Ok(size);
    }
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let sb = Superblock {
        block_size: BLOCK_SIZE,
        n_blocks: n,
        seq_count: 2 * n + 1,
    };
    w.write_all(&sb.encode())?;
    w.seek(SeekFrom::Start(geo.entry_offset(0)))?;
    let spb = bs / SECTOR_SIZE;
    for b in 0..n {
        w.write_all(&entry_for(b, n, spb).encode())?;
    }
    w.flush()?;
    Ok(size)
}

/// `field` of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system, all threads) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (which may hold spaces) come the state
    // (field 3) ... utime and stime (fields 14 and 15).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn tgt_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WRITECACHE_TGT") {
        return PathBuf::from(p);
    }
    let me = std::env::current_exe().expect("own path");
    me.with_file_name("writecache_tgt")
}

struct Target {
    child: Child,
    sock: PathBuf,
}

impl Target {
    fn start(dir: &Path) -> Target {
        let sock = dir.join(format!("wc-rss-{}.sock", std::process::id()));
        let child = Command::new(tgt_binary())
            .args([
                "--interrupt-mode",
                "--no-pin",
                "-m",
                "0x1",
                "--log-level=ERROR",
                "-r",
            ])
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tgt_binary().display()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = Client::connect(&sock) {
                if c.call("framework_wait_init", None).is_ok() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "writecache_tgt did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Target { child, sock }
    }

    fn call(&self, method: &str, params: Value) -> Value {
        let mut c = Client::connect(&self.sock).expect("connect");
        c.set_timeout(Some(Duration::from_secs(600)))
            .expect("timeout");
        c.call(method, Some(params))
            .unwrap_or_else(|e| panic!("{method}: {e:?}"))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
        let mut lock = self.sock.clone().into_os_string();
        lock.push(".lock");
        let _ = std::fs::remove_file(lock);
    }
}

/// Removes the cache image, also when a measurement panics.
struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Figures {
    blocks: u64,
    steady: f64,
    peak: f64,
    sampled_peak: f64,
    recovery: Duration,
    recovery_cpu: Duration,
    committed: u64,
    instance: f64,
}

fn measure(dir: &Path, mi: u64, empty: bool) -> Figures {
    let n = mi << 20;
    let image = Image(dir.join(format!("wc-rss-{}-{mi}.pmem", std::process::id())));
    write_image(&image.0, n, empty).expect("write cache image");
    let t = Target::start(dir);
    let pid = t.child.id();
    t.call(
        "bdev_null_create",
        json!({"name": "RssOrigin", "num_blocks": n, "block_size": BLOCK_SIZE}),
    );
    t.call(
        "bdev_pmem_create",
        json!({"name": "RssCache", "filename": image.0, "block_size": BLOCK_SIZE}),
    );
    // The image is mapped (and populated) by now: file and shared pages do
    // not change during the create, so the peak of RssAnon is VmHWM less
    // them.
    std::thread::sleep(Duration::from_millis(100));
    let before = status_kib(pid, "RssAnon:");
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let stop = Arc::new(AtomicBool::new(false));
    let sampled = Arc::new(AtomicU64::new(before));
    let sampler = {
        let (stop, sampled) = (stop.clone(), sampled.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                sampled.fetch_max(status_kib(pid, "RssAnon:"), Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let (t0, cpu0) = (Instant::now(), cpu_time(pid));
    t.call(
        "bdev_writecache_create",
        json!({"name": "RssWC", "base_bdev": "RssOrigin", "cache_bdev": "RssCache",
               "block_size": BLOCK_SIZE}),
    );
    let recovery = t0.elapsed();
    let recovery_cpu = cpu_time(pid).saturating_sub(cpu0);
    let after = status_kib(pid, "RssAnon:");
    stop.store(true, Ordering::Release);
    let _ = sampler.join();
    let hwm = status_kib(pid, "VmHWM:");
    let not_anon = status_kib(pid, "RssFile:") + status_kib(pid, "RssShmem:");
    let peak_anon = hwm.saturating_sub(not_anon).max(after);
    let stats = t.call("bdev_writecache_get_stats", json!({"name": "RssWC"}));
    let s = if stats.is_array() {
        stats[0].clone()
    } else {
        stats
    };
    let per_block = |kib: u64| (kib * 1024) as f64 / n as f64;
    let f = Figures {
        blocks: n,
        steady: per_block(after.saturating_sub(before)),
        peak: per_block(peak_anon.saturating_sub(before)),
        sampled_peak: per_block(sampled.load(Ordering::Acquire).saturating_sub(before)),
        recovery,
        recovery_cpu,
        committed: s["dirty_blocks"]
            .as_u64()
            .or_else(|| s["dirty"].as_u64())
            .unwrap_or(0),
        instance: s["metadata_ram_bytes"].as_u64().unwrap_or(0) as f64 / n as f64,
    };
    drop(t);
    drop(image);
    f
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut sizes: Vec<u64> = Vec::new();
    let (mut max_steady, mut max_peak, mut max_time) = (None, None, None);
    let mut dir = PathBuf::from("/dev/shm");
    let mut empty = false;
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> f64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{what} needs a number"))
        };
        match a.as_str() {
            "--check-steady" => max_steady = Some(num("--check-steady")),
            "--check-peak" => max_peak = Some(num("--check-peak")),
            "--check-time" => max_time = Some(num("--check-time")),
            "--empty" => empty = true,
            "--dir" => dir = PathBuf::from(args.next().expect("--dir needs a path")),
            s => sizes.push(s.parse().unwrap_or_else(|_| panic!("bad size {s}"))),
        }
    }
    if sizes.is_empty() {
        sizes = vec![1, 4, 16];
    }
    let mut failed = false;
    println!(
        "{:>9} {:>10} {:>12} {:>11} {:>14} {:>10} {:>9} {:>14}",
        "blocks",
        "committed",
        "steady B/blk",
        "peak B/blk",
        "sampled B/blk",
        "create",
        "cpu",
        "instance B/blk"
    );
    for mi in sizes {
        let f = measure(&dir, mi, empty);
        println!(
            "{:>8}Mi {:>10} {:>12.1} {:>11.1} {:>14.1} {:>9.3}s {:>8.2}s {:>14.1}",
            f.blocks >> 20,
            f.committed,
            f.steady,
            f.peak,
            f.sampled_peak,
            f.recovery.as_secs_f64(),
            f.recovery_cpu.as_secs_f64(),
            f.instance
        );
        if max_steady.is_some_and(|m| f.steady > m)
            || max_peak.is_some_and(|m| f.peak > m)
            || max_time.is_some_and(|m| f.recovery_cpu.as_secs_f64() > m)
        {
            println!("FAIL: {mi} Mi blocks exceed a bound");
            failed = true;
        }
    }
    std::process::exit(i32::from(failed));
}
