//! Generic bdev JSON-RPC methods: `bdev_get_bdevs`, `bdev_get_iostat`,
//! `bdev_reset_iostat`, `bdev_wait_for_examine`, `bdev_set_options`, plus
//! the error mapping every module's RPC glue uses.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use wc_rpc::{decode, no_params, RegisterError, Registry, Responder, RpcError, StateMask};

use crate::error::BdevError;
use crate::{list, lookup};

/// Maps a bdev error to SPDK's reply: `-errno` with our precise message.
pub fn rpc_error(e: &BdevError) -> RpcError {
    RpcError::errno_msg(e.errno(), e.to_string())
}

/// Registers the generic bdev methods.
pub fn register(reg: &Registry) -> Result<(), RegisterError> {
    reg.register_fn("bdev_get_bdevs", StateMask::RUNTIME, get_bdevs)?;
    reg.register_fn("bdev_get_iostat", StateMask::RUNTIME, get_iostat)?;
    reg.register_fn("bdev_reset_iostat", StateMask::RUNTIME, reset_iostat)?;
    reg.register_fn(
        "bdev_wait_for_examine",
        StateMask::RUNTIME,
        |p, r: Responder| {
            r.respond(no_params("bdev_wait_for_examine", p.as_ref()).map(|_| json!(true)))
        },
    )?;
    reg.register_fn("bdev_set_options", StateMask::STARTUP, set_options)?;
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    timeout: Option<u64>,
}

fn get_bdevs(params: Option<Value>, r: Responder) {
    let p: GetBdevs = match decode(params) {
        Ok(p) => p,
        Err(e) => return r.err(e),
    };
    let Some(name) = p.name else {
        let all: Vec<Value> = list().iter().map(|b| b.info_json()).collect();
        return r.ok(Value::Array(all));
    };
    if let Some(b) = lookup(&name) {
        return r.ok(json!([b.info_json()]));
    }
    let timeout = p.timeout.unwrap_or(0);
    if timeout == 0 {
        return r.err(RpcError::from_errno(libc::ENODEV));
    }
    // Wait for the bdev without blocking the reactor: poll every 10 ms.
    let deadline = Instant::now() + Duration::from_millis(timeout);
    let Some(reactor) = wc_reactor::try_current() else {
        return r.err(RpcError::from_errno(libc::ENODEV));
    };
    let mut responder = Some(r);
    let handle = std::rc::Rc::new(std::cell::RefCell::new(None::<wc_reactor::PollerHandle>));
    let h2 = handle.clone();
    let poller = reactor.register_poller(
        "bdev_get_bdevs_wait",
        Some(Duration::from_millis(10)),
        move || {
            let found = lookup(&name);
            if found.is_some() || Instant::now() >= deadline {
                if let Some(r) = responder.take() {
                    match found {
                        Some(b) => r.ok(json!([b.info_json()])),
                        None => r.err(RpcError::from_errno(libc::ETIMEDOUT)),
                    }
                }
                if let Some(h) = h2.borrow().as_ref() {
                    h.unregister();
                }
            }
            wc_reactor::PollStatus::Idle
        },
    );
    *handle.borrow_mut() = Some(poller);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetIostat {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    names: Option<Vec<String>>,
    #[serde(default)]
    per_channel: Option<bool>,
    #[serde(default)]
    reset_mode: Option<String>,
}

fn get_iostat(params: Option<Value>, r: Responder) {
    let p: GetIostat = match decode(params) {
        Ok(p) => p,
        Err(e) => return r.err(e),
    };
    let mut wanted: Vec<String> = p.names.unwrap_or_default();
    if let Some(n) = p.name {
        wanted.push(n);
    }
    let bdevs = if wanted.is_empty() {
        list()
    } else {
        let mut v = Vec::new();
        for n in &wanted {
            match lookup(n) {
                Some(b) => v.push(b),
                None => return r.err(RpcError::from_errno(libc::ENODEV)),
            }
        }
        v
    };
    if p.per_channel.unwrap_or(false) && bdevs.len() != 1 {
        return r.err(RpcError::invalid_params(
            "per_channel requires exactly one bdev",
        ));
    }
    let reset = match p.reset_mode.as_deref() {
        None | Some("none") => false,
        Some("all") | Some("maxmin") | Some("error") => true,
        Some(other) => {
            return r.err(RpcError::invalid_params(format!(
                "invalid reset_mode '{other}'"
            )))
        }
    };
    let stats: Vec<Value> = bdevs
        .iter()
        .map(|b| {
            let mut v = serde_json::to_value(b.io_stats()).unwrap_or_else(|_| json!({}));
            if let Some(o) = v.as_object_mut() {
                let mut m = serde_json::Map::new();
                m.insert("name".into(), json!(b.name()));
                m.extend(std::mem::take(o));
                *o = m;
            }
            if reset {
                b.reset_io_stats();
            }
            v
        })
        .collect();
    r.ok(json!({
        "tick_rate": wc_reactor::tick::tick_rate(),
        "ticks": wc_reactor::tick::ticks(),
        "bdevs": stats,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetIostat {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    mode: Option<String>,
}

fn reset_iostat(params: Option<Value>, r: Responder) {
    let p: ResetIostat = match decode(params) {
        Ok(p) => p,
        Err(e) => return r.err(e),
    };
    if let Some(m) = p.mode.as_deref() {
        if !matches!(m, "all" | "maxmin" | "error" | "none") {
            return r.err(RpcError::invalid_params(format!("invalid mode '{m}'")));
        }
    }
    let bdevs = match p.name {
        Some(n) => match lookup(&n) {
            Some(b) => vec![b],
            None => return r.err(RpcError::from_errno(libc::ENODEV)),
        },
        None => list(),
    };
    for b in bdevs {
        b.reset_io_stats();
    }
    r.ok(json!(true))
}

/// `bdev_set_options`: accepted for compatibility with SPDK configs (the
/// pool sizes are per reactor here and fixed).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SetOptions {
    bdev_io_pool_size: Option<u64>,
    bdev_io_cache_size: Option<u64>,
    bdev_auto_examine: Option<bool>,
    iobuf_small_cache_size: Option<u64>,
    iobuf_large_cache_size: Option<u64>,
}

fn set_options(params: Option<Value>, r: Responder) {
    r.respond(decode::<SetOptions>(params).map(|_| json!(true)));
}

/// Decodes params, runs `f`, and replies with its value or the mapped error.
pub fn handle<P, F>(params: Option<Value>, r: Responder, f: F)
where
    P: serde::de::DeserializeOwned,
    F: FnOnce(P) -> Result<Value, BdevError>,
{
    match decode::<P>(params) {
        Ok(p) => r.respond(f(p).map_err(|e| rpc_error(&e))),
        Err(e) => r.err(e),
    }
}

/// Registers the usual pair `<prefix>_create` (params `P`, result: the
/// new bdev's name) and `<prefix>_delete` (`{name}`, result `true`) for a
/// bdev module, as every SPDK base bdev module has.
pub fn register_create_delete<P, C, D>(
    reg: &Registry,
    prefix: &str,
    create: C,
    delete: D,
) -> Result<(), RegisterError>
where
    P: serde::de::DeserializeOwned + 'static,
    C: Fn(P) -> Result<std::sync::Arc<crate::Bdev>, BdevError> + Send + Sync + 'static,
    D: Fn(&str) -> Result<(), BdevError> + Send + Sync + 'static,
{
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Delete {
        name: String,
    }
    reg.register_fn(
        &format!("{prefix}_create"),
        StateMask::RUNTIME,
        move |p, r| handle(p, r, |o: P| create(o).map(|b| json!(b.name()))),
    )?;
    reg.register_fn(
        &format!("{prefix}_delete"),
        StateMask::RUNTIME,
        move |p, r| handle(p, r, |d: Delete| delete(&d.name).map(|_| Value::Bool(true))),
    )
}

/// A module's own config entries (e.g. creations still waiting for a base
/// bdev), written after the registered bdevs.
pub type ConfigWriter = std::sync::Arc<dyn Fn() -> Vec<Value> + Send + Sync>;

fn module_writers() -> std::sync::MutexGuard<'static, Vec<(String, ConfigWriter)>> {
    static W: std::sync::OnceLock<std::sync::Mutex<Vec<(String, ConfigWriter)>>> =
        std::sync::OnceLock::new();
    W.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Registers a module-level config writer under a key (re-adding replaces).
pub fn add_module_config_writer(key: &str, w: ConfigWriter) {
    let mut m = module_writers();
    m.retain(|(k, _)| k != key);
    m.push((key.to_string(), w));
}

fn module_head_writers() -> std::sync::MutexGuard<'static, Vec<(String, ConfigWriter)>> {
    static W: std::sync::OnceLock<std::sync::Mutex<Vec<(String, ConfigWriter)>>> =
        std::sync::OnceLock::new();
    W.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Registers a module-level config writer whose entries come first, right
/// after `bdev_set_options` and before any bdev's (SPDK's module
/// `config_json`: a module's options, then what it attaches on its own,
/// e.g. `bdev_nvme_set_options` and `bdev_nvme_attach_controller`).
/// Re-adding a key replaces it.
pub fn add_module_head_config_writer(key: &str, w: ConfigWriter) {
    let mut m = module_head_writers();
    m.retain(|(k, _)| k != key);
    m.push((key.to_string(), w));
}

/// The `bdev` subsystem's config: `bdev_set_options`, the modules' head
/// entries, every bdev's create entry in registration order, modules' own
/// later entries, then `bdev_wait_for_examine`, as SPDK writes it.
pub fn subsystem_config() -> Vec<Value> {
    let mut v: Vec<Value> = vec![json!({
        "method": "bdev_set_options",
        "params": {"bdev_io_pool_size": 65535, "bdev_io_cache_size": 256, "bdev_auto_examine": true}
    })];
    let heads: Vec<ConfigWriter> = module_head_writers()
        .iter()
        .map(|(_, w)| w.clone())
        .collect();
    for w in heads {
        v.extend(w());
    }
    v.extend(list().iter().filter_map(|b| b.ops().config_entry(b)));
    let writers: Vec<ConfigWriter> = module_writers().iter().map(|(_, w)| w.clone()).collect();
    for w in writers {
        v.extend(w());
    }
    v.push(json!({"method": "bdev_wait_for_examine"}));
    v
}
