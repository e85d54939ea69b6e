//! Parameters of `bdev_nvme_attach_controller` as the stock `rpc.py` sends
//! them, their validation (SPDK's rules for the reconnect timers), and the
//! transport ID they name.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;
use wc_bdev::BdevError;

/// The default host NQN SPDK uses when none is given.
pub const DEFAULT_HOSTNQN_PREFIX: &str = "nqn.2014-08.org.nvmexpress:uuid:";
/// NVMe/TCP's well-known port.
pub const DEFAULT_TRSVCID: &str = "4420";
/// The discovery subsystem's NQN (SPDK's default `subnqn`).
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// `bdev_nvme_attach_controller` parameters. Every key the 26.x CLI can
/// send is accepted; the ones this initiator cannot honour are refused
/// with a precise error by [`AttachOpts::validate`] when set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachOpts {
    /// Controller name, prefix of the bdev names (`<name>n<nsid>`).
    pub name: String,
    /// Transport type: `tcp` (case-insensitive); `pcie` is refused.
    pub trtype: String,
    /// Target address (an IPv4 or IPv6 literal).
    pub traddr: String,
    /// `ipv4` or `ipv6` (case-insensitive); derived from `traddr` if absent.
    #[serde(default)]
    pub adrfam: Option<String>,
    /// Target port (default 4420).
    #[serde(default)]
    pub trsvcid: Option<String>,
    /// Subsystem NQN to connect to.
    #[serde(default)]
    pub subnqn: Option<String>,
    /// Our host NQN (default: a UUID-based one fixed for this process).
    #[serde(default)]
    pub hostnqn: Option<String>,
    /// Source address (unsupported: the kernel picks it).
    #[serde(default)]
    pub hostaddr: Option<String>,
    /// Source port (unsupported).
    #[serde(default)]
    pub hostsvcid: Option<String>,
    /// Connection priority (accepted; no effect).
    #[serde(default)]
    pub priority: Option<Prio>,
    /// Protection information checks (no PI support: must be false).
    #[serde(default)]
    pub prchk_reftag: bool,
    /// Protection information checks (no PI support: must be false).
    #[serde(default)]
    pub prchk_guard: bool,
    /// Ask for the TCP header digest (CRC32C).
    #[serde(default)]
    pub hdgst: bool,
    /// Ask for the TCP data digest (CRC32C).
    #[serde(default)]
    pub ddgst: bool,
    /// Timeout of the Fabrics Connect exchange in microseconds.
    #[serde(default)]
    pub fabrics_connect_timeout_us: Option<u64>,
    /// `disable`, `failover` or `multipath` (only `disable` semantics: a
    /// second path to the same name is refused).
    #[serde(default)]
    pub multipath: Option<String>,
    /// I/O queues to ask for (one is used per reactor that opens a channel).
    #[serde(default)]
    pub num_io_queues: Option<u32>,
    /// Seconds to keep reconnecting before the controller is deleted; -1
    /// forever, 0 no reconnect (SPDK's semantics).
    #[serde(default)]
    pub ctrlr_loss_timeout_sec: Option<i64>,
    /// Seconds between reconnect attempts.
    #[serde(default)]
    pub reconnect_delay_sec: Option<u64>,
    /// Seconds after which queued I/O fails while reconnecting (0: never).
    #[serde(default)]
    pub fast_io_fail_timeout_sec: Option<u64>,
    /// TLS key (unsupported).
    #[serde(default)]
    pub psk: Option<String>,
    /// Size of the result array (accepted; no limit here beyond it).
    #[serde(default)]
    pub max_bdevs: Option<u32>,
    /// DH-HMAC-CHAP (unsupported).
    #[serde(default)]
    pub dhchap_key: Option<String>,
    /// DH-HMAC-CHAP (unsupported).
    #[serde(default)]
    pub dhchap_ctrlr_key: Option<String>,
    /// Namespaces of other command sets (none are exposed).
    #[serde(default)]
    pub allow_unrecognized_csi: bool,
    /// Multipath policy (accepted only without multipath).
    #[serde(default)]
    pub multipath_opts: Option<serde_json::Value>,
    /// Clears the SQ flow-control bit of Fabrics Connect.
    #[serde(default)]
    pub disable_sq_flow_control: bool,
}

/// `priority` arrives as a string from the CLI, a number from configs.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prio {
    /// As a number.
    Num(i64),
    /// As the CLI sends it.
    Text(String),
}

/// Address family of a transport ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdrFam {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

impl AdrFam {
    /// SPDK's canonical spelling in `bdev_nvme_get_controllers`.
    pub fn canonical(self) -> &'static str {
        match self {
            AdrFam::Ipv4 => "IPv4",
            AdrFam::Ipv6 => "IPv6",
        }
    }
}

/// Validated connection parameters of one controller.
#[derive(Debug, Clone)]
pub struct CtrlrParams {
    /// Controller name.
    pub name: String,
    /// Where the target listens.
    pub addr: SocketAddr,
    /// Address family as given (or derived).
    pub adrfam: AdrFam,
    /// `traddr` as given.
    pub traddr: String,
    /// `trsvcid` as given (or the default).
    pub trsvcid: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Host ID (16 bytes) sent in Fabrics Connect.
    pub hostid: [u8; 16],
    /// Header digest requested.
    pub hdgst: bool,
    /// Data digest requested.
    pub ddgst: bool,
    /// I/O queues to request.
    pub num_io_queues: u32,
    /// Timeout of one queue pair's connect (TCP, ICReq, Fabrics Connect).
    pub connect_timeout: Duration,
    /// -1 forever, 0 none, else seconds.
    pub ctrlr_loss_timeout_sec: i64,
    /// Seconds between reconnect attempts (0: one immediate attempt).
    pub reconnect_delay_sec: u64,
    /// Seconds before queued I/O fails (0: never before the loss).
    pub fast_io_fail_timeout_sec: u64,
    /// SQ flow control asked for.
    pub sq_flow_control: bool,
}

fn invalid(msg: impl Into<String>) -> BdevError {
    BdevError::Invalid(msg.into())
}

fn unsupported(msg: impl Into<String>) -> BdevError {
    BdevError::NotSupported(msg.into())
}

/// A host NQN fixed for the life of the process (SPDK derives its default
/// from a UUID too).
pub fn default_hostnqn() -> (String, [u8; 16]) {
    use std::sync::OnceLock;
    static ID: OnceLock<uuid::Uuid> = OnceLock::new();
    let id = *ID.get_or_init(uuid::Uuid::new_v4);
    (format!("{DEFAULT_HOSTNQN_PREFIX}{id}"), *id.as_bytes())
}

/// Checks an NQN's length and characters as the NVMe base spec bounds it
/// (at most 223 bytes, UTF-8, non-empty).
fn check_nqn(what: &str, nqn: &str) -> Result<(), BdevError> {
    if nqn.is_empty() || nqn.len() > 223 {
        return Err(invalid(format!(
            "{what} '{nqn}' must be 1 to 223 bytes long"
        )));
    }
    if nqn.chars().any(|c| c.is_control()) {
        return Err(invalid(format!("{what} contains control characters")));
    }
    Ok(())
}

impl AttachOpts {
    /// Options for a controller at `traddr:trsvcid` with subsystem `subnqn`.
    pub fn tcp(name: &str, traddr: &str, trsvcid: u16, subnqn: &str) -> AttachOpts {
        AttachOpts {
            name: name.to_string(),
            trtype: "tcp".into(),
            traddr: traddr.to_string(),
            adrfam: None,
            trsvcid: Some(trsvcid.to_string()),
            subnqn: Some(subnqn.to_string()),
            hostnqn: None,
            hostaddr: None,
            hostsvcid: None,
            priority: None,
            prchk_reftag: false,
            prchk_guard: false,
            hdgst: false,
            ddgst: false,
            fabrics_connect_timeout_us: None,
            multipath: None,
            num_io_queues: None,
            ctrlr_loss_timeout_sec: None,
            reconnect_delay_sec: None,
            fast_io_fail_timeout_sec: None,
            psk: None,
            max_bdevs: None,
            dhchap_key: None,
            dhchap_ctrlr_key: None,
            allow_unrecognized_csi: false,
            multipath_opts: None,
            disable_sq_flow_control: false,
        }
    }

    /// Validates everything and resolves the target address.
    pub fn validate(&self) -> Result<CtrlrParams, BdevError> {
        if self.name.is_empty() {
            return Err(invalid("controller name must not be empty"));
        }
        match self.trtype.to_ascii_lowercase().as_str() {
            "tcp" => {}
            "pcie" => {
                return Err(unsupported(
                    "trtype pcie is not supported: this target does not drive PCIe devices \
                     from user space; let the kernel's nvme driver own the device and create \
                     a bdev on its namespace with bdev_uring_create \
                     (e.g. bdev_uring_create /dev/nvme0n1 Nvme0n1)",
                ))
            }
            other => {
                return Err(unsupported(format!(
                    "trtype '{other}' is not supported (only tcp)"
                )))
            }
        }
        let ip: IpAddr = self.traddr.parse().map_err(|_| {
            invalid(format!(
                "traddr '{}' is not an IPv4 or IPv6 address",
                self.traddr
            ))
        })?;
        let fam = match self.adrfam.as_deref().map(|s| s.to_ascii_lowercase()) {
            None => {
                if ip.is_ipv4() {
                    AdrFam::Ipv4
                } else {
                    AdrFam::Ipv6
                }
            }
            Some(f) if f == "ipv4" => AdrFam::Ipv4,
            Some(f) if f == "ipv6" => AdrFam::Ipv6,
            Some(f) => {
                return Err(unsupported(format!(
                    "adrfam '{f}' is not supported with tcp (ipv4 or ipv6)"
                )))
            }
        };
        if (fam == AdrFam::Ipv4) != ip.is_ipv4() {
            return Err(invalid(format!(
                "traddr '{}' does not match adrfam {}",
                self.traddr,
                fam.canonical()
            )));
        }
        let trsvcid = self
            .trsvcid
            .clone()
            .unwrap_or_else(|| DEFAULT_TRSVCID.to_string());
        let port: u16 = trsvcid
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(format!("trsvcid '{trsvcid}' is not a TCP port")))?;
        let subnqn = self
            .subnqn
            .clone()
            .unwrap_or_else(|| DISCOVERY_NQN.to_string());
        check_nqn("subnqn", &subnqn)?;
        if subnqn == DISCOVERY_NQN {
            return Err(unsupported(
                "attaching the discovery subsystem is not supported: give the subnqn \
                 of an NVM subsystem",
            ));
        }
        let (hostnqn, hostid) = match &self.hostnqn {
            Some(n) => {
                check_nqn("hostnqn", n)?;
                let id = n
                    .strip_prefix(DEFAULT_HOSTNQN_PREFIX)
                    .and_then(|u| uuid::Uuid::parse_str(u).ok())
                    .unwrap_or_else(|| {
                        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, n.as_bytes())
                    });
                (n.clone(), *id.as_bytes())
            }
            None => default_hostnqn(),
        };
        if self.hostaddr.as_deref().is_some_and(|s| !s.is_empty())
            || self.hostsvcid.as_deref().is_some_and(|s| !s.is_empty())
        {
            return Err(unsupported(
                "hostaddr/hostsvcid are not supported: the kernel picks the source address",
            ));
        }
        if self.prchk_reftag || self.prchk_guard {
            return Err(unsupported(
                "protection information checks (prchk_reftag/prchk_guard) are not supported",
            ));
        }
        if self.psk.is_some() {
            return Err(unsupported("TLS (psk) is not supported"));
        }
        if self.dhchap_key.is_some() || self.dhchap_ctrlr_key.is_some() {
            return Err(unsupported("DH-HMAC-CHAP authentication is not supported"));
        }
        match self.multipath.as_deref() {
            None | Some("disable") => {}
            Some(m @ ("failover" | "multipath")) => {
                return Err(unsupported(format!(
                    "multipath mode '{m}' is not supported (one path per controller)"
                )))
            }
            Some(m) => return Err(invalid(format!("unknown multipath mode '{m}'"))),
        }
        if self.multipath_opts.is_some() {
            return Err(unsupported("multipath policies are not supported"));
        }
        let nq = self.num_io_queues.unwrap_or(DEFAULT_IO_QUEUES);
        if nq == 0 || nq > 65535 {
            return Err(invalid(format!(
                "num_io_queues {nq} must be between 1 and 65535"
            )));
        }
        // Timers left out take bdev_nvme_set_options' defaults.
        let defaults = crate::options::current();
        let loss = self
            .ctrlr_loss_timeout_sec
            .unwrap_or(defaults.ctrlr_loss_timeout_sec as i64);
        let delay = self
            .reconnect_delay_sec
            .unwrap_or(defaults.reconnect_delay_sec as u64);
        let fast = self
            .fast_io_fail_timeout_sec
            .unwrap_or(defaults.fast_io_fail_timeout_sec as u64);
        check_resiliency(loss, delay, fast)?;
        let connect_timeout = match (
            self.fabrics_connect_timeout_us,
            defaults.tcp_connect_timeout_ms,
        ) {
            (None | Some(0), 0) => Duration::from_secs(10),
            (None | Some(0), ms) => Duration::from_millis(ms as u64),
            (Some(us), _) => Duration::from_micros(us),
        };
        Ok(CtrlrParams {
            name: self.name.clone(),
            addr: SocketAddr::new(ip, port),
            adrfam: fam,
            traddr: self.traddr.clone(),
            trsvcid,
            subnqn,
            hostnqn,
            hostid,
            hdgst: self.hdgst,
            ddgst: self.ddgst,
            num_io_queues: nq,
            connect_timeout,
            ctrlr_loss_timeout_sec: loss,
            reconnect_delay_sec: delay,
            fast_io_fail_timeout_sec: fast,
            sq_flow_control: !self.disable_sq_flow_control,
        })
    }
}

/// SPDK's default number of I/O queues asked for.
pub const DEFAULT_IO_QUEUES: u32 = 1024;

/// SPDK's rules relating the three timers (`bdev_nvme_check_io_error_
/// resiliency_params`), with messages saying which rule failed.
pub fn check_resiliency(loss: i64, delay: u64, fast: u64) -> Result<(), BdevError> {
    if loss < -1 {
        return Err(invalid(format!(
            "ctrlr_loss_timeout_sec {loss} is invalid (-1, 0 or a positive number)"
        )));
    }
    match loss {
        -1 => {
            if delay == 0 {
                return Err(invalid(
                    "reconnect_delay_sec must be non-zero when ctrlr_loss_timeout_sec is -1",
                ));
            }
            if fast != 0 && fast < delay {
                return Err(invalid(
                    "fast_io_fail_timeout_sec must not be less than reconnect_delay_sec",
                ));
            }
        }
        0 => {
            if delay != 0 {
                return Err(invalid(
                    "reconnect_delay_sec must be zero when ctrlr_loss_timeout_sec is zero",
                ));
            }
            if fast != 0 {
                return Err(invalid(
                    "fast_io_fail_timeout_sec must be zero when ctrlr_loss_timeout_sec is zero",
                ));
            }
        }
        loss => {
            let loss = loss as u64;
            if delay == 0 {
                return Err(invalid(
                    "reconnect_delay_sec must be non-zero when ctrlr_loss_timeout_sec is set",
                ));
            }
            if delay > loss {
                return Err(invalid(
                    "reconnect_delay_sec must not be more than ctrlr_loss_timeout_sec",
                ));
            }
            if fast != 0 && (fast < delay || fast > loss) {
                return Err(invalid(
                    "fast_io_fail_timeout_sec must be between reconnect_delay_sec and \
                     ctrlr_loss_timeout_sec",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resiliency_rules_follow_spdk() {
        assert!(check_resiliency(0, 0, 0).is_ok());
        assert!(check_resiliency(-1, 1, 0).is_ok());
        assert!(check_resiliency(-1, 0, 0).is_err());
        assert!(check_resiliency(0, 1, 0).is_err());
        assert!(check_resiliency(0, 0, 1).is_err());
        assert!(check_resiliency(10, 2, 5).is_ok());
        assert!(check_resiliency(10, 11, 0).is_err());
        assert!(check_resiliency(10, 2, 1).is_err());
        assert!(check_resiliency(10, 2, 11).is_err());
        assert!(check_resiliency(-2, 1, 0).is_err());
    }

    #[test]
    fn pcie_is_refused_with_the_uring_hint() {
        let mut o = AttachOpts::tcp("N", "127.0.0.1", 4420, "nqn.x");
        o.trtype = "PCIe".into();
        let e = o.validate().unwrap_err();
        assert!(e.to_string().contains("bdev_uring_create"), "{e}");
        assert_eq!(e.errno(), libc::ENOTSUP);
    }

    #[test]
    fn address_family_and_port_are_checked() {
        let mut o = AttachOpts::tcp("N", "127.0.0.1", 4420, "nqn.x");
        let p = o.validate().unwrap();
        assert_eq!(p.addr.to_string(), "127.0.0.1:4420");
        assert_eq!(p.adrfam, AdrFam::Ipv4);
        o.adrfam = Some("IPv6".into());
        assert!(o.validate().is_err());
        o.adrfam = None;
        o.trsvcid = Some("http".into());
        assert!(o.validate().is_err());
        o.trsvcid = None;
        o.traddr = "example.com".into();
        assert!(o.validate().is_err());
    }

    #[test]
    fn cli_defaults_decode() {
        // What `rpc.py bdev_nvme_attach_controller -b N -t tcp -a 127.0.0.1
        // -s 4420 -n nqn.x` sends.
        let v = serde_json::json!({
            "name": "N", "trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "4420",
            "subnqn": "nqn.x", "prchk_reftag": false, "prchk_guard": false,
            "hdgst": false, "ddgst": false, "allow_unrecognized_csi": false,
            "disable_sq_flow_control": false
        });
        let o: AttachOpts = wc_rpc::decode(Some(v)).unwrap();
        let p = o.validate().unwrap();
        assert_eq!(p.ctrlr_loss_timeout_sec, 0);
        assert!(p.hostnqn.starts_with(DEFAULT_HOSTNQN_PREFIX));
    }
}
