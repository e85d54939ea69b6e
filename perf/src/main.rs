//! `bdevperf`: SPDK's bdev benchmark, same flags and output. It starts the
//! same application framework as `writecache_tgt` (reactors, `--json`
//! config, RPC with `-z`), runs jobs in-process and prints SPDK's table.

mod job;
mod report;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use clap::Parser;
use serde::Deserialize;
use serde_json::{json, Value};
use wc_reactor::ReactorHandle;
use wc_rpc::{Responder, RpcError, StateMask};

use job::{JobResult, JobSpec, Workload};

/// SPDK-compatible bdev benchmark.
#[derive(Parser, Debug, Clone)]
#[command(name = "bdevperf", version, about)]
struct Cli {
    #[command(flatten)]
    app: wc_tgt::AppArgs,
    /// Queue depth per job.
    #[arg(short = 'q')]
    queue_depth: Option<u32>,
    /// I/O size in bytes (suffixes k, m accepted).
    #[arg(short = 'o')]
    io_size: Option<String>,
    /// Workload: read write randread randwrite rw randrw verify reset flush unmap write_zeroes.
    #[arg(short = 'w')]
    workload: Option<String>,
    /// Run time in seconds.
    #[arg(short = 't')]
    time: Option<f64>,
    /// Read percentage for rw/randrw.
    #[arg(short = 'M')]
    rwmixread: Option<u32>,
    /// Only this bdev (default: every unclaimed bdev).
    #[arg(short = 'T')]
    target: Option<String>,
    /// Every core drives every bdev.
    #[arg(short = 'C')]
    every_core: bool,
    /// Start idle and wait for perform_tests over RPC.
    #[arg(short = 'z')]
    wait_for_tests: bool,
    /// Continue after I/O failures.
    #[arg(short = 'f')]
    continue_on_error: bool,
    /// Print a latency summary (percentiles) per job.
    #[arg(short = 'l', action = clap::ArgAction::Count)]
    latency: u8,
    /// I/O timeout in seconds (accepted; timeouts are not enforced).
    #[arg(short = 'k')]
    timeout: Option<u64>,
    /// Write results as JSON to this file.
    #[arg(long = "output-json")]
    output_json: Option<std::path::PathBuf>,
}

/// Parameters of one run.
#[derive(Debug, Clone)]
struct RunParams {
    queue_depth: u32,
    io_size: u64,
    workload: Workload,
    read_pct: u32,
    seconds: f64,
    target: Option<String>,
    every_core: bool,
    continue_on_error: bool,
}

/// Parses `4096`, `4k`, `4K`, `128k`, `1m`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k') | Some('K') => (&t[..t.len() - 1], 1024),
        Some('m') | Some('M') => (&t[..t.len() - 1], 1024 * 1024),
        Some('g') | Some('G') => (&t[..t.len() - 1], 1024 * 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("invalid IO size '{s}'"))
}

fn params_from_cli(cli: &Cli) -> Result<RunParams, String> {
    let missing = |f: &str| {
        format!("missing required option {f} (-q, -o, -w and -t are required without -z)")
    };
    let workload_name = cli.workload.clone().ok_or_else(|| missing("-w"))?;
    let workload = Workload::parse(&workload_name)
        .ok_or_else(|| format!("unsupported workload type '{workload_name}'"))?;
    let read_pct = resolve_mix(workload, cli.rwmixread)?;
    Ok(RunParams {
        queue_depth: cli.queue_depth.ok_or_else(|| missing("-q"))?,
        io_size: parse_size(cli.io_size.as_deref().ok_or_else(|| missing("-o"))?)?,
        workload,
        read_pct,
        seconds: cli.time.ok_or_else(|| missing("-t"))?,
        target: cli.target.clone(),
        every_core: cli.every_core,
        continue_on_error: cli.continue_on_error,
    })
}

fn resolve_mix(workload: Workload, m: Option<u32>) -> Result<u32, String> {
    match (workload.mixed(), m) {
        (true, Some(m)) if m <= 100 => Ok(m),
        (true, Some(m)) => Err(format!("-M {m} is out of range 0..100")),
        (true, None) => Err("-M (rwmixread) is required for rw/randrw".into()),
        (false, Some(_)) => {
            eprintln!("Ignoring -M option: it only applies to rw and randrw");
            Ok(match workload {
                Workload::Read | Workload::RandRead => 100,
                _ => 0,
            })
        }
        (false, None) => Ok(match workload {
            Workload::Read | Workload::RandRead => 100,
            _ => 0,
        }),
    }
}

/// Builds jobs: without -C, bdevs round-robin over reactors; with -C every
/// reactor runs a job on every bdev, each on its own slice of the LBAs.
fn plan(p: &RunParams, reactors: &[ReactorHandle]) -> Result<Vec<JobSpec>, String> {
    let bdevs: Vec<Arc<wc_bdev::Bdev>> = match &p.target {
        Some(t) => vec![wc_bdev::lookup(t).ok_or_else(|| format!("bdev '{t}' not found"))?],
        None => wc_bdev::list()
            .into_iter()
            .filter(|b| b.claim_info().is_none())
            .collect(),
    };
    if bdevs.is_empty() {
        return Err("no bdevs to test (create some with --json or over RPC)".into());
    }
    if p.queue_depth == 0 {
        return Err("queue depth must be at least 1".into());
    }
    let mut jobs = Vec::new();
    let mut seed = 0x5EED_u64;
    for (bi, b) in bdevs.iter().enumerate() {
        let cores: Vec<&ReactorHandle> = if p.every_core {
            reactors.iter().collect()
        } else {
            vec![&reactors[bi % reactors.len()]]
        };
        let n = cores.len() as u64;
        let slice = b.num_blocks() / n;
        for (ci, h) in cores.into_iter().enumerate() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            jobs.push(JobSpec {
                bdev: b.name().to_string(),
                reactor: h.index(),
                core: h.core(),
                workload: p.workload,
                read_pct: p.read_pct,
                queue_depth: p.queue_depth,
                io_size: p.io_size,
                seconds: p.seconds,
                range_start: ci as u64 * slice,
                range_len: slice,
                continue_on_error: p.continue_on_error,
                seed,
            });
        }
    }
    Ok(jobs)
}

/// Runs the jobs to completion (blocking; call off-reactor).
fn run(p: &RunParams, reactors: &[ReactorHandle]) -> Result<Vec<JobResult>, String> {
    let main = reactors.first().ok_or("no reactors")?.clone();
    let (ptx, prx) = mpsc::channel();
    let p2 = p.clone();
    let handles = reactors.to_vec();
    main.send(move || {
        let _ = ptx.send(plan(&p2, &handles));
    });
    let jobs = prx.recv().map_err(|_| "reactor stopped")??;
    println!("Running I/O for {} seconds...", p.seconds);
    let (tx, rx) = mpsc::channel();
    for spec in jobs.iter().cloned() {
        let tx = tx.clone();
        reactors[spec.reactor].send(move || job::start(spec, tx));
    }
    drop(tx);
    let mut results: Vec<JobResult> = rx.iter().take(jobs.len()).collect();
    results.sort_by_key(|r| (r.spec.reactor, r.spec.bdev.clone()));
    Ok(results)
}

static RUNNING: AtomicBool = AtomicBool::new(false);

#[derive(Deserialize)]
struct PerformTests {
    queue_depth: Option<u32>,
    io_size: Option<String>,
    time_in_sec: Option<f64>,
    workload_type: Option<String>,
    rw_percentage: Option<u32>,
}

fn register_perform_tests(
    reg: &wc_rpc::Registry,
    base: Option<RunParams>,
    cli: Cli,
) -> Result<(), String> {
    reg.register_fn(
        "perform_tests",
        StateMask::RUNTIME,
        move |params, r: Responder| {
            // Relaxed decode (unknown keys ignored), -32700 on bad params, as SPDK's bdevperf.
            let p: PerformTests = match serde_json::from_value(params.unwrap_or(json!({}))) {
                Ok(p) => p,
                Err(e) => {
                    return r.err(RpcError::new(
                        wc_rpc::PARSE_ERROR,
                        format!("Invalid parameters: {e}"),
                    ))
                }
            };
            let mut run_params = match build_rpc_params(&p, base.clone(), &cli) {
                Ok(rp) => rp,
                Err(e) => return r.err(RpcError::new(wc_rpc::PARSE_ERROR, e)),
            };
            if RUNNING.swap(true, Ordering::AcqRel) {
                return r.err(RpcError::internal("Operation now in progress"));
            }
            run_params.continue_on_error = cli.continue_on_error;
            let Some(me) = wc_reactor::try_current() else {
                RUNNING.store(false, Ordering::Release);
                return r.err(RpcError::internal("not on a reactor"));
            };
            let reactors = me.siblings();
            let latency = cli.latency;
            std::thread::spawn(move || {
                let res = run(&run_params, &reactors);
                RUNNING.store(false, Ordering::Release);
                match res {
                    Ok(results) => {
                        report::print_table(&results, latency);
                        r.ok(report::results_json(&results, reactors.len()));
                    }
                    Err(e) => r.err(RpcError::internal(format!(
                        "bdevperf failed with error {e}"
                    ))),
                }
            });
        },
    )
    .map_err(|e| e.to_string())
}

fn build_rpc_params(
    p: &PerformTests,
    base: Option<RunParams>,
    cli: &Cli,
) -> Result<RunParams, String> {
    let workload = match &p.workload_type {
        Some(w) => Workload::parse(w).ok_or_else(|| format!("unsupported workload type '{w}'"))?,
        None => base
            .as_ref()
            .map(|b| b.workload)
            .ok_or("workload_type is required")?,
    };
    let read_pct = match p.rw_percentage {
        Some(m) => resolve_mix(workload, Some(m))?,
        None => match &base {
            Some(b) if b.workload == workload => b.read_pct,
            _ => resolve_mix(workload, cli.rwmixread)?,
        },
    };
    Ok(RunParams {
        queue_depth: p
            .queue_depth
            .or(base.as_ref().map(|b| b.queue_depth))
            .ok_or("queue_depth is required")?,
        io_size: match &p.io_size {
            Some(s) => parse_size(s)?,
            None => base
                .as_ref()
                .map(|b| b.io_size)
                .ok_or("io_size is required")?,
        },
        workload,
        read_pct,
        seconds: p
            .time_in_sec
            .or(base.as_ref().map(|b| b.seconds))
            .ok_or("time_in_sec is required")?,
        target: cli.target.clone(),
        every_core: cli.every_core,
        continue_on_error: cli.continue_on_error,
    })
}

fn main() {
    let mut cli = Cli::parse();
    // bdevperf does not start an RPC server unless -z (or -r) asks for it.
    let rpc_given = std::env::args().any(|a| a == "-r" || a.starts_with("--rpc-socket"));
    if !cli.wait_for_tests && !rpc_given {
        cli.app.no_rpc_server = true;
    }
    wc_tgt::init_logging(&cli.app);
    let base = if cli.wait_for_tests {
        params_from_cli(&cli).ok()
    } else {
        match params_from_cli(&cli) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("bdevperf: {e}");
                std::process::exit(1);
            }
        }
    };
    let cli2 = cli.clone();
    let base2 = base.clone();
    let mut app = match wc_tgt::App::start(cli.app.clone(), move |reg| {
        register_perform_tests(reg, base2, cli2)
    }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bdevperf: {e}");
            std::process::exit(1);
        }
    };
    if cli.wait_for_tests {
        app.wait_for_signal();
        app.shutdown();
        return;
    }
    let Some(params) = base else { return };
    let code = match run(&params, &app.reactors()) {
        Ok(results) => {
            report::print_table(&results, cli.latency);
            if let Some(path) = &cli.output_json {
                let v: Value = report::results_json(&results, app.reactors().len());
                if let Err(e) =
                    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap_or_default())
                {
                    eprintln!("bdevperf: cannot write {}: {e}", path.display());
                }
            }
            let bad = results.iter().any(|r| {
                r.error.is_some()
                    || r.miscompares > 0
                    || (r.failed > 0 && !params.continue_on_error)
            });
            i32::from(bad)
        }
        Err(e) => {
            eprintln!("bdevperf: {e}");
            1
        }
    };
    app.shutdown();
    std::process::exit(code);
}
