//! Fabrics commands: Connect (command and its 1024-byte data), Property
//! Get/Set and the controller properties (CAP, VS, CC, CSTS).

use crate::error::{need, need_out, WireError};
use crate::le::{put_str_nul, put_u16, put_u32, str_field, u16_at, u32_at};
use crate::opcode::{fctype, FABRICS};
use crate::sqe::Sqe;

/// Well-known NQN of a discovery controller.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Controller ID a host sends to ask for a new (dynamic) controller.
pub const CNTLID_DYNAMIC: u16 = 0xffff;
pub const CONNECT_DATA_LEN: usize = 1024;
pub const NQN_FIELD_LEN: usize = 256;
/// Longest NQN (the field keeps a terminating NUL).
pub const NQN_MAX_LEN: usize = 223;

/// Connect command fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectCommand {
    /// Record format (0).
    pub recfmt: u16,
    /// Queue id: 0 is the admin queue.
    pub qid: u16,
    /// Submission queue size, 1-based here (the wire holds size - 1).
    pub sqsize: u32,
    /// Connect attributes (priority class).
    pub cattr: u8,
    /// Keep-alive timeout in milliseconds (admin queue), 0 disables.
    pub kato: u32,
}

impl ConnectCommand {
    pub fn parse(sqe: &Sqe) -> ConnectCommand {
        ConnectCommand {
            recfmt: sqe.cdw10() as u16,
            qid: (sqe.cdw10() >> 16) as u16,
            sqsize: (sqe.cdw11() & 0xffff) + 1,
            cattr: (sqe.cdw11() >> 16) as u8,
            kato: sqe.cdw12(),
        }
    }

    /// The SQE; its SGL must describe the 1024 bytes of connect data.
    pub fn build(&self, cid: u16) -> Result<Sqe, WireError> {
        if self.sqsize == 0 || self.sqsize > 65536 {
            return Err(WireError::BadField {
                field: "SQSIZE",
                value: self.sqsize as u64,
            });
        }
        Ok(Sqe {
            opcode: FABRICS,
            cid,
            nsid: fctype::CONNECT as u32,
            cdw: [
                self.recfmt as u32 | (self.qid as u32) << 16,
                (self.sqsize - 1) | (self.cattr as u32) << 16,
                self.kato,
                0,
                0,
                0,
            ],
            ..Sqe::default()
        })
    }
}

/// Connect data: who connects to what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectData<'a> {
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: &'a str,
    pub hostnqn: &'a str,
}

impl<'a> ConnectData<'a> {
    pub fn decode(b: &'a [u8]) -> Result<ConnectData<'a>, WireError> {
        need(b, CONNECT_DATA_LEN)?;
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[..16]);
        Ok(ConnectData {
            hostid,
            cntlid: u16_at(b, 16),
            subnqn: nqn_field(&b[256..512], "SUBNQN")?,
            // Empty is accepted, as SPDK's nvmf_tgt does: SPDK's own
            // spdk_nvme_perf sends no host NQN unless given one, and
            // whether a host may connect is the subsystem's call.
            hostnqn: terminated_field(&b[512..768], "HOSTNQN")?,
        })
    }

    pub fn encode(&self, b: &mut [u8]) -> Result<(), WireError> {
        need_out(b, CONNECT_DATA_LEN)?;
        for (name, n) in [("SUBNQN", self.subnqn), ("HOSTNQN", self.hostnqn)] {
            if n.len() > NQN_MAX_LEN {
                return Err(WireError::BadField {
                    field: name,
                    value: n.len() as u64,
                });
            }
        }
        b[..CONNECT_DATA_LEN].fill(0);
        b[..16].copy_from_slice(&self.hostid);
        put_u16(b, 16, self.cntlid);
        put_str_nul(&mut b[256..512], self.subnqn);
        put_str_nul(&mut b[512..768], self.hostnqn);
        Ok(())
    }
}

fn nqn_field<'a>(b: &'a [u8], field: &'static str) -> Result<&'a str, WireError> {
    let s = terminated_field(b, field)?;
    if s.is_empty() {
        return Err(WireError::BadField { field, value: 0 });
    }
    Ok(s)
}

/// A string that must be NUL-terminated inside its field (may be empty).
fn terminated_field<'a>(b: &'a [u8], field: &'static str) -> Result<&'a str, WireError> {
    let end = b.iter().position(|&c| c == 0).ok_or(WireError::BadField {
        field,
        value: b.len() as u64,
    })?;
    str_field(&b[..end])
}

/// Connect completion dword 0 for a success: the controller id.
pub fn connect_success_dw0(cntlid: u16) -> u32 {
    cntlid as u32
}

/// Connect completion dword 0 for Invalid Parameters: which parameter was
/// bad (`in_data`: in the connect data rather than the command) at which
/// byte offset.
pub fn connect_invalid_param_dw0(in_data: bool, offset: u16) -> u32 {
    in_data as u32 | (offset as u32) << 16
}

/// Byte offsets of connect data fields (for invalid-parameter answers).
pub mod connect_data_offset {
    pub const CNTLID: u16 = 16;
    pub const SUBNQN: u16 = 256;
    pub const HOSTNQN: u16 = 512;
}

/// Property Get / Property Set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertyCommand {
    /// 8-byte property (ATTRIB bit 0), else 4 bytes.
    pub size8: bool,
    pub offset: u32,
    /// Property Set: the value.
    pub value: u64,
}

impl PropertyCommand {
    pub fn parse(sqe: &Sqe) -> PropertyCommand {
        PropertyCommand {
            size8: sqe.cdw10() & 0x7 == 1,
            offset: sqe.cdw11(),
            value: sqe.cdw12() as u64 | (sqe.cdw13() as u64) << 32,
        }
    }

    pub fn build_get(&self, cid: u16) -> Sqe {
        Sqe {
            opcode: FABRICS,
            cid,
            nsid: fctype::PROPERTY_GET as u32,
            cdw: [self.size8 as u32, self.offset, 0, 0, 0, 0],
            ..Sqe::default()
        }
    }

    pub fn build_set(&self, cid: u16) -> Sqe {
        Sqe {
            opcode: FABRICS,
            cid,
            nsid: fctype::PROPERTY_SET as u32,
            cdw: [
                self.size8 as u32,
                self.offset,
                self.value as u32,
                (self.value >> 32) as u32,
                0,
                0,
            ],
            ..Sqe::default()
        }
    }
}

/// Controller property offsets.
pub mod property {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const INTMS: u32 = 0x0c;
    pub const INTMC: u32 = 0x10;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1c;
    pub const NSSR: u32 = 0x20;

    /// NVMe 1.3.
    pub const VS_1_3: u32 = 0x0001_0300;

    pub mod cc {
        pub const EN: u32 = 1 << 0;
        pub const SHN_SHIFT: u32 = 14;
        pub const SHN_MASK: u32 = 0x3 << SHN_SHIFT;
        pub const SHN_NONE: u32 = 0;
        pub const SHN_NORMAL: u32 = 1;
        pub const SHN_ABRUPT: u32 = 2;
        pub const IOSQES_SHIFT: u32 = 16;
        pub const IOCQES_SHIFT: u32 = 20;
    }

    pub mod csts {
        pub const RDY: u32 = 1 << 0;
        pub const CFS: u32 = 1 << 1;
        pub const SHST_SHIFT: u32 = 2;
        pub const SHST_NORMAL: u32 = 0;
        pub const SHST_OCCURRING: u32 = 1 << SHST_SHIFT;
        pub const SHST_COMPLETE: u32 = 2 << SHST_SHIFT;
    }
}

/// Controller Capabilities (CAP) fields we report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Maximum queue entries supported, 1-based here.
    pub mqes: u32,
    /// Contiguous queues required.
    pub cqr: bool,
    /// Worst-case time to become ready, in 500 ms units.
    pub timeout_500ms: u8,
    /// NVM command set supported.
    pub css_nvm: bool,
    /// Memory page size min/max (2 ^ (12 + x)).
    pub mpsmin: u8,
    pub mpsmax: u8,
}

impl Capabilities {
    pub fn to_u64(&self) -> u64 {
        (self.mqes.clamp(2, 65536) as u64 - 1)
            | (self.cqr as u64) << 16
            | (self.timeout_500ms as u64) << 24
            | (self.css_nvm as u64) << 37
            | ((self.mpsmin & 0xf) as u64) << 48
            | ((self.mpsmax & 0xf) as u64) << 52
    }

    pub fn from_u64(v: u64) -> Capabilities {
        Capabilities {
            mqes: (v & 0xffff) as u32 + 1,
            cqr: v & (1 << 16) != 0,
            timeout_500ms: (v >> 24) as u8,
            css_nvm: v & (1 << 37) != 0,
            mpsmin: ((v >> 48) & 0xf) as u8,
            mpsmax: ((v >> 52) & 0xf) as u8,
        }
    }
}

/// Reads u32 fields of a register image (helpers for hosts' tests).
pub fn reg_u32(b: &[u8], off: usize) -> Result<u32, WireError> {
    need(b, off + 4)?;
    Ok(u32_at(b, off))
}

/// Writes a u32 register into an image.
pub fn put_reg_u32(b: &mut [u8], off: usize, v: u32) -> Result<(), WireError> {
    need_out(b, off + 4)?;
    put_u32(b, off, v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_round_trip() {
        let c = ConnectCommand {
            recfmt: 0,
            qid: 3,
            sqsize: 128,
            cattr: 0,
            kato: 15000,
        };
        let sqe = c.build(9).unwrap();
        assert_eq!(sqe.fctype(), fctype::CONNECT);
        assert_eq!(ConnectCommand::parse(&sqe), c);
        let d = ConnectData {
            hostid: [7; 16],
            cntlid: CNTLID_DYNAMIC,
            subnqn: "nqn.2016-06.io.spdk:cnode1",
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1",
        };
        let mut b = [0u8; CONNECT_DATA_LEN];
        d.encode(&mut b).unwrap();
        assert_eq!(ConnectData::decode(&b).unwrap(), d);
    }

    #[test]
    fn connect_data_rejects_unterminated_nqn() {
        let mut b = [b'a'; CONNECT_DATA_LEN];
        assert!(matches!(
            ConnectData::decode(&b),
            Err(WireError::BadField {
                field: "SUBNQN",
                ..
            })
        ));
        b[256] = 0;
        assert!(ConnectData::decode(&b).is_err());
    }

    #[test]
    fn connect_data_accepts_an_empty_host_nqn_only() {
        let d = ConnectData {
            hostid: [1; 16],
            cntlid: CNTLID_DYNAMIC,
            subnqn: "nqn.2016-06.io.spdk:cnode1",
            hostnqn: "",
        };
        let mut b = [0u8; CONNECT_DATA_LEN];
        d.encode(&mut b).unwrap();
        assert_eq!(ConnectData::decode(&b).unwrap(), d);
        b[256] = 0;
        assert!(matches!(
            ConnectData::decode(&b),
            Err(WireError::BadField {
                field: "SUBNQN",
                value: 0
            })
        ));
        b[256] = b'n';
        b[512..768].fill(b'h');
        assert!(matches!(
            ConnectData::decode(&b),
            Err(WireError::BadField {
                field: "HOSTNQN",
                ..
            })
        ));
    }

    #[test]
    fn cap_round_trip() {
        let c = Capabilities {
            mqes: 128,
            cqr: true,
            timeout_500ms: 30,
            css_nvm: true,
            mpsmin: 0,
            mpsmax: 0,
        };
        assert_eq!(Capabilities::from_u64(c.to_u64()), c);
    }
}
