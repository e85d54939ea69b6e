//! Framework RPCs: `framework_start_init`, `framework_get_reactors`,
//! `thread_get_stats`, `spdk_kill_instance`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{json, Value};
use wc_config::ConfigCall;
use wc_reactor::ReactorHandle;
use wc_rpc::{
    decode, no_params, PauseHandle, RegisterError, Registry, Responder, RpcError, StateMask,
};

/// What `framework_start_init` still has to do under `--wait-for-rpc`.
pub(crate) struct PendingInit {
    pub(crate) calls: Vec<ConfigCall>,
    pub(crate) ignore_errors: bool,
    pub(crate) main: ReactorHandle,
    pub(crate) pause: Option<PauseHandle>,
}

static PENDING: Mutex<Option<PendingInit>> = Mutex::new(None);

/// Set when `framework_start_init` failed: the app then stops with a
/// non-zero exit status, as SPDK's `spdk_app_stop(rc)` does.
static INIT_FAILED: AtomicBool = AtomicBool::new(false);

/// Whether a `framework_start_init` failed (the exit status must say so).
pub(crate) fn init_failed() -> bool {
    INIT_FAILED.load(Ordering::SeqCst)
}

pub(crate) fn set_pending_init(p: PendingInit) {
    *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
}

pub(crate) fn register(reg: &Registry) -> Result<(), RegisterError> {
    let reg2 = reg.clone();
    reg.register_fn(
        "framework_start_init",
        StateMask::STARTUP,
        move |p, r: Responder| {
            if let Err(e) = no_params("framework_start_init", p.as_ref()) {
                return r.err(e);
            }
            let Some(pending) = PENDING.lock().unwrap_or_else(|e| e.into_inner()).take() else {
                return r.err(RpcError::internal("framework_initialization failed"));
            };
            // Replaying the config needs the main reactor (where we run now):
            // do it from a helper thread and reply when done.
            let reg = reg2.clone();
            std::thread::spawn(move || {
                if let Some(p) = &pending.pause {
                    p.pause();
                }
                let res =
                    crate::finish_init(&reg, &pending.main, &pending.calls, pending.ignore_errors);
                if let Some(p) = &pending.pause {
                    p.resume();
                }
                match res {
                    Ok(()) => r.ok(json!(true)),
                    Err(e) => {
                        tracing::error!("framework_start_init: {e}");
                        INIT_FAILED.store(true, Ordering::SeqCst);
                        r.err(RpcError::internal("framework_initialization failed"));
                        // SPDK stops the app when init fails (non-zero exit).
                        // Give the reply a moment to leave first, as
                        // spdk_kill_instance does: stopping the server drops
                        // unsent replies.
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        // SAFETY: kill(getpid(), SIGTERM) has no memory-safety preconditions.
                        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                    }
                }
            });
        },
    )?;
    reg.register_fn("framework_get_reactors", StateMask::RUNTIME, |p, r: Responder| {
        if let Err(e) = no_params("framework_get_reactors", p.as_ref()) {
            return r.err(e);
        }
        let Some(me) = wc_reactor::try_current() else {
            return r.err(RpcError::internal("not on a reactor"));
        };
        let reactors: Vec<Value> = me
            .siblings()
            .iter()
            .map(|h| {
                let (busy, idle) = h.busy_idle_ticks();
                json!({
                    "lcore": h.core(),
                    "numa_id": wc_reactor::topology::numa_node_of(h.core()).map(|n| n as i64).unwrap_or(-1),
                    "tid": h.tid(),
                    "busy": busy,
                    "idle": idle,
                    "in_interrupt": h.in_interrupt(),
                    "irq": 0, "sys": 0, "usr": 0,
                    "lw_threads": [{
                        "name": thread_name(h, me.main_handle().index()),
                        "id": h.index() + 1,
                        "cpumask": wc_reactor::CoreMask::from_cores([h.core()]).to_hex(),
                        "elapsed": busy + idle,
                    }],
                })
            })
            .collect();
        r.ok(json!({
            "tick_rate": wc_reactor::tick::tick_rate(),
            "pid": std::process::id(),
            "reactors": reactors,
        }));
    })?;
    reg.register_fn("thread_get_stats", StateMask::RUNTIME, |p, r: Responder| {
        if let Err(e) = no_params("thread_get_stats", p.as_ref()) {
            return r.err(e);
        }
        let Some(me) = wc_reactor::try_current() else {
            return r.err(RpcError::internal("not on a reactor"));
        };
        let threads: Vec<Value> = me
            .siblings()
            .iter()
            .map(|h| {
                let (busy, idle) = h.busy_idle_ticks();
                let (active, timed) = h.poller_counts();
                json!({
                    "name": thread_name(h, me.main_handle().index()),
                    "id": h.index() + 1,
                    "cpumask": wc_reactor::CoreMask::from_cores([h.core()]).to_hex(),
                    "busy": busy,
                    "idle": idle,
                    "active_pollers_count": active,
                    "timed_pollers_count": timed,
                    "paused_pollers_count": 0,
                })
            })
            .collect();
        r.ok(json!({"tick_rate": wc_reactor::tick::tick_rate(), "threads": threads}));
    })?;
    reg.register_fn(
        "spdk_kill_instance",
        StateMask::RUNTIME,
        |p, r: Responder| {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Kill {
                sig_name: String,
            }
            let k: Kill = match decode(p) {
                Ok(k) => k,
                Err(e) => return r.err(e),
            };
            let sig = match k.sig_name.as_str() {
                "SIGINT" => libc::SIGINT,
                "SIGTERM" => libc::SIGTERM,
                "SIGQUIT" => libc::SIGQUIT,
                "SIGHUP" => libc::SIGHUP,
                "SIGKILL" => libc::SIGKILL,
                "SIGUSR1" => libc::SIGUSR1,
                other => {
                    return r.err(RpcError::invalid_params(format!(
                        "unsupported signal '{other}'"
                    )))
                }
            };
            r.ok(json!(true));
            // Give the reply a moment to leave before the signal lands.
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                // SAFETY: kill(getpid(), sig) has no memory-safety preconditions.
                unsafe { libc::kill(libc::getpid(), sig) };
            });
        },
    )?;
    Ok(())
}

fn thread_name(h: &ReactorHandle, main_index: usize) -> String {
    if h.index() == main_index {
        "app_thread".into()
    } else {
        format!("reactor_{}", h.core())
    }
}
