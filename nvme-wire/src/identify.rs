//! Identify data structures (4096 bytes each): controller, namespace,
//! active namespace id list, namespace identification descriptor list.

use crate::error::{need, need_out, WireError};
use crate::le::{
    put_ascii_padded, put_str_nul, put_u16, put_u32, put_u64, str_field, u16_at, u32_at, u64_at,
};

pub const IDENTIFY_LEN: usize = 4096;

/// CNS values.
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_ID_DESCRIPTOR_LIST: u8 = 0x03;
}

/// Controller type (CNTRLTYPE).
pub mod cntrltype {
    pub const IO: u8 = 1;
    pub const DISCOVERY: u8 = 2;
    pub const ADMIN: u8 = 3;
}

/// ONCS bits (optional NVM commands).
pub mod oncs {
    pub const COMPARE: u16 = 1 << 0;
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    pub const DSM: u16 = 1 << 2;
    pub const WRITE_ZEROES: u16 = 1 << 3;
}

/// The Identify Controller fields a fabrics target fills in and a host reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyController<'a> {
    pub vid: u16,
    pub ssvid: u16,
    pub serial: &'a str,
    pub model: &'a str,
    pub firmware: &'a str,
    /// Maximum data transfer size, 2^mdts minimum pages (0: no limit).
    pub mdts: u8,
    pub cntlid: u16,
    pub ver: u32,
    /// Optional async events supported (bit 8: namespace attribute notices).
    pub oaes: u32,
    pub cntrltype: u8,
    /// Optional admin commands supported.
    pub oacs: u16,
    /// Abort command limit, 0-based.
    pub acl: u8,
    /// Asynchronous event request limit, 0-based.
    pub aerl: u8,
    /// Log page attributes (bit 2: extended data for Get Log Page).
    pub lpa: u8,
    /// Error log page entries, 0-based.
    pub elpe: u8,
    /// Keep alive support granularity in 100 ms units (0: unsupported).
    pub kas: u16,
    pub sqes: u8,
    pub cqes: u8,
    pub maxcmd: u16,
    /// Number of namespaces (the highest valid nsid).
    pub nn: u32,
    pub oncs: u16,
    /// Volatile write cache present (bit 0).
    pub vwc: u8,
    /// SGL support (bit 0 SGLs supported, bit 2 keyed, bit 20 offsets ...).
    pub sgls: u32,
    /// Maximum allowed namespaces.
    pub mnan: u32,
    pub subnqn: &'a str,
    /// I/O queue command capsule supported size, in 16-byte units.
    pub ioccsz: u32,
    /// I/O queue response capsule supported size, in 16-byte units.
    pub iorcsz: u32,
    pub icdoff: u16,
    /// Fabrics controller attributes (bit 0: static controller model).
    pub fcatt: u8,
    pub msdbd: u8,
}

impl<'a> IdentifyController<'a> {
    /// Writes the 4096-byte structure into `b`.
    pub fn encode(&self, b: &mut [u8]) -> Result<(), WireError> {
        need_out(b, IDENTIFY_LEN)?;
        let b = &mut b[..IDENTIFY_LEN];
        b.fill(0);
        put_u16(b, 0, self.vid);
        put_u16(b, 2, self.ssvid);
        put_ascii_padded(&mut b[4..24], self.serial);
        put_ascii_padded(&mut b[24..64], self.model);
        put_ascii_padded(&mut b[64..72], self.firmware);
        b[77] = self.mdts;
        put_u16(b, 78, self.cntlid);
        put_u32(b, 80, self.ver);
        put_u32(b, 92, self.oaes);
        b[111] = self.cntrltype;
        put_u16(b, 256, self.oacs);
        b[258] = self.acl;
        b[259] = self.aerl;
        b[261] = self.lpa;
        b[262] = self.elpe;
        put_u16(b, 320, self.kas);
        b[512] = self.sqes;
        b[513] = self.cqes;
        put_u16(b, 514, self.maxcmd);
        put_u32(b, 516, self.nn);
        put_u16(b, 520, self.oncs);
        b[525] = self.vwc;
        put_u32(b, 536, self.sgls);
        put_u32(b, 540, self.mnan);
        put_str_nul(&mut b[768..1024], self.subnqn);
        put_u32(b, 1792, self.ioccsz);
        put_u32(b, 1796, self.iorcsz);
        put_u16(b, 1800, self.icdoff);
        b[1802] = self.fcatt;
        b[1803] = self.msdbd;
        Ok(())
    }

    pub fn decode(b: &'a [u8]) -> Result<IdentifyController<'a>, WireError> {
        need(b, IDENTIFY_LEN)?;
        Ok(IdentifyController {
            vid: u16_at(b, 0),
            ssvid: u16_at(b, 2),
            serial: str_field(&b[4..24])?,
            model: str_field(&b[24..64])?,
            firmware: str_field(&b[64..72])?,
            mdts: b[77],
            cntlid: u16_at(b, 78),
            ver: u32_at(b, 80),
            oaes: u32_at(b, 92),
            cntrltype: b[111],
            oacs: u16_at(b, 256),
            acl: b[258],
            aerl: b[259],
            lpa: b[261],
            elpe: b[262],
            kas: u16_at(b, 320),
            sqes: b[512],
            cqes: b[513],
            maxcmd: u16_at(b, 514),
            nn: u32_at(b, 516),
            oncs: u16_at(b, 520),
            vwc: b[525],
            sgls: u32_at(b, 536),
            mnan: u32_at(b, 540),
            subnqn: str_field(&b[768..1024])?,
            ioccsz: u32_at(b, 1792),
            iorcsz: u32_at(b, 1796),
            icdoff: u16_at(b, 1800),
            fcatt: b[1802],
            msdbd: b[1803],
        })
    }
}

/// The Identify Namespace fields for a namespace with one LBA format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Size, capacity, utilization in logical blocks.
    pub nsze: u64,
    pub ncap: u64,
    pub nuse: u64,
    /// Namespace features (bit 2: deallocated/unwritten error support ...).
    pub nsfeat: u8,
    /// Number of LBA formats, 0-based.
    pub nlbaf: u8,
    /// Formatted LBA size: index of the format in use.
    pub flbas: u8,
    /// Deallocate logical block features (bits 0-2: read behaviour).
    pub dlfeat: u8,
    pub nmic: u8,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    /// log2 of the block size of LBA format 0.
    pub lbads: u8,
}

impl IdentifyNamespace {
    pub fn encode(&self, b: &mut [u8]) -> Result<(), WireError> {
        need_out(b, IDENTIFY_LEN)?;
        let b = &mut b[..IDENTIFY_LEN];
        b.fill(0);
        put_u64(b, 0, self.nsze);
        put_u64(b, 8, self.ncap);
        put_u64(b, 16, self.nuse);
        b[24] = self.nsfeat;
        b[25] = self.nlbaf;
        b[26] = self.flbas;
        b[30] = self.nmic;
        b[33] = self.dlfeat;
        b[104..120].copy_from_slice(&self.nguid);
        b[120..128].copy_from_slice(&self.eui64);
        // LBA format 0: no metadata, lbads, best relative performance.
        b[128 + 2] = self.lbads;
        Ok(())
    }

    pub fn decode(b: &[u8]) -> Result<IdentifyNamespace, WireError> {
        need(b, IDENTIFY_LEN)?;
        let flbas = b[26];
        let fmt = (flbas & 0xf) as usize;
        let mut nguid = [0u8; 16];
        nguid.copy_from_slice(&b[104..120]);
        let mut eui64 = [0u8; 8];
        eui64.copy_from_slice(&b[120..128]);
        Ok(IdentifyNamespace {
            nsze: u64_at(b, 0),
            ncap: u64_at(b, 8),
            nuse: u64_at(b, 16),
            nsfeat: b[24],
            nlbaf: b[25],
            flbas,
            nmic: b[30],
            dlfeat: b[33],
            nguid,
            eui64,
            lbads: b[128 + 4 * fmt + 2],
        })
    }

    /// Block size in bytes of the format in use (None if out of range).
    pub fn block_size(&self) -> Option<u32> {
        if (9..=31).contains(&self.lbads) {
            Some(1u32 << self.lbads)
        } else {
            None
        }
    }
}

/// Writes an active namespace id list: the ids greater than `after`
/// (ascending, from `nsids`), up to 1024 of them, zero-terminated.
pub fn encode_active_ns_list(
    b: &mut [u8],
    after: u32,
    nsids: impl IntoIterator<Item = u32>,
) -> Result<usize, WireError> {
    need_out(b, IDENTIFY_LEN)?;
    b[..IDENTIFY_LEN].fill(0);
    let mut n = 0;
    for id in nsids.into_iter().filter(|&id| id > after) {
        if n == IDENTIFY_LEN / 4 {
            break;
        }
        put_u32(b, n * 4, id);
        n += 1;
    }
    Ok(n)
}

/// The namespace ids of an active namespace list.
pub fn active_ns_list(b: &[u8]) -> impl Iterator<Item = u32> + '_ {
    b.chunks_exact(4)
        .take(IDENTIFY_LEN / 4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&id| id != 0)
}

/// Namespace identification descriptor types.
pub mod nidt {
    pub const EUI64: u8 = 1;
    pub const NGUID: u8 = 2;
    pub const UUID: u8 = 3;
    pub const CSI: u8 = 4;
}

/// One namespace identification descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NsIdDescriptor<'a> {
    pub nidt: u8,
    pub nid: &'a [u8],
}

fn nid_len(nidt: u8) -> Option<usize> {
    match nidt {
        nidt::EUI64 => Some(8),
        nidt::NGUID | nidt::UUID => Some(16),
        nidt::CSI => Some(1),
        _ => None,
    }
}

/// Writes a descriptor list (4096 bytes, zero-terminated).
pub fn encode_ns_id_descriptors(
    b: &mut [u8],
    descs: &[NsIdDescriptor<'_>],
) -> Result<(), WireError> {
    need_out(b, IDENTIFY_LEN)?;
    b[..IDENTIFY_LEN].fill(0);
    let mut off = 0;
    for d in descs {
        let len = nid_len(d.nidt).ok_or(WireError::BadField {
            field: "NIDT",
            value: d.nidt as u64,
        })?;
        if d.nid.len() != len {
            return Err(WireError::BadField {
                field: "NIDL",
                value: d.nid.len() as u64,
            });
        }
        if off + 4 + len + 4 > IDENTIFY_LEN {
            return Err(WireError::OutputTooSmall {
                need: off + 4 + len + 4,
                have: IDENTIFY_LEN,
            });
        }
        b[off] = d.nidt;
        b[off + 1] = len as u8;
        b[off + 4..off + 4 + len].copy_from_slice(d.nid);
        off += 4 + len;
    }
    Ok(())
}

/// Iterates a descriptor list; ends at the terminator or the first error.
pub fn ns_id_descriptors(b: &[u8]) -> NsIdDescriptors<'_> {
    NsIdDescriptors {
        b: &b[..b.len().min(IDENTIFY_LEN)],
        off: 0,
    }
}

pub struct NsIdDescriptors<'a> {
    b: &'a [u8],
    off: usize,
}

impl<'a> Iterator for NsIdDescriptors<'a> {
    type Item = Result<NsIdDescriptor<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.b[self.off..];
        if rest.len() < 4 || rest[0] == 0 {
            return None;
        }
        let (t, l) = (rest[0], rest[1] as usize);
        if rest.len() < 4 + l || l == 0 {
            self.off = self.b.len();
            return Some(Err(WireError::BadField {
                field: "NIDL",
                value: l as u64,
            }));
        }
        self.off += 4 + l;
        Some(Ok(NsIdDescriptor {
            nidt: t,
            nid: &rest[4..4 + l],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_round_trip() {
        let c = IdentifyController {
            vid: 0,
            ssvid: 0,
            serial: "WC0001",
            model: "writecache",
            firmware: "0.1.0",
            mdts: 5,
            cntlid: 3,
            ver: 0x10300,
            oaes: 1 << 8,
            cntrltype: cntrltype::IO,
            oacs: 0,
            acl: 3,
            aerl: 3,
            lpa: 4,
            elpe: 127,
            kas: 10,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: 128,
            nn: 32,
            oncs: oncs::DSM | oncs::WRITE_ZEROES,
            vwc: 1,
            sgls: 0x100005,
            mnan: 32,
            subnqn: "nqn.2016-06.io.spdk:cnode1",
            ioccsz: 260,
            iorcsz: 1,
            icdoff: 0,
            fcatt: 0,
            msdbd: 1,
        };
        let mut b = vec![0u8; IDENTIFY_LEN];
        c.encode(&mut b).unwrap();
        assert_eq!(IdentifyController::decode(&b).unwrap(), c);
    }

    #[test]
    fn namespace_and_lists() {
        let ns = IdentifyNamespace {
            nsze: 1 << 20,
            ncap: 1 << 20,
            nuse: 1 << 20,
            nsfeat: 0,
            nlbaf: 0,
            flbas: 0,
            dlfeat: 0,
            nmic: 0,
            nguid: [1; 16],
            eui64: [0; 8],
            lbads: 12,
        };
        let mut b = vec![0u8; IDENTIFY_LEN];
        ns.encode(&mut b).unwrap();
        let d = IdentifyNamespace::decode(&b).unwrap();
        assert_eq!(d, ns);
        assert_eq!(d.block_size(), Some(4096));

        assert_eq!(encode_active_ns_list(&mut b, 1, [1, 2, 5]).unwrap(), 2);
        assert_eq!(active_ns_list(&b).collect::<Vec<_>>(), vec![2, 5]);

        let uuid = [0xab; 16];
        encode_ns_id_descriptors(
            &mut b,
            &[
                NsIdDescriptor {
                    nidt: nidt::UUID,
                    nid: &uuid,
                },
                NsIdDescriptor {
                    nidt: nidt::CSI,
                    nid: &[0],
                },
            ],
        )
        .unwrap();
        let got: Vec<_> = ns_id_descriptors(&b).map(|d| d.unwrap()).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].nid, &uuid);
        assert!(encode_ns_id_descriptors(
            &mut b,
            &[NsIdDescriptor {
                nidt: nidt::UUID,
                nid: &[1, 2]
            }]
        )
        .is_err());
    }
}
