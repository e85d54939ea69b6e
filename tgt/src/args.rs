//! Command line, with SPDK's application flags.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use wc_reactor::{CoreMask, IdleMode};

/// Idle behaviour of reactors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdleArg {
    /// Busy polling (default; lowest latency).
    Poll,
    /// Sleep when idle (tests, shared machines).
    Sleep,
}

/// SPDK's generic application flags (`spdk_app_parse_args`).
#[derive(Debug, Clone, Args)]
pub struct AppArgs {
    /// Reactor core mask: hex (0x3) or list ([0,1], 0-1).
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    pub cpumask: String,
    /// Main core (runs RPC); default the first core of the mask.
    #[arg(short = 'p', long = "main-core")]
    pub main_core: Option<u32>,
    /// RPC Unix socket path.
    #[arg(short = 'r', long = "rpc-socket", default_value = "/var/tmp/spdk.sock")]
    pub rpc_socket: PathBuf,
    /// Run without an RPC server.
    #[arg(long = "no-rpc-server")]
    pub no_rpc_server: bool,
    /// JSON (or .yaml/.yml) config file to replay at start.
    #[arg(short = 'c', long = "config", visible_alias = "json")]
    pub config: Option<PathBuf>,
    /// Keep going when a config entry fails.
    #[arg(long = "json-ignore-init-errors")]
    pub json_ignore_init_errors: bool,
    /// Stay in STARTUP until framework_start_init.
    #[arg(long = "wait-for-rpc")]
    pub wait_for_rpc: bool,
    /// Only these RPC methods (comma separated).
    #[arg(long = "rpcs-allowed")]
    pub rpcs_allowed: Option<String>,
    /// Enable a debug log flag (repeatable; `all` for everything).
    #[arg(short = 'L', long = "logflag")]
    pub logflag: Vec<String>,
    /// Log level: ERROR, WARNING, NOTICE, INFO or DEBUG.
    #[arg(long = "log-level", default_value = "NOTICE")]
    pub log_level: String,
    /// Print only warnings and errors.
    #[arg(long = "silence-noticelog")]
    pub silence_noticelog: bool,
    /// Reactors sleep when idle instead of busy polling (SPDK's interrupt mode).
    #[arg(long = "interrupt-mode")]
    pub interrupt_mode: bool,
    /// Idle behaviour (overrides --interrupt-mode when given).
    #[arg(long = "idle", value_enum)]
    pub idle: Option<IdleArg>,
    /// Do not pin reactor threads to their cores.
    #[arg(long = "no-pin")]
    pub no_pin: bool,
    /// Hugepage memory size: accepted for SPDK compatibility; memory here is
    /// ordinary process memory.
    #[arg(short = 's', long = "mem-size")]
    pub mem_size: Option<String>,
    /// Accepted for SPDK compatibility (no hugepages are used anyway).
    #[arg(long = "no-huge")]
    pub no_huge: bool,
    /// Write the process id to this file.
    #[arg(short = 'f', long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Directory for vhost sockets (default: current directory); `-S` in
    /// writecache_tgt (bdevperf uses `-S` for its stats interval).
    #[arg(long = "vhost-dir")]
    pub vhost_dir: Option<PathBuf>,
    /// Reactors driven by threads of an embedding program (the fio
    /// engine's job threads), beyond those of the core mask. Not a flag.
    #[arg(skip)]
    pub hosted_reactors: usize,
}

impl AppArgs {
    /// Parsed core mask.
    pub fn core_mask(&self) -> Result<CoreMask, String> {
        CoreMask::parse(&self.cpumask).map_err(|e| e.to_string())
    }

    /// Reactor idle mode from the flags.
    pub fn idle_mode(&self) -> IdleMode {
        match self.idle {
            Some(IdleArg::Poll) => IdleMode::Busy,
            Some(IdleArg::Sleep) => IdleMode::sleep(),
            None if self.interrupt_mode => IdleMode::sleep(),
            None => IdleMode::Busy,
        }
    }

    /// `tracing` filter directive for the chosen level.
    pub fn effective_log_level(&self) -> String {
        if !self.logflag.is_empty() {
            return "debug".into();
        }
        if self.silence_noticelog {
            return "warn".into();
        }
        match self.log_level.to_ascii_uppercase().as_str() {
            "ERROR" => "error",
            "WARNING" | "WARN" => "warn",
            "DEBUG" => "debug",
            "NOTICE" | "INFO" => "info",
            _ => "info",
        }
        .into()
    }
}
