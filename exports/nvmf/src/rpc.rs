//! JSON-RPC methods of the NVMe-oF target, with SPDK's names, parameters
//! and results (see the crate docs for the table). Parameters the stock
//! CLI sends for features we do not have (ANA, passthrough, TLS keys,
//! target names) are accepted where they ask for nothing.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use wc_rpc::{decode, RegisterError, Registry, Responder, RpcError, StateMask};

use crate::target::{self, NsArgs, NvmfError, SubsystemArgs};

fn rpc_err(e: NvmfError) -> RpcError {
    RpcError::new(e.code, e.message)
}

fn run<P, F>(params: Option<Value>, r: Responder, f: F)
where
    P: serde::de::DeserializeOwned,
    F: FnOnce(P) -> Result<Value, NvmfError>,
{
    match decode::<P>(params) {
        Ok(p) => r.respond(f(p).map_err(rpc_err)),
        Err(e) => r.err(e),
    }
}

/// Replies once every reactor swept its connections, so the queue pairs of
/// a deleted subsystem or removed listener are closed when the caller
/// hears back.
fn respond_after_sweep(r: Responder, v: Value) {
    if wc_reactor::try_current().is_none() {
        return r.ok(v);
    }
    wc_reactor::for_each_reactor(crate::conn::sweep_now, move || r.ok(v));
}

/// Rejects a `tgt_name` other than the default target.
fn check_tgt(t: &Option<String>) -> Result<(), NvmfError> {
    match t {
        None => Ok(()),
        Some(n) => Err(NvmfError::invalid(format!(
            "Unable to find a target with name {n} (only the default target exists)"
        ))),
    }
}

fn no(flag: Option<bool>, what: &str) -> Result<(), NvmfError> {
    if flag == Some(true) {
        return Err(NvmfError::invalid(format!("{what} is not supported")));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetTransports {
    #[serde(default)]
    trtype: Option<String>,
    #[serde(default)]
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSubsystem {
    nqn: String,
    #[serde(default)]
    serial_number: Option<String>,
    #[serde(default)]
    model_number: Option<String>,
    #[serde(default)]
    allow_any_host: Option<bool>,
    #[serde(default)]
    max_namespaces: Option<u32>,
    #[serde(default)]
    min_cntlid: Option<u16>,
    #[serde(default)]
    max_cntlid: Option<u16>,
    #[serde(default)]
    ana_reporting: Option<bool>,
    #[serde(default)]
    passthrough: Option<bool>,
    #[serde(default)]
    enable_nssr: Option<bool>,
    #[serde(default)]
    dmrsl: Option<u32>,
    #[serde(default)]
    wzsl: Option<u32>,
    #[serde(default)]
    admin_label: Option<String>,
    #[serde(default)]
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Nqn {
    nqn: String,
    #[serde(default)]
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaybeNqn {
    #[serde(default)]
    nqn: Option<String>,
    #[serde(default)]
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NsParams {
    bdev_name: String,
    #[serde(default)]
    nsid: Option<u32>,
    #[serde(default)]
    nguid: Option<String>,
    #[serde(default)]
    eui64: Option<String>,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    ptpl_file: Option<String>,
    #[serde(default)]
    anagrpid: Option<u32>,
    #[serde(default)]
    no_auto_visible: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNs {
    nqn: String,
    namespace: NsParams,
    #[serde(default)]
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveNs {
    nqn: String,
    nsid: u32,
    #[serde(default)]
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenParams {
    trtype: String,
    #[serde(default)]
    adrfam: Option<String>,
    traddr: String,
    #[serde(default)]
    trsvcid: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Listener {
    nqn: String,
    listen_address: ListenParams,
    #[serde(default)]
    secure_channel: Option<bool>,
    #[serde(default)]
    ana_state: Option<String>,
    #[serde(default)]
    sock_impl: Option<String>,
    #[serde(default)]
    numa_id: Option<i64>,
    #[serde(default)]
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Host {
    nqn: String,
    host: String,
    #[serde(default)]
    psk: Option<String>,
    #[serde(default)]
    dhchap_key: Option<String>,
    #[serde(default)]
    dhchap_ctrlr_key: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    tgt_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowAny {
    nqn: String,
    allow_any_host: bool,
    #[serde(default)]
    tgt_name: Option<String>,
}

fn listen_of(l: &ListenParams) -> Result<(crate::ListenAddress, std::net::SocketAddr), NvmfError> {
    target::parse_listen_address(
        &l.trtype,
        l.adrfam.as_deref(),
        &l.traddr,
        l.trsvcid.as_deref(),
    )
}

/// Registers the `nvmf_*` methods and the shutdown step that closes every
/// listener and queue pair before bdevs are torn down.
pub fn register(reg: &Registry) -> Result<(), RegisterError> {
    reg.register_fn("nvmf_create_transport", StateMask::RUNTIME, |p, r| {
        let map = match p {
            Some(Value::Object(m)) => m,
            _ => return r.err(RpcError::invalid_params("Invalid parameters")),
        };
        r.respond(
            target::create_transport(&map)
                .map(|_| Value::Bool(true))
                .map_err(rpc_err),
        )
    })?;
    reg.register_fn("nvmf_get_transports", StateMask::RUNTIME, |p, r| {
        let p = if p.is_none() {
            Some(serde_json::json!({}))
        } else {
            p
        };
        run(p, r, |g: GetTransports| {
            check_tgt(&g.tgt_name)?;
            target::get_transports(g.trtype.as_deref())
        })
    })?;
    reg.register_fn("nvmf_create_subsystem", StateMask::RUNTIME, |p, r| {
        run(p, r, |c: CreateSubsystem| {
            check_tgt(&c.tgt_name)?;
            no(c.ana_reporting, "ana_reporting")?;
            no(c.passthrough, "passthrough")?;
            no(c.enable_nssr, "enable_nssr")?;
            let _ = (c.dmrsl, c.wzsl, c.admin_label);
            target::create_subsystem(SubsystemArgs {
                nqn: c.nqn,
                serial_number: c.serial_number,
                model_number: c.model_number,
                allow_any_host: c.allow_any_host.unwrap_or(false),
                max_namespaces: c.max_namespaces,
                min_cntlid: c.min_cntlid,
                max_cntlid: c.max_cntlid,
            })
            .map(|_| Value::Bool(true))
        })
    })?;
    reg.register_fn(
        "nvmf_delete_subsystem",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<Nqn>(p).and_then(|n| {
            check_tgt(&n.tgt_name)
                .and_then(|_| target::delete_subsystem(&n.nqn))
                .map_err(rpc_err)
        }) {
            Ok(()) => respond_after_sweep(r, Value::Bool(true)),
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn("nvmf_subsystem_add_ns", StateMask::RUNTIME, |p, r| {
        run(p, r, |a: AddNs| {
            check_tgt(&a.tgt_name)?;
            let n = a.namespace;
            if n.ptpl_file.is_some() {
                return Err(NvmfError::invalid("ptpl_file is not supported"));
            }
            no(n.no_auto_visible, "no_auto_visible")?;
            let _ = n.anagrpid;
            target::add_ns(
                &a.nqn,
                NsArgs {
                    bdev_name: n.bdev_name,
                    nsid: n.nsid,
                    nguid: n.nguid,
                    eui64: n.eui64,
                    uuid: n.uuid,
                },
            )
            .map(Value::from)
        })
    })?;
    reg.register_fn("nvmf_subsystem_remove_ns", StateMask::RUNTIME, |p, r| {
        run(p, r, |a: RemoveNs| {
            check_tgt(&a.tgt_name)?;
            target::remove_ns(&a.nqn, a.nsid).map(|_| Value::Bool(true))
        })
    })?;
    reg.register_fn("nvmf_subsystem_add_listener", StateMask::RUNTIME, |p, r| {
        run(p, r, |l: Listener| {
            check_tgt(&l.tgt_name)?;
            no(l.secure_channel, "secure_channel")?;
            let _ = (l.ana_state, l.sock_impl, l.numa_id);
            let (addr, sa) = listen_of(&l.listen_address)?;
            target::add_listener(&l.nqn, addr, sa).map(|_| Value::Bool(true))
        })
    })?;
    reg.register_fn(
        "nvmf_subsystem_remove_listener",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<Listener>(p).and_then(|l| {
            check_tgt(&l.tgt_name)
                .and_then(|_| listen_of(&l.listen_address))
                .and_then(|(addr, _)| target::remove_listener(&l.nqn, &addr))
                .map_err(rpc_err)
        }) {
            Ok(()) => respond_after_sweep(r, Value::Bool(true)),
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn("nvmf_subsystem_add_host", StateMask::RUNTIME, |p, r| {
        run(p, r, |h: Host| {
            check_tgt(&h.tgt_name)?;
            if h.psk.is_some() || h.dhchap_key.is_some() || h.dhchap_ctrlr_key.is_some() {
                return Err(NvmfError::invalid(
                    "TLS PSK and DH-HMAC-CHAP keys are not supported",
                ));
            }
            target::add_host(&h.nqn, &h.host).map(|_| Value::Bool(true))
        })
    })?;
    reg.register_fn(
        "nvmf_subsystem_remove_host",
        StateMask::RUNTIME,
        |p, r: Responder| match decode::<Host>(p).and_then(|h| {
            let _ = h.timeout_ms;
            check_tgt(&h.tgt_name)
                .and_then(|_| target::remove_host(&h.nqn, &h.host))
                .map_err(rpc_err)
        }) {
            Ok(()) => respond_after_sweep(r, Value::Bool(true)),
            Err(e) => r.err(e),
        },
    )?;
    reg.register_fn(
        "nvmf_subsystem_allow_any_host",
        StateMask::RUNTIME,
        |p, r| {
            run(p, r, |a: AllowAny| {
                check_tgt(&a.tgt_name)?;
                target::allow_any_host(&a.nqn, a.allow_any_host).map(|_| Value::Bool(true))
            })
        },
    )?;
    reg.register_fn("nvmf_get_subsystems", StateMask::RUNTIME, |p, r| {
        let p = if p.is_none() {
            Some(serde_json::json!({}))
        } else {
            p
        };
        run(p, r, |m: MaybeNqn| {
            check_tgt(&m.tgt_name)?;
            target::get_subsystems(m.nqn.as_deref())
        })
    })?;
    reg.register_fn(
        "nvmf_subsystem_get_controllers",
        StateMask::RUNTIME,
        |p, r| {
            run(p, r, |n: Nqn| {
                check_tgt(&n.tgt_name)?;
                target::get_controllers(&n.nqn)
            })
        },
    )?;
    reg.register_fn("nvmf_subsystem_get_qpairs", StateMask::RUNTIME, |p, r| {
        run(p, r, |n: Nqn| {
            check_tgt(&n.tgt_name)?;
            target::get_qpairs(&n.nqn)
        })
    })?;
    wc_bdev::add_shutdown_hook(
        "nvmf",
        Arc::new(|done: Box<dyn FnOnce() + Send>| {
            target::shutdown();
            if wc_reactor::try_current().is_some() {
                wc_reactor::for_each_reactor(crate::conn::sweep_now, done);
            } else {
                done();
            }
        }),
    );
    Ok(())
}
