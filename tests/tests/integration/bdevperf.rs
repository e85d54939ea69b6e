//! `bdevperf` (crate `wc-perf`) run as a real process: `-w verify` on
//! malloc and on a writecache (pmem file over a uring file), `-C` jobs and
//! totals, the `-S` periodic output, usage errors, and `perform_tests`
//! with overrides through `perf/bdevperf.py` (SPDK's client interface, on
//! SPDK's Python client) and the raw socket.
//!
//! Runs are short (≤ 1 s of I/O each) and reactors sleep when idle.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wc_rpc::client::Client;

use crate::harness::{
    run_bounded, signal, unique_dir, wait_timeout, workspace_binary, workspace_root, Out,
    EXIT_TIMEOUT,
};

/// Wall-clock bound for one bdevperf run (start-up, ≤ 1 s of I/O, shutdown).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Flags every run here gets: sleeping reactors, no pinning, quiet logs.
const BASE: [&str; 4] = ["--idle", "sleep", "--no-pin", "--log-level=ERROR"];

/// `$BDEVPERF`, else `bdevperf` next to `writecache_tgt` in
/// `<target>/<profile>/` (built once if missing).
fn bdevperf_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("BDEVPERF", "bdevperf", "wc-perf"))
        .clone()
}

/// A JSON config file in `dir` with these bdev calls.
fn config(dir: &Path, calls: Value) -> PathBuf {
    let path = dir.join("bdev.json");
    let doc = json!({"subsystems": [{"subsystem": "bdev", "config": calls}]});
    std::fs::write(&path, doc.to_string()).expect("write config");
    path
}

fn malloc(name: &str, blocks: u64) -> Value {
    json!({"method": "bdev_malloc_create",
           "params": {"name": name, "num_blocks": blocks, "block_size": 4096}})
}

/// `WC0`: a writecache whose cache is a 16 MiB pmem file over a 32 MiB
/// uring origin file, both in `dir`.
fn writecache(dir: &Path) -> Vec<Value> {
    let origin = dir.join("origin.img");
    File::create(&origin)
        .and_then(|f| f.set_len(32 << 20))
        .expect("origin file");
    vec![
        json!({"method": "bdev_uring_create",
               "params": {"name": "Origin0", "filename": origin, "block_size": 4096}}),
        json!({"method": "bdev_pmem_create",
               "params": {"name": "Cache0", "filename": dir.join("cache.pmem"), "size": 16 << 20}}),
        json!({"method": "bdev_writecache_create",
               "params": {"name": "WC0", "base_bdev": "Origin0", "cache_bdev": "Cache0"}}),
    ]
}

/// Runs bdevperf to completion.
fn bdevperf(dir: &Path, args: &[&str]) -> Out {
    let mut cmd = Command::new(bdevperf_binary());
    cmd.current_dir(dir).args(BASE).args(args);
    run_bounded(cmd, RUN_TIMEOUT)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

/// The numbers of the last ` Total` line: IOPS, MiB/s, Fail/s, TO/s, avg, min, max.
fn total_line(stdout: &str) -> Vec<f64> {
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with(" Total"))
        .unwrap_or_else(|| panic!("no Total line in {stdout}"));
    line.split(':')
        .nth(1)
        .expect("Total: ...")
        .split_whitespace()
        .map(|x| x.parse().expect("a number"))
        .collect()
}

fn results(v: &Value) -> &Vec<Value> {
    v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results in {v}"))
}

fn assert_verified(out: &Out, json: &Value, jobs: usize) {
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(results(json).len(), jobs, "{json}");
    for j in results(json) {
        assert_eq!(j["status"], "finished", "{j}");
        assert_eq!(j["workload"], "verify", "{j}");
        assert_eq!(j["miscompares"], 0, "{j}");
        assert_eq!(j["io_failed"], 0, "{j}");
        assert!(j["iops"].as_f64().unwrap_or(0.0) > 0.0, "{j}");
    }
    assert_eq!(
        out.stdout.matches("Verification LBA range").count(),
        jobs,
        "{}",
        out.stdout
    );
}

/// `-w verify` (write, read back, compare) on malloc and on writecache,
/// every unclaimed bdev at once: the cache's bases are claimed, so the jobs
/// are Malloc0 and WC0.
#[test]
fn bdevperf_verify_on_malloc_and_writecache() {
    let dir = unique_dir("bp-verify");
    let mut calls = vec![malloc("Malloc0", 4096)];
    calls.extend(writecache(&dir));
    let cfg = config(&dir, Value::Array(calls));
    let res = dir.join("res.json");
    let out = bdevperf(
        &dir,
        &[
            "--json",
            cfg.to_str().unwrap(),
            "-m",
            "0x1",
            "-q",
            "8",
            "-o",
            "4k",
            "-w",
            "verify",
            "-t",
            "1",
            "--output-json",
            res.to_str().unwrap(),
        ],
    );
    let json = read_json(&res);
    assert_verified(&out, &json, 2);
    let names: Vec<&str> = results(&json)
        .iter()
        .map(|j| j["job"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["Malloc0", "WC0"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `-C` on two reactors: one job per core per bdev, each verifying its own
/// half of the blocks (writecache from two cores at once).
#[test]
fn bdevperf_verify_every_core_on_writecache() {
    let dir = unique_dir("bp-verify-c");
    let cfg = config(&dir, Value::Array(writecache(&dir)));
    let res = dir.join("res.json");
    let out = bdevperf(
        &dir,
        &[
            "--json",
            cfg.to_str().unwrap(),
            "-m",
            "0x3",
            "-C",
            "-T",
            "WC0",
            "-q",
            "8",
            "-o",
            "4k",
            "-w",
            "verify",
            "-t",
            "1",
            "--output-json",
            res.to_str().unwrap(),
        ],
    );
    let json = read_json(&res);
    assert_verified(&out, &json, 2);
    let r = results(&json);
    assert_eq!(r[0]["core_mask"], "0x1");
    assert_eq!(r[1]["core_mask"], "0x2");
    let (s0, l0) = (
        &r[0]["verify_range"]["start"],
        &r[0]["verify_range"]["length"],
    );
    assert_eq!(s0, 0, "{json}");
    assert_eq!(r[1]["verify_range"]["start"], *l0, "{json}");
    assert_eq!(r[1]["verify_range"]["length"], *l0, "{json}");
    assert_eq!(json["core_count"], 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `-C` with two bdevs on two reactors: four jobs in SPDK's order (bdev,
/// then core); the Total line adds up the jobs' rates and weights the
/// average latency by I/Os.
#[test]
fn bdevperf_every_core_jobs_and_totals() {
    let dir = unique_dir("bp-every-core");
    let cfg = config(
        &dir,
        json!([malloc("Malloc0", 4096), malloc("Malloc1", 4096)]),
    );
    let res = dir.join("res.json");
    let out = bdevperf(
        &dir,
        &[
            "--json",
            cfg.to_str().unwrap(),
            "-m",
            "0x3",
            "-C",
            "-q",
            "4",
            "-o",
            "4k",
            "-w",
            "randwrite",
            "-t",
            "0.5",
            "--output-json",
            res.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.all());
    let json = read_json(&res);
    let r = results(&json);
    let order: Vec<(String, String)> = r
        .iter()
        .map(|j| (j["job"].to_string(), j["core_mask"].to_string()))
        .collect();
    let want: Vec<(String, String)> = [
        ("Malloc0", "0x1"),
        ("Malloc0", "0x2"),
        ("Malloc1", "0x1"),
        ("Malloc1", "0x2"),
    ]
    .iter()
    .map(|(a, b)| (format!("\"{a}\""), format!("\"{b}\"")))
    .collect();
    assert_eq!(order, want, "{json}");
    assert_eq!(json["core_count"], 2);
    let f = |j: &Value, k: &str| j[k].as_f64().unwrap_or(f64::NAN);
    let iops: f64 = r.iter().map(|j| f(j, "iops")).sum();
    let mibps: f64 = r.iter().map(|j| f(j, "mibps")).sum();
    let ios: f64 = r.iter().map(|j| f(j, "iops") * f(j, "runtime")).sum();
    let lat: f64 = r
        .iter()
        .map(|j| f(j, "avg_latency_us") * f(j, "iops") * f(j, "runtime"))
        .sum::<f64>()
        / ios;
    let min = r
        .iter()
        .map(|j| f(j, "min_latency_us"))
        .fold(f64::MAX, f64::min);
    let max = r.iter().map(|j| f(j, "max_latency_us")).fold(0.0, f64::max);
    let t = total_line(&out.stdout);
    assert!(iops > 0.0);
    assert!((t[0] - iops).abs() < 0.02, "Total IOPS {} vs {iops}", t[0]);
    assert!(
        (t[1] - mibps).abs() < 0.02,
        "Total MiB/s {} vs {mibps}",
        t[1]
    );
    assert!((t[4] - lat).abs() < 0.02, "Total avg {} vs {lat}", t[4]);
    assert!((t[5] - min).abs() < 0.006, "Total min {} vs {min}", t[5]);
    assert!((t[6] - max).abs() < 0.006, "Total max {} vs {max}", t[6]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `-S PERIOD`: the per-job table and Total every period while running,
/// then the final table; `-P 1` (moving average of one period) too.
/// Without -S: SPDK's running total line every second.
#[test]
fn bdevperf_stats_period_output() {
    let dir = unique_dir("bp-stats");
    let cfg = config(&dir, json!([malloc("Malloc0", 4096)]));
    let cfg = cfg.to_str().unwrap();
    let base = [
        "--json", cfg, "-m", "0x1", "-q", "4", "-o", "4k", "-w", "randread", "-t",
    ];
    let mut args = base.to_vec();
    args.extend(["1.1", "-S", "0.25"]);
    let out = bdevperf(&dir, &args);
    assert_eq!(out.code, 0, "{}", out.all());
    // 4 periods (0.25 .. 1.0 s) + the final table; allow a late sample to
    // be skipped on a loaded machine.
    let totals = out.stdout.matches("\n Total ").count();
    assert!(
        (3..=5).contains(&totals),
        "{totals} Total lines:\n{}",
        out.stdout
    );
    assert_eq!(
        out.stdout.matches("Device Information").count(),
        2,
        "{}",
        out.stdout
    );
    let runtimes: Vec<f64> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("\t Malloc0"))
        .map(|l| {
            l.split(':')
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(runtimes.len(), totals, "{}", out.stdout);
    assert!(runtimes.windows(2).all(|w| w[0] < w[1]), "{runtimes:?}");
    assert!(runtimes[0] >= 0.2 && runtimes[0] < 1.0, "{runtimes:?}");
    assert!(*runtimes.last().unwrap() >= 1.1, "{runtimes:?}");

    let mut args = base.to_vec();
    args.extend(["0.6", "-S", "0.2", "-P", "1"]);
    let out = bdevperf(&dir, &args);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.matches("\n Total ").count() >= 2,
        "{}",
        out.stdout
    );

    let mut args = base.to_vec();
    args.push("1.3");
    let out = bdevperf(&dir, &args);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains(" IOPS, "), "{}", out.stdout);
    assert!(out.stdout.contains(" MiB/s\r"), "{}", out.stdout);
    assert_eq!(out.stdout.matches("\n Total ").count(), 1, "{}", out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad command lines are usage errors (exit 2, the precise problem, a
/// pointer to --help); runs that cannot start exit 1 with the reason. Nothing
/// panics.
#[test]
fn bdevperf_argument_errors() {
    let dir = unique_dir("bp-args");
    let cfg = config(&dir, json!([malloc("Malloc0", 256)]));
    let cfg = cfg.to_str().unwrap();
    let usage: &[(&[&str], &str)] = &[
        (
            &["-o", "4k", "-w", "read", "-t", "1"],
            "missing required option -q",
        ),
        (&["-w", "read"], "missing required options -q, -o, -t"),
        (
            &["-q", "0", "-o", "4k", "-w", "read", "-t", "1"],
            "queue depth must be at least 1",
        ),
        (
            &["-q", "x", "-o", "4k", "-w", "read", "-t", "1"],
            "invalid value 'x' for '-q <DEPTH>'",
        ),
        (
            &["-q", "1", "-o", "4q", "-w", "read", "-t", "1"],
            "invalid IO size '4q'",
        ),
        (
            &["-q", "1", "-o", "4k", "-w", "sideways", "-t", "1"],
            "unsupported workload type 'sideways'",
        ),
        (
            &["-q", "1", "-o", "4k", "-w", "read", "-t", "0"],
            "-t must be a number of seconds above 0",
        ),
        (
            &["-q", "1", "-o", "4k", "-w", "randrw", "-t", "1"],
            "rwmixread (-M, rw_percentage) is required for randrw",
        ),
        (
            &["-q", "1", "-o", "4k", "-w", "rw", "-M", "101", "-t", "1"],
            "rwmixread (-M) 101 is out of range 0..100",
        ),
        (
            &["-q", "1", "-o", "4k", "-w", "read", "-t", "1", "-S", "-1"],
            "-S must be a number of seconds above 0",
        ),
        (
            &[
                "-q", "1", "-o", "4k", "-w", "read", "-t", "1", "-S", "0.001",
            ],
            "-S must be at least 0.01 s",
        ),
        (
            &["-q", "1", "-o", "4k", "-w", "read", "-t", "1", "-P", "2"],
            "-P (moving average period) needs -S",
        ),
        (
            &["-q", "4096", "-o", "4m", "-w", "read", "-t", "1"],
            "needs more than 8 GiB of buffers",
        ),
        (&["-z", "-q", "0"], "queue depth must be at least 1"),
        (&["--bogus"], "unexpected argument '--bogus'"),
    ];
    for (args, msg) in usage {
        let out = bdevperf(&dir, args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.all());
        assert!(
            out.stderr.contains(msg),
            "{args:?}: want '{msg}' in {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("try '--help'"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(!out.all().contains("panicked"), "{args:?}: {}", out.all());
    }
    let runtime: &[(&[&str], &str)] = &[
        (&["-o", "4k", "-T", "Nope"], "bdev 'Nope' not found"),
        (
            &["-o", "512"],
            "IO size 512 is not a multiple of the block size 4096 of bdev Malloc0",
        ),
        (
            &["-o", "2m", "-C", "-m", "0x3"],
            "bdev Malloc0 (256 blocks) is too small for 2 job(s) of IO size 2097152",
        ),
    ];
    for (extra, msg) in runtime {
        let mut args = vec!["--json", cfg, "-q", "1", "-w", "read", "-t", "0.2"];
        args.extend_from_slice(extra);
        let out = bdevperf(&dir, &args);
        assert_eq!(out.code, 1, "{args:?}: {}", out.all());
        assert!(
            out.stderr.contains(msg),
            "{args:?}: want '{msg}' in {}",
            out.stderr
        );
        assert!(!out.all().contains("panicked"), "{args:?}: {}", out.all());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `bdevperf -z` process, killed on drop.
struct Waiting {
    child: Option<Child>,
    dir: PathBuf,
    sock: PathBuf,
    log: PathBuf,
}

impl Waiting {
    fn start(tag: &str, args: &[&str]) -> Waiting {
        let dir = unique_dir(tag);
        let sock = dir.join("bp.sock");
        let log = dir.join("bdevperf.log");
        let logf = File::create(&log).expect("log");
        let cfg = config(&dir, json!([malloc("Malloc0", 4096)]));
        let child = Command::new(bdevperf_binary())
            .current_dir(&dir)
            .args(BASE)
            .args(["-z", "-r"])
            .arg(&sock)
            .arg("--json")
            .arg(&cfg)
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf)
            .spawn()
            .expect("start bdevperf -z");
        let mut w = Waiting {
            child: Some(child),
            dir,
            sock,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(st))) = w.child.as_mut().map(|c| c.try_wait()) {
                panic!("bdevperf -z exited ({st}): {}", w.log());
            }
            if let Ok(mut c) = Client::connect(&w.sock) {
                if c.call("rpc_get_methods", None).is_ok() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "bdevperf -z not ready: {}",
                w.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        w
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `python3 perf/bdevperf.py -s <sock> perform_tests <args>`.
    fn client(&self, args: &[&str]) -> Out {
        let mut cmd = Command::new("python3");
        cmd.arg(workspace_root().join("perf/bdevperf.py"))
            .arg("-s")
            .arg(&self.sock)
            .arg("perform_tests")
            .args(args);
        run_bounded(cmd, RUN_TIMEOUT)
    }

    fn client_ok(&self, args: &[&str]) -> Value {
        let out = self.client(args);
        assert_eq!(
            out.code,
            0,
            "perform_tests {args:?}: {}\n{}",
            out.all(),
            self.log()
        );
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
    }

    fn rpc(&self) -> Client {
        let c = Client::connect(&self.sock).expect("connect");
        c.set_timeout(Some(RUN_TIMEOUT)).expect("timeout");
        c
    }

    /// SIGINT, and the exit status.
    fn stop(mut self) -> i32 {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGINT);
        let st = wait_timeout(&mut child, EXIT_TIMEOUT);
        if st.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        st.and_then(|s| s.code()).unwrap_or(-1)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// (workload, queue depth, io size, percentage, runtime) of the one job.
fn job(v: &Value) -> (String, u64, u64, Option<u64>, f64) {
    let r = results(v);
    assert_eq!(r.len(), 1, "{v}");
    let j = &r[0];
    assert_eq!(j["status"], "finished", "{j}");
    (
        j["workload"].as_str().unwrap_or("").to_string(),
        j["queue_depth"].as_u64().unwrap_or(0),
        j["io_size"].as_u64().unwrap_or(0),
        j["percentage"].as_u64(),
        j["runtime"].as_f64().unwrap_or(0.0),
    )
}

/// `perform_tests` through the client with SPDK's interface: no options
/// runs the command line's settings; options override them and stick for
/// later runs, as in SPDK; a refused set changes nothing.
#[test]
fn bdevperf_perform_tests_overrides_with_the_client() {
    require_spdk_rpc!();
    let w = Waiting::start(
        "bp-perform",
        &["-q", "4", "-o", "4k", "-w", "randread", "-t", "0.3"],
    );
    let (wl, qd, size, pct, rt) = job(&w.client_ok(&[]));
    assert_eq!((wl.as_str(), qd, size, pct), ("randread", 4, 4096, None));
    assert!((0.3..1.0).contains(&rt), "{rt}");

    let v = w.client_ok(&[
        "-q", "16", "-o", "8k", "-w", "randrw", "-M", "30", "-t", "0.2",
    ]);
    let (wl, qd, size, pct, rt) = job(&v);
    assert_eq!((wl.as_str(), qd, size, pct), ("randrw", 16, 8192, Some(30)));
    assert!((0.2..0.9).contains(&rt), "{rt}");
    assert_eq!(v["core_count"], 1);

    // Sticky: nothing given, the last values again.
    let (wl, qd, size, pct, _) = job(&w.client_ok(&[]));
    assert_eq!((wl.as_str(), qd, size, pct), ("randrw", 16, 8192, Some(30)));

    // Only the workload changes.
    let (wl, qd, size, pct, _) = job(&w.client_ok(&["-w", "write"]));
    assert_eq!((wl.as_str(), qd, size, pct), ("write", 16, 8192, None));

    // Refused: an IO size the block size does not divide (-32602) ...
    let out = w.client(&["-o", "2k"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.all().contains("-32602"), "{}", out.all());
    assert!(
        out.all()
            .contains("IO size 2048 is not a multiple of the block size 4096 of bdev Malloc0"),
        "{}",
        out.all()
    );
    // ... and a zero run time (-32700) ...
    let out = w.client(&["-q", "2", "-t", "0"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.all().contains("-32700"), "{}", out.all());
    assert!(
        out.all()
            .contains("time_in_sec must be a number of seconds above 0"),
        "{}",
        out.all()
    );
    // ... and neither changed the settings.
    let (wl, qd, size, _, _) = job(&w.client_ok(&[]));
    assert_eq!((wl.as_str(), qd, size), ("write", 16, 8192));
    // The read percentage given earlier still holds for a mixed workload.
    let (wl, qd, size, pct, _) = job(&w.client_ok(&["-w", "rw"]));
    assert_eq!((wl.as_str(), qd, size, pct), ("rw", 16, 8192, Some(30)));
    assert!(
        w.log().contains("Running I/O for 0.2 seconds..."),
        "{}",
        w.log()
    );
    assert_eq!(w.stop(), 0);
}

/// `perform_tests` on the raw socket: SPDK's error codes for bad params
/// (-32700), a run while one is going on (-32603 "Operation now in
/// progress"), nothing to run (-32700 naming what is missing).
#[test]
fn bdevperf_perform_tests_errors_on_the_socket() {
    let w = Waiting::start("bp-perform-err", &[]);
    let mut c = w.rpc();
    let e = c.call("perform_tests", None).unwrap_err();
    assert_eq!(e.code, -32700, "{e:?}");
    assert_eq!(
        e.message,
        "missing required options queue_depth, io_size, workload_type, time_in_sec"
    );
    for (params, msg) in [
        (
            json!({"queue_depth": "8"}),
            "queue_depth must be an integer",
        ),
        (json!({"queue_depth": 0}), "queue depth must be at least 1"),
        (json!({"io_size": "lots"}), "invalid IO size 'lots'"),
        (
            json!({"time_in_sec": -3}),
            "time_in_sec must be a number of seconds above 0",
        ),
        (
            json!({"workload_type": 7}),
            "workload_type must be a string",
        ),
        (
            json!({"rw_percentage": 300}),
            "rw_percentage must be an integer in 0..100",
        ),
        (json!([1, 2]), "params must be an object"),
    ] {
        let e = c.call("perform_tests", Some(params.clone())).unwrap_err();
        assert_eq!(e.code, -32700, "{params}: {e:?}");
        assert!(e.message.contains(msg), "{params}: {e:?}");
    }
    // A 1 s run on one connection; a second call meanwhile is refused.
    let sock = w.sock.clone();
    let first = std::thread::spawn(move || {
        let mut c1 = Client::connect(&sock).expect("connect");
        c1.set_timeout(Some(RUN_TIMEOUT)).expect("timeout");
        c1.call(
            "perform_tests",
            Some(
                json!({"queue_depth": 2, "io_size": "4096", "time_in_sec": 1,
                        "workload_type": "randwrite"}),
            ),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !w.log().contains("Running I/O") {
        assert!(Instant::now() < deadline, "{}", w.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = c.call("perform_tests", None).unwrap_err();
    assert_eq!(e.code, -32603, "{e:?}");
    assert_eq!(e.message, "Operation now in progress");
    let v = first.join().expect("join").expect("first run");
    assert_eq!(v["results"][0]["workload"], "randwrite", "{v}");
    assert_eq!(v["results"][0]["queue_depth"], 2, "{v}");
    // The first run's values stuck: a call without params now runs them.
    let v = c
        .call("perform_tests", Some(json!({"time_in_sec": 0.2})))
        .unwrap();
    assert_eq!(v["results"][0]["workload"], "randwrite", "{v}");
    // SIGINT during a 30 s run: the run stops, its reply comes (status
    // "terminated") and bdevperf exits 0.
    let sock = w.sock.clone();
    let long = std::thread::spawn(move || {
        let mut c1 = Client::connect(&sock).expect("connect");
        c1.set_timeout(Some(RUN_TIMEOUT)).expect("timeout");
        c1.call("perform_tests", Some(json!({"time_in_sec": 30})))
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.log().matches("Running I/O").count() < 3 {
        assert!(Instant::now() < deadline, "{}", w.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    assert_eq!(w.stop(), 0);
    let v = long.join().expect("join").expect("the stopped run's reply");
    assert_eq!(v["results"][0]["status"], "terminated", "{v}");
    assert!(
        v["results"][0]["runtime"].as_f64().unwrap_or(99.0) < 20.0,
        "{v}"
    );
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

/// SIGINT during a run: SPDK's "Received shutdown signal" line, the table
/// of what ran, status "terminated", exit 0.
#[test]
fn bdevperf_sigint_stops_the_run_and_reports_it() {
    let dir = unique_dir("bp-sigint");
    let cfg = config(&dir, json!([malloc("Malloc0", 4096)]));
    let res = dir.join("res.json");
    let log = dir.join("out.log");
    let logf = File::create(&log).expect("log");
    let mut child = Command::new(bdevperf_binary())
        .current_dir(&dir)
        .args(BASE)
        .arg("--json")
        .arg(&cfg)
        .args(["-q", "4", "-o", "4k", "-w", "randread", "-t", "30"])
        .arg("--output-json")
        .arg(&res)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("dup"))
        .stderr(logf)
        .spawn()
        .expect("start bdevperf");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text().contains("Running I/O for 30 seconds") {
        assert!(Instant::now() < deadline, "{}", text());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    signal(child.id(), libc::SIGINT);
    let st = wait_timeout(&mut child, EXIT_TIMEOUT);
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let out = text();
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{out}");
    assert!(
        out.contains("Received shutdown signal, test time was about"),
        "{out}"
    );
    assert!(out.contains("\n Total "), "{out}");
    let json = read_json(&res);
    assert_eq!(json["results"][0]["status"], "terminated", "{json}");
    assert!(json["results"][0]["runtime"].as_f64().unwrap_or(99.0) < 20.0);
    let _ = std::fs::remove_dir_all(&dir);
}
