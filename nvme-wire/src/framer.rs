//! Incremental PDU framing over a receive buffer: how many bytes are needed
//! next, and the validated layout once the header is in.
//!
//! A receiver reads into its buffer, asks [`Framer::poll`] with what it has,
//! and reads at least the bytes asked for. Once [`Frame::Header`] comes back
//! it may decode the header ([`crate::decode_header`]) before the data
//! arrives, to receive the data straight into its final place (zero-copy),
//! or wait for `layout.plen` bytes and decode the whole [`crate::Pdu`].

use crate::error::{TermFes, WireError};
use crate::pdu::{CommonHeader, Digests, PduLayout, PduType, CH_LEN};

/// Which end of the connection is receiving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The controller (target) receives host-to-controller PDUs.
    Controller,
    /// The host (initiator) receives controller-to-host PDUs.
    Host,
}

/// What the receive buffer holds so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// At least this many more bytes are needed to go on.
    Need(usize),
    /// The common header is valid and the whole header (with its digest)
    /// is in the buffer; `layout.plen` bytes make the whole PDU.
    Header(PduLayout),
}

/// Framing state of one connection: direction, negotiated digests, the data
/// limit, and whether the connection is initialized (ICReq/ICResp done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framer {
    role: Role,
    digests: Digests,
    max_data: u32,
    initialized: bool,
}

impl Framer {
    /// A framer before initialization: only ICReq (controller) or ICResp
    /// (host) and terminate requests are accepted.
    pub fn new(role: Role) -> Framer {
        Framer {
            role,
            digests: Digests::default(),
            max_data: 0,
            initialized: false,
        }
    }

    /// Connection initialized: digests as negotiated, and the largest data
    /// one received PDU may carry.
    pub fn initialized(&mut self, digests: Digests, max_data: u32) {
        self.digests = digests;
        self.max_data = max_data;
        self.initialized = true;
    }

    pub fn digests(&self) -> Digests {
        self.digests
    }

    pub fn is_initialized(&self) -> bool {
        self.initialized
    }

    pub fn max_data(&self) -> u32 {
        self.max_data
    }

    /// Validates what `buf` holds of the next PDU and says what comes next.
    pub fn poll(&self, buf: &[u8]) -> Result<Frame, WireError> {
        if buf.len() < CH_LEN {
            return Ok(Frame::Need(CH_LEN - buf.len()));
        }
        let ch = CommonHeader::decode(buf)?;
        let t = ch.pdu_type;
        let ours = match self.role {
            Role::Controller => t.is_host_to_controller(),
            Role::Host => !t.is_host_to_controller(),
        };
        let is_ic = matches!(t, PduType::IcReq | PduType::IcResp);
        let is_term = matches!(t, PduType::H2CTermReq | PduType::C2HTermReq);
        if !ours || (is_ic == self.initialized && !is_term) {
            return Err(WireError::UnexpectedPdu(t as u8));
        }
        let layout = PduLayout::from_common(ch, self.digests, self.max_data)?;
        if buf.len() < layout.header_len {
            return Ok(Frame::Need(layout.header_len - buf.len()));
        }
        Ok(Frame::Header(layout))
    }
}

/// The terminate request to send for a framing or header error, if any.
pub fn term_for(err: &WireError) -> Option<(TermFes, u32)> {
    err.term_fes()
}
