//! Decode errors: each names what was wrong so a target can answer with the
//! right terminate request (see [`WireError::term_fes`]) and a host can log it.

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("buffer too short: {need} bytes needed, {have} given")]
    Short { need: usize, have: usize },
    #[error("unknown PDU type {0:#04x}")]
    UnknownPduType(u8),
    #[error("PDU type {pdu_type:#04x}: header length {hlen}, expected {expected}")]
    BadHlen {
        pdu_type: u8,
        hlen: u8,
        expected: u8,
    },
    #[error("PDU type {pdu_type:#04x}: PDU length {plen} invalid ({why})")]
    BadPlen {
        pdu_type: u8,
        plen: u32,
        why: &'static str,
    },
    #[error("PDU type {pdu_type:#04x}: data offset {pdo} invalid ({why})")]
    BadPdo {
        pdu_type: u8,
        pdo: u8,
        why: &'static str,
    },
    #[error("PDU type {pdu_type:#04x}: flags {flags:#04x} invalid ({why})")]
    BadFlags {
        pdu_type: u8,
        flags: u8,
        why: &'static str,
    },
    #[error("header digest mismatch: received {received:#010x}, computed {computed:#010x}")]
    HeaderDigest { received: u32, computed: u32 },
    #[error("data digest mismatch: received {received:#010x}, computed {computed:#010x}")]
    DataDigest { received: u32, computed: u32 },
    #[error("PDU type {0:#04x} is not expected in this direction or state")]
    UnexpectedPdu(u8),
    #[error("unsupported PDU format version {0}")]
    UnsupportedPfv(u16),
    #[error("field {field} has invalid value {value:#x}")]
    BadField { field: &'static str, value: u64 },
    #[error("string field is not valid UTF-8")]
    BadString,
    #[error("output buffer too small: {need} bytes needed, {have} given")]
    OutputTooSmall { need: usize, have: usize },
}

/// NVMe/TCP fatal error status (FES) of a terminate request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum TermFes {
    InvalidHeaderField = 0x01,
    PduSequenceError = 0x02,
    HeaderDigestError = 0x03,
    DataTransferOutOfRange = 0x04,
    DataTransferLimitExceeded = 0x05,
    UnsupportedParameter = 0x06,
}

impl TermFes {
    pub fn from_u16(v: u16) -> Option<TermFes> {
        Some(match v {
            0x01 => TermFes::InvalidHeaderField,
            0x02 => TermFes::PduSequenceError,
            0x03 => TermFes::HeaderDigestError,
            0x04 => TermFes::DataTransferOutOfRange,
            0x05 => TermFes::DataTransferLimitExceeded,
            0x06 => TermFes::UnsupportedParameter,
            _ => return None,
        })
    }
}

impl WireError {
    /// The terminate request a receiver sends for this error, with the
    /// byte offset of the offending field in the PDU header (FEI) where one
    /// field is to blame. `None` for errors that are not protocol errors of
    /// the peer (a data digest error fails only its command, with a
    /// transient transport error status).
    pub fn term_fes(&self) -> Option<(TermFes, u32)> {
        Some(match *self {
            WireError::UnknownPduType(_) => (TermFes::InvalidHeaderField, 0),
            WireError::UnexpectedPdu(_) => (TermFes::PduSequenceError, 0),
            WireError::BadFlags { .. } => (TermFes::InvalidHeaderField, 1),
            WireError::BadHlen { .. } => (TermFes::InvalidHeaderField, 2),
            WireError::BadPdo { .. } => (TermFes::InvalidHeaderField, 3),
            WireError::BadPlen { .. } => (TermFes::InvalidHeaderField, 4),
            WireError::HeaderDigest { .. } => (TermFes::HeaderDigestError, 0),
            WireError::UnsupportedPfv(_) => (TermFes::InvalidHeaderField, 8),
            WireError::BadField { .. } => (TermFes::InvalidHeaderField, 0),
            WireError::DataDigest { .. } => return None,
            WireError::Short { .. } | WireError::BadString | WireError::OutputTooSmall { .. } => {
                (TermFes::InvalidHeaderField, 0)
            }
        })
    }
}

pub(crate) fn need(buf: &[u8], n: usize) -> Result<(), WireError> {
    if buf.len() < n {
        Err(WireError::Short {
            need: n,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

pub(crate) fn need_out(buf: &[u8], n: usize) -> Result<(), WireError> {
    if buf.len() < n {
        Err(WireError::OutputTooSmall {
            need: n,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}
