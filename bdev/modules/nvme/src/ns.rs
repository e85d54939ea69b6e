//! A namespace bdev (`<controller>n<nsid>`): geometry from Identify
//! Namespace, I/O types from the controller's ONCS and VWC, its channel
//! the reactor's queue pair to the controller.

use std::sync::Arc;

use serde_json::{json, Value};
use wc_bdev::{BdevConfig, BdevError, BdevOps, IoChannel, IoType};
use wc_nvme_wire::identify::oncs;

use crate::channel::{path_for, NsChannel};
use crate::ctrlr::{phase, Ctrlr, NsInfo};

/// Module name in `bdev_get_bdevs`.
pub(crate) const MODULE: &str = "nvme";

pub(crate) struct NsBdev {
    pub ctrlr: Arc<Ctrlr>,
    pub ns: NsInfo,
    /// Largest read/write of one command, in blocks.
    pub max_blocks: u64,
    pub vwc: bool,
    pub oncs: u16,
}

/// The bdev name of namespace `nsid` of controller `ctrlr`.
pub(crate) fn bdev_name(ctrlr: &str, nsid: u32) -> String {
    format!("{ctrlr}n{nsid}")
}

/// Registers the bdev of namespace `ns` and records it in the
/// controller's registered namespaces; resolves with its name.
fn register(ctrlr: &Arc<Ctrlr>, ns: &NsInfo) -> Result<String, BdevError> {
    let info = ctrlr.info.lock().map(|i| i.clone()).unwrap_or_default();
    let max_blocks = (info.max_xfer / ns.block_size).max(1) as u64;
    let name = bdev_name(&ctrlr.params.name, ns.nsid);
    let mut cfg = BdevConfig::new(name.clone(), ns.block_size, ns.num_blocks);
    cfg.uuid = Some(ns_uuid(&ctrlr.params.subnqn, ns));
    cfg.max_io_blocks = max_blocks;
    let ops = NsBdev {
        ctrlr: ctrlr.clone(),
        ns: ns.clone(),
        max_blocks,
        vwc: info.vwc,
        oncs: info.oncs,
    };
    lock(&ctrlr.bdevs).push(name.clone());
    if let Err(e) = wc_bdev::register(cfg, Arc::new(ops)) {
        lock(&ctrlr.bdevs).retain(|n| n != &name);
        return Err(e);
    }
    lock(&ctrlr.info).namespaces.push(ns.clone());
    Ok(name)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The namespace's NGUID as UUID when it has one, else a UUID derived
/// from the subsystem and NSID (stable across restarts either way).
fn ns_uuid(subnqn: &str, ns: &NsInfo) -> uuid::Uuid {
    if ns.nguid != [0; 16] {
        uuid::Uuid::from_bytes(ns.nguid)
    } else {
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("{subnqn}/{}", ns.nsid).as_bytes(),
        )
    }
}

/// Brings the controller's bdevs in line with the active namespaces the
/// target reports (`found`): a bdev for each new namespace, a hot-remove
/// for each gone one (the controller stays, as SPDK keeps a controller
/// with no namespace). Runs on the home reactor; resolves with the names
/// registered. A namespace whose geometry changed keeps its bdev as it is
/// (with a warning): resizing is not supported.
pub(crate) fn sync_namespaces(
    ctrlr: &Arc<Ctrlr>,
    found: &[NsInfo],
) -> Result<Vec<String>, BdevError> {
    let known = lock(&ctrlr.info).namespaces.clone();
    for old in &known {
        match found.iter().find(|n| n.nsid == old.nsid) {
            Some(n) if n != old => tracing::warn!(
                "nvme {}: namespace {} changed geometry; its bdev keeps the old one",
                ctrlr.params.name,
                old.nsid
            ),
            Some(_) => {}
            None => {
                let name = bdev_name(&ctrlr.params.name, old.nsid);
                tracing::info!(
                    "nvme {}: namespace {} went away",
                    ctrlr.params.name,
                    old.nsid
                );
                lock(&ctrlr.info).namespaces.retain(|n| n.nsid != old.nsid);
                // Out of the list first: its destruct must not take the
                // controller with it.
                lock(&ctrlr.bdevs).retain(|n| n != &name);
                let _ = wc_bdev::hot_remove(&name);
            }
        }
    }
    let mut names = Vec::new();
    for ns in found {
        if known.iter().any(|k| k.nsid == ns.nsid) {
            continue;
        }
        names.push(register(ctrlr, ns)?);
    }
    Ok(names)
}

impl BdevOps for NsBdev {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        "NVMe disk"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Write | IoType::Flush => true,
            IoType::Unmap => self.oncs & oncs::DSM != 0,
            IoType::WriteZeroes => self.oncs & oncs::WRITE_ZEROES != 0,
            IoType::Reset => false,
        }
    }

    fn create_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        if self.ctrlr.phase() == phase::DELETED {
            return Err(BdevError::NotFound(self.ctrlr.params.name.clone()));
        }
        let path = path_for(&self.ctrlr)?;
        Ok(Box::new(NsChannel {
            path,
            nsid: self.ns.nsid,
            max_blocks: self.max_blocks,
        }))
    }

    fn driver_info(&self) -> Value {
        let info = self
            .ctrlr
            .info
            .lock()
            .map(|i| i.clone())
            .unwrap_or_default();
        let p = &self.ctrlr.params;
        json!({
            "nvme": [{
                "trid": {
                    "trtype": "TCP",
                    "adrfam": p.adrfam.canonical(),
                    "traddr": p.traddr,
                    "trsvcid": p.trsvcid,
                    "subnqn": p.subnqn,
                },
                "ctrlr_data": {
                    "cntlid": info.cntlid,
                    "serial_number": info.serial,
                    "model_number": info.model,
                    "firmware_revision": info.firmware,
                    "oacs": {"security": 0, "format": 0, "firmware": 0, "ns_manage": 0},
                    "multi_ctrlr": false,
                    "ana_reporting": false,
                },
                "vs": {"nvme_version": "1.3"},
                "ns_data": {"id": self.ns.nsid, "can_share": false},
            }],
            "mp_policy": "active_passive",
        })
    }

    fn write_cache(&self) -> bool {
        self.vwc
    }

    fn destruct(&self) {
        // The last bdev of a controller going away (shutdown, or removed
        // one by one) takes the controller with it.
        // A namespace the target removed was taken off the list before its
        // hot-remove: the controller stays.
        let name = bdev_name(&self.ctrlr.params.name, self.ns.nsid);
        let last = {
            let mut b = lock(&self.ctrlr.bdevs);
            let listed = b.iter().any(|n| n == &name);
            b.retain(|n| n != &name);
            listed && b.is_empty()
        };
        if last && self.ctrlr.phase() != phase::DELETED {
            let c = self.ctrlr.clone();
            self.ctrlr.home.send(move || crate::ctrlr::delete(&c));
        }
    }
}
