//! NVMe/TCP PDUs: the 8-byte common header, each PDU type's header, header
//! and data digests, and the layout checks (hlen, pdo, plen, flags) a
//! receiver makes before it trusts a length.
//!
//! Decoding borrows from the receive buffer and never allocates: the
//! [`crate::Framer`] says how many bytes to read next and yields a
//! [`PduLayout`]; [`decode_header`] then gives the typed [`PduHeader`], and
//! the data (if any) is `buf[layout.data_range()]`, checked with
//! [`check_data_digest`]. Encoding writes headers into caller buffers; the
//! caller sends the data (from wherever it lies) and the data digest.

use crate::digest::crc32c;
use crate::error::{need, need_out, TermFes, WireError};
use crate::le::{put_u16, put_u32, u16_at, u32_at};
use crate::sqe::{Cqe, Sqe, CQE_LEN, SQE_LEN};

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// ICReq / ICResp header length (and whole PDU length).
pub const IC_LEN: usize = 128;
/// Header length of H2CData, C2HData, R2T, CapsuleResp and the terminate
/// requests.
pub const HLEN_24: usize = 24;
/// CapsuleCmd header length (common header + SQE).
pub const CAPSULE_CMD_HLEN: usize = CH_LEN + SQE_LEN;
/// CapsuleResp header length (common header + CQE).
pub const CAPSULE_RESP_HLEN: usize = CH_LEN + CQE_LEN;
/// Largest terminate request PDU (header + offending PDU header).
pub const TERM_REQ_MAX_PLEN: usize = 152;
/// Largest header a receiver ever needs to buffer: ICReq/ICResp (no digest),
/// or a CapsuleCmd with a header digest.
pub const MAX_HEADER_LEN: usize = IC_LEN;
/// The only PDU format version (NVMe/TCP 1.0).
pub const PFV_1_0: u16 = 0;

/// PDU header flags.
pub mod flags {
    /// A header digest follows the PDU header.
    pub const HDGSTF: u8 = 0x01;
    /// A data digest follows the PDU data.
    pub const DDGSTF: u8 = 0x02;
    /// Last data PDU of a transfer (H2CData, C2HData).
    pub const DATA_LAST: u8 = 0x04;
    /// C2HData: the command completed successfully, no CapsuleResp follows.
    pub const DATA_SUCCESS: u8 = 0x08;
}

/// The digest bits of ICReq/ICResp DGST.
pub mod dgst {
    pub const HDGST_ENABLE: u8 = 0x01;
    pub const DDGST_ENABLE: u8 = 0x02;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PduType {
    IcReq = 0x00,
    IcResp = 0x01,
    H2CTermReq = 0x02,
    C2HTermReq = 0x03,
    CapsuleCmd = 0x04,
    CapsuleResp = 0x05,
    H2CData = 0x06,
    C2HData = 0x07,
    R2T = 0x09,
}

impl PduType {
    pub fn from_u8(v: u8) -> Result<PduType, WireError> {
        Ok(match v {
            0x00 => PduType::IcReq,
            0x01 => PduType::IcResp,
            0x02 => PduType::H2CTermReq,
            0x03 => PduType::C2HTermReq,
            0x04 => PduType::CapsuleCmd,
            0x05 => PduType::CapsuleResp,
            0x06 => PduType::H2CData,
            0x07 => PduType::C2HData,
            0x09 => PduType::R2T,
            other => return Err(WireError::UnknownPduType(other)),
        })
    }

    /// The fixed header length (hlen) of this type.
    pub fn hlen(self) -> usize {
        match self {
            PduType::IcReq | PduType::IcResp => IC_LEN,
            PduType::CapsuleCmd => CAPSULE_CMD_HLEN,
            _ => HLEN_24,
        }
    }

    /// Whether a header digest follows the header when negotiated.
    pub fn may_have_hdgst(self) -> bool {
        !matches!(
            self,
            PduType::IcReq | PduType::IcResp | PduType::H2CTermReq | PduType::C2HTermReq
        )
    }

    /// Whether the PDU may carry data protected by the data digest.
    pub fn may_have_ddgst(self) -> bool {
        matches!(
            self,
            PduType::CapsuleCmd | PduType::H2CData | PduType::C2HData
        )
    }

    /// Sent by the host (H2C) rather than by the controller (C2H).
    pub fn is_host_to_controller(self) -> bool {
        matches!(
            self,
            PduType::IcReq | PduType::H2CTermReq | PduType::CapsuleCmd | PduType::H2CData
        )
    }
}

/// The common header of every PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    pub pdu_type: PduType,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

impl CommonHeader {
    /// Decodes the 8 common header bytes (type checked, lengths not yet).
    pub fn decode(buf: &[u8]) -> Result<CommonHeader, WireError> {
        need(buf, CH_LEN)?;
        Ok(CommonHeader {
            pdu_type: PduType::from_u8(buf[0])?,
            flags: buf[1],
            hlen: buf[2],
            pdo: buf[3],
            plen: u32_at(buf, 4),
        })
    }

    pub fn encode(&self, out: &mut [u8]) {
        out[0] = self.pdu_type as u8;
        out[1] = self.flags;
        out[2] = self.hlen;
        out[3] = self.pdo;
        put_u32(out, 4, self.plen);
    }
}

/// Digests in use on a connection (after the ICReq/ICResp exchange).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Where the parts of a PDU lie, once its common header is validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PduLayout {
    pub ch: CommonHeader,
    /// Header plus header digest, if any: what [`decode_header`] needs.
    pub header_len: usize,
    /// A header digest sits at `header_len - 4`.
    pub hdgst: bool,
    /// Offset of the data from the start of the PDU (0 if no data).
    pub data_offset: usize,
    pub data_len: usize,
    /// A data digest follows the data.
    pub ddgst: bool,
    /// Whole PDU length (plen).
    pub plen: usize,
}

impl PduLayout {
    pub fn data_range(&self) -> std::ops::Range<usize> {
        self.data_offset..self.data_offset + self.data_len
    }

    /// Offset of the data digest (valid when `ddgst`).
    pub fn ddgst_offset(&self) -> usize {
        self.data_offset + self.data_len
    }

    /// Validates a common header against the negotiated digests and a data
    /// limit (`max_data`: the largest data a single PDU of this connection
    /// may carry, e.g. in-capsule data size or MAXH2CDATA).
    pub fn from_common(
        ch: CommonHeader,
        digests: Digests,
        max_data: u32,
    ) -> Result<PduLayout, WireError> {
        let t = ch.pdu_type;
        let tb = t as u8;
        let expected = t.hlen();
        if ch.hlen as usize != expected {
            return Err(WireError::BadHlen {
                pdu_type: tb,
                hlen: ch.hlen,
                expected: expected as u8,
            });
        }
        let known = flags::HDGSTF
            | flags::DDGSTF
            | match t {
                PduType::H2CData => flags::DATA_LAST,
                PduType::C2HData => flags::DATA_LAST | flags::DATA_SUCCESS,
                _ => 0,
            };
        if ch.flags & !known != 0 {
            return Err(WireError::BadFlags {
                pdu_type: tb,
                flags: ch.flags,
                why: "unknown flag bits",
            });
        }
        let hdgst = ch.flags & flags::HDGSTF != 0;
        let ddgst = ch.flags & flags::DDGSTF != 0;
        if !t.may_have_hdgst() && (hdgst || ddgst) {
            return Err(WireError::BadFlags {
                pdu_type: tb,
                flags: ch.flags,
                why: "digest flag on a PDU without digests",
            });
        }
        if t.may_have_hdgst() && hdgst != digests.header {
            return Err(WireError::BadFlags {
                pdu_type: tb,
                flags: ch.flags,
                why: "header digest flag disagrees with negotiation",
            });
        }
        if ddgst && (!digests.data || !t.may_have_ddgst()) {
            return Err(WireError::BadFlags {
                pdu_type: tb,
                flags: ch.flags,
                why: "data digest flag without negotiated data digest",
            });
        }
        let plen = ch.plen as usize;
        let header_len = expected + if hdgst { DIGEST_LEN } else { 0 };
        match t {
            PduType::IcReq | PduType::IcResp if plen != IC_LEN => {
                return Err(WireError::BadPlen {
                    pdu_type: tb,
                    plen: ch.plen,
                    why: "must be 128",
                });
            }
            PduType::H2CTermReq | PduType::C2HTermReq => {
                if !(HLEN_24..=TERM_REQ_MAX_PLEN).contains(&plen) {
                    return Err(WireError::BadPlen {
                        pdu_type: tb,
                        plen: ch.plen,
                        why: "terminate request must be 24..=152 bytes",
                    });
                }
                // The offending header rides as data, no pdo required.
                return Ok(PduLayout {
                    ch,
                    header_len,
                    hdgst,
                    data_offset: HLEN_24,
                    data_len: plen - HLEN_24,
                    ddgst: false,
                    plen,
                });
            }
            _ => {}
        }
        if plen < header_len {
            return Err(WireError::BadPlen {
                pdu_type: tb,
                plen: ch.plen,
                why: "shorter than its header",
            });
        }
        if plen == header_len {
            if ddgst {
                return Err(WireError::BadFlags {
                    pdu_type: tb,
                    flags: ch.flags,
                    why: "data digest flag on a PDU without data",
                });
            }
            if matches!(t, PduType::H2CData | PduType::C2HData) {
                return Err(WireError::BadPlen {
                    pdu_type: tb,
                    plen: ch.plen,
                    why: "data PDU without data",
                });
            }
            return Ok(PduLayout {
                ch,
                header_len,
                hdgst,
                data_offset: 0,
                data_len: 0,
                ddgst: false,
                plen,
            });
        }
        if !t.may_have_ddgst() {
            return Err(WireError::BadPlen {
                pdu_type: tb,
                plen: ch.plen,
                why: "PDU type carries no data",
            });
        }
        if digests.data && !ddgst {
            return Err(WireError::BadFlags {
                pdu_type: tb,
                flags: ch.flags,
                why: "data without the negotiated data digest",
            });
        }
        let pdo = ch.pdo as usize;
        if pdo < header_len {
            return Err(WireError::BadPdo {
                pdu_type: tb,
                pdo: ch.pdo,
                why: "data overlaps the header",
            });
        }
        let tail = if ddgst { DIGEST_LEN } else { 0 };
        if plen < pdo + tail + 1 {
            return Err(WireError::BadPdo {
                pdu_type: tb,
                pdo: ch.pdo,
                why: "beyond the end of the PDU",
            });
        }
        let data_len = plen - pdo - tail;
        if data_len > max_data as usize {
            return Err(WireError::BadPlen {
                pdu_type: tb,
                plen: ch.plen,
                why: "data longer than the connection allows",
            });
        }
        Ok(PduLayout {
            ch,
            header_len,
            hdgst,
            data_offset: pdo,
            data_len,
            ddgst,
            plen,
        })
    }
}

/// Initialize Connection Request (host → controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    pub pfv: u16,
    /// Host PDU data alignment, in 4-byte units minus one.
    pub hpda: u8,
    /// `dgst::HDGST_ENABLE | dgst::DDGST_ENABLE` requested.
    pub dgst: u8,
    /// Maximum outstanding R2Ts per command, minus one.
    pub maxr2t: u32,
}

/// Initialize Connection Response (controller → host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    pub pfv: u16,
    /// Controller PDU data alignment, in 4-byte units minus one.
    pub cpda: u8,
    pub dgst: u8,
    /// Largest H2CData payload the controller accepts.
    pub maxh2cdata: u32,
}

/// H2CTermReq / C2HTermReq: the sender closes the connection after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermReq {
    /// Raw FES (see [`TermFes::from_u16`]).
    pub fes: u16,
    pub fei: u32,
}

/// H2CData / C2HData header (C2HData has no ttag: 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub cccid: u16,
    pub ttag: u16,
    pub datao: u32,
    pub datal: u32,
}

/// Ready to Transfer: the controller asks for `r2tl` bytes at `r2to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2T {
    pub cccid: u16,
    pub ttag: u16,
    pub r2to: u32,
    pub r2tl: u32,
}

/// A decoded PDU header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PduHeader {
    IcReq(IcReq),
    IcResp(IcResp),
    H2CTermReq(TermReq),
    C2HTermReq(TermReq),
    CapsuleCmd(Sqe),
    CapsuleResp(Cqe),
    H2CData(DataHeader),
    C2HData(DataHeader),
    R2T(R2T),
}

/// Decodes the header of a PDU whose layout the framer validated, checking
/// the header digest. `buf` must hold at least `layout.header_len` bytes.
pub fn decode_header(buf: &[u8], layout: &PduLayout) -> Result<PduHeader, WireError> {
    need(buf, layout.header_len)?;
    let hlen = layout.ch.hlen as usize;
    if layout.hdgst {
        let received = u32_at(buf, hlen);
        let computed = crc32c(&buf[..hlen]);
        if received != computed {
            return Err(WireError::HeaderDigest { received, computed });
        }
    }
    let f = layout.ch.flags;
    Ok(match layout.ch.pdu_type {
        PduType::IcReq => {
            let r = IcReq {
                pfv: u16_at(buf, 8),
                hpda: buf[10],
                dgst: buf[11],
                maxr2t: u32_at(buf, 12),
            };
            if r.pfv != PFV_1_0 {
                return Err(WireError::UnsupportedPfv(r.pfv));
            }
            if r.hpda > 31 {
                return Err(WireError::BadField {
                    field: "ICReq.HPDA",
                    value: r.hpda as u64,
                });
            }
            PduHeader::IcReq(r)
        }
        PduType::IcResp => {
            let r = IcResp {
                pfv: u16_at(buf, 8),
                cpda: buf[10],
                dgst: buf[11],
                maxh2cdata: u32_at(buf, 12),
            };
            if r.pfv != PFV_1_0 {
                return Err(WireError::UnsupportedPfv(r.pfv));
            }
            if r.cpda > 31 {
                return Err(WireError::BadField {
                    field: "ICResp.CPDA",
                    value: r.cpda as u64,
                });
            }
            if r.maxh2cdata < 4096 || r.maxh2cdata % 4 != 0 {
                return Err(WireError::BadField {
                    field: "ICResp.MAXH2CDATA",
                    value: r.maxh2cdata as u64,
                });
            }
            PduHeader::IcResp(r)
        }
        PduType::H2CTermReq | PduType::C2HTermReq => {
            let t = TermReq {
                fes: u16_at(buf, 8),
                fei: u32_at(buf, 10),
            };
            if layout.ch.pdu_type == PduType::H2CTermReq {
                PduHeader::H2CTermReq(t)
            } else {
                PduHeader::C2HTermReq(t)
            }
        }
        PduType::CapsuleCmd => PduHeader::CapsuleCmd(Sqe::decode(&buf[CH_LEN..])?),
        PduType::CapsuleResp => PduHeader::CapsuleResp(Cqe::decode(&buf[CH_LEN..])?),
        PduType::H2CData | PduType::C2HData => {
            let d = DataHeader {
                cccid: u16_at(buf, 8),
                ttag: u16_at(buf, 10),
                datao: u32_at(buf, 12),
                datal: u32_at(buf, 16),
            };
            if d.datal as usize != layout.data_len {
                return Err(WireError::BadField {
                    field: "DATAL",
                    value: d.datal as u64,
                });
            }
            if d.datao.checked_add(d.datal).is_none() {
                return Err(WireError::BadField {
                    field: "DATAO",
                    value: d.datao as u64,
                });
            }
            if layout.ch.pdu_type == PduType::H2CData {
                PduHeader::H2CData(d)
            } else {
                if f & flags::DATA_SUCCESS != 0 && f & flags::DATA_LAST == 0 {
                    return Err(WireError::BadFlags {
                        pdu_type: PduType::C2HData as u8,
                        flags: f,
                        why: "SUCCESS without LAST_PDU",
                    });
                }
                PduHeader::C2HData(DataHeader { ttag: 0, ..d })
            }
        }
        PduType::R2T => {
            let r = R2T {
                cccid: u16_at(buf, 8),
                ttag: u16_at(buf, 10),
                r2to: u32_at(buf, 12),
                r2tl: u32_at(buf, 16),
            };
            if r.r2tl == 0 {
                return Err(WireError::BadField {
                    field: "R2TL",
                    value: 0,
                });
            }
            PduHeader::R2T(r)
        }
    })
}

/// Checks the data digest of a complete PDU in `buf` (no-op without one).
pub fn check_data_digest(buf: &[u8], layout: &PduLayout) -> Result<(), WireError> {
    if !layout.ddgst {
        return Ok(());
    }
    need(buf, layout.plen)?;
    let received = u32_at(buf, layout.ddgst_offset());
    let computed = crc32c(&buf[layout.data_range()]);
    if received != computed {
        return Err(WireError::DataDigest { received, computed });
    }
    Ok(())
}

/// Checks a data digest computed by the caller (data received straight into
/// its final buffer, possibly in pieces: see [`crate::crc32c_append`]).
pub fn check_digest_value(received: [u8; 4], computed: u32) -> Result<(), WireError> {
    let received = u32::from_le_bytes(received);
    if received != computed {
        return Err(WireError::DataDigest { received, computed });
    }
    Ok(())
}

/// A complete decoded PDU borrowing its data from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pdu<'a> {
    pub layout: PduLayout,
    pub header: PduHeader,
    pub data: &'a [u8],
}

impl<'a> Pdu<'a> {
    /// Decodes a whole PDU (header digest, header, data digest).
    pub fn decode(buf: &'a [u8], layout: &PduLayout) -> Result<Pdu<'a>, WireError> {
        need(buf, layout.plen)?;
        let header = decode_header(buf, layout)?;
        check_data_digest(buf, layout)?;
        Ok(Pdu {
            layout: *layout,
            header,
            data: &buf[layout.data_range()],
        })
    }
}

/// Offset of data after a header of `header_len` bytes, given the
/// receiver's alignment requirement (HPDA/CPDA: 4-byte units minus one).
pub fn data_offset_for(header_len: usize, pda: u8) -> usize {
    if pda == 0 {
        return header_len;
    }
    let align = (pda as usize + 1) * 4;
    header_len.div_ceil(align) * align
}

/// Writes a PDU header of `pdu_type` (common header, the type's own bytes
/// from `specific`, header digest, padding up to the data offset) and
/// returns its length: the bytes to send before the data. The caller sends
/// `data_len` bytes of data next and then, if `digests.data` and
/// `data_len > 0`, the data digest.
fn encode_header(
    out: &mut [u8],
    pdu_type: PduType,
    extra_flags: u8,
    specific: impl FnOnce(&mut [u8]),
    data_len: usize,
    digests: Digests,
    pda: u8,
) -> Result<usize, WireError> {
    let hlen = pdu_type.hlen();
    let hdgst = digests.header && pdu_type.may_have_hdgst();
    let ddgst = digests.data && pdu_type.may_have_ddgst() && data_len > 0;
    let header_len = hlen + if hdgst { DIGEST_LEN } else { 0 };
    let pdo = if data_len > 0 {
        data_offset_for(header_len, pda)
    } else {
        0
    };
    let pre_data = pdo.max(header_len);
    need_out(out, pre_data)?;
    if pdo > u8::MAX as usize {
        return Err(WireError::BadField {
            field: "PDO",
            value: pdo as u64,
        });
    }
    let plen = pre_data + data_len + if ddgst { DIGEST_LEN } else { 0 };
    let plen = u32::try_from(plen).map_err(|_| WireError::BadField {
        field: "PLEN",
        value: plen as u64,
    })?;
    out[..pre_data].fill(0);
    let mut f = extra_flags;
    if hdgst {
        f |= flags::HDGSTF;
    }
    if ddgst {
        f |= flags::DDGSTF;
    }
    CommonHeader {
        pdu_type,
        flags: f,
        hlen: hlen as u8,
        pdo: pdo as u8,
        plen,
    }
    .encode(out);
    specific(&mut out[..hlen]);
    if hdgst {
        let d = crc32c(&out[..hlen]);
        put_u32(out, hlen, d);
    }
    Ok(pre_data)
}

pub fn encode_ic_req(out: &mut [u8], r: &IcReq) -> Result<usize, WireError> {
    encode_header(
        out,
        PduType::IcReq,
        0,
        |b| {
            put_u16(b, 8, r.pfv);
            b[10] = r.hpda;
            b[11] = r.dgst;
            put_u32(b, 12, r.maxr2t);
        },
        0,
        Digests::default(),
        0,
    )
}

pub fn encode_ic_resp(out: &mut [u8], r: &IcResp) -> Result<usize, WireError> {
    encode_header(
        out,
        PduType::IcResp,
        0,
        |b| {
            put_u16(b, 8, r.pfv);
            b[10] = r.cpda;
            b[11] = r.dgst;
            put_u32(b, 12, r.maxh2cdata);
        },
        0,
        Digests::default(),
        0,
    )
}

/// Writes a whole terminate request (header plus up to 128 bytes of the
/// offending PDU header) and returns its length.
pub fn encode_term_req(
    out: &mut [u8],
    host_to_controller: bool,
    fes: TermFes,
    fei: u32,
    offending: &[u8],
) -> Result<usize, WireError> {
    let take = offending.len().min(TERM_REQ_MAX_PLEN - HLEN_24);
    let plen = HLEN_24 + take;
    need_out(out, plen)?;
    out[..HLEN_24].fill(0);
    CommonHeader {
        pdu_type: if host_to_controller {
            PduType::H2CTermReq
        } else {
            PduType::C2HTermReq
        },
        flags: 0,
        hlen: HLEN_24 as u8,
        pdo: 0,
        plen: plen as u32,
    }
    .encode(out);
    put_u16(out, 8, fes as u16);
    put_u32(out, 10, fei);
    out[HLEN_24..plen].copy_from_slice(&offending[..take]);
    Ok(plen)
}

/// CapsuleCmd header, with `data_len` bytes of in-capsule data to follow.
pub fn encode_capsule_cmd(
    out: &mut [u8],
    sqe: &Sqe,
    data_len: usize,
    digests: Digests,
    cpda: u8,
) -> Result<usize, WireError> {
    encode_header(
        out,
        PduType::CapsuleCmd,
        0,
        |b| sqe.encode(&mut b[CH_LEN..CH_LEN + SQE_LEN]),
        data_len,
        digests,
        cpda,
    )
}

pub fn encode_capsule_resp(
    out: &mut [u8],
    cqe: &Cqe,
    digests: Digests,
) -> Result<usize, WireError> {
    encode_header(
        out,
        PduType::CapsuleResp,
        0,
        |b| cqe.encode(&mut b[CH_LEN..CH_LEN + CQE_LEN]),
        0,
        digests,
        0,
    )
}

/// H2CData header; `last` sets LAST_PDU. `pda` is the controller's CPDA.
pub fn encode_h2c_data(
    out: &mut [u8],
    d: &DataHeader,
    last: bool,
    digests: Digests,
    pda: u8,
) -> Result<usize, WireError> {
    encode_data(
        out,
        PduType::H2CData,
        d,
        if last { flags::DATA_LAST } else { 0 },
        digests,
        pda,
    )
}

/// C2HData header; `last` sets LAST_PDU, `success` (only with `last`) tells
/// the host that no CapsuleResp follows. `pda` is the host's HPDA.
pub fn encode_c2h_data(
    out: &mut [u8],
    d: &DataHeader,
    last: bool,
    success: bool,
    digests: Digests,
    pda: u8,
) -> Result<usize, WireError> {
    if success && !last {
        return Err(WireError::BadFlags {
            pdu_type: PduType::C2HData as u8,
            flags: flags::DATA_SUCCESS,
            why: "SUCCESS without LAST_PDU",
        });
    }
    let mut f = 0;
    if last {
        f |= flags::DATA_LAST;
    }
    if success {
        f |= flags::DATA_SUCCESS;
    }
    encode_data(
        out,
        PduType::C2HData,
        &DataHeader { ttag: 0, ..*d },
        f,
        digests,
        pda,
    )
}

fn encode_data(
    out: &mut [u8],
    t: PduType,
    d: &DataHeader,
    f: u8,
    digests: Digests,
    pda: u8,
) -> Result<usize, WireError> {
    if d.datal == 0 {
        return Err(WireError::BadField {
            field: "DATAL",
            value: 0,
        });
    }
    encode_header(
        out,
        t,
        f,
        |b| {
            put_u16(b, 8, d.cccid);
            put_u16(b, 10, d.ttag);
            put_u32(b, 12, d.datao);
            put_u32(b, 16, d.datal);
        },
        d.datal as usize,
        digests,
        pda,
    )
}

pub fn encode_r2t(out: &mut [u8], r: &R2T, digests: Digests) -> Result<usize, WireError> {
    encode_header(
        out,
        PduType::R2T,
        0,
        |b| {
            put_u16(b, 8, r.cccid);
            put_u16(b, 10, r.ttag);
            put_u32(b, 12, r.r2to);
            put_u32(b, 16, r.r2tl);
        },
        0,
        digests,
        0,
    )
}
