//! bdevperf's command line and run settings: SPDK's flags, validated up
//! front so a bad value is a usage error with a precise message, and the
//! settings `perform_tests` overrides (they stick for later runs, as in
//! SPDK's bdevperf).

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, Parser};

use crate::job::Workload;

/// Buffers are allocated per queue slot up front: the most one job may ask for.
pub const MAX_BUFFER_BYTES: u64 = 8 << 30;
/// Longest accepted run time and stats period (seconds): one year.
pub const MAX_SECONDS: f64 = 365.0 * 86400.0;

/// SPDK-compatible bdev benchmark.
#[derive(Parser, Debug, Clone)]
#[command(name = "bdevperf", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub app: wc_tgt::AppArgs,
    /// Queue depth per job.
    #[arg(short = 'q', value_name = "DEPTH", allow_hyphen_values = true)]
    pub queue_depth: Option<u32>,
    /// I/O size in bytes (suffixes k, m, g accepted).
    #[arg(short = 'o', value_name = "SIZE")]
    pub io_size: Option<String>,
    /// Workload: read write randread randwrite rw randrw verify reset flush unmap write_zeroes.
    #[arg(short = 'w', value_name = "TYPE")]
    pub workload: Option<String>,
    /// Run time in seconds.
    #[arg(short = 't', value_name = "SECONDS", allow_hyphen_values = true)]
    pub time: Option<f64>,
    /// rwmixread: read percentage for rw/randrw (100 for reads, 0 for writes).
    #[arg(short = 'M', value_name = "PERCENT", allow_hyphen_values = true)]
    pub rwmixread: Option<u32>,
    /// Show the per-job table every PERIOD seconds while running (default:
    /// a running total line every second).
    #[arg(short = 'S', value_name = "PERIOD", allow_hyphen_values = true)]
    pub stats_period: Option<f64>,
    /// With -S: show the exponential moving average of the previous NUM
    /// periods' IOPS instead of the average since the start (-P 1: each
    /// period's own rate).
    #[arg(short = 'P', value_name = "NUM", allow_hyphen_values = true)]
    pub ema_period: Option<u64>,
    /// Only this bdev (default: every unclaimed bdev).
    #[arg(short = 'T', value_name = "BDEV")]
    pub target: Option<String>,
    /// Every core drives every bdev (one job per core per bdev, each on its
    /// own slice of the blocks).
    #[arg(short = 'C')]
    pub every_core: bool,
    /// Start idle and wait for perform_tests over RPC.
    #[arg(short = 'z')]
    pub wait_for_tests: bool,
    /// Continue after I/O failures.
    #[arg(short = 'f')]
    pub continue_on_error: bool,
    /// Print a latency summary (percentiles) per job; -ll adds the histogram.
    #[arg(short = 'l', action = clap::ArgAction::Count)]
    pub latency: u8,
    /// I/O timeout in seconds (accepted; timeouts are not enforced).
    #[arg(short = 'k', value_name = "SECONDS", allow_hyphen_values = true)]
    pub timeout: Option<u64>,
    /// Write results as JSON to this file.
    #[arg(long = "output-json", value_name = "FILE")]
    pub output_json: Option<std::path::PathBuf>,
}

/// The clap command: SPDK's generic flags plus bdevperf's. bdevperf's `-f`
/// is "continue on failure", so the pid file is `--pid-file` only here.
pub fn command() -> clap::Command {
    Cli::command().mut_arg("pid_file", |a| a.short(None))
}

/// How progress is shown while a run goes on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatsMode {
    /// Seconds between two outputs.
    pub period: f64,
    /// `-S`: the per-job table each period; otherwise a running total line.
    pub table: bool,
    /// `-P`: exponential moving average over this many periods (0: average
    /// since the start).
    pub ema: u64,
}

/// Parameters of one run.
#[derive(Debug, Clone)]
pub struct RunParams {
    pub queue_depth: u32,
    pub io_size: u64,
    pub workload: Workload,
    pub read_pct: u32,
    pub seconds: f64,
    pub target: Option<String>,
    pub every_core: bool,
    pub continue_on_error: bool,
    pub stats: StatsMode,
}

/// The settings a run needs that `perform_tests` may override; `None`
/// means not given yet. Values held here are each valid on their own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub queue_depth: Option<u32>,
    pub io_size: Option<u64>,
    pub workload: Option<Workload>,
    pub rwmixread: Option<u32>,
    pub seconds: Option<f64>,
}

/// What stays fixed for the life of the process (command line only).
#[derive(Debug, Clone)]
pub struct Fixed {
    pub target: Option<String>,
    pub every_core: bool,
    pub continue_on_error: bool,
    pub stats: StatsMode,
}

/// Parses `4096`, `4k`, `4K`, `128k`, `1m`, `1g`.
pub fn parse_size(s: &str) -> Result<u64, String> {
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
        .ok_or_else(|| {
            format!("invalid IO size '{s}' (a positive number of bytes, e.g. 4096 or 4k)")
        })
}

pub fn check_queue_depth(q: u32) -> Result<u32, String> {
    if q == 0 {
        return Err("queue depth must be at least 1".into());
    }
    Ok(q)
}

pub fn check_seconds(what: &str, t: f64) -> Result<f64, String> {
    if !t.is_finite() || t <= 0.0 || t > MAX_SECONDS {
        return Err(format!(
            "{what} must be a number of seconds above 0 and at most {MAX_SECONDS}, got {t}"
        ));
    }
    Ok(t)
}

pub fn parse_workload(w: &str) -> Result<Workload, String> {
    Workload::parse(&w.to_ascii_lowercase()).ok_or_else(|| {
        format!(
            "unsupported workload type '{w}' (one of read, write, randread, randwrite, rw, \
             randrw, verify, reset, unmap, flush, write_zeroes)"
        )
    })
}

pub fn check_mix(m: u32) -> Result<u32, String> {
    if m > 100 {
        return Err(format!("rwmixread (-M) {m} is out of range 0..100"));
    }
    Ok(m)
}

/// The read percentage of a run: `-M` for rw/randrw (required there),
/// implied by the workload otherwise (a given `-M` is then ignored, with
/// SPDK's warning).
pub fn resolve_mix(workload: Workload, m: Option<u32>) -> Result<u32, String> {
    match (workload.mixed(), m) {
        (true, Some(m)) => check_mix(m),
        (true, None) => Err(format!(
            "rwmixread (-M, rw_percentage) is required for {}",
            workload.name()
        )),
        (false, m) => {
            if m.is_some() {
                eprintln!("Ignoring -M option: it only applies to rw and randrw");
            }
            Ok(match workload {
                Workload::Read | Workload::RandRead => 100,
                _ => 0,
            })
        }
    }
}

impl Settings {
    /// The settings given on the command line, each checked.
    pub fn from_cli(cli: &Cli) -> Result<Settings, String> {
        Ok(Settings {
            queue_depth: cli.queue_depth.map(check_queue_depth).transpose()?,
            io_size: cli.io_size.as_deref().map(parse_size).transpose()?,
            workload: cli.workload.as_deref().map(parse_workload).transpose()?,
            rwmixread: cli.rwmixread.map(check_mix).transpose()?,
            seconds: cli.time.map(|t| check_seconds("-t", t)).transpose()?,
        })
    }

    /// `self` with every value `o` gives replacing ours.
    pub fn overridden_by(&self, o: &Settings) -> Settings {
        Settings {
            queue_depth: o.queue_depth.or(self.queue_depth),
            io_size: o.io_size.or(self.io_size),
            workload: o.workload.or(self.workload),
            rwmixread: o.rwmixread.or(self.rwmixread),
            seconds: o.seconds.or(self.seconds),
        }
    }

    /// A complete, consistent run, or what is missing or inconsistent.
    /// `names` are the option names to cite: CLI flags or RPC params.
    pub fn resolve(&self, fixed: &Fixed, names: &Names) -> Result<RunParams, String> {
        let mut missing = Vec::new();
        if self.queue_depth.is_none() {
            missing.push(names.queue_depth);
        }
        if self.io_size.is_none() {
            missing.push(names.io_size);
        }
        if self.workload.is_none() {
            missing.push(names.workload);
        }
        if self.seconds.is_none() {
            missing.push(names.seconds);
        }
        let (Some(queue_depth), Some(io_size), Some(workload), Some(seconds)) =
            (self.queue_depth, self.io_size, self.workload, self.seconds)
        else {
            return Err(format!(
                "missing required {} {}",
                if missing.len() > 1 {
                    "options"
                } else {
                    "option"
                },
                missing.join(", ")
            ));
        };
        if (queue_depth as u64).saturating_mul(io_size) > MAX_BUFFER_BYTES {
            return Err(format!(
                "queue depth {queue_depth} x IO size {io_size} needs more than 8 GiB of buffers"
            ));
        }
        let read_pct = resolve_mix(workload, self.rwmixread)?;
        Ok(RunParams {
            queue_depth,
            io_size,
            workload,
            read_pct,
            seconds,
            target: fixed.target.clone(),
            every_core: fixed.every_core,
            continue_on_error: fixed.continue_on_error,
            stats: fixed.stats,
        })
    }
}

/// Option names for messages.
pub struct Names {
    pub queue_depth: &'static str,
    pub io_size: &'static str,
    pub workload: &'static str,
    pub seconds: &'static str,
}

/// Command-line spelling.
pub const CLI_NAMES: Names = Names {
    queue_depth: "-q",
    io_size: "-o",
    workload: "-w",
    seconds: "-t",
};

/// `perform_tests` spelling.
pub const RPC_NAMES: Names = Names {
    queue_depth: "queue_depth",
    io_size: "io_size",
    workload: "workload_type",
    seconds: "time_in_sec",
};

/// The fixed part of the command line, checked.
pub fn fixed_from_cli(cli: &Cli) -> Result<Fixed, String> {
    let period = cli
        .stats_period
        .map(|s| check_seconds("-S", s))
        .transpose()?;
    if period.is_some_and(|p| p < 0.01) {
        return Err("-S must be at least 0.01 s".into());
    }
    if cli.ema_period.is_some() && period.is_none() {
        return Err("-P (moving average period) needs -S".into());
    }
    if let Some(t) = &cli.target {
        if t.is_empty() {
            return Err("-T needs a bdev name".into());
        }
    }
    Ok(Fixed {
        target: cli.target.clone(),
        every_core: cli.every_core,
        continue_on_error: cli.continue_on_error,
        stats: StatsMode {
            period: period.unwrap_or(1.0),
            table: period.is_some(),
            ema: cli.ema_period.unwrap_or(0),
        },
    })
}

/// Everything main needs from the command line.
pub struct Parsed {
    pub cli: Cli,
    pub fixed: Fixed,
    pub settings: Settings,
    /// The run to do now (`None` with `-z`).
    pub run: Option<RunParams>,
}

/// Parses and checks `args`; `Err` is a clap error to print and exit with
/// (usage errors exit 2, `--help`/`--version` 0).
pub fn parse_from<I, T>(args: I) -> Result<Parsed, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut cmd = command();
    let matches = cmd.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))?;
    let usage = |cmd: &mut clap::Command, msg: String| cmd.error(ErrorKind::ValueValidation, msg);
    let fixed = fixed_from_cli(&cli).map_err(|e| usage(&mut cmd, e))?;
    let settings = Settings::from_cli(&cli).map_err(|e| usage(&mut cmd, e))?;
    let run = if cli.wait_for_tests {
        None
    } else {
        Some(settings.resolve(&fixed, &CLI_NAMES).map_err(|e| {
            usage(
                &mut cmd,
                format!("{e} (-q, -o, -w and -t are required without -z)"),
            )
        })?)
    };
    Ok(Parsed {
        cli,
        fixed,
        settings,
        run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Parsed, clap::Error> {
        parse_from(std::iter::once("bdevperf").chain(args.split_whitespace()))
    }

    fn err(args: &str) -> String {
        match parse(args) {
            Ok(_) => panic!("'{args}' was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(131072));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        for bad in ["", "0", "k", "-4", "4x", "99999999999999999999g"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_full_command_line() {
        let p =
            parse("-q 32 -o 4k -w randrw -M 70 -t 2 -m 0x3 -C -S 1 -P 3 -f -T Malloc0").unwrap();
        let r = p.run.unwrap();
        assert_eq!((r.queue_depth, r.io_size, r.read_pct), (32, 4096, 70));
        assert_eq!(r.workload, Workload::RandRw);
        assert!(r.every_core && r.continue_on_error);
        assert_eq!(r.target.as_deref(), Some("Malloc0"));
        assert_eq!(
            r.stats,
            StatsMode {
                period: 1.0,
                table: true,
                ema: 3
            }
        );
        assert_eq!(p.cli.app.cpumask, "0x3");
    }

    #[test]
    fn f_is_continue_and_the_pid_file_is_long_only() {
        let p = parse("-q 1 -o 4k -w read -t 1 -f --pid-file /tmp/x.pid").unwrap();
        assert!(p.cli.continue_on_error);
        assert_eq!(
            p.cli.app.pid_file.as_deref(),
            Some(std::path::Path::new("/tmp/x.pid"))
        );
    }

    #[test]
    fn defaults_show_a_running_total_every_second() {
        let p = parse("-q 1 -o 4k -w write -t 1").unwrap();
        assert_eq!(
            p.run.unwrap().stats,
            StatsMode {
                period: 1.0,
                table: false,
                ema: 0
            }
        );
    }

    #[test]
    fn usage_errors_are_precise() {
        assert!(err("-o 4k -w read -t 1").contains("missing required option -q"));
        assert!(err("-w read").contains("missing required options -q, -o, -t"));
        assert!(err("-q 0 -o 4k -w read -t 1").contains("queue depth must be at least 1"));
        assert!(err("-q 1 -o 0 -w read -t 1").contains("invalid IO size '0'"));
        assert!(err("-q 1 -o 4x -w read -t 1").contains("invalid IO size '4x'"));
        assert!(err("-q 1 -o 4k -w bogus -t 1").contains("unsupported workload type 'bogus'"));
        assert!(err("-q 1 -o 4k -w read -t 0").contains("-t must be a number of seconds above 0"));
        assert!(err("-q 1 -o 4k -w read -t nan").contains("-t must be"));
        assert!(err("-q 1 -o 4k -w read -t -1")
            .contains("-t must be a number of seconds above 0 and at most 31536000, got -1"));
        assert!(err("-q -1 -o 4k -w read -t 1").contains("invalid value '-1' for '-q <DEPTH>'"));
        assert!(err("-q 1 -o 4k -w randrw -t 1")
            .contains("rwmixread (-M, rw_percentage) is required for randrw"));
        assert!(err("-q 1 -o 4k -w rw -M 101 -t 1").contains("out of range 0..100"));
        assert!(err("-q 1 -o 4k -w read -t 1 -S 0").contains("-S must be"));
        assert!(err("-q 1 -o 4k -w read -t 1 -S 0.001").contains("-S must be at least 0.01 s"));
        assert!(err("-q 1 -o 4k -w read -t 1 -P 2").contains("-P (moving average period) needs -S"));
        assert!(err("-q 1024 -o 16m -w read -t 1").contains("more than 8 GiB"));
        assert!(err("-q abc").contains("invalid value 'abc'"));
        assert!(err("--no-such-flag").contains("unexpected argument"));
    }

    #[test]
    fn wait_for_tests_needs_nothing_but_checks_what_is_given() {
        let p = parse("-z").unwrap();
        assert!(p.run.is_none());
        assert_eq!(p.settings, Settings::default());
        assert!(err("-z -q 0").contains("queue depth must be at least 1"));
        assert!(err("-z -w nope").contains("unsupported workload type"));
    }

    #[test]
    fn overrides_replace_only_what_they_give() {
        let base = Settings {
            queue_depth: Some(8),
            io_size: Some(4096),
            workload: Some(Workload::RandWrite),
            rwmixread: None,
            seconds: Some(1.0),
        };
        let o = Settings {
            queue_depth: Some(2),
            workload: Some(Workload::RandRw),
            rwmixread: Some(30),
            ..Settings::default()
        };
        let m = base.overridden_by(&o);
        assert_eq!(m.queue_depth, Some(2));
        assert_eq!(m.io_size, Some(4096));
        assert_eq!(m.workload, Some(Workload::RandRw));
        assert_eq!(m.rwmixread, Some(30));
        assert_eq!(m.seconds, Some(1.0));
        let fixed = fixed_from_cli(&parse("-z").unwrap().cli).unwrap();
        assert_eq!(m.resolve(&fixed, &RPC_NAMES).unwrap().read_pct, 30);
        let e = Settings::default().resolve(&fixed, &RPC_NAMES).unwrap_err();
        assert_eq!(
            e,
            "missing required options queue_depth, io_size, workload_type, time_in_sec"
        );
    }
}
