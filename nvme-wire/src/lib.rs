//! `wc-nvme-wire`: the NVMe over TCP wire format and the NVMe command
//! structures, shared by the NVMe/TCP target (`wc-nvmf`) and initiator.
//!
//! Pure code: no sockets, no reactors, no allocation while decoding.
//! Decoders take byte slices and return typed values or a [`WireError`]
//! naming what was wrong; encoders write into caller buffers.
//!
//! * [`pdu`]: common header, every PDU type, digests, layout validation;
//!   [`framer`]: how many bytes to read next.
//! * [`sqe`]: the 64-byte SQE with its SGL descriptor, the 16-byte CQE;
//!   [`status`]: completion status codes.
//! * [`opcode`], [`command`]: opcodes and typed command fields (read/write,
//!   DSM, identify, get log page, features, AER, keep alive).
//! * [`fabrics`]: Connect and its data, Property Get/Set, CAP/CC/CSTS.
//! * [`identify`], [`log`]: Identify data and log pages.

pub mod command;
pub mod digest;
pub mod error;
pub mod fabrics;
pub mod framer;
pub mod identify;
mod le;
pub mod log;
pub mod opcode;
pub mod pdu;
pub mod sqe;
pub mod status;

pub use digest::{crc32c, crc32c_append};
pub use error::{TermFes, WireError};
pub use framer::{Frame, Framer, Role};
pub use pdu::{
    check_data_digest, check_digest_value, decode_header, CommonHeader, DataHeader, Digests, IcReq,
    IcResp, Pdu, PduHeader, PduLayout, PduType, TermReq, R2T,
};
pub use sqe::{Cqe, DataPlacement, SglDescriptor, Sqe};
pub use status::Status;
