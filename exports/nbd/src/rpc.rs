//! JSON-RPC methods of the NBD target.
//!
//! | method | params | result |
//! |---|---|---|
//! | `nbd_server_start` | `listen` | the canonical listen address |
//! | `nbd_server_stop` | `listen` | `true` |
//! | `nbd_export_create` | `bdev_name`, `export_name`, `readonly?` | the export name |
//! | `nbd_export_delete` | `export_name` | `true` |
//! | `nbd_get_exports` | `export_name?` | `[{export_name, bdev_name, readonly, connections}]` |
//! | `nbd_get_servers` | none | `[{listen, transport, connections}]` |
//!
//! Errors are `-errno` with a precise message: -17 exists, -19 no such
//! bdev/export/server, -22 bad address or name, -98 address in use, -16 a
//! claimed bdev exported writable.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use wc_rpc::{decode, no_params, RegisterError, Registry, Responder, RpcError, StateMask};

use crate::server::{self, NbdError};

fn rpc_err(e: NbdError) -> RpcError {
    RpcError::errno_msg(e.errno(), e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Listen {
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportCreate {
    bdev_name: String,
    export_name: String,
    #[serde(default)]
    readonly: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportName {
    export_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaybeExportName {
    #[serde(default)]
    export_name: Option<String>,
}

/// Replies once every reactor swept its connections, so the connections
/// of a deleted export or stopped server are closed (and the bdev
/// descriptor released) when the caller hears back.
fn respond_after_sweep(r: Responder, v: Value) {
    if wc_reactor::try_current().is_none() {
        return r.ok(v);
    }
    wc_reactor::for_each_reactor(crate::conn::sweep_now, move || r.ok(v));
}

fn run<P, F>(params: Option<Value>, r: Responder, f: F)
where
    P: serde::de::DeserializeOwned,
    F: FnOnce(P) -> Result<Value, NbdError>,
{
    match decode::<P>(params) {
        Ok(p) => r.respond(f(p).map_err(rpc_err)),
        Err(e) => r.err(e),
    }
}

/// Registers the `nbd_*` methods, and the shutdown step that stops every
/// server and export before bdevs are torn down.
pub fn register(reg: &Registry) -> Result<(), RegisterError> {
    reg.register_fn("nbd_server_start", StateMask::RUNTIME, |p, r| {
        run(p, r, |l: Listen| {
            server::start_server(&l.listen).map(Value::String)
        })
    })?;
    reg.register_fn(
        "nbd_server_stop",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<Listen>(p)
            .and_then(|l| server::stop_server(&l.listen).map_err(rpc_err))
        {
            Ok(()) => respond_after_sweep(r, Value::Bool(true)),
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn("nbd_export_create", StateMask::RUNTIME, |p, r| {
        run(p, r, |c: ExportCreate| {
            server::create_export(&c.bdev_name, &c.export_name, c.readonly.unwrap_or(false))
                .map(|_| Value::String(c.export_name))
        })
    })?;
    reg.register_fn(
        "nbd_export_delete",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<ExportName>(p)
            .and_then(|e| server::delete_export(&e.export_name).map_err(rpc_err))
        {
            Ok(()) => respond_after_sweep(r, Value::Bool(true)),
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn("nbd_get_exports", StateMask::RUNTIME, |p, r| {
        run(p, r, |m: MaybeExportName| {
            let mut all = server::exports();
            if let Some(n) = m.export_name {
                all.retain(|e| e.export_name == n);
                if all.is_empty() {
                    return Err(NbdError::NotFound(format!("NBD export '{n}' not found")));
                }
            }
            Ok(json!(all))
        })
    })?;
    reg.register_fn(
        "nbd_get_servers",
        StateMask::RUNTIME,
        |p, r: Responder| match no_params("nbd_get_servers", p.as_ref()) {
            Ok(()) => r.ok(json!(server::servers())),
            Err(e) => r.err(e),
        },
    )?;
    wc_bdev::add_shutdown_hook(
        "nbd",
        Arc::new(|done: Box<dyn FnOnce() + Send>| {
            server::shutdown();
            if wc_reactor::try_current().is_some() {
                wc_reactor::for_each_reactor(crate::conn::sweep_now, done);
            } else {
                done();
            }
        }),
    );
    Ok(())
}
