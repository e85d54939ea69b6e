//! JSON-RPC methods (SPDK shapes, relaxed decoding: unknown keys ignored).
//!
//! | method | params | result |
//! |---|---|---|
//! | `vhost_create_blk_controller` | `ctrlr, dev_name, cpumask?, readonly?, packed_ring?, transport?` | `true` |
//! | `vhost_delete_controller` | `ctrlr` | `true` |
//! | `vhost_get_controllers` | `name?` | `[{ctrlr, cpumask, delay_base_us, iops_threshold, socket, sessions, backend_specific}]` |
//!
//! Errors are SPDK's: -32602 with the errno's text (then the details).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use wc_rpc::{decode, RegisterError, Registry, RpcError, StateMask};

use crate::ctrl::{self, CreateOpts, VhostError};

/// As SPDK's vhost RPCs: invalid params (-32602) with the errno's text,
/// followed by what exactly was wrong.
fn rpc_err(e: VhostError) -> RpcError {
    RpcError::new(
        wc_rpc::INVALID_PARAMS,
        format!("{}: {e}", wc_rpc::strerror(e.errno())),
    )
}

#[derive(Deserialize)]
struct Create {
    ctrlr: String,
    dev_name: String,
    #[serde(default)]
    cpumask: Option<String>,
    #[serde(default)]
    readonly: Option<bool>,
    #[serde(default)]
    packed_ring: Option<bool>,
    #[serde(default)]
    transport: Option<String>,
}

#[derive(Deserialize)]
struct Ctrlr {
    ctrlr: String,
}

#[derive(Deserialize)]
struct MaybeName {
    #[serde(default)]
    name: Option<String>,
}

/// Registers the `vhost_*` methods and the shutdown hook.
pub fn register(reg: &Registry) -> Result<(), RegisterError> {
    reg.register_fn(
        "vhost_create_blk_controller",
        StateMask::RUNTIME,
        |p, r| match decode::<Create>(p) {
            Err(e) => r.err(e),
            Ok(c) => {
                if let Some(t) = c.transport.as_deref() {
                    if t != "vhost_user_blk" {
                        return r.err(rpc_err(VhostError::Invalid(format!(
                            "transport '{t}' is not supported"
                        ))));
                    }
                }
                let o = CreateOpts {
                    ctrlr: c.ctrlr,
                    dev_name: c.dev_name,
                    cpumask: c.cpumask,
                    readonly: c.readonly.unwrap_or(false),
                    packed_ring: c.packed_ring.unwrap_or(false),
                };
                r.respond(
                    ctrl::create_controller(o)
                        .map(|_| Value::Bool(true))
                        .map_err(rpc_err),
                )
            }
        },
    )?;
    reg.register_fn(
        "vhost_delete_controller",
        StateMask::RUNTIME,
        |p, r| match decode::<Ctrlr>(p) {
            Err(e) => r.err(e),
            Ok(c) => r.respond(
                ctrl::delete_controller(&c.ctrlr)
                    .map(|_| Value::Bool(true))
                    .map_err(rpc_err),
            ),
        },
    )?;
    reg.register_fn(
        "vhost_get_controllers",
        StateMask::RUNTIME,
        |p, r| match decode::<MaybeName>(p) {
            Err(e) => r.err(e),
            Ok(m) => {
                let mut all = ctrl::controllers();
                if let Some(n) = m.name {
                    all.retain(|c| c.ctrlr == n);
                    if all.is_empty() {
                        return r.err(rpc_err(VhostError::NotFound(format!(
                            "controller '{n}' not found"
                        ))));
                    }
                }
                r.ok(json!(all))
            }
        },
    )?;
    wc_bdev::add_shutdown_hook(
        "vhost",
        Arc::new(|done: Box<dyn FnOnce() + Send>| {
            ctrl::shutdown();
            done();
        }),
    );
    Ok(())
}
