//! Typed views of command dwords (I/O, admin) and builders for hosts.
//! Parsers take an [`Sqe`] and read the fields; builders make one.

use crate::error::{need, need_out, WireError};
use crate::le::{put_u32, put_u64, u32_at, u64_at};
use crate::opcode::{admin, io};
use crate::sqe::Sqe;

/// Read, Write, Compare, Write Zeroes: starting LBA and block count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RwCommand {
    pub slba: u64,
    /// Number of logical blocks (1-based here; the wire holds count - 1).
    pub nlb: u32,
    /// Force Unit Access.
    pub fua: bool,
    /// Write Zeroes: the host allows deallocation.
    pub deac: bool,
}

const CDW12_FUA: u32 = 1 << 30;
const CDW12_DEAC: u32 = 1 << 25;

impl RwCommand {
    pub fn parse(sqe: &Sqe) -> RwCommand {
        RwCommand {
            slba: sqe.cdw10() as u64 | ((sqe.cdw11() as u64) << 32),
            nlb: (sqe.cdw12() & 0xffff) + 1,
            fua: sqe.cdw12() & CDW12_FUA != 0,
            deac: sqe.cdw12() & CDW12_DEAC != 0,
        }
    }

    /// Exclusive end LBA, or `None` if it overflows.
    pub fn end_lba(&self) -> Option<u64> {
        self.slba.checked_add(self.nlb as u64)
    }

    /// An SQE for `opcode` (read, write, compare, write zeroes); `nlb` must be
    /// 1..=65536. Set the SGL with [`Sqe::with_sgl`].
    pub fn build(&self, opcode: u8, cid: u16, nsid: u32) -> Result<Sqe, WireError> {
        if self.nlb == 0 || self.nlb > 65536 {
            return Err(WireError::BadField {
                field: "NLB",
                value: self.nlb as u64,
            });
        }
        let mut cdw12 = self.nlb - 1;
        if self.fua {
            cdw12 |= CDW12_FUA;
        }
        if self.deac {
            cdw12 |= CDW12_DEAC;
        }
        Ok(Sqe {
            opcode,
            cid,
            nsid,
            cdw: [self.slba as u32, (self.slba >> 32) as u32, cdw12, 0, 0, 0],
            ..Sqe::default()
        })
    }
}

/// A Flush command for `nsid`.
pub fn flush(cid: u16, nsid: u32) -> Sqe {
    Sqe {
        opcode: io::FLUSH,
        cid,
        nsid,
        ..Sqe::default()
    }
}

/// Dataset Management: number of ranges and attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsmCommand {
    /// Number of ranges (1-based; wire holds count - 1), up to 256.
    pub nr: u32,
    pub deallocate: bool,
    pub integral_read: bool,
    pub integral_write: bool,
}

impl DsmCommand {
    pub fn parse(sqe: &Sqe) -> DsmCommand {
        DsmCommand {
            nr: (sqe.cdw10() & 0xff) + 1,
            integral_read: sqe.cdw11() & 1 != 0,
            integral_write: sqe.cdw11() & 2 != 0,
            deallocate: sqe.cdw11() & 4 != 0,
        }
    }

    pub fn build(&self, cid: u16, nsid: u32) -> Result<Sqe, WireError> {
        if self.nr == 0 || self.nr > 256 {
            return Err(WireError::BadField {
                field: "NR",
                value: self.nr as u64,
            });
        }
        let cdw11 = self.integral_read as u32
            | (self.integral_write as u32) << 1
            | (self.deallocate as u32) << 2;
        Ok(Sqe {
            opcode: io::DATASET_MANAGEMENT,
            cid,
            nsid,
            cdw: [self.nr - 1, cdw11, 0, 0, 0, 0],
            ..Sqe::default()
        })
    }

    /// Bytes of range data the command carries.
    pub fn data_len(&self) -> usize {
        self.nr as usize * DSM_RANGE_LEN
    }
}

pub const DSM_RANGE_LEN: usize = 16;

/// One Dataset Management range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsmRange {
    pub context_attributes: u32,
    /// Length in logical blocks.
    pub nlb: u32,
    pub slba: u64,
}

impl DsmRange {
    pub fn decode(b: &[u8]) -> Result<DsmRange, WireError> {
        need(b, DSM_RANGE_LEN)?;
        Ok(DsmRange {
            context_attributes: u32_at(b, 0),
            nlb: u32_at(b, 4),
            slba: u64_at(b, 8),
        })
    }

    pub fn encode(&self, b: &mut [u8]) -> Result<(), WireError> {
        need_out(b, DSM_RANGE_LEN)?;
        put_u32(b, 0, self.context_attributes);
        put_u32(b, 4, self.nlb);
        put_u64(b, 8, self.slba);
        Ok(())
    }
}

/// Iterates the ranges of DSM data without allocating.
pub fn dsm_ranges(data: &[u8]) -> impl Iterator<Item = DsmRange> + '_ {
    data.chunks_exact(DSM_RANGE_LEN)
        .filter_map(|c| DsmRange::decode(c).ok())
}

/// Identify: CNS and its selectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyCommand {
    pub cns: u8,
    pub cntid: u16,
    pub csi: u8,
    pub nsid: u32,
}

impl IdentifyCommand {
    pub fn parse(sqe: &Sqe) -> IdentifyCommand {
        IdentifyCommand {
            cns: sqe.cdw10() as u8,
            cntid: (sqe.cdw10() >> 16) as u16,
            csi: (sqe.cdw11() >> 24) as u8,
            nsid: sqe.nsid,
        }
    }

    pub fn build(&self, cid: u16) -> Sqe {
        Sqe {
            opcode: admin::IDENTIFY,
            cid,
            nsid: self.nsid,
            cdw: [
                self.cns as u32 | (self.cntid as u32) << 16,
                (self.csi as u32) << 24,
                0,
                0,
                0,
                0,
            ],
            ..Sqe::default()
        }
    }
}

/// Get Log Page: log id, length in bytes and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetLogPageCommand {
    pub lid: u8,
    pub lsp: u8,
    /// Retain Asynchronous Event.
    pub rae: bool,
    /// Bytes requested (NUMD dwords * 4).
    pub len: u64,
    /// Byte offset into the log.
    pub offset: u64,
    pub nsid: u32,
}

impl GetLogPageCommand {
    pub fn parse(sqe: &Sqe) -> GetLogPageCommand {
        let numdl = (sqe.cdw10() >> 16) as u64;
        let numdu = (sqe.cdw11() & 0xffff) as u64;
        GetLogPageCommand {
            lid: sqe.cdw10() as u8,
            lsp: ((sqe.cdw10() >> 8) & 0x7f) as u8,
            rae: sqe.cdw10() & (1 << 15) != 0,
            len: ((numdu << 16 | numdl) + 1) * 4,
            offset: sqe.cdw12() as u64 | (sqe.cdw13() as u64) << 32,
            nsid: sqe.nsid,
        }
    }

    /// `len` must be a non-zero multiple of 4, `offset` a multiple of 4.
    pub fn build(&self, cid: u16) -> Result<Sqe, WireError> {
        if self.len == 0 || self.len % 4 != 0 || self.len / 4 > 1 << 32 {
            return Err(WireError::BadField {
                field: "NUMD",
                value: self.len,
            });
        }
        if self.offset % 4 != 0 {
            return Err(WireError::BadField {
                field: "LPO",
                value: self.offset,
            });
        }
        let numd = self.len / 4 - 1;
        Ok(Sqe {
            opcode: admin::GET_LOG_PAGE,
            cid,
            nsid: self.nsid,
            cdw: [
                self.lid as u32
                    | (self.lsp as u32 & 0x7f) << 8
                    | (self.rae as u32) << 15
                    | ((numd & 0xffff) as u32) << 16,
                (numd >> 16) as u32,
                self.offset as u32,
                (self.offset >> 32) as u32,
                0,
                0,
            ],
            ..Sqe::default()
        })
    }
}

/// Get Features / Set Features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureCommand {
    pub fid: u8,
    /// Get Features: SEL (0 current, 1 default, 2 saved, 3 supported caps).
    pub sel: u8,
    /// Set Features: save.
    pub save: bool,
    /// CDW11: the feature's value (Set) or selector argument (Get).
    pub value: u32,
}

impl FeatureCommand {
    pub fn parse(sqe: &Sqe) -> FeatureCommand {
        FeatureCommand {
            fid: sqe.cdw10() as u8,
            sel: ((sqe.cdw10() >> 8) & 0x7) as u8,
            save: sqe.cdw10() & (1 << 31) != 0,
            value: sqe.cdw11(),
        }
    }

    pub fn build_get(&self, cid: u16) -> Sqe {
        Sqe {
            opcode: admin::GET_FEATURES,
            cid,
            cdw: [
                self.fid as u32 | (self.sel as u32 & 7) << 8,
                self.value,
                0,
                0,
                0,
                0,
            ],
            ..Sqe::default()
        }
    }

    pub fn build_set(&self, cid: u16) -> Sqe {
        Sqe {
            opcode: admin::SET_FEATURES,
            cid,
            cdw: [
                self.fid as u32 | (self.save as u32) << 31,
                self.value,
                0,
                0,
                0,
                0,
            ],
            ..Sqe::default()
        }
    }
}

/// Feature identifiers.
pub mod feature {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
    pub const HOST_IDENTIFIER: u8 = 0x81;

    /// Number of Queues value: I/O submission and completion queues
    /// requested or allocated, 1-based (the wire holds count - 1 each).
    pub fn num_queues_value(nsq: u16, ncq: u16) -> u32 {
        (nsq.saturating_sub(1) as u32) | (ncq.saturating_sub(1) as u32) << 16
    }

    /// (submission queues, completion queues), 1-based.
    pub fn num_queues_parse(v: u32) -> (u32, u32) {
        ((v & 0xffff) + 1, (v >> 16) + 1)
    }

    /// Async event config: namespace attribute notices (bit 8).
    pub const AEC_NS_ATTRIBUTE_NOTICES: u32 = 1 << 8;
}

/// A Keep Alive command.
pub fn keep_alive(cid: u16) -> Sqe {
    Sqe {
        opcode: admin::KEEP_ALIVE,
        cid,
        ..Sqe::default()
    }
}

/// An Asynchronous Event Request command.
pub fn async_event_request(cid: u16) -> Sqe {
    Sqe {
        opcode: admin::ASYNC_EVENT_REQUEST,
        cid,
        ..Sqe::default()
    }
}

/// Asynchronous event completion dword 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    pub event_type: u8,
    pub info: u8,
    pub log_page: u8,
}

/// Asynchronous event types and the notice infos we use.
pub mod async_event {
    pub const TYPE_ERROR: u8 = 0;
    pub const TYPE_SMART: u8 = 1;
    pub const TYPE_NOTICE: u8 = 2;
    pub const NOTICE_NS_ATTRIBUTE_CHANGED: u8 = 0x00;
    pub const NOTICE_DISCOVERY_LOG_CHANGED: u8 = 0xf0;
}

impl AsyncEvent {
    pub fn to_dw0(self) -> u32 {
        (self.event_type as u32 & 7) | (self.info as u32) << 8 | (self.log_page as u32) << 16
    }

    pub fn from_dw0(v: u32) -> AsyncEvent {
        AsyncEvent {
            event_type: (v & 7) as u8,
            info: (v >> 8) as u8,
            log_page: (v >> 16) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rw_round_trip() {
        let rw = RwCommand {
            slba: 0x1_2345_6789,
            nlb: 65536,
            fua: true,
            deac: false,
        };
        let sqe = rw.build(io::WRITE, 7, 1).unwrap();
        assert_eq!(RwCommand::parse(&Sqe::decode(&sqe.to_bytes()).unwrap()), rw);
        assert!(RwCommand { nlb: 0, ..rw }.build(io::WRITE, 0, 1).is_err());
    }

    #[test]
    fn log_page_lengths() {
        let c = GetLogPageCommand {
            lid: 0x70,
            lsp: 0,
            rae: true,
            len: 4096 * 300,
            offset: 1024,
            nsid: 0,
        };
        assert_eq!(GetLogPageCommand::parse(&c.build(1).unwrap()), c);
        assert!(GetLogPageCommand { len: 3, ..c }.build(1).is_err());
    }

    #[test]
    fn dsm_ranges_decode() {
        let mut data = [0u8; 32];
        DsmRange {
            context_attributes: 0,
            nlb: 8,
            slba: 100,
        }
        .encode(&mut data[..16])
        .unwrap();
        let r: Vec<_> = dsm_ranges(&data).collect();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].slba, 100);
        assert_eq!(r[1].nlb, 0);
    }
}
