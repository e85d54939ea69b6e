//! `bdevperf`: SPDK's bdev benchmark, same flags and output. It starts the
//! same application framework as `writecache_tgt` (reactors, `--json`
//! config, RPC with `-z`), runs jobs in-process and prints SPDK's table.

mod args;
mod job;
mod report;
mod rpc;

// Reactors hand buffers to each other (messages, commit logs): glibc's
// arena locks then park threads in futex waits on the I/O path, mimalloc's
// cross-thread frees do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use wc_reactor::ReactorHandle;

use args::{RunParams, StatsMode};
use job::{JobResult, JobSpec, Progress, Workload};

/// Set by SIGINT/SIGTERM: a run in progress stops early and reports what
/// it measured (SPDK's "Received shutdown signal").
pub fn shutdown_flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// What a run produced.
pub struct RunOutcome {
    /// Per job, in report order.
    pub results: Vec<JobResult>,
    /// Stopped early by a shutdown signal.
    pub terminated: bool,
}

/// Why a run did not happen.
#[derive(Debug)]
pub enum RunError {
    /// Nothing to run with these settings (no such bdev, IO size that does
    /// not fit the block size...).
    Setup(String),
    /// The framework failed under the run.
    Internal(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Setup(e) | RunError::Internal(e) => f.write_str(e),
        }
    }
}

/// Builds jobs (on the main reactor), SPDK's way: without -C one job per
/// bdev, bdevs round-robin over reactors; with -C one job per reactor per
/// bdev, each on its own slice of the blocks. Jobs are numbered in report
/// order (bdev, then core).
fn plan(p: &RunParams, reactors: &[ReactorHandle]) -> Result<Vec<JobSpec>, String> {
    if reactors.is_empty() {
        return Err("no reactors".into());
    }
    let mut bdevs: Vec<Arc<wc_bdev::Bdev>> = match &p.target {
        Some(t) => vec![wc_bdev::lookup(t).ok_or_else(|| format!("bdev '{t}' not found"))?],
        None => wc_bdev::list()
            .into_iter()
            .filter(|b| b.claim_info().is_none())
            .collect(),
    };
    if p.workload == Workload::Unmap {
        bdevs.retain(|b| {
            let ok = b.io_type_supported(wc_bdev::IoType::Unmap);
            if !ok {
                println!("Skipping {} because it does not support unmap", b.name());
            }
            ok
        });
    }
    if bdevs.is_empty() {
        return Err("no bdevs to test (create some with --json or over RPC)".into());
    }
    if p.queue_depth == 0 {
        return Err("queue depth must be at least 1".into());
    }
    let mut jobs = Vec::new();
    let mut seed = 0x5EED_u64;
    for (bi, b) in bdevs.iter().enumerate() {
        let bs = u64::from(b.block_size());
        if bs == 0 || p.io_size % bs != 0 {
            return Err(format!(
                "IO size {} is not a multiple of the block size {bs} of bdev {}",
                p.io_size,
                b.name()
            ));
        }
        let cores: Vec<&ReactorHandle> = if p.every_core {
            reactors.iter().collect()
        } else {
            vec![&reactors[bi % reactors.len()]]
        };
        let n = cores.len() as u64;
        let slice = b.num_blocks() / n;
        if slice < p.io_size / bs {
            return Err(format!(
                "bdev {} ({} blocks) is too small for {n} job(s) of IO size {}",
                b.name(),
                b.num_blocks(),
                p.io_size
            ));
        }
        for (ci, h) in cores.into_iter().enumerate() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            jobs.push(JobSpec {
                id: jobs.len(),
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

/// The periodic output: every period, a sample of every job's counters,
/// shown as the running total line or (with -S) the per-job table.
struct Sampler {
    stats: StatsMode,
    /// Per job: (I/Os, elapsed) at the previous sample, and the moving average.
    prev: Vec<(u64, f64, f64)>,
}

impl Sampler {
    fn new(stats: StatsMode, jobs: usize) -> Sampler {
        Sampler {
            stats,
            prev: vec![(0, 0.0, 0.0); jobs],
        }
    }

    fn show(&mut self, out: &mut dyn Write, jobs: &[JobSpec], samples: &[Option<Progress>]) {
        let mut total = report::Total::default();
        for (spec, p) in jobs.iter().zip(samples) {
            let Some(p) = p else { continue };
            let iops = if self.stats.ema > 0 {
                // SPDK's EMA: M = 2 / (n + 1), EMA += (IO/s - EMA) * M.
                let (ios0, t0, ema) = &mut self.prev[spec.id];
                let dt = p.elapsed - *t0;
                if dt > 0.0 {
                    let rate = p.ios.saturating_sub(*ios0) as f64 / dt;
                    *ema += (rate - *ema) * 2.0 / (self.stats.ema as f64 + 1.0);
                    *ios0 = p.ios;
                    *t0 = p.elapsed;
                }
                Some(*ema)
            } else {
                None
            };
            let row = report::Row::from_progress(p, spec.io_size, iops);
            if self.stats.table {
                report::job_line(out, spec);
                report::row_line(out, &spec.bdev, &row);
            }
            total.add(&row, p);
        }
        if self.stats.table {
            report::total_lines(out, &total);
            let _ = writeln!(out);
            let _ = out.flush();
        } else {
            report::running_total(out, &total);
        }
    }
}

/// Runs the jobs to completion (blocking; call off-reactor), showing
/// progress every period, then prints the final table (`latency`: `-l`).
fn run(
    p: &RunParams,
    reactors: &[ReactorHandle],
    latency: u8,
    out: &mut dyn Write,
) -> Result<RunOutcome, RunError> {
    let main = reactors
        .first()
        .ok_or_else(|| RunError::Internal("no reactors".into()))?
        .clone();
    let (ptx, prx) = mpsc::channel();
    let p2 = p.clone();
    let handles = reactors.to_vec();
    main.send(move || {
        let _ = ptx.send(plan(&p2, &handles));
    });
    let jobs = prx
        .recv()
        .map_err(|_| RunError::Internal("reactor stopped".into()))?
        .map_err(RunError::Setup)?;
    let _ = writeln!(out, "Running I/O for {} seconds...", p.seconds);
    if p.stats.table {
        report::header(out);
    }
    let _ = out.flush();
    let (tx, rx) = mpsc::channel::<JobResult>();
    for spec in jobs.iter().cloned() {
        let tx = tx.clone();
        reactors[spec.reactor].send(move || job::start(spec, tx));
    }
    drop(tx);

    let n = jobs.len();
    let mut results: Vec<Option<JobResult>> = vec![None; n];
    let mut got = 0;
    let mut take = |r: JobResult, results: &mut Vec<Option<JobResult>>| {
        let id = r.spec.id;
        if id < n && results[id].is_none() {
            results[id] = Some(r);
            got += 1;
        }
        got
    };
    let period = Duration::try_from_secs_f64(p.stats.period).unwrap_or(Duration::from_secs(1));
    let t0 = Instant::now();
    let mut next = t0 + period;
    let mut sampler = Sampler::new(p.stats, n);
    let mut done = 0;
    let mut terminated: Option<f64> = None;
    // How often the shutdown flag is looked at while waiting.
    let tick = Duration::from_millis(50);
    while done < n {
        if terminated.is_none() && shutdown_flag().load(Ordering::Acquire) {
            terminated = Some(t0.elapsed().as_secs_f64());
            let mut told = Vec::new();
            for spec in jobs.iter().filter(|s| results[s.id].is_none()) {
                if !told.contains(&spec.reactor) {
                    told.push(spec.reactor);
                    reactors[spec.reactor].send(job::stop_here);
                }
            }
        }
        let now = Instant::now();
        if now < next {
            match rx.recv_timeout((next - now).min(tick)) {
                Ok(r) => done = take(r, &mut results),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            continue;
        }
        // A sample: ask each reactor with running jobs for their counters.
        next += period;
        let (stx, srx) = mpsc::channel::<Vec<Progress>>();
        let mut asked = Vec::new();
        for spec in jobs.iter().filter(|s| results[s.id].is_none()) {
            if !asked.contains(&spec.reactor) {
                asked.push(spec.reactor);
                let stx = stx.clone();
                reactors[spec.reactor].send(move || {
                    let _ = stx.send(job::progress_here());
                });
            }
        }
        drop(stx);
        let mut samples: Vec<Option<Progress>> = vec![None; n];
        for _ in 0..asked.len() {
            let Ok(list) = srx.recv_timeout(Duration::from_secs(1)) else {
                break;
            };
            for s in list.into_iter().filter(|s| s.id < n) {
                samples[s.id] = Some(s);
            }
        }
        // Jobs that finished meanwhile show their final counters.
        while let Ok(r) = rx.try_recv() {
            done = take(r, &mut results);
        }
        for (s, r) in samples.iter_mut().zip(&results) {
            if let Some(r) = r {
                *s = Some(r.progress());
            }
        }
        if done < n {
            sampler.show(out, &jobs, &samples);
        }
    }
    if done < n {
        return Err(RunError::Internal(format!(
            "{} of {n} jobs did not report (reactor stopped)",
            n - done
        )));
    }
    let results: Vec<JobResult> = results.into_iter().flatten().collect();
    if let Some(t) = terminated {
        let _ = writeln!(
            out,
            "\nReceived shutdown signal, test time was about {:.6} seconds",
            t.min(p.seconds)
        );
    }
    report::print_table(out, &results, latency);
    Ok(RunOutcome {
        results,
        terminated: terminated.is_some(),
    })
}

fn write_json(path: &std::path::Path, run: &RunOutcome) {
    let v = report::results_json(&run.results, run.terminated);
    if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&v).unwrap_or_default()) {
        eprintln!("bdevperf: cannot write {}: {e}", path.display());
    }
}

fn main() {
    let parsed = match args::parse_from(std::env::args_os()) {
        Ok(p) => p,
        Err(e) => e.exit(),
    };
    let mut cli = parsed.cli;
    // bdevperf does not start an RPC server unless -z (or -r) asks for it.
    let rpc_given = std::env::args().any(|a| a == "-r" || a.starts_with("--rpc-socket"));
    if !cli.wait_for_tests && !rpc_given {
        cli.app.no_rpc_server = true;
    }
    wc_tgt::init_logging(&cli.app);
    let state = rpc::State::new(
        parsed.settings.clone(),
        parsed.fixed.clone(),
        cli.latency,
        cli.output_json.clone(),
    );
    let mut app = match wc_tgt::App::start(cli.app.clone(), move |reg| rpc::register(reg, state)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bdevperf: {e}");
            std::process::exit(1);
        }
    };
    let Some(params) = parsed.run else {
        app.wait_for_signal();
        // A perform_tests in progress stops and answers before the server goes.
        shutdown_flag().store(true, Ordering::Release);
        rpc::wait_idle(Duration::from_secs(30));
        app.shutdown();
        return;
    };
    // SIGINT/SIGTERM stop the run and report it; a second one exits at once.
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let flag = shutdown_flag().clone();
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 1, flag.clone());
        let _ = signal_hook::flag::register(sig, flag);
    }
    let mut stdout = std::io::stdout();
    let code = match run(&params, &app.reactors(), cli.latency, &mut stdout) {
        Ok(outcome) => {
            if let Some(path) = &cli.output_json {
                write_json(path, &outcome);
            }
            i32::from(outcome.results.iter().any(report::failed))
        }
        Err(e) => {
            eprintln!("bdevperf: {e}");
            1
        }
    };
    app.shutdown();
    std::process::exit(code);
}
