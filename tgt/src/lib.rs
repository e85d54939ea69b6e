//! # writecache_tgt as a library
//!
//! The target application: SPDK-style command line, reactors, the JSON-RPC
//! server, config replay at start, and clean shutdown. `bdevperf` reuses it
//! so both share flags, config loading and module registration.
//!
//! Startup follows SPDK's `spdk_app_start`: reactors start; the RPC server
//! listens (paused while a `--json` config is replayed, so early clients
//! wait instead of failing); STARTUP-state config entries run; the framework
//! switches to RUNTIME; RUNTIME entries run; the server resumes. With
//! `--wait-for-rpc` the server stays in STARTUP until `framework_start_init`.

#![warn(missing_docs)]

mod args;
mod framework;

use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use serde_json::Value;
use wc_config::{ConfigCall, Pass};
use wc_reactor::{ReactorHandle, Runtime, RuntimeConfig};
use wc_rpc::{Registry, Responder, RpcError, RpcServer, RpcState, ServerOptions};

pub use args::{AppArgs, IdleArg};

/// Registers every bdev module's RPC methods and config writer.
pub fn register_modules(reg: &Registry) -> Result<(), String> {
    let e = |e: wc_rpc::RegisterError| e.to_string();
    wc_rpc::register_builtin(reg).map_err(e)?;
    wc_bdev::rpc::register(reg).map_err(e)?;
    wc_nbd::rpc::register(reg).map_err(e)?;
    wc_nvmf::rpc::register(reg).map_err(e)?;
    wc_vhost::rpc::register(reg).map_err(e)?;
    wc_bdev_malloc::rpc::register(reg).map_err(e)?;
    wc_bdev_null::rpc::register(reg).map_err(e)?;
    wc_bdev_uring::rpc::register(reg).map_err(e)?;
    wc_bdev_pmem::rpc::register(reg).map_err(e)?;
    wc_writecache::rpc::register(reg).map_err(e)?;
    wc_bdev_error::rpc::register(reg).map_err(e)?;
    wc_bdev_delay::rpc::register(reg).map_err(e)?;
    wc_bdev_nvme::rpc::register(reg).map_err(e)?;
    wc_config::register_rpcs(reg).map_err(e)?;
    wc_config::register_subsystem("iobuf", &[], None);
    wc_config::register_subsystem("accel", &["iobuf"], None);
    wc_config::register_subsystem(
        "bdev",
        &["accel", "iobuf"],
        Some(Arc::new(wc_bdev::rpc::subsystem_config)),
    );
    wc_config::register_subsystem("nbd", &["bdev"], Some(Arc::new(wc_nbd::config_entries)));
    wc_config::register_subsystem("nvmf", &["bdev"], Some(Arc::new(wc_nvmf::config_entries)));
    wc_config::register_subsystem(
        "vhost_blk",
        &["bdev"],
        Some(Arc::new(wc_vhost::config_entries)),
    );
    Ok(())
}

/// Sets up `tracing` on stderr from the log options: coloured on a terminal
/// only, so that logs written to a file or a pipe carry no escape codes.
pub fn init_logging(args: &AppArgs) {
    use std::io::IsTerminal;
    let level = args.effective_log_level();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// A running application.
pub struct App {
    runtime: Option<Runtime>,
    server: Option<RpcServer>,
    registry: Registry,
    args: AppArgs,
}

/// Runs `method` on the main reactor and waits for its reply (used for
/// config replay; never call it from a reactor).
pub fn call_on_main(
    reg: &Registry,
    main: &ReactorHandle,
    method: &str,
    params: Option<Value>,
) -> Result<Value, RpcError> {
    let (r, rx) = Responder::channel();
    let reg = reg.clone();
    let m = method.to_string();
    main.send(move || reg.dispatch(&m, params, r));
    rx.recv()
        .unwrap_or_else(|_| Err(RpcError::internal("reactor stopped")))
}

impl App {
    /// Starts reactors, the RPC server and replays the config. `extra`
    /// registers application-specific RPCs (bdevperf's `perform_tests`).
    pub fn start(
        args: AppArgs,
        extra: impl FnOnce(&Registry) -> Result<(), String>,
    ) -> Result<App, String> {
        if let Some(dir) = &args.vhost_dir {
            wc_vhost::set_socket_dir(dir);
        }
        let mask = args.core_mask()?;
        let mut rcfg = RuntimeConfig::new(mask);
        rcfg.main_core = args.main_core;
        rcfg.idle = args.idle_mode();
        rcfg.pin = !args.no_pin;
        rcfg.hosted = args.hosted_reactors;
        let runtime = Runtime::start(rcfg).map_err(|e| e.to_string())?;
        let registry = wc_rpc::registry().clone();
        register_modules(&registry)?;
        framework::register(&registry).map_err(|e| e.to_string())?;
        extra(&registry)?;

        let calls: Vec<ConfigCall> = match &args.config {
            Some(path) => wc_config::load_file(path).map_err(|e| e.to_string())?,
            None => Vec::new(),
        };
        let main = runtime.main().clone();
        let dispatch_main = main.clone();
        let dispatcher: wc_rpc::Dispatcher = Arc::new(move |job| dispatch_main.send(job));

        let server = if args.no_rpc_server {
            None
        } else {
            let opts = ServerOptions {
                start_paused: !args.wait_for_rpc,
                ..ServerOptions::default()
            };
            Some(
                RpcServer::start_with_options(&args.rpc_socket, registry.clone(), dispatcher, opts)
                    .map_err(|e| e.to_string())?,
            )
        };
        if let Some(allowed) = &args.rpcs_allowed {
            let list: Vec<String> = allowed.split(',').map(|s| s.trim().to_string()).collect();
            registry.set_allowlist(Some(list));
        }

        let mut app = App {
            runtime: Some(runtime),
            server,
            registry: registry.clone(),
            args: args.clone(),
        };
        // STARTUP pass (both modes), in file order.
        let exec = |m: &str, p: Option<Value>| call_on_main(&registry, &main, m, p);
        if let Err(e) = wc_config::apply(
            &registry,
            &calls,
            Pass::Startup,
            args.json_ignore_init_errors,
            &exec,
        ) {
            app.shutdown();
            return Err(e.to_string());
        }
        if args.wait_for_rpc {
            // framework_start_init finishes init (and the RUNTIME pass).
            let pause = app.server.as_ref().map(|s| s.pause_handle());
            framework::set_pending_init(framework::PendingInit {
                calls,
                ignore_errors: args.json_ignore_init_errors,
                main: main.clone(),
                pause,
            });
            tracing::info!("waiting for framework_start_init");
        } else {
            if let Err(e) = finish_init(&registry, &main, &calls, args.json_ignore_init_errors) {
                app.shutdown();
                return Err(e);
            }
            if let Some(s) = &app.server {
                s.resume();
            }
        }
        Ok(app)
    }

    /// The RPC registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The main reactor.
    pub fn main(&self) -> ReactorHandle {
        self.runtime
            .as_ref()
            .map(|r| r.main().clone())
            .expect("app is running")
    }

    /// All reactors.
    pub fn reactors(&self) -> Vec<ReactorHandle> {
        self.runtime
            .as_ref()
            .map(|r| r.handles().to_vec())
            .unwrap_or_default()
    }

    /// The hosted reactors (`AppArgs::hosted_reactors`), for the threads
    /// of an embedding program to attach to.
    pub fn hosted(&self) -> Vec<wc_reactor::HostedReactor> {
        self.runtime
            .as_ref()
            .map(|r| r.hosted().to_vec())
            .unwrap_or_default()
    }

    /// The options the app started with.
    pub fn args(&self) -> &AppArgs {
        &self.args
    }

    /// Blocks until SIGINT/SIGTERM (also what `spdk_kill_instance` sends).
    pub fn wait_for_signal(&self) {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        if let Some(sig) = signals.forever().next() {
            tracing::info!("received signal {sig}; shutting down");
        }
    }

    /// Stops the RPC server, unregisters every bdev top-down (vbdevs before
    /// their bases, so caches commit), stops the reactors.
    pub fn shutdown(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
        if let Some(rt) = self.runtime.take() {
            let (tx, rx) = mpsc::channel();
            rt.main().send(move || {
                // Modules finish first (caches commit), then bdevs go away
                // top-down: vbdevs before the bases they sit on.
                wc_bdev::run_shutdown_hooks(Box::new(move || {
                    for b in wc_bdev::list().into_iter().rev() {
                        let _ = wc_bdev::hot_remove(b.name());
                    }
                    let _ = tx.send(());
                }));
            });
            let _ = rx.recv_timeout(std::time::Duration::from_secs(60));
            rt.shutdown();
        }
        if let Some(p) = &self.args.pid_file {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Switches to RUNTIME and replays the RUNTIME pass.
pub(crate) fn finish_init(
    reg: &Registry,
    main: &ReactorHandle,
    calls: &[ConfigCall],
    ignore: bool,
) -> Result<(), String> {
    reg.set_state(RpcState::Runtime);
    let exec = |m: &str, p: Option<Value>| call_on_main(reg, main, m, p);
    wc_config::apply(reg, calls, Pass::Runtime, ignore, &exec)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The process exit code for a run of `writecache_tgt`.
pub fn run_target(args: AppArgs) -> i32 {
    init_logging(&args);
    if let Some(p) = &args.pid_file {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            eprintln!("cannot write pid file {}: {e}", p.display());
            return 1;
        }
    }
    // Take over SIGINT/SIGTERM before starting: one that arrives while a
    // config is replayed must still end in a clean shutdown (socket and
    // lock removed), not in the default "terminate now".
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("writecache_tgt: cannot install signal handlers: {e}");
            return 1;
        }
    };
    let mut app = match App::start(args, |_| Ok(())) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("writecache_tgt: {e}");
            return 1;
        }
    };
    if let Some(sig) = signals.forever().next() {
        tracing::info!("received signal {sig}; shutting down");
    }
    app.shutdown();
    if framework::init_failed() {
        1
    } else {
        0
    }
}

/// Paths used by tests and scripts.
pub fn default_rpc_socket() -> PathBuf {
    PathBuf::from("/var/tmp/spdk.sock")
}
