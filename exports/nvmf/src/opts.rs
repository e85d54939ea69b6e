//! TCP transport options (`nvmf_create_transport`), SPDK's names and
//! defaults. Unknown keys are accepted and ignored (SPDK decodes the
//! transport options relaxed: the stock CLI sends RDMA and VFIO-USER keys
//! too).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the target enforces of the transport options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransportOpts {
    /// Queue entries per I/O queue (and the largest SQSIZE a Connect may ask).
    pub max_queue_depth: u32,
    /// I/O queue pairs per controller.
    pub max_io_qpairs_per_ctrlr: u32,
    /// In-capsule data accepted on I/O queues.
    pub in_capsule_data_size: u32,
    /// Largest transfer of one command.
    pub max_io_size: u32,
    /// Deprecated in SPDK; kept and reported.
    pub io_unit_size: u32,
    /// Admin queue entries.
    pub max_aq_depth: u32,
    /// Send C2HData with the SUCCESS flag instead of a response capsule.
    pub c2h_success: bool,
    pub sock_priority: u32,
    pub abort_timeout_sec: u32,
    pub zcopy: bool,
    pub dif_insert_or_strip: bool,
}

impl Default for TransportOpts {
    fn default() -> Self {
        TransportOpts {
            max_queue_depth: 128,
            max_io_qpairs_per_ctrlr: 127,
            in_capsule_data_size: 4096,
            max_io_size: 131072,
            io_unit_size: 131072,
            max_aq_depth: 128,
            c2h_success: true,
            sock_priority: 0,
            abort_timeout_sec: 1,
            zcopy: false,
            dif_insert_or_strip: false,
        }
    }
}

/// In-capsule data accepted on the admin queue (Linux sends up to 8 KiB).
pub const ADMIN_IN_CAPSULE: u32 = 8192;

impl TransportOpts {
    /// Reads the TCP-relevant keys of `nvmf_create_transport` params
    /// (everything else is ignored, as SPDK does), checking ranges.
    pub fn from_params(p: &serde_json::Map<String, Value>) -> Result<TransportOpts, String> {
        let mut o = TransportOpts::default();
        let num = |k: &str| -> Result<Option<u32>, String> {
            match p.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| format!("{k} must be a non-negative 32-bit integer")),
            }
        };
        let flag = |k: &str| -> Result<Option<bool>, String> {
            match p.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(format!("{k} must be a boolean")),
            }
        };
        if let Some(v) = num("max_queue_depth")? {
            o.max_queue_depth = v;
        }
        if let Some(v) = num("max_io_qpairs_per_ctrlr")? {
            o.max_io_qpairs_per_ctrlr = v;
        }
        if let Some(v) = num("in_capsule_data_size")? {
            o.in_capsule_data_size = v;
        }
        if let Some(v) = num("max_io_size")? {
            o.max_io_size = v;
        }
        if let Some(v) = num("io_unit_size")? {
            o.io_unit_size = v;
        }
        if let Some(v) = num("max_aq_depth")? {
            o.max_aq_depth = v;
        }
        if let Some(v) = num("sock_priority")? {
            o.sock_priority = v;
        }
        if let Some(v) = num("abort_timeout_sec")? {
            o.abort_timeout_sec = v;
        }
        if let Some(v) = flag("c2h_success")? {
            o.c2h_success = v;
        }
        if let Some(v) = flag("zcopy")? {
            o.zcopy = v;
        }
        if let Some(v) = flag("dif_insert_or_strip")? {
            o.dif_insert_or_strip = v;
        }
        o.validate()?;
        Ok(o)
    }

    fn validate(&self) -> Result<(), String> {
        if !(2..=65536).contains(&self.max_queue_depth) {
            return Err("max_queue_depth must be 2..=65536".into());
        }
        if !(2..=4096).contains(&self.max_aq_depth) {
            return Err("max_aq_depth must be 2..=4096".into());
        }
        if !(1..=65534).contains(&self.max_io_qpairs_per_ctrlr) {
            return Err("max_io_qpairs_per_ctrlr must be 1..=65534".into());
        }
        if self.max_io_size < 4096
            || !self.max_io_size.is_power_of_two()
            || self.max_io_size > 1 << 24
        {
            return Err("max_io_size must be a power of two, 4 KiB..=16 MiB".into());
        }
        if self.in_capsule_data_size % 16 != 0 || self.in_capsule_data_size > self.max_io_size {
            return Err(
                "in_capsule_data_size must be a multiple of 16, at most max_io_size".into(),
            );
        }
        if self.sock_priority > 16 {
            return Err("sock_priority must be 0..=16".into());
        }
        if self.dif_insert_or_strip {
            return Err("dif_insert_or_strip is not supported (no bdev here has metadata)".into());
        }
        Ok(())
    }

    /// `nvmf_get_transports` / `save_config` form.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "trtype": "TCP",
            "max_queue_depth": self.max_queue_depth,
            "max_io_qpairs_per_ctrlr": self.max_io_qpairs_per_ctrlr,
            "in_capsule_data_size": self.in_capsule_data_size,
            "max_io_size": self.max_io_size,
            "io_unit_size": self.io_unit_size,
            "max_aq_depth": self.max_aq_depth,
            "c2h_success": self.c2h_success,
            "sock_priority": self.sock_priority,
            "abort_timeout_sec": self.abort_timeout_sec,
            "zcopy": self.zcopy,
            "dif_insert_or_strip": self.dif_insert_or_strip,
        })
    }

    /// MDTS for Identify Controller: log2 of max_io_size in 4 KiB pages.
    pub fn mdts(&self) -> u8 {
        (self.max_io_size / 4096).trailing_zeros() as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn relaxed_params_with_ranges() {
        let p =
            json!({"trtype": "TCP", "no_srq": false, "max_io_size": 65536, "c2h_success": false});
        let o = TransportOpts::from_params(p.as_object().unwrap()).unwrap();
        assert_eq!(o.max_io_size, 65536);
        assert!(!o.c2h_success);
        assert_eq!(o.mdts(), 4);
        let bad = json!({"max_io_size": 1000});
        assert!(TransportOpts::from_params(bad.as_object().unwrap()).is_err());
        let bad = json!({"max_queue_depth": "x"});
        assert!(TransportOpts::from_params(bad.as_object().unwrap()).is_err());
        let bad = json!({"dif_insert_or_strip": true});
        assert!(TransportOpts::from_params(bad.as_object().unwrap()).is_err());
    }
}
