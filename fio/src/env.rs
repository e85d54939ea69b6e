//! The framework inside fio: one `writecache_tgt` application (reactors,
//! config replay, optional RPC server) per fio process, started by the
//! first job's setup and stopped at process exit, as SPDK's plugin starts
//! its environment once and tears it down from its `fio_exit` destructor.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use clap::Parser;
use wc_reactor::HostedReactor;
use wc_tgt::{App, AppArgs};

/// What the engine options ask of the framework.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvOptions {
    /// `spdk_json_conf`: the JSON or YAML config to replay.
    pub config: PathBuf,
    /// `spdk_rpc_listen_addr`: where to serve JSON-RPC (none: no server).
    pub rpc_listen_addr: Option<PathBuf>,
    /// fio job threads of this run: one hosted reactor each.
    pub jobs: usize,
}

struct Env {
    app: App,
    opts: EnvOptions,
}

static ENV: Mutex<Option<Env>> = Mutex::new(None);

fn env() -> MutexGuard<'static, Option<Env>> {
    ENV.lock().unwrap_or_else(|p| p.into_inner())
}

/// `writecache_tgt`'s flags, so the engine starts the application exactly
/// as the target does.
#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    app: AppArgs,
}

fn app_args(o: &EnvOptions) -> Result<AppArgs, String> {
    let mut argv: Vec<String> = vec![
        "fio".into(),
        "--cpumask".into(),
        "0x1".into(),
        // The main reactor only serves control and RPC: it sleeps when
        // idle; fio's threads run the I/O on their hosted reactors.
        "--idle".into(),
        "sleep".into(),
        // fio places its threads itself (cpus_allowed).
        "--no-pin".into(),
        "--log-level".into(),
        "WARNING".into(),
        "--json".into(),
        o.config.display().to_string(),
    ];
    match &o.rpc_listen_addr {
        Some(p) => {
            argv.push("--rpc-socket".into());
            argv.push(p.display().to_string());
        }
        None => argv.push("--no-rpc-server".into()),
    }
    let mut f = Flags::try_parse_from(argv).map_err(|e| e.to_string())?;
    f.app.hosted_reactors = o.jobs;
    Ok(f.app)
}

/// Starts the framework unless it runs already (later jobs share it; their
/// options must agree with the first's).
pub fn start(o: &EnvOptions) -> Result<(), String> {
    let mut g = env();
    if let Some(e) = g.as_ref() {
        if e.opts.config != o.config || e.opts.rpc_listen_addr != o.rpc_listen_addr {
            return Err(format!(
                "all jobs must use the same spdk_json_conf and spdk_rpc_listen_addr \
                 (the framework runs with {} already)",
                e.opts.config.display()
            ));
        }
        if o.jobs > e.opts.jobs {
            return Err(format!(
                "{} jobs need reactors, the framework started with {}",
                o.jobs, e.opts.jobs
            ));
        }
        return Ok(());
    }
    check_config_readable(&o.config)?;
    let args = app_args(o)?;
    wc_tgt::init_logging(&args);
    let app = App::start(args, |_| Ok(()))
        .map_err(|e| format!("cannot start with config {}: {e}", o.config.display()))?;
    *g = Some(Env {
        app,
        opts: o.clone(),
    });
    Ok(())
}

fn check_config_readable(p: &Path) -> Result<(), String> {
    std::fs::metadata(p)
        .map_err(|e| format!("cannot read spdk_json_conf {}: {e}", p.display()))
        .map(|_| ())
}

/// The hosted reactor of fio job `index` (0-based).
pub fn hosted(index: usize) -> Result<HostedReactor, String> {
    let g = env();
    let e = g
        .as_ref()
        .ok_or_else(|| "the framework is not running (setup failed?)".to_string())?;
    let all = e.app.hosted();
    let n = all.len();
    all.into_iter()
        .nth(index)
        .ok_or_else(|| format!("job {index} has no reactor ({n} started)"))
}

/// Stops the framework: RPC server, bdevs top-down (caches commit), then
/// reactors, as `writecache_tgt` does on SIGTERM. Idempotent.
pub fn stop() {
    let e = env().take();
    if let Some(mut e) = e {
        e.app.shutdown();
    }
}

/// True while the framework runs.
pub fn running() -> bool {
    env().is_some()
}
