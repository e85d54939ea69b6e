//! `perform_tests` (with `-z`): SPDK's params (`queue_depth`, `io_size`,
//! `time_in_sec`, `workload_type`, `rw_percentage`), all optional. Given
//! values override the command line's and stick for later runs, as in
//! SPDK's bdevperf; a set that is refused (bad or missing values: -32700;
//! nothing to run them on, e.g. an IO size the bdev's block size does not
//! divide: -32602) changes nothing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use wc_rpc::{Responder, RpcError, StateMask};

use crate::args::{self, Fixed, Settings, RPC_NAMES};
use crate::{report, run, RunError};

static RUNNING: AtomicBool = AtomicBool::new(false);
/// A finished run's reply is on its way to the server.
static REPLYING: AtomicBool = AtomicBool::new(false);

fn busy() -> bool {
    RUNNING.load(Ordering::Acquire) || REPLYING.load(Ordering::Acquire)
}

/// Waits (at most `limit`) until no perform_tests is running, its reply
/// handed to the server.
pub fn wait_idle(limit: Duration) {
    let end = Instant::now() + limit;
    if !busy() {
        return;
    }
    while busy() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the server write the reply out before it stops.
    std::thread::sleep(Duration::from_millis(200));
}

/// What `perform_tests` works with.
pub struct State {
    settings: Mutex<Settings>,
    fixed: Fixed,
    latency: u8,
    output_json: Option<PathBuf>,
}

impl State {
    /// The command line's settings, to be overridden by RPC.
    pub fn new(
        settings: Settings,
        fixed: Fixed,
        latency: u8,
        output_json: Option<PathBuf>,
    ) -> Arc<State> {
        Arc::new(State {
            settings: Mutex::new(settings),
            fixed,
            latency,
            output_json,
        })
    }
}

fn uint(v: &Value, name: &str, max: u64) -> Result<u64, String> {
    v.as_u64()
        .filter(|n| *n <= max)
        .ok_or_else(|| format!("{name} must be an integer in 0..{max}, got {v}"))
}

/// The overrides in `params` (relaxed: unknown keys are ignored; `null`
/// is the same as absent), each checked.
pub fn decode(params: Option<Value>) -> Result<Settings, String> {
    let obj = match params {
        None | Some(Value::Null) => return Ok(Settings::default()),
        Some(Value::Object(o)) => o,
        Some(v) => return Err(format!("params must be an object, got {v}")),
    };
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let mut s = Settings::default();
    if let Some(v) = get("queue_depth") {
        let q = uint(v, "queue_depth", u64::from(u32::MAX))?;
        s.queue_depth = Some(args::check_queue_depth(q as u32)?);
    }
    if let Some(v) = get("io_size") {
        // A string as SPDK's (same parser as -o); a plain number also does.
        s.io_size = Some(match v {
            Value::String(t) => args::parse_size(t)?,
            Value::Number(_) => v
                .as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("invalid IO size {v}"))?,
            _ => return Err(format!("io_size must be a string such as \"4k\", got {v}")),
        });
    }
    if let Some(v) = get("time_in_sec") {
        let t = v
            .as_f64()
            .ok_or_else(|| format!("time_in_sec must be a number, got {v}"))?;
        s.seconds = Some(args::check_seconds("time_in_sec", t)?);
    }
    if let Some(v) = get("workload_type") {
        let w = v
            .as_str()
            .ok_or_else(|| format!("workload_type must be a string, got {v}"))?;
        s.workload = Some(args::parse_workload(w)?);
    }
    if let Some(v) = get("rw_percentage") {
        let m = uint(v, "rw_percentage", 100)
            .map_err(|_| format!("rw_percentage must be an integer in 0..100, got {v}"))?;
        s.rwmixread = Some(m as u32);
    }
    Ok(s)
}

/// Registers `perform_tests`.
pub fn register(reg: &wc_rpc::Registry, state: Arc<State>) -> Result<(), String> {
    reg.register_fn(
        "perform_tests",
        StateMask::RUNTIME,
        move |params, r: Responder| {
            if RUNNING.load(Ordering::Acquire) {
                return r.err(RpcError::internal("Operation now in progress"));
            }
            if crate::shutdown_flag().load(Ordering::Acquire) {
                return r.err(RpcError::internal("bdevperf is shutting down"));
            }
            // -32700 for bad params, as SPDK's bdevperf.
            let bad = |e: String| RpcError::new(wc_rpc::PARSE_ERROR, e);
            let overrides = match decode(params) {
                Ok(o) => o,
                Err(e) => return r.err(bad(e)),
            };
            let next = state
                .settings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .overridden_by(&overrides);
            let run_params = match next.resolve(&state.fixed, &RPC_NAMES) {
                Ok(p) => p,
                Err(e) => return r.err(bad(e)),
            };
            if RUNNING.swap(true, Ordering::AcqRel) {
                return r.err(RpcError::internal("Operation now in progress"));
            }
            let Some(me) = wc_reactor::try_current() else {
                RUNNING.store(false, Ordering::Release);
                return r.err(RpcError::internal("not on a reactor"));
            };
            let reactors = me.siblings();
            let state = state.clone();
            let spawned = std::thread::Builder::new()
                .name("perform_tests".into())
                .spawn(move || {
                    let mut stdout = std::io::stdout();
                    let res = run(&run_params, &reactors, state.latency, &mut stdout);
                    // The overrides stick once they made a run (SPDK's
                    // behaviour); a refused set changes nothing.
                    if !matches!(res, Err(RunError::Setup(_))) {
                        *state.settings.lock().unwrap_or_else(|e| e.into_inner()) = next;
                    }
                    let reply = match res {
                        Ok(outcome) => {
                            if let Some(path) = &state.output_json {
                                crate::write_json(path, &outcome);
                            }
                            Ok(report::results_json(&outcome.results, outcome.terminated))
                        }
                        Err(RunError::Setup(e)) => Err(RpcError::invalid_params(e)),
                        Err(RunError::Internal(e)) => Err(RpcError::internal(format!(
                            "bdevperf failed with error {e}"
                        ))),
                    };
                    // Done before the reply leaves: a client that calls
                    // again as soon as it has the reply must not be told a
                    // run is still in progress.
                    REPLYING.store(true, Ordering::Release);
                    RUNNING.store(false, Ordering::Release);
                    match reply {
                        Ok(v) => r.ok(v),
                        Err(e) => r.err(e),
                    }
                    REPLYING.store(false, Ordering::Release);
                });
            if let Err(e) = spawned {
                RUNNING.store(false, Ordering::Release);
                tracing::error!("perform_tests: cannot start a thread: {e}");
            }
        },
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Workload;
    use serde_json::json;

    #[test]
    fn decodes_spdks_params() {
        let s = decode(Some(json!({
            "queue_depth": 16, "io_size": "128k", "time_in_sec": 3,
            "workload_type": "RandRW", "rw_percentage": 70, "unknown": true
        })))
        .unwrap();
        assert_eq!(s.queue_depth, Some(16));
        assert_eq!(s.io_size, Some(131072));
        assert_eq!(s.seconds, Some(3.0));
        assert_eq!(s.workload, Some(Workload::RandRw));
        assert_eq!(s.rwmixread, Some(70));
        assert_eq!(decode(None).unwrap(), Settings::default());
        assert_eq!(decode(Some(json!({}))).unwrap(), Settings::default());
        assert_eq!(
            decode(Some(json!({"io_size": 8192}))).unwrap().io_size,
            Some(8192)
        );
    }

    #[test]
    fn refuses_bad_params_precisely() {
        let e = |v: Value| decode(Some(v)).unwrap_err();
        assert!(e(json!([1])).contains("params must be an object"));
        assert!(e(json!({"queue_depth": 0})).contains("queue depth must be at least 1"));
        assert!(e(json!({"queue_depth": -1})).contains("queue_depth must be an integer"));
        assert!(e(json!({"queue_depth": "8"})).contains("queue_depth must be an integer"));
        assert!(e(json!({"io_size": "4q"})).contains("invalid IO size '4q'"));
        assert!(e(json!({"io_size": true})).contains("io_size must be a string"));
        assert!(e(json!({"time_in_sec": 0}))
            .contains("time_in_sec must be a number of seconds above 0"));
        assert!(e(json!({"time_in_sec": "1"})).contains("time_in_sec must be a number"));
        assert!(e(json!({"workload_type": "sideways"}))
            .contains("unsupported workload type 'sideways'"));
        assert!(
            e(json!({"rw_percentage": 101})).contains("rw_percentage must be an integer in 0..100")
        );
    }
}
