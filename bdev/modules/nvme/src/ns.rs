//! A namespace bdev (`<controller>n<nsid>`): geometry from Identify
//! Namespace, I/O types from the controller's ONCS and VWC, its channel
//! the reactor's queue pair to the controller.

use std::sync::Arc;

use serde_json::{json, Value};
use wc_bdev::{Bdev, BdevError, BdevOps, IoChannel, IoType};
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
    /// The bdev that writes the controller's config entry (the first
    /// namespace), so `save_config` attaches it once.
    pub writes_config: bool,
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

    fn config_entry(&self, _bdev: &Bdev) -> Option<Value> {
        if !self.writes_config {
            return None;
        }
        let p = &self.ctrlr.params;
        Some(json!({
            "method": "bdev_nvme_attach_controller",
            "params": {
                "name": p.name,
                "trtype": "TCP",
                "adrfam": p.adrfam.canonical(),
                "traddr": p.traddr,
                "trsvcid": p.trsvcid,
                "subnqn": p.subnqn,
                "hostnqn": p.hostnqn,
                "prchk_reftag": false,
                "prchk_guard": false,
                "hdgst": p.hdgst,
                "ddgst": p.ddgst,
                "num_io_queues": p.num_io_queues,
                "ctrlr_loss_timeout_sec": p.ctrlr_loss_timeout_sec,
                "reconnect_delay_sec": p.reconnect_delay_sec,
                "fast_io_fail_timeout_sec": p.fast_io_fail_timeout_sec,
            }
        }))
    }

    fn write_cache(&self) -> bool {
        self.vwc
    }

    fn destruct(&self) {
        // The last bdev of a controller going away (shutdown, or removed
        // one by one) takes the controller with it.
        let name = format!("{}n{}", self.ctrlr.params.name, self.ns.nsid);
        let last = {
            let mut b = self.ctrlr.bdevs.lock().unwrap_or_else(|p| p.into_inner());
            b.retain(|n| n != &name);
            b.is_empty()
        };
        if last && self.ctrlr.phase() != phase::DELETED {
            let c = self.ctrlr.clone();
            self.ctrlr.home.send(move || crate::ctrlr::delete(&c));
        }
    }
}
