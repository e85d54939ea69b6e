//! The 64-byte submission queue entry, its SGL descriptor, and the 16-byte
//! completion queue entry.

use crate::error::{need, WireError};
use crate::le::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use crate::status::Status;

pub const SQE_LEN: usize = 64;
pub const CQE_LEN: usize = 16;
pub const SGL_LEN: usize = 16;

/// PSDT value for "SGLs, metadata as contiguous buffer" (required on fabrics).
pub const PSDT_SGL_MPTR_CONTIG: u8 = 0x1;
/// PSDT value for "SGLs, metadata as SGL" (accepted as well: no metadata).
pub const PSDT_SGL_MPTR_SGL: u8 = 0x2;

/// SGL descriptor type byte values used on NVMe/TCP.
pub mod sgl_type {
    /// Data block, offset subtype: in-capsule data (address = offset into
    /// the capsule's data).
    pub const DATA_BLOCK_OFFSET: u8 = 0x01;
    /// Transport SGL data block, transport-specific subtype: data moves by
    /// R2T/H2CData (writes) or C2HData (reads).
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5a;
}

/// An SGL descriptor (DPTR of a fabrics command).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SglDescriptor {
    pub address: u64,
    pub length: u32,
    /// Descriptor type (high nibble) and subtype (low nibble).
    pub type_byte: u8,
}

/// How the data of a command moves, from its SGL descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlacement {
    /// No data (length 0).
    None,
    /// In the capsule, `offset` bytes into its data, `length` bytes.
    InCapsule { offset: u64, length: u32 },
    /// Moved by the transport (R2T/H2CData or C2HData), `length` bytes.
    Transport { length: u32 },
}

impl SglDescriptor {
    pub fn in_capsule(length: u32) -> SglDescriptor {
        SglDescriptor {
            address: 0,
            length,
            type_byte: sgl_type::DATA_BLOCK_OFFSET,
        }
    }

    pub fn transport(length: u32) -> SglDescriptor {
        SglDescriptor {
            address: 0,
            length,
            type_byte: sgl_type::TRANSPORT_DATA_BLOCK,
        }
    }

    pub fn decode(b: &[u8]) -> Result<SglDescriptor, WireError> {
        need(b, SGL_LEN)?;
        Ok(SglDescriptor {
            address: u64_at(b, 0),
            length: u32_at(b, 8),
            type_byte: b[15],
        })
    }

    pub fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.address);
        put_u32(b, 8, self.length);
        b[12..15].fill(0);
        b[15] = self.type_byte;
    }

    /// Where the data is, or the status to fail the command with.
    pub fn placement(&self) -> Result<DataPlacement, Status> {
        match self.type_byte {
            _ if self.length == 0 => Ok(DataPlacement::None),
            sgl_type::DATA_BLOCK_OFFSET => Ok(DataPlacement::InCapsule {
                offset: self.address,
                length: self.length,
            }),
            sgl_type::TRANSPORT_DATA_BLOCK => Ok(DataPlacement::Transport {
                length: self.length,
            }),
            _ => Err(Status::SGL_DESCRIPTOR_TYPE_INVALID),
        }
    }
}

/// A submission queue entry, fields as on the wire (command-specific
/// meaning is read through the accessors of the command modules).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sqe {
    pub opcode: u8,
    /// FUSE (bits 0-1) and PSDT (bits 6-7).
    pub flags: u8,
    pub cid: u16,
    /// Namespace id; on a fabrics command (opcode 0x7f) byte 4 is FCTYPE.
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub mptr: u64,
    pub sgl: SglDescriptor,
    /// Command dwords 10 to 15.
    pub cdw: [u32; 6],
}

impl Sqe {
    pub fn decode(b: &[u8]) -> Result<Sqe, WireError> {
        need(b, SQE_LEN)?;
        let mut cdw = [0u32; 6];
        for (i, d) in cdw.iter_mut().enumerate() {
            *d = u32_at(b, 40 + 4 * i);
        }
        Ok(Sqe {
            opcode: b[0],
            flags: b[1],
            cid: u16_at(b, 2),
            nsid: u32_at(b, 4),
            cdw2: u32_at(b, 8),
            cdw3: u32_at(b, 12),
            mptr: u64_at(b, 16),
            sgl: SglDescriptor::decode(&b[24..40])?,
            cdw,
        })
    }

    /// Writes the 64 bytes into `b` (which must be at least 64 bytes).
    pub fn encode(&self, b: &mut [u8]) {
        b[0] = self.opcode;
        b[1] = self.flags;
        put_u16(b, 2, self.cid);
        put_u32(b, 4, self.nsid);
        put_u32(b, 8, self.cdw2);
        put_u32(b, 12, self.cdw3);
        put_u64(b, 16, self.mptr);
        self.sgl.encode(&mut b[24..40]);
        for (i, d) in self.cdw.iter().enumerate() {
            put_u32(b, 40 + 4 * i, *d);
        }
    }

    pub fn to_bytes(&self) -> [u8; SQE_LEN] {
        let mut b = [0u8; SQE_LEN];
        self.encode(&mut b);
        b
    }

    pub fn cdw10(&self) -> u32 {
        self.cdw[0]
    }
    pub fn cdw11(&self) -> u32 {
        self.cdw[1]
    }
    pub fn cdw12(&self) -> u32 {
        self.cdw[2]
    }
    pub fn cdw13(&self) -> u32 {
        self.cdw[3]
    }
    pub fn cdw14(&self) -> u32 {
        self.cdw[4]
    }
    pub fn cdw15(&self) -> u32 {
        self.cdw[5]
    }

    pub fn psdt(&self) -> u8 {
        self.flags >> 6
    }

    pub fn fuse(&self) -> u8 {
        self.flags & 0x3
    }

    /// Sets PSDT to "SGL" as fabrics requires.
    pub fn with_sgl(mut self, sgl: SglDescriptor) -> Sqe {
        self.flags = (self.flags & 0x3f) | (PSDT_SGL_MPTR_CONTIG << 6);
        self.sgl = sgl;
        self
    }

    /// The fabrics command type (byte 4) of a fabrics command.
    pub fn fctype(&self) -> u8 {
        self.nsid as u8
    }
}

/// A completion queue entry. The phase bit is not used on fabrics and
/// is written as 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cqe {
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

impl Cqe {
    pub fn decode(b: &[u8]) -> Result<Cqe, WireError> {
        need(b, CQE_LEN)?;
        Ok(Cqe {
            dw0: u32_at(b, 0),
            dw1: u32_at(b, 4),
            sqhd: u16_at(b, 8),
            sqid: u16_at(b, 10),
            cid: u16_at(b, 12),
            status: Status::from_wire(u16_at(b, 14)),
        })
    }

    pub fn encode(&self, b: &mut [u8]) {
        put_u32(b, 0, self.dw0);
        put_u32(b, 4, self.dw1);
        put_u16(b, 8, self.sqhd);
        put_u16(b, 10, self.sqid);
        put_u16(b, 12, self.cid);
        put_u16(b, 14, self.status.to_wire());
    }

    pub fn to_bytes(&self) -> [u8; CQE_LEN] {
        let mut b = [0u8; CQE_LEN];
        self.encode(&mut b);
        b
    }

    /// The 64-bit result of Property Get (dw0 low, dw1 high).
    pub fn result_u64(&self) -> u64 {
        self.dw0 as u64 | ((self.dw1 as u64) << 32)
    }
}
