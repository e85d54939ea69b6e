//! JSON-RPC methods: `bdev_writecache_create`, `_delete`, `_flush`,
//! `_suspend`, `_resume`, `_get_stats`, `_clear_stats`, `_set_options`,
//! `_set_flush_on_suspend`.

use serde::Deserialize;
use serde_json::{json, Value};
use wc_rpc::{decode, RegisterError, Registry, Responder, RpcError, StateMask};

use crate::{CreateOpts, SetOpts, WcError};

fn err(e: &WcError) -> RpcError {
    RpcError::errno_msg(e.errno(), e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Delete {
    name: String,
    #[serde(default)]
    flush: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Name {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaybeName {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlushOnSuspend {
    name: String,
    #[serde(default)]
    enable: Option<bool>,
}

fn reply_done(r: Responder) -> Box<dyn FnOnce(Result<(), WcError>) + Send> {
    Box::new(move |res| match res {
        Ok(()) => r.ok(json!(true)),
        Err(e) => r.err(err(&e)),
    })
}

/// Registers the methods, and the shutdown hook that commits every
/// instance (writing back all when flush-on-suspend is set) before the
/// target exits.
pub fn register(reg: &Registry) -> Result<(), RegisterError> {
    wc_bdev::add_shutdown_hook(
        crate::MODULE,
        std::sync::Arc::new(|done: Box<dyn FnOnce() + Send>| {
            let names = crate::names();
            if names.is_empty() {
                return done();
            }
            let left = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(names.len()));
            let done = std::sync::Arc::new(std::sync::Mutex::new(Some(done)));
            for n in names {
                let left = left.clone();
                let done = done.clone();
                crate::delete(
                    &n,
                    false,
                    Box::new(move |r| {
                        if let Err(e) = r {
                            tracing::error!("writecache shutdown: {e}");
                        }
                        if left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
                            if let Some(d) = done.lock().ok().and_then(|mut d| d.take()) {
                                d();
                            }
                        }
                    }),
                );
            }
        }),
    );
    reg.register_fn(
        "bdev_writecache_create",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<CreateOpts>(p) {
            Ok(o) => {
                let name = o.name.clone();
                crate::create_or_wait_async(
                    o,
                    Box::new(move |res| match res {
                        // SPDK's vbdevs answer with the name either way; a
                        // pending one shows as such in get_stats.
                        Ok(crate::Created::Started(b)) => r.ok(json!(b.name())),
                        Ok(crate::Created::Pending { .. }) => r.ok(json!(name)),
                        Err(e) => r.err(err(&e)),
                    }),
                )
            }
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn(
        "bdev_writecache_delete",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<Delete>(p) {
            Ok(d) => crate::delete(&d.name, d.flush.unwrap_or(false), reply_done(r)),
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn(
        "bdev_writecache_flush",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<Name>(p) {
            Ok(n) => crate::flush(&n.name, reply_done(r)),
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn(
        "bdev_writecache_suspend",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<Name>(p) {
            Ok(n) => crate::suspend(&n.name, reply_done(r)),
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn(
        "bdev_writecache_resume",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<Name>(p) {
            Ok(n) => r.respond(
                crate::resume(&n.name)
                    .map(|_| json!(true))
                    .map_err(|e| err(&e)),
            ),
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn(
        "bdev_writecache_get_stats",
        StateMask::RUNTIME,
        |p, r: Responder| {
            let n: MaybeName = match decode(p) {
                Ok(n) => n,
                Err(e) => return r.err(e),
            };
            let pending = crate::pending_creations();
            let names = match &n.name {
                Some(n) => vec![n.clone()],
                None => crate::names(),
            };
            let mut out = Vec::new();
            for (p, waiting) in &pending {
                if n.name.as_ref().is_none_or(|x| x == p) {
                    out.push(json!({"name": p, "state": "pending", "waiting_for": waiting}));
                }
            }
            for name in names {
                if pending.iter().any(|(p, _)| *p == name) {
                    continue;
                }
                match crate::stats(&name) {
                    Ok(s) => {
                        let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
                        if let Some(o) = v.as_object_mut() {
                            o.insert("name".into(), json!(name));
                            let state = if crate::is_suspended(&name) == Some(true) {
                                "suspended"
                            } else if o.get("error").and_then(Value::as_i64).unwrap_or(0) != 0 {
                                "error"
                            } else {
                                "running"
                            };
                            o.insert("state".into(), json!(state));
                        }
                        out.push(v);
                    }
                    Err(e) => return r.err(err(&e)),
                }
            }
            r.ok(Value::Array(out));
        },
    )?;
    reg.register_fn(
        "bdev_writecache_clear_stats",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<Name>(p) {
            Ok(n) => r.respond(
                crate::clear_stats(&n.name)
                    .map(|_| json!(true))
                    .map_err(|e| err(&e)),
            ),
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn(
        "bdev_writecache_set_options",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<SetOpts>(p) {
            Ok(o) => r.respond(
                crate::set_options(&o)
                    .map(|_| json!(true))
                    .map_err(|e| err(&e)),
            ),
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn(
        "bdev_writecache_set_flush_on_suspend",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<FlushOnSuspend>(p) {
            Ok(f) => r.respond(
                crate::set_flush_on_suspend(&f.name, f.enable.unwrap_or(true))
                    .map(|_| json!(true))
                    .map_err(|e| err(&e)),
            ),
            Err(e) => r.err(e),
        },
    )?;
    Ok(())
}
