//! NVMe completion status: type (SCT) and code (SC), plus More and DNR.

/// A status field without the phase bit: SC in bits 0-7, SCT in bits 8-10,
/// CRD in 11-12, More in 13, DNR in 14 (Linux's `NVME_SC_*` encoding).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

/// Status code types.
pub mod sct {
    pub const GENERIC: u8 = 0x0;
    pub const COMMAND_SPECIFIC: u8 = 0x1;
    pub const MEDIA: u8 = 0x2;
    pub const PATH: u8 = 0x3;
    pub const VENDOR: u8 = 0x7;
}

const DNR: u16 = 0x4000;
const MORE: u16 = 0x2000;

const fn st(sct: u8, sc: u8) -> Status {
    Status(((sct as u16) << 8) | sc as u16)
}

impl Status {
    // Generic command status (SCT 0).
    pub const SUCCESS: Status = st(sct::GENERIC, 0x00);
    pub const INVALID_OPCODE: Status = st(sct::GENERIC, 0x01);
    pub const INVALID_FIELD: Status = st(sct::GENERIC, 0x02);
    pub const CID_CONFLICT: Status = st(sct::GENERIC, 0x03);
    pub const DATA_TRANSFER_ERROR: Status = st(sct::GENERIC, 0x04);
    pub const INTERNAL_ERROR: Status = st(sct::GENERIC, 0x06);
    pub const ABORT_REQUESTED: Status = st(sct::GENERIC, 0x07);
    pub const ABORTED_SQ_DELETION: Status = st(sct::GENERIC, 0x08);
    pub const INVALID_NAMESPACE: Status = st(sct::GENERIC, 0x0b);
    pub const COMMAND_SEQUENCE_ERROR: Status = st(sct::GENERIC, 0x0c);
    pub const SGL_DATA_BLOCK_GRANULARITY_INVALID: Status = st(sct::GENERIC, 0x0f);
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Status = st(sct::GENERIC, 0x11);
    pub const SGL_OFFSET_INVALID: Status = st(sct::GENERIC, 0x16);
    pub const DATA_SGL_LENGTH_INVALID: Status = st(sct::GENERIC, 0x0d);
    pub const TRANSIENT_TRANSPORT_ERROR: Status = st(sct::GENERIC, 0x22);
    pub const LBA_OUT_OF_RANGE: Status = st(sct::GENERIC, 0x80);
    pub const CAPACITY_EXCEEDED: Status = st(sct::GENERIC, 0x81);
    pub const NAMESPACE_NOT_READY: Status = st(sct::GENERIC, 0x82);

    // Command specific status (SCT 1).
    pub const INVALID_QUEUE_IDENTIFIER: Status = st(sct::COMMAND_SPECIFIC, 0x01);
    pub const INVALID_QUEUE_SIZE: Status = st(sct::COMMAND_SPECIFIC, 0x02);
    pub const ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED: Status = st(sct::COMMAND_SPECIFIC, 0x05);
    pub const INVALID_LOG_PAGE: Status = st(sct::COMMAND_SPECIFIC, 0x09);
    pub const FEATURE_ID_NOT_SAVEABLE: Status = st(sct::COMMAND_SPECIFIC, 0x0d);
    pub const FEATURE_NOT_CHANGEABLE: Status = st(sct::COMMAND_SPECIFIC, 0x0e);
    pub const CONFLICTING_ATTRIBUTES: Status = st(sct::COMMAND_SPECIFIC, 0x80);

    // Fabrics command status (SCT 1, SC 0x80..).
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status = st(sct::COMMAND_SPECIFIC, 0x80);
    pub const CONNECT_CONTROLLER_BUSY: Status = st(sct::COMMAND_SPECIFIC, 0x81);
    pub const CONNECT_INVALID_PARAMETERS: Status = st(sct::COMMAND_SPECIFIC, 0x82);
    pub const CONNECT_RESTART_DISCOVERY: Status = st(sct::COMMAND_SPECIFIC, 0x83);
    pub const CONNECT_INVALID_HOST: Status = st(sct::COMMAND_SPECIFIC, 0x84);
    pub const DISCOVERY_RESTART: Status = st(sct::COMMAND_SPECIFIC, 0x90);
    pub const AUTHENTICATION_REQUIRED: Status = st(sct::COMMAND_SPECIFIC, 0x91);

    // Media and data integrity errors (SCT 2).
    pub const WRITE_FAULT: Status = st(sct::MEDIA, 0x80);
    pub const UNRECOVERED_READ_ERROR: Status = st(sct::MEDIA, 0x81);
    pub const COMPARE_FAILURE: Status = st(sct::MEDIA, 0x85);
    pub const ACCESS_DENIED: Status = st(sct::MEDIA, 0x86);

    // Path related status (SCT 3).
    pub const INTERNAL_PATH_ERROR: Status = st(sct::PATH, 0x00);
    pub const ANA_INACCESSIBLE: Status = st(sct::PATH, 0x02);

    pub const fn new(sct: u8, sc: u8) -> Status {
        st(sct & 0x7, sc)
    }

    pub const fn sc(self) -> u8 {
        self.0 as u8
    }

    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    pub const fn dnr(self) -> bool {
        self.0 & DNR != 0
    }

    pub const fn more(self) -> bool {
        self.0 & MORE != 0
    }

    pub const fn is_success(self) -> bool {
        self.0 & 0x7ff == 0
    }

    /// The same status with Do Not Retry set (errors a retry cannot fix).
    pub const fn with_dnr(self) -> Status {
        Status(self.0 | DNR)
    }

    /// The 16-bit status field of a CQE, phase bit 0.
    pub const fn to_wire(self) -> u16 {
        (self.0 & 0x7fff) << 1
    }

    pub const fn from_wire(v: u16) -> Status {
        Status(v >> 1)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sct {:#x} sc {:#04x}{}",
            self.sct(),
            self.sc(),
            if self.dnr() { " dnr" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_shifts_out_the_phase_bit() {
        let s = Status::CONNECT_INVALID_HOST.with_dnr();
        assert_eq!(s.sct(), 1);
        assert_eq!(s.sc(), 0x84);
        assert!(s.dnr());
        assert_eq!(Status::from_wire(s.to_wire() | 1), s);
        assert!(!s.is_success());
        assert!(Status::SUCCESS.is_success());
    }
}
