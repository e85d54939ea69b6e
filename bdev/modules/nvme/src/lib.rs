//! `nvme`: the NVMe over TCP initiator as a bdev module, SPDK's
//! `bdev_nvme_attach_controller -t tcp`.
//!
//! Attaching a controller connects its admin queue on the reactor that
//! runs the RPC (its home), enables and identifies the controller, and
//! registers one bdev per active namespace, `<name>n<nsid>`. Each reactor
//! that opens a channel on any of them gets its own I/O queue pair to the
//! controller, polled there ([`channel`]); the wire format is
//! `wc-nvme-wire`'s. Queue pairs are non-blocking state machines
//! ([`qpair`]) with preallocated command slots.
//!
//! Connection loss follows SPDK's reconnect rules (see [`ctrlr`]):
//! I/O waits while the controller reconnects every `reconnect_delay_sec`,
//! fails after `fast_io_fail_timeout_sec`, and the controller is deleted
//! (bdevs hot-removed) after `ctrlr_loss_timeout_sec`.
//!
//! `trtype: "pcie"` is refused: the kernel's nvme driver owns local
//! devices here, and `bdev_uring_create` on `/dev/nvmeXnY` uses them.

#![warn(missing_docs)]

mod channel;
mod cmd;
mod ctrlr;
mod ns;
pub mod options;
pub mod opts;
mod qpair;
mod sock;

use serde_json::{json, Value};
use wc_bdev::BdevError;

pub use ctrlr::{set_io_timeout_ms, set_keep_alive_timeout_ms};
pub use opts::AttachOpts;

/// Attaches a controller from the current reactor and resolves with the
/// names of the bdevs created, one per active namespace.
pub async fn attach(opts: AttachOpts) -> Result<Vec<String>, BdevError> {
    let params = opts.validate()?;
    let name = params.name.clone();
    if ctrlr::lookup(&name).is_some() {
        return Err(BdevError::Exists(format!("NVMe controller {name}")));
    }
    let (ctrlr, info) = ctrlr::connect(params).await?;
    let names = match ns::sync_namespaces(&ctrlr, &info.namespaces) {
        Ok(n) => n,
        Err(e) => {
            ctrlr::delete(&ctrlr);
            return Err(e);
        }
    };
    if names.is_empty() {
        tracing::warn!("nvme {name}: the subsystem has no active namespace");
    }
    tracing::info!(
        "nvme {name}: attached {} ({} namespaces, {} I/O queues, digests header={} data={})",
        ctrlr.params.addr,
        names.len(),
        info.io_queues,
        ctrlr.params.hdgst,
        ctrlr.params.ddgst
    );
    Ok(names)
}

/// Detaches a controller: its bdevs are removed, its queues closed. Must
/// run on the controller's home reactor or forwards there.
pub fn detach(name: &str) -> Result<(), BdevError> {
    let c = ctrlr::lookup(name)
        .ok_or_else(|| BdevError::NotFound(format!("NVMe controller {name}")))?;
    let on_home = wc_reactor::try_current().is_some_and(|r| r.handle().index() == c.home.index());
    if on_home {
        ctrlr::delete(&c);
    } else {
        let c2 = c.clone();
        c.home.send(move || ctrlr::delete(&c2));
    }
    Ok(())
}

/// `bdev_nvme_get_controllers` result: one entry, or all.
pub fn controllers_json(name: Option<&str>) -> Result<Value, BdevError> {
    match name {
        Some(n) => {
            let c = ctrlr::lookup(n)
                .ok_or_else(|| BdevError::NotFound(format!("NVMe controller {n}")))?;
            Ok(json!([c.info_json()]))
        }
        None => Ok(Value::Array(
            ctrlr::all().iter().map(|c| c.info_json()).collect(),
        )),
    }
}

/// `bdev_nvme_reset_controller`: disconnects and reconnects the admin
/// queue and every I/O queue pair of controller `name` (queued I/O is
/// sent again after it); resolves when the reconnect is done. `cntlid`,
/// when given and not 0, must be the controller's. Runs on any reactor
/// (the reset itself runs on the controller's home).
pub async fn reset(name: &str, cntlid: Option<u16>) -> Result<(), BdevError> {
    let c = ctrlr::lookup(name)
        .ok_or_else(|| BdevError::NotFound(format!("NVMe controller {name}")))?;
    if let Some(id) = cntlid.filter(|id| *id != 0) {
        let ours = c.info.lock().map(|i| i.cntlid).unwrap_or_default();
        if id != ours {
            return Err(BdevError::NotFound(format!(
                "NVMe controller {name} has no controller with cntlid {id}"
            )));
        }
    }
    let (tx, rx) = futures::channel::oneshot::channel();
    let c2 = c.clone();
    c.home.send(move || {
        let _ = tx.send(ctrlr::user_reset(&c2));
    });
    let waiter = rx
        .await
        .map_err(|_| BdevError::Internal("the controller's reactor stopped".into()))??;
    match waiter.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(msg)) => Err(BdevError::Os {
            context: format!("reset of NVMe controller {name} failed"),
            source_msg: msg,
            errno: libc::EIO,
        }),
        Err(_) => Err(BdevError::Internal("the reset was abandoned".into())),
    }
}

/// The `bdev` subsystem's head entries of this module, as SPDK's
/// `bdev_nvme` writes them: the options, then one attach per controller
/// (a controller without namespaces included).
pub fn config_entries() -> Vec<Value> {
    let mut v = vec![options::current().config_entry()];
    v.extend(ctrlr::all().iter().map(|c| c.config_entry()));
    v
}

/// Counters of a controller, for tests and diagnostics: (namespace
/// attribute notices handled, bdev names).
pub fn controller_namespaces(name: &str) -> Option<(u64, Vec<String>)> {
    ctrlr::lookup(name).map(|c| {
        (
            c.ns_notices.load(std::sync::atomic::Ordering::Relaxed),
            c.bdevs.lock().map(|b| b.clone()).unwrap_or_default(),
        )
    })
}

/// Counters of a controller, for tests and diagnostics: (resets started,
/// current generation, state name).
pub fn controller_state(name: &str) -> Option<(u64, u64, &'static str)> {
    ctrlr::lookup(name).map(|c| {
        (
            c.resets.load(std::sync::atomic::Ordering::Relaxed),
            c.generation(),
            c.state_name(),
        )
    })
}

/// JSON-RPC methods: `bdev_nvme_set_options`,
/// `bdev_nvme_attach_controller`, `bdev_nvme_detach_controller`,
/// `bdev_nvme_get_controllers`, `bdev_nvme_reset_controller`; and the
/// module's place in `save_config`.
pub mod rpc {
    use serde::Deserialize;
    use serde_json::{json, Value};
    use wc_rpc::{decode, RegisterError, Registry, Responder, StateMask};

    use super::AttachOpts;

    /// `bdev_nvme_detach_controller`: the CLI sends the path keys too
    /// (a path selects which of a multipath controller's paths goes; with
    /// one path per controller they must match it when given).
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Detach {
        name: String,
        #[serde(default)]
        trtype: Option<String>,
        #[serde(default)]
        traddr: Option<String>,
        #[serde(default)]
        adrfam: Option<String>,
        #[serde(default)]
        trsvcid: Option<String>,
        #[serde(default)]
        subnqn: Option<String>,
        #[serde(default)]
        hostaddr: Option<String>,
        #[serde(default)]
        hostsvcid: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Reset {
        name: String,
        #[serde(default)]
        cntlid: Option<u16>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Get {
        #[serde(default)]
        name: Option<String>,
    }

    fn err(e: &wc_bdev::BdevError) -> wc_rpc::RpcError {
        wc_bdev::rpc::rpc_error(e)
    }

    /// Registers the methods.
    pub fn register(reg: &Registry) -> Result<(), RegisterError> {
        wc_bdev::rpc::add_module_head_config_writer(
            "nvme",
            std::sync::Arc::new(super::config_entries),
        );
        reg.register_fn(
            "bdev_nvme_set_options",
            StateMask::BOTH,
            |p: Option<Value>, r: Responder| {
                let o: crate::options::SetOptions = match decode(p) {
                    Ok(o) => o,
                    Err(e) => return r.err(e),
                };
                match crate::options::set(&o) {
                    Ok(()) => r.ok(json!(true)),
                    Err(crate::options::SetError::ControllersAttached) => {
                        r.err(wc_rpc::RpcError::errno_msg(
                            libc::EPERM,
                            "RPC not permitted with nvme controllers already attached",
                        ))
                    }
                    Err(crate::options::SetError::Invalid(e)) => r.err(err(&e)),
                }
            },
        )?;
        reg.register_fn(
            "bdev_nvme_reset_controller",
            StateMask::RUNTIME,
            |p: Option<Value>, r: Responder| {
                let q: Reset = match decode(p) {
                    Ok(q) => q,
                    Err(e) => return r.err(e),
                };
                let Some(reactor) = wc_reactor::try_current() else {
                    return r.err(wc_rpc::RpcError::internal("no reactor to reset from"));
                };
                reactor
                    .spawn_local(async move {
                        match super::reset(&q.name, q.cntlid).await {
                            Ok(()) => r.ok(json!(true)),
                            Err(e) => r.err(err(&e)),
                        }
                    })
                    .detach();
            },
        )?;
        reg.register_fn(
            "bdev_nvme_attach_controller",
            StateMask::RUNTIME,
            |p: Option<Value>, r: Responder| {
                let o: AttachOpts = match decode(p) {
                    Ok(o) => o,
                    Err(e) => return r.err(e),
                };
                // Refuse bad parameters at once, before any connecting.
                if let Err(e) = o.validate() {
                    return r.err(err(&e));
                }
                let Some(reactor) = wc_reactor::try_current() else {
                    return r.err(wc_rpc::RpcError::internal("no reactor to attach from"));
                };
                reactor
                    .spawn_local(async move {
                        match super::attach(o).await {
                            Ok(names) => r.ok(json!(names)),
                            Err(e) => r.err(err(&e)),
                        }
                    })
                    .detach();
            },
        )?;
        reg.register_fn(
            "bdev_nvme_detach_controller",
            StateMask::RUNTIME,
            |p: Option<Value>, r: Responder| {
                let d: Detach = match decode(p) {
                    Ok(d) => d,
                    Err(e) => return r.err(e),
                };
                let Some(c) = super::ctrlr::lookup(&d.name) else {
                    return r.err(err(&wc_bdev::BdevError::NotFound(format!(
                        "NVMe controller {}",
                        d.name
                    ))));
                };
                let p = &c.params;
                let mismatch = d
                    .trtype
                    .as_deref()
                    .is_some_and(|t| !t.eq_ignore_ascii_case("tcp"))
                    || d.traddr.as_deref().is_some_and(|t| t != p.traddr)
                    || d.adrfam
                        .as_deref()
                        .is_some_and(|f| !f.eq_ignore_ascii_case(p.adrfam.canonical()))
                    || d.trsvcid.as_deref().is_some_and(|s| s != p.trsvcid)
                    || d.subnqn.as_deref().is_some_and(|s| s != p.subnqn)
                    || d.hostaddr.as_deref().is_some_and(|s| !s.is_empty())
                    || d.hostsvcid.as_deref().is_some_and(|s| !s.is_empty());
                if mismatch {
                    return r.err(err(&wc_bdev::BdevError::NotFound(format!(
                        "NVMe controller {} has no path matching the given transport ID",
                        d.name
                    ))));
                }
                r.respond(
                    super::detach(&d.name)
                        .map(|_| json!(true))
                        .map_err(|e| err(&e)),
                )
            },
        )?;
        reg.register_fn(
            "bdev_nvme_get_controllers",
            StateMask::RUNTIME,
            |p: Option<Value>, r: Responder| {
                let g: Get = match decode(p) {
                    Ok(g) => g,
                    Err(e) => return r.err(e),
                };
                r.respond(super::controllers_json(g.name.as_deref()).map_err(|e| err(&e)))
            },
        )
    }
}
