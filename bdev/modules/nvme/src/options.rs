//! `bdev_nvme_set_options`: the module-wide defaults, with SPDK's
//! parameter names. Every name SPDK's method takes is accepted (an
//! unknown one is refused); the ones this initiator honours are the
//! reconnect timers' defaults (`ctrlr_loss_timeout_sec`,
//! `reconnect_delay_sec`, `fast_io_fail_timeout_sec`, used when an attach
//! leaves them out), `keep_alive_timeout_ms` (0: no keep-alive),
//! `timeout_us` (an I/O command unanswered that long resets its queue
//! pair; 0: never) and `tcp_connect_timeout_ms` (the connect timeout of
//! an attach without `fabrics_connect_timeout_us`; 0: 10 s). The others
//! are checked, kept and saved, nothing more: `transport_retry_count` and
//! `transport_ack_timeout` do nothing for TCP in SPDK either (they are
//! RDMA's), admin commands time out by the keep-alive timeout rather than
//! `timeout_admin_us`, and the RDMA, arbitration, multipath,
//! DH-HMAC-CHAP, polling-period and statistics options have no meaning
//! for this initiator.
//!
//! As in SPDK the options can only change while no controller exists,
//! and `save_config` writes them first in the `bdev` subsystem.

use std::sync::{Mutex, MutexGuard, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use wc_bdev::BdevError;

use crate::opts::check_resiliency;

/// `bdev_nvme_set_options` parameters, every one optional (SPDK keeps
/// the current value of an absent one).
// The fields are SPDK's option names, documented in SPDK's jsonrpc.md.
#[allow(missing_docs)]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetOptions {
    pub action_on_timeout: Option<String>,
    pub timeout_us: Option<u64>,
    pub timeout_admin_us: Option<u64>,
    pub keep_alive_timeout_ms: Option<u32>,
    pub arbitration_burst: Option<u32>,
    pub low_priority_weight: Option<u32>,
    pub medium_priority_weight: Option<u32>,
    pub high_priority_weight: Option<u32>,
    pub nvme_adminq_poll_period_us: Option<u64>,
    pub nvme_ioq_poll_period_us: Option<u64>,
    pub io_queue_requests: Option<u32>,
    pub delay_cmd_submit: Option<bool>,
    pub transport_retry_count: Option<u32>,
    pub bdev_retry_count: Option<i32>,
    pub transport_ack_timeout: Option<u8>,
    pub ctrlr_loss_timeout_sec: Option<i32>,
    pub reconnect_delay_sec: Option<u32>,
    pub fast_io_fail_timeout_sec: Option<u32>,
    pub disable_auto_failback: Option<bool>,
    pub generate_uuids: Option<bool>,
    pub transport_tos: Option<u8>,
    pub nvme_error_stat: Option<bool>,
    pub rdma_srq_size: Option<u32>,
    pub io_path_stat: Option<bool>,
    pub allow_accel_sequence: Option<bool>,
    pub rdma_max_cq_size: Option<u32>,
    pub rdma_cm_event_timeout_ms: Option<u16>,
    pub dhchap_digests: Option<Vec<String>>,
    pub dhchap_dhgroups: Option<Vec<String>>,
    pub rdma_umr_per_io: Option<bool>,
    pub tcp_connect_timeout_ms: Option<u32>,
    pub enable_flush: Option<bool>,
    pub multipath_opts: Option<MultipathOpts>,
}

/// `multipath_opts` as the CLI groups `--policy`, `--selector`, `--min-io`.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MultipathOpts {
    #[serde(default = "default_policy")]
    pub policy: String,
    #[serde(default = "default_selector")]
    pub selector: String,
    #[serde(default = "default_min_io")]
    pub min_io: u32,
}

fn default_policy() -> String {
    "active_passive".into()
}

fn default_selector() -> String {
    "round_robin".into()
}

fn default_min_io() -> u32 {
    1000
}

/// The current module options, with SPDK's defaults except where this
/// initiator's own default differs and is written out (`timeout_us`).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NvmeOptions {
    pub action_on_timeout: String,
    pub timeout_us: u64,
    pub timeout_admin_us: u64,
    pub keep_alive_timeout_ms: u32,
    pub arbitration_burst: u32,
    pub low_priority_weight: u32,
    pub medium_priority_weight: u32,
    pub high_priority_weight: u32,
    pub nvme_adminq_poll_period_us: u64,
    pub nvme_ioq_poll_period_us: u64,
    pub io_queue_requests: u32,
    pub delay_cmd_submit: bool,
    pub transport_retry_count: u32,
    pub bdev_retry_count: i32,
    pub transport_ack_timeout: u8,
    pub ctrlr_loss_timeout_sec: i32,
    pub reconnect_delay_sec: u32,
    pub fast_io_fail_timeout_sec: u32,
    pub disable_auto_failback: bool,
    pub generate_uuids: bool,
    pub transport_tos: u8,
    pub nvme_error_stat: bool,
    pub rdma_srq_size: u32,
    pub io_path_stat: bool,
    pub allow_accel_sequence: bool,
    pub rdma_max_cq_size: u32,
    pub rdma_cm_event_timeout_ms: u16,
    pub dhchap_digests: Vec<String>,
    pub dhchap_dhgroups: Vec<String>,
    pub rdma_umr_per_io: bool,
    pub tcp_connect_timeout_ms: u32,
    pub enable_flush: bool,
    pub multipath_opts: MultipathOpts,
}

impl Default for NvmeOptions {
    fn default() -> Self {
        let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        NvmeOptions {
            action_on_timeout: "none".into(),
            // SPDK tracks no I/O timeout by default; this initiator resets
            // a queue pair whose command waits 30 s (a target that went
            // silent without closing the connection).
            timeout_us: 30_000_000,
            timeout_admin_us: 0,
            keep_alive_timeout_ms: 10_000,
            arbitration_burst: 0,
            low_priority_weight: 0,
            medium_priority_weight: 0,
            high_priority_weight: 0,
            nvme_adminq_poll_period_us: 10_000,
            nvme_ioq_poll_period_us: 0,
            io_queue_requests: 0,
            delay_cmd_submit: true,
            transport_retry_count: 4,
            bdev_retry_count: 3,
            transport_ack_timeout: 0,
            ctrlr_loss_timeout_sec: 0,
            reconnect_delay_sec: 0,
            fast_io_fail_timeout_sec: 0,
            disable_auto_failback: false,
            generate_uuids: false,
            transport_tos: 0,
            nvme_error_stat: false,
            rdma_srq_size: 0,
            io_path_stat: false,
            allow_accel_sequence: false,
            rdma_max_cq_size: 0,
            rdma_cm_event_timeout_ms: 0,
            dhchap_digests: strs(&["sha256", "sha384", "sha512"]),
            dhchap_dhgroups: strs(&[
                "null",
                "ffdhe2048",
                "ffdhe3072",
                "ffdhe4096",
                "ffdhe6144",
                "ffdhe8192",
            ]),
            rdma_umr_per_io: false,
            tcp_connect_timeout_ms: 0,
            enable_flush: false,
            multipath_opts: MultipathOpts {
                policy: default_policy(),
                selector: default_selector(),
                min_io: default_min_io(),
            },
        }
    }
}

fn store() -> MutexGuard<'static, NvmeOptions> {
    static O: OnceLock<Mutex<NvmeOptions>> = OnceLock::new();
    O.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The current options.
pub fn current() -> NvmeOptions {
    store().clone()
}

/// Changes the options in place, bypassing the no-controller rule (the
/// crate's test hooks).
pub(crate) fn update(f: impl FnOnce(&mut NvmeOptions)) {
    f(&mut store());
}

/// Why [`set`] refused.
#[derive(Debug)]
pub enum SetError {
    /// A controller exists (SPDK's EPERM).
    ControllersAttached,
    /// A value is out of range.
    Invalid(BdevError),
}

impl SetOptions {
    /// The options with these values applied over `base`, checked.
    pub fn apply(&self, base: &NvmeOptions) -> Result<NvmeOptions, BdevError> {
        let mut o = base.clone();
        macro_rules! take {
            ($($f:ident),*) => {$(if let Some(v) = &self.$f { o.$f = v.clone(); })*};
        }
        take!(
            action_on_timeout,
            timeout_us,
            timeout_admin_us,
            keep_alive_timeout_ms,
            arbitration_burst,
            low_priority_weight,
            medium_priority_weight,
            high_priority_weight,
            nvme_adminq_poll_period_us,
            nvme_ioq_poll_period_us,
            io_queue_requests,
            delay_cmd_submit,
            transport_retry_count,
            bdev_retry_count,
            transport_ack_timeout,
            ctrlr_loss_timeout_sec,
            reconnect_delay_sec,
            fast_io_fail_timeout_sec,
            disable_auto_failback,
            generate_uuids,
            transport_tos,
            nvme_error_stat,
            rdma_srq_size,
            io_path_stat,
            allow_accel_sequence,
            rdma_max_cq_size,
            rdma_cm_event_timeout_ms,
            dhchap_digests,
            dhchap_dhgroups,
            rdma_umr_per_io,
            tcp_connect_timeout_ms,
            enable_flush,
            multipath_opts
        );
        o.check()?;
        Ok(o)
    }
}

fn invalid(msg: impl Into<String>) -> BdevError {
    BdevError::Invalid(msg.into())
}

impl NvmeOptions {
    /// SPDK's checks (`bdev_nvme_validate_opts`) and the enum names.
    fn check(&self) -> Result<(), BdevError> {
        if !matches!(self.action_on_timeout.as_str(), "none" | "reset" | "abort") {
            return Err(invalid(format!(
                "action_on_timeout '{}' is not none, reset or abort",
                self.action_on_timeout
            )));
        }
        if self.timeout_us == 0 && self.timeout_admin_us != 0 {
            return Err(invalid(
                "timeout_admin_us cannot be set while timeout_us is 0",
            ));
        }
        if self.bdev_retry_count < -1 {
            return Err(invalid("bdev_retry_count cannot be less than -1"));
        }
        if self.transport_ack_timeout > 31 {
            return Err(invalid("transport_ack_timeout must be between 0 and 31"));
        }
        check_resiliency(
            self.ctrlr_loss_timeout_sec as i64,
            self.reconnect_delay_sec as u64,
            self.fast_io_fail_timeout_sec as u64,
        )?;
        let m = &self.multipath_opts;
        if !matches!(m.policy.as_str(), "active_passive" | "active_active") {
            return Err(invalid(format!(
                "multipath policy '{}' is unknown",
                m.policy
            )));
        }
        if !matches!(m.selector.as_str(), "round_robin" | "queue_depth") {
            return Err(invalid(format!(
                "multipath selector '{}' is unknown",
                m.selector
            )));
        }
        Ok(())
    }

    /// The `bdev_nvme_set_options` entry `save_config` writes.
    pub fn config_entry(&self) -> Value {
        serde_json::json!({
            "method": "bdev_nvme_set_options",
            "params": serde_json::to_value(self).unwrap_or(Value::Null),
        })
    }
}

/// Applies `o` unless a controller exists.
pub fn set(o: &SetOptions) -> Result<(), SetError> {
    let mut cur = store();
    let new = o.apply(&cur).map_err(SetError::Invalid)?;
    if !crate::ctrlr::all().is_empty() {
        return Err(SetError::ControllersAttached);
    }
    *cur = new;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_defaults_decode_and_change_nothing_but_what_is_given() {
        // What `spdk-rpc bdev_nvme_set_options -l 5 -o 1 -u 2` sends.
        let v = serde_json::json!({
            "delay_cmd_submit": true, "ctrlr_loss_timeout_sec": 5,
            "reconnect_delay_sec": 1, "fast_io_fail_timeout_sec": 2,
            "disable_auto_failback": false, "generate_uuids": false,
            "nvme_error_stat": false, "io_path_stat": false,
            "allow_accel_sequence": false, "enable_flush": false
        });
        let s: SetOptions = wc_rpc::decode(Some(v)).unwrap();
        let o = s.apply(&NvmeOptions::default()).unwrap();
        assert_eq!(
            (
                o.ctrlr_loss_timeout_sec,
                o.reconnect_delay_sec,
                o.fast_io_fail_timeout_sec
            ),
            (5, 1, 2)
        );
        assert_eq!(o.keep_alive_timeout_ms, 10_000);
    }

    #[test]
    fn unknown_names_and_bad_values_are_refused() {
        let v = serde_json::json!({"no_such_option": 1});
        assert!(wc_rpc::decode::<SetOptions>(Some(v)).is_err());
        let bad = |v: Value| {
            let s: SetOptions = wc_rpc::decode(Some(v)).unwrap();
            s.apply(&NvmeOptions::default()).unwrap_err().to_string()
        };
        assert!(bad(serde_json::json!({"reconnect_delay_sec": 1})).contains("reconnect_delay_sec"));
        assert!(
            bad(serde_json::json!({"timeout_us": 0, "timeout_admin_us": 5}))
                .contains("timeout_admin_us")
        );
        assert!(bad(serde_json::json!({"action_on_timeout": "explode"})).contains("explode"));
        assert!(bad(serde_json::json!({"bdev_retry_count": -2})).contains("bdev_retry_count"));
    }

    #[test]
    fn the_saved_entry_decodes_back_to_the_same_options() {
        let o = NvmeOptions::default();
        let e = o.config_entry();
        let s: SetOptions = wc_rpc::decode(Some(e["params"].clone())).unwrap();
        assert_eq!(s.apply(&NvmeOptions::default()).unwrap(), o);
    }
}
