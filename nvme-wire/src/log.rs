//! Log pages: error information, SMART / health, changed namespace list,
//! and the discovery log (header and entries).

use crate::error::{need, need_out, WireError};
use crate::le::{put_str_nul, put_u16, put_u32, put_u64, str_field, u16_at, u32_at, u64_at};

/// Log page identifiers.
pub mod lid {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NS_LIST: u8 = 0x04;
    pub const COMMANDS_SUPPORTED: u8 = 0x05;
    pub const DISCOVERY: u8 = 0x70;
}

pub const ERROR_ENTRY_LEN: usize = 64;
pub const SMART_LEN: usize = 512;
pub const CHANGED_NS_LIST_LEN: usize = 4096;
pub const DISCOVERY_HEADER_LEN: usize = 1024;
pub const DISCOVERY_ENTRY_LEN: usize = 1024;

/// One error information log entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorLogEntry {
    pub error_count: u64,
    pub sqid: u16,
    pub cid: u16,
    /// Status field (with phase bit position, as in a CQE).
    pub status_field: u16,
    pub param_error_location: u16,
    pub lba: u64,
    pub nsid: u32,
}

impl ErrorLogEntry {
    pub fn encode(&self, b: &mut [u8]) -> Result<(), WireError> {
        need_out(b, ERROR_ENTRY_LEN)?;
        b[..ERROR_ENTRY_LEN].fill(0);
        put_u64(b, 0, self.error_count);
        put_u16(b, 8, self.sqid);
        put_u16(b, 10, self.cid);
        put_u16(b, 12, self.status_field);
        put_u16(b, 14, self.param_error_location);
        put_u64(b, 16, self.lba);
        put_u32(b, 24, self.nsid);
        Ok(())
    }

    pub fn decode(b: &[u8]) -> Result<ErrorLogEntry, WireError> {
        need(b, ERROR_ENTRY_LEN)?;
        Ok(ErrorLogEntry {
            error_count: u64_at(b, 0),
            sqid: u16_at(b, 8),
            cid: u16_at(b, 10),
            status_field: u16_at(b, 12),
            param_error_location: u16_at(b, 14),
            lba: u64_at(b, 16),
            nsid: u32_at(b, 24),
        })
    }
}

/// SMART / health information (the counters a bdev target can know).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmartLog {
    pub critical_warning: u8,
    /// Composite temperature in kelvins.
    pub temperature: u16,
    pub available_spare: u8,
    pub available_spare_threshold: u8,
    pub percentage_used: u8,
    /// In thousands of 512-byte units, as the spec counts.
    pub data_units_read: u64,
    pub data_units_written: u64,
    pub host_read_commands: u64,
    pub host_write_commands: u64,
    pub power_cycles: u64,
    pub power_on_hours: u64,
    pub unsafe_shutdowns: u64,
    pub media_errors: u64,
    pub num_error_log_entries: u64,
}

impl SmartLog {
    pub fn encode(&self, b: &mut [u8]) -> Result<(), WireError> {
        need_out(b, SMART_LEN)?;
        b[..SMART_LEN].fill(0);
        b[0] = self.critical_warning;
        put_u16(b, 1, self.temperature);
        b[3] = self.available_spare;
        b[4] = self.available_spare_threshold;
        b[5] = self.percentage_used;
        // 128-bit counters: the low 64 bits carry every value we report.
        put_u64(b, 32, self.data_units_read);
        put_u64(b, 48, self.data_units_written);
        put_u64(b, 64, self.host_read_commands);
        put_u64(b, 80, self.host_write_commands);
        put_u64(b, 112, self.power_cycles);
        put_u64(b, 128, self.power_on_hours);
        put_u64(b, 144, self.unsafe_shutdowns);
        put_u64(b, 160, self.media_errors);
        put_u64(b, 176, self.num_error_log_entries);
        Ok(())
    }

    pub fn decode(b: &[u8]) -> Result<SmartLog, WireError> {
        need(b, SMART_LEN)?;
        Ok(SmartLog {
            critical_warning: b[0],
            temperature: u16_at(b, 1),
            available_spare: b[3],
            available_spare_threshold: b[4],
            percentage_used: b[5],
            data_units_read: u64_at(b, 32),
            data_units_written: u64_at(b, 48),
            host_read_commands: u64_at(b, 64),
            host_write_commands: u64_at(b, 80),
            power_cycles: u64_at(b, 112),
            power_on_hours: u64_at(b, 128),
            unsafe_shutdowns: u64_at(b, 144),
            media_errors: u64_at(b, 160),
            num_error_log_entries: u64_at(b, 176),
        })
    }
}

/// Writes a changed namespace list: up to 1023 ids, or 0xffffffff in the
/// first slot when more changed than fit.
pub fn encode_changed_ns_list(b: &mut [u8], nsids: &[u32]) -> Result<(), WireError> {
    need_out(b, CHANGED_NS_LIST_LEN)?;
    b[..CHANGED_NS_LIST_LEN].fill(0);
    if nsids.len() > CHANGED_NS_LIST_LEN / 4 {
        put_u32(b, 0, u32::MAX);
        return Ok(());
    }
    for (i, id) in nsids.iter().enumerate() {
        put_u32(b, i * 4, *id);
    }
    Ok(())
}

/// Discovery log transport types, address families, subsystem types.
pub mod discovery {
    pub const TRTYPE_RDMA: u8 = 1;
    pub const TRTYPE_FC: u8 = 2;
    pub const TRTYPE_TCP: u8 = 3;
    pub const TRTYPE_LOOP: u8 = 254;
    pub const ADRFAM_IPV4: u8 = 1;
    pub const ADRFAM_IPV6: u8 = 2;
    /// Referral to another discovery service.
    pub const SUBTYPE_DISCOVERY_REFERRAL: u8 = 1;
    pub const SUBTYPE_NVME: u8 = 2;
    pub const SUBTYPE_CURRENT_DISCOVERY: u8 = 3;
    /// TREQ: secure channel not required.
    pub const TREQ_SECURE_CHANNEL_NOT_REQUIRED: u8 = 0x2;
    /// TSAS for TCP: no security.
    pub const TCP_SECTYPE_NONE: u8 = 0;
    /// CNTLID: dynamic controller model.
    pub const CNTLID_DYNAMIC: u16 = 0xffff;
}

/// Discovery log page header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoveryLogHeader {
    pub genctr: u64,
    pub numrec: u64,
    pub recfmt: u16,
}

impl DiscoveryLogHeader {
    pub fn encode(&self, b: &mut [u8]) -> Result<(), WireError> {
        need_out(b, DISCOVERY_HEADER_LEN)?;
        b[..DISCOVERY_HEADER_LEN].fill(0);
        put_u64(b, 0, self.genctr);
        put_u64(b, 8, self.numrec);
        put_u16(b, 16, self.recfmt);
        Ok(())
    }

    pub fn decode(b: &[u8]) -> Result<DiscoveryLogHeader, WireError> {
        need(b, 18)?;
        Ok(DiscoveryLogHeader {
            genctr: u64_at(b, 0),
            numrec: u64_at(b, 8),
            recfmt: u16_at(b, 16),
        })
    }
}

/// One discovery log entry (a subsystem reachable at one port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoveryLogEntry<'a> {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub treq: u8,
    pub portid: u16,
    pub cntlid: u16,
    /// Admin max submission queue size.
    pub asqsz: u16,
    pub trsvcid: &'a str,
    pub subnqn: &'a str,
    pub traddr: &'a str,
    /// TCP: security type (TSAS byte 0).
    pub sectype: u8,
}

impl<'a> DiscoveryLogEntry<'a> {
    pub fn encode(&self, b: &mut [u8]) -> Result<(), WireError> {
        need_out(b, DISCOVERY_ENTRY_LEN)?;
        b[..DISCOVERY_ENTRY_LEN].fill(0);
        b[0] = self.trtype;
        b[1] = self.adrfam;
        b[2] = self.subtype;
        b[3] = self.treq;
        put_u16(b, 4, self.portid);
        put_u16(b, 6, self.cntlid);
        put_u16(b, 8, self.asqsz);
        // trsvcid and traddr are space padded, the NQN NUL padded.
        crate::le::put_ascii_padded(&mut b[32..64], self.trsvcid);
        put_str_nul(&mut b[256..512], self.subnqn);
        crate::le::put_ascii_padded(&mut b[512..768], self.traddr);
        b[768] = self.sectype;
        Ok(())
    }

    pub fn decode(b: &'a [u8]) -> Result<DiscoveryLogEntry<'a>, WireError> {
        need(b, DISCOVERY_ENTRY_LEN)?;
        Ok(DiscoveryLogEntry {
            trtype: b[0],
            adrfam: b[1],
            subtype: b[2],
            treq: b[3],
            portid: u16_at(b, 4),
            cntlid: u16_at(b, 6),
            asqsz: u16_at(b, 8),
            trsvcid: str_field(&b[32..64])?,
            subnqn: str_field(&b[256..512])?,
            traddr: str_field(&b[512..768])?,
            sectype: b[768],
        })
    }
}

/// Copies the part `[offset, offset + out.len())` of a log that is laid out
/// by `write_log` into `out`, zero-filling past its end. `write_log` is
/// given a scratch buffer of the whole log's length.
pub fn copy_log_window(log: &[u8], offset: u64, out: &mut [u8]) -> Result<usize, WireError> {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    out.fill(0);
    if start >= log.len() {
        return Ok(0);
    }
    let n = (log.len() - start).min(out.len());
    out[..n].copy_from_slice(&log[start..start + n]);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_round_trip() {
        let e = DiscoveryLogEntry {
            trtype: discovery::TRTYPE_TCP,
            adrfam: discovery::ADRFAM_IPV4,
            subtype: discovery::SUBTYPE_NVME,
            treq: discovery::TREQ_SECURE_CHANNEL_NOT_REQUIRED,
            portid: 1,
            cntlid: discovery::CNTLID_DYNAMIC,
            asqsz: 32,
            trsvcid: "4420",
            subnqn: "nqn.2016-06.io.spdk:cnode1",
            traddr: "127.0.0.1",
            sectype: 0,
        };
        let mut b = vec![0u8; DISCOVERY_ENTRY_LEN];
        e.encode(&mut b).unwrap();
        assert_eq!(DiscoveryLogEntry::decode(&b).unwrap(), e);
        let h = DiscoveryLogHeader {
            genctr: 3,
            numrec: 1,
            recfmt: 0,
        };
        h.encode(&mut b).unwrap();
        assert_eq!(DiscoveryLogHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn smart_and_error_round_trip() {
        let s = SmartLog {
            temperature: 300,
            available_spare: 100,
            host_read_commands: 5,
            data_units_written: 9,
            ..SmartLog::default()
        };
        let mut b = vec![0u8; SMART_LEN];
        s.encode(&mut b).unwrap();
        assert_eq!(SmartLog::decode(&b).unwrap(), s);
        let e = ErrorLogEntry {
            error_count: 1,
            sqid: 1,
            cid: 2,
            status_field: 4,
            param_error_location: 0xffff,
            lba: 7,
            nsid: 1,
        };
        e.encode(&mut b).unwrap();
        assert_eq!(ErrorLogEntry::decode(&b).unwrap(), e);
    }

    #[test]
    fn log_window() {
        let log: Vec<u8> = (0..10).collect();
        let mut out = [0xffu8; 8];
        assert_eq!(copy_log_window(&log, 6, &mut out).unwrap(), 4);
        assert_eq!(out, [6, 7, 8, 9, 0, 0, 0, 0]);
        assert_eq!(copy_log_window(&log, u64::MAX, &mut out).unwrap(), 0);
    }

    #[test]
    fn changed_list_overflow() {
        let mut b = vec![0u8; CHANGED_NS_LIST_LEN];
        encode_changed_ns_list(&mut b, &[1, 3]).unwrap();
        assert_eq!(&b[..8], &[1, 0, 0, 0, 3, 0, 0, 0]);
        let many: Vec<u32> = (1..=2000).collect();
        encode_changed_ns_list(&mut b, &many).unwrap();
        assert_eq!(&b[..4], &[0xff; 4]);
    }
}
