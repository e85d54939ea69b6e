//! Property tests (encode/decode round trips) and a fuzz-style test that
//! feeds arbitrary and mutated bytes to the framer and every decoder:
//! errors, never panics.

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use wc_nvme_wire::command::{DsmRange, GetLogPageCommand, RwCommand};
use wc_nvme_wire::fabrics::ConnectData;
use wc_nvme_wire::identify::{ns_id_descriptors, IdentifyController, IdentifyNamespace};
use wc_nvme_wire::log::{DiscoveryLogEntry, ErrorLogEntry, SmartLog};
use wc_nvme_wire::pdu::{self, MAX_HEADER_LEN};
use wc_nvme_wire::*;

fn sqe_strategy() -> impl Strategy<Value = Sqe> {
    (
        any::<u8>(),
        any::<u8>(),
        any::<u16>(),
        any::<u32>(),
        any::<u64>(),
        any::<(u64, u32, u8)>(),
        any::<[u32; 6]>(),
    )
        .prop_map(|(opcode, flags, cid, nsid, mptr, (a, l, t), cdw)| Sqe {
            opcode,
            flags,
            cid,
            nsid,
            cdw2: 0,
            cdw3: 0,
            mptr,
            sgl: SglDescriptor {
                address: a,
                length: l,
                type_byte: t,
            },
            cdw,
        })
}

fn digests_strategy() -> impl Strategy<Value = Digests> {
    (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
}

/// Frames and decodes one whole PDU from `wire` with a controller or host
/// framer already initialized with `digests`.
fn frame_one(role: Role, digests: Digests, wire: &[u8]) -> Result<(PduHeader, Vec<u8>), WireError> {
    let mut f = Framer::new(role);
    f.initialized(digests, 1 << 20);
    let mut have = 0;
    loop {
        match f.poll(&wire[..have])? {
            Frame::Need(n) => {
                have += n;
                assert!(have <= wire.len(), "framer asked past the PDU");
            }
            Frame::Header(layout) => {
                let p = Pdu::decode(&wire[..layout.plen], &layout)?;
                assert_eq!(layout.plen, wire.len());
                return Ok((p.header, p.data.to_vec()));
            }
        }
    }
}

fn with_data(header: &[u8], data: &[u8], digests: Digests) -> Vec<u8> {
    let mut v = header.to_vec();
    v.extend_from_slice(data);
    if digests.data && !data.is_empty() {
        v.extend_from_slice(&crc32c(data).to_le_bytes());
    }
    v
}

proptest! {
    #[test]
    fn capsule_cmd_round_trip(sqe in sqe_strategy(), data in proptest::collection::vec(any::<u8>(), 0..600),
                              dg in digests_strategy(), pda in 0u8..4) {
        let mut h = [0u8; 256];
        let n = pdu::encode_capsule_cmd(&mut h, &sqe, data.len(), dg, pda).unwrap();
        let wire = with_data(&h[..n], &data, dg);
        let (hdr, got) = frame_one(Role::Controller, dg, &wire).unwrap();
        prop_assert_eq!(hdr, PduHeader::CapsuleCmd(sqe));
        prop_assert_eq!(got, data);
    }

    #[test]
    fn capsule_resp_round_trip(dw0 in any::<u32>(), dw1 in any::<u32>(), sqhd in any::<u16>(), cid in any::<u16>(),
                               st in 0u16..0x7fff, dg in digests_strategy()) {
        let cqe = Cqe { dw0, dw1, sqhd, sqid: 1, cid, status: Status(st) };
        let mut h = [0u8; 64];
        let n = pdu::encode_capsule_resp(&mut h, &cqe, dg).unwrap();
        let (hdr, data) = frame_one(Role::Host, dg, &h[..n]).unwrap();
        prop_assert_eq!(hdr, PduHeader::CapsuleResp(cqe));
        prop_assert!(data.is_empty());
    }

    #[test]
    fn data_pdus_round_trip(cccid in any::<u16>(), ttag in any::<u16>(), datao in 0u32..1<<30,
                            data in proptest::collection::vec(any::<u8>(), 1..3000),
                            last in any::<bool>(), success in any::<bool>(), dg in digests_strategy()) {
        let d = DataHeader { cccid, ttag, datao, datal: data.len() as u32 };
        let mut h = [0u8; 64];
        let n = pdu::encode_h2c_data(&mut h, &d, last, dg, 0).unwrap();
        let (hdr, got) = frame_one(Role::Controller, dg, &with_data(&h[..n], &data, dg)).unwrap();
        prop_assert_eq!(hdr, PduHeader::H2CData(d));
        prop_assert_eq!(&got, &data);

        let success = success && last;
        let n = pdu::encode_c2h_data(&mut h, &d, last, success, dg, 0).unwrap();
        let wire = with_data(&h[..n], &data, dg);
        prop_assert_eq!(wire[1] & pdu::flags::DATA_SUCCESS != 0, success);
        let (hdr, got) = frame_one(Role::Host, dg, &wire).unwrap();
        prop_assert_eq!(hdr, PduHeader::C2HData(DataHeader { ttag: 0, ..d }));
        prop_assert_eq!(got, data);
    }

    #[test]
    fn r2t_and_ic_round_trip(cccid in any::<u16>(), ttag in any::<u16>(), r2to in any::<u32>(), r2tl in 1u32..,
                             dg in digests_strategy(), hpda in 0u8..32, dgst in 0u8..4, maxr2t in any::<u32>(),
                             maxh2c in 1024u32..0x400000) {
        let r = R2T { cccid, ttag, r2to, r2tl };
        let mut h = [0u8; 160];
        let n = pdu::encode_r2t(&mut h, &r, dg).unwrap();
        prop_assert_eq!(frame_one(Role::Host, dg, &h[..n]).unwrap().0, PduHeader::R2T(r));

        let req = IcReq { pfv: 0, hpda, dgst, maxr2t };
        let n = pdu::encode_ic_req(&mut h, &req).unwrap();
        let f = Framer::new(Role::Controller);
        match f.poll(&h[..n]).unwrap() {
            Frame::Header(l) => prop_assert_eq!(decode_header(&h, &l).unwrap(), PduHeader::IcReq(req)),
            other => prop_assert!(false, "{:?}", other),
        }
        let resp = IcResp { pfv: 0, cpda: hpda, dgst, maxh2cdata: maxh2c * 4 };
        let n = pdu::encode_ic_resp(&mut h, &resp).unwrap();
        let f = Framer::new(Role::Host);
        match f.poll(&h[..n]).unwrap() {
            Frame::Header(l) => prop_assert_eq!(decode_header(&h, &l).unwrap(), PduHeader::IcResp(resp)),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn commands_round_trip(slba in any::<u64>(), nlb in 1u32..=65536, fua in any::<bool>(),
                           lid in any::<u8>(), numd in 1u64..(1<<32), lpo in any::<u64>()) {
        let rw = RwCommand { slba, nlb, fua, deac: false };
        let sqe = rw.build(0x02, 1, 1).unwrap();
        prop_assert_eq!(RwCommand::parse(&Sqe::decode(&sqe.to_bytes()).unwrap()), rw);
        let glp = GetLogPageCommand { lid, lsp: 0, rae: false, len: numd * 4, offset: lpo & !3, nsid: 0 };
        prop_assert_eq!(GetLogPageCommand::parse(&glp.build(3).unwrap()), glp);
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000), dg in digests_strategy()) {
        fuzz_one(&bytes, dg);
    }
}

/// Runs every decoder on `bytes`; only checks that nothing panics and that
/// the framer never asks past a PDU's stated length.
fn fuzz_one(bytes: &[u8], dg: Digests) {
    for role in [Role::Controller, Role::Host] {
        for init in [false, true] {
            let mut f = Framer::new(role);
            if init {
                f.initialized(dg, 8192);
            }
            let mut have = 0usize;
            loop {
                match f.poll(&bytes[..have.min(bytes.len())]) {
                    Ok(Frame::Need(n)) => {
                        assert!(n > 0);
                        have += n;
                        if have > bytes.len() {
                            break;
                        }
                    }
                    Ok(Frame::Header(l)) => {
                        assert!(l.header_len <= MAX_HEADER_LEN + 4);
                        assert!(l.data_offset + l.data_len <= l.plen);
                        let _ = decode_header(bytes, &l);
                        if bytes.len() >= l.plen {
                            let _ = Pdu::decode(&bytes[..l.plen], &l);
                        }
                        break;
                    }
                    Err(e) => {
                        let _ = e.to_string();
                        let _ = e.term_fes();
                        break;
                    }
                }
            }
        }
    }
    let _ = Sqe::decode(bytes);
    let _ = Cqe::decode(bytes);
    let _ = ConnectData::decode(bytes);
    let _ = IdentifyController::decode(bytes);
    let _ = IdentifyNamespace::decode(bytes).map(|n| n.block_size());
    for d in ns_id_descriptors(bytes) {
        let _ = d;
    }
    let _ = DiscoveryLogEntry::decode(bytes);
    let _ = SmartLog::decode(bytes);
    let _ = ErrorLogEntry::decode(bytes);
    let _ = DsmRange::decode(bytes);
    if let Ok(s) = Sqe::decode(bytes) {
        let _ = s.sgl.placement();
        let _ = RwCommand::parse(&s).end_lba();
        let _ = GetLogPageCommand::parse(&s);
    }
}

/// Mutates valid PDUs (bit flips, truncations, length fields) and checks the
/// framer and decoders reject or accept them without panicking, and that a
/// flipped bit under a digest is always caught.
#[test]
fn mutated_pdus() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let dg = Digests {
        header: true,
        data: true,
    };
    let sqe = RwCommand {
        slba: 8,
        nlb: 2,
        fua: false,
        deac: false,
    }
    .build(0x01, 5, 1)
    .unwrap()
    .with_sgl(SglDescriptor::in_capsule(1024));
    let data: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
    let mut h = [0u8; 128];
    let n = pdu::encode_capsule_cmd(&mut h, &sqe, data.len(), dg, 0).unwrap();
    let base = with_data(&h[..n], &data, dg);
    assert!(frame_one(Role::Controller, dg, &base).is_ok());
    for _ in 0..20_000 {
        let mut m = base.clone();
        match rng.gen_range(0..4) {
            0 => {
                let i = rng.gen_range(0..m.len());
                let bit = 1u8 << rng.gen_range(0..8);
                m[i] ^= bit;
                // Any single bit flip past the common header is covered by
                // a digest and must be caught.
                if i >= 8 {
                    assert!(
                        frame_one(Role::Controller, dg, &m).is_err(),
                        "flip at {i} missed"
                    );
                }
            }
            1 => m.truncate(rng.gen_range(0..m.len())),
            2 => {
                let v: u32 = rng.gen();
                m[4..8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                m[rng.gen_range(0..4)] = rng.gen();
            }
        }
        fuzz_one(&m, dg);
        fuzz_one(&m, Digests::default());
    }
}

#[test]
fn random_bytes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..5_000 {
        let len = rng.gen_range(0..2048);
        let mut v = vec![0u8; len];
        rng.fill(&mut v[..]);
        // Bias the first byte towards valid PDU types.
        if len > 0 && rng.gen_bool(0.7) {
            v[0] = rng.gen_range(0..10);
        }
        fuzz_one(
            &v,
            Digests {
                header: rng.gen(),
                data: rng.gen(),
            },
        );
    }
}

#[test]
fn precise_errors() {
    let f = {
        let mut f = Framer::new(Role::Controller);
        f.initialized(Digests::default(), 8192);
        f
    };
    // Unknown type.
    assert_eq!(
        f.poll(&[0x08, 0, 24, 0, 24, 0, 0, 0]),
        Err(WireError::UnknownPduType(8))
    );
    // A controller-to-host PDU sent to the controller.
    assert_eq!(
        f.poll(&[0x05, 0, 24, 0, 24, 0, 0, 0]),
        Err(WireError::UnexpectedPdu(5))
    );
    // ICReq after initialization.
    assert_eq!(
        f.poll(&[0x00, 0, 128, 0, 128, 0, 0, 0]),
        Err(WireError::UnexpectedPdu(0))
    );
    // Bad hlen.
    assert!(matches!(
        f.poll(&[0x04, 0, 70, 0, 72, 0, 0, 0]),
        Err(WireError::BadHlen { expected: 72, .. })
    ));
    // Header digest flag not negotiated.
    assert!(matches!(
        f.poll(&[0x04, 1, 72, 0, 76, 0, 0, 0]),
        Err(WireError::BadFlags { .. })
    ));
    // Data longer than the limit.
    let plen = 72 + 8193u32;
    let mut ch = [0x04, 0, 72, 72, 0, 0, 0, 0];
    ch[4..8].copy_from_slice(&plen.to_le_bytes());
    assert!(matches!(f.poll(&ch), Err(WireError::BadPlen { .. })));
    // pdo inside the header.
    let mut ch = [0x04, 0, 72, 40, 0, 0, 0, 0];
    ch[4..8].copy_from_slice(&100u32.to_le_bytes());
    assert!(matches!(f.poll(&ch), Err(WireError::BadPdo { .. })));
    // Needs the header next.
    let mut ch = [0x04, 0, 72, 0, 0, 0, 0, 0];
    ch[4..8].copy_from_slice(&72u32.to_le_bytes());
    assert_eq!(f.poll(&ch), Ok(Frame::Need(64)));
    // Terminate request's FES for a header error.
    assert_eq!(
        WireError::UnknownPduType(8).term_fes(),
        Some((TermFes::InvalidHeaderField, 0))
    );
}
