//! Hostile hosts: bad PDU types and lengths, wrong digests, data longer
//! than the command, out-of-range H2CData, commands before Connect, a host
//! vanishing mid-R2T, random bytes, thousands of connections. Each gets an
//! NVMe status or a closed connection; the target never crashes, leaks no
//! connection or descriptor, and a well-behaved host keeps working.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use wc_nvme_wire::command::RwCommand;
use wc_nvme_wire::pdu::{self, flags};
use wc_nvme_wire::{opcode, PduHeader, SglDescriptor, Sqe, Status, TermFes};

const NQN: &str = "nqn.2026-12.io.writecache:hostile";

fn expect_term(h: &mut Host, fes: TermFes) {
    match h.try_recv() {
        Ok(rx) => match rx.header {
            PduHeader::C2HTermReq(t) => assert_eq!(t.fes, fes as u16, "{t:?}"),
            other => panic!("expected C2HTermReq, got {other:?}"),
        },
        Err(e) => panic!("expected C2HTermReq, got {e}"),
    }
    assert!(
        h.try_recv().is_err(),
        "connection closed after the terminate request"
    );
}

fn write_sqe(cid: u16, slba: u64, nlb: u32) -> Sqe {
    RwCommand {
        slba,
        nlb,
        fua: false,
        deac: false,
    }
    .build(opcode::io::WRITE, cid, 1)
    .unwrap()
}

#[test]
fn hostile_hosts() {
    let addr = setup_subsystem(NQN, "nvmf_hostile", 4096, true);
    // Settle, then take the baseline.
    std::thread::sleep(Duration::from_millis(200));
    let base_conns = wc_nvmf::live_connections();
    // Descriptors are counted once both reactors have their epoll
    // instance (made with their first connection): see below.
    let base_fds;

    // Every socket of the test hosts lives in this block (shadowed
    // bindings would otherwise stay open until the end).
    {
        // A good host that must keep working throughout.
        let (mut good_admin, cntlid) = Host::admin(addr, NQN, (true, true), 0);
        let mut good = Host::io(addr, NQN, (true, true), cntlid, 1);
        let check_good = |good: &mut Host, seed: u64| {
            let data = pattern(seed, 8192);
            assert!(good.write(1, 64, &data, false).status.is_success());
            assert_eq!(good.read(1, 64, 8192).1, data);
        };
        check_good(&mut good, 1);
        base_fds = fd_count();

        // Unknown PDU type after ICReq.
        let mut h = Host::connect(addr, false, false);
        h.stream.write_all(&[0x08, 0, 24, 0, 24, 0, 0, 0]).unwrap();
        h.stream.write_all(&[0u8; 16]).unwrap();
        expect_term(&mut h, TermFes::InvalidHeaderField);

        // A PDU type that only the controller sends.
        let mut h = Host::connect(addr, false, false);
        h.stream.write_all(&[0x05, 0, 24, 0, 24, 0, 0, 0]).unwrap();
        expect_term(&mut h, TermFes::PduSequenceError);

        // Bad lengths: plen shorter than the header.
        let mut h = Host::connect(addr, false, false);
        h.stream.write_all(&[0x04, 0, 72, 0, 10, 0, 0, 0]).unwrap();
        expect_term(&mut h, TermFes::InvalidHeaderField);

        // A second ICReq.
        let mut h = Host::connect(addr, false, false);
        let mut b = [0u8; 128];
        let n = pdu::encode_ic_req(
            &mut b,
            &wc_nvme_wire::IcReq {
                pfv: 0,
                hpda: 0,
                dgst: 0,
                maxr2t: 0,
            },
        )
        .unwrap();
        h.stream.write_all(&b[..n]).unwrap();
        expect_term(&mut h, TermFes::PduSequenceError);

        // An unsupported PDU format version: the ICReq is refused.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        b[8] = 1;
        s.write_all(&b[..128]).unwrap();
        let mut tmp = [0u8; 256];
        let n = std::io::Read::read(&mut s, &mut tmp).unwrap_or(0);
        assert!(n == 0 || tmp[0] == 0x03, "a terminate request or a close");

        // Wrong header digest.
        let (mut h, _) = Host::admin(addr, NQN, (true, false), 0);
        let mut hdr = [0u8; 128];
        let cid = h.cid();
        let n = pdu::encode_capsule_cmd(
            &mut hdr,
            &wc_nvme_wire::command::keep_alive(cid),
            0,
            h.digests,
            0,
        )
        .unwrap();
        hdr[n - 1] ^= 0xff;
        h.stream.write_all(&hdr[..n]).unwrap();
        expect_term(&mut h, TermFes::HeaderDigestError);

        // Wrong data digest: the command fails with a transient transport
        // error, the connection goes on.
        let mut q = Host::io(addr, NQN, (true, true), cntlid, 2);
        let cid = q.cid();
        let sqe = write_sqe(cid, 0, 8).with_sgl(SglDescriptor::in_capsule(4096));
        let n = pdu::encode_capsule_cmd(&mut hdr, &sqe, 4096, q.digests, 0).unwrap();
        let mut wire = hdr[..n].to_vec();
        wire.extend_from_slice(&[7u8; 4096]);
        wire.extend_from_slice(&[0, 0, 0, 0]);
        q.stream.write_all(&wire).unwrap();
        match q.recv().header {
            PduHeader::CapsuleResp(c) => assert_eq!(c.status, Status::TRANSIENT_TRANSPORT_ERROR),
            other => panic!("{other:?}"),
        }
        let data = pattern(9, 4096);
        assert!(q.write(1, 0, &data, false).status.is_success());

        // Data longer than the command: 2 KiB in the capsule for a 1 KiB write.
        let cid = q.cid();
        let sqe = write_sqe(cid, 0, 2).with_sgl(SglDescriptor::in_capsule(1024));
        q.send_capsule(&sqe, &[1u8; 2048]);
        match q.recv().header {
            PduHeader::CapsuleResp(c) => {
                assert_eq!(c.status, Status::DATA_SGL_LENGTH_INVALID.with_dnr())
            }
            other => panic!("{other:?}"),
        }
        // ...and an SGL that says more than the blocks: 4 KiB for 1 block.
        let cid = q.cid();
        let sqe = write_sqe(cid, 0, 1).with_sgl(SglDescriptor::in_capsule(4096));
        q.send_capsule(&sqe, &[1u8; 4096]);
        match q.recv().header {
            PduHeader::CapsuleResp(c) => {
                assert_eq!(c.status, Status::DATA_SGL_LENGTH_INVALID.with_dnr())
            }
            other => panic!("{other:?}"),
        }
        // Out-of-range LBA on a write through R2T: refused before any R2T.
        let cid = q.cid();
        let sqe = write_sqe(cid, 4090, 16).with_sgl(SglDescriptor::transport(8192));
        q.send_capsule(&sqe, &[]);
        match q.recv().header {
            PduHeader::CapsuleResp(c) => assert_eq!(c.status, Status::LBA_OUT_OF_RANGE.with_dnr()),
            other => panic!("{other:?}"),
        }
        // In-capsule data beyond the queue's limit: fatal.
        let cid = q.cid();
        let sqe = write_sqe(cid, 0, 32).with_sgl(SglDescriptor::in_capsule(16384));
        q.send_capsule(&sqe, &[0u8; 16384]);
        expect_term(&mut q, TermFes::InvalidHeaderField);

        // H2CData beyond what the R2T asked for.
        let mut q = Host::io(addr, NQN, (false, false), cntlid, 2);
        let cid = q.cid();
        q.send_capsule(
            &write_sqe(cid, 0, 16).with_sgl(SglDescriptor::transport(8192)),
            &[],
        );
        let PduHeader::R2T(r) = q.recv().header else {
            panic!("R2T expected")
        };
        assert_eq!(r.r2tl, 8192);
        q.send_h2c(cid, r.ttag, 4096, &[0u8; 8192], true);
        expect_term(&mut q, TermFes::DataTransferOutOfRange);

        // H2CData for a transfer tag nobody asked for.
        let mut q = Host::io(addr, NQN, (false, false), cntlid, 2);
        q.send_h2c(1, 77, 0, &[0u8; 512], true);
        expect_term(&mut q, TermFes::InvalidHeaderField);

        // Commands before Connect: refused with a status.
        let mut h = Host::connect(addr, false, false);
        let cid = h.cid();
        let (c, _) = h.exec(wc_nvme_wire::command::keep_alive(cid), &[], 0);
        assert_eq!(c.status, Status::COMMAND_SEQUENCE_ERROR.with_dnr());
        // An I/O queue for a controller that does not exist, or a queue id
        // beyond what was granted.
        let mut h = Host::connect(addr, false, false);
        let c = h.fabric_connect(1, 32, NQN, HOSTNQN, 0x7777, 0);
        assert_eq!(c.status, Status::CONNECT_INVALID_PARAMETERS.with_dnr());
        let mut h = Host::connect(addr, false, false);
        let c = h.fabric_connect(500, 32, NQN, HOSTNQN, cntlid, 0);
        assert_eq!(c.status, Status::INVALID_QUEUE_IDENTIFIER.with_dnr());

        // A host vanishing mid-R2T (half the data sent), several times.
        for i in 0..5u16 {
            let mut q = Host::io(addr, NQN, (false, false), cntlid, 2 + i % 2);
            let cid = q.cid();
            q.send_capsule(
                &write_sqe(cid, 0, 256).with_sgl(SglDescriptor::transport(128 * 1024)),
                &[],
            );
            let PduHeader::R2T(r) = q.recv().header else {
                panic!("R2T expected")
            };
            q.send_h2c(cid, r.ttag, 0, &[5u8; 65536], false);
            drop(q);
        }

        // A host that sends more commands than its queue holds.
        let mut q = Host::io(addr, NQN, (false, false), cntlid, 2);
        let mut out = Vec::new();
        for i in 0..300u16 {
            let sqe = RwCommand {
                slba: 0,
                nlb: 1,
                fua: false,
                deac: false,
            }
            .build(opcode::io::READ, i, 1)
            .unwrap()
            .with_sgl(SglDescriptor::transport(512));
            let n = pdu::encode_capsule_cmd(&mut hdr, &sqe, 0, q.digests, 0).unwrap();
            out.extend_from_slice(&hdr[..n]);
        }
        let _ = q.stream.write_all(&out);
        drop(q);

        // Random bytes after a good ICReq, and random bytes instead of one.
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for round in 0..200 {
            let mut junk = vec![0u8; rng.gen_range(1..600)];
            rng.fill(&mut junk[..]);
            if rng.gen_bool(0.6) {
                junk[0] = rng.gen_range(0..10);
                if junk.len() > 8 {
                    let plen: u32 = rng.gen_range(0..400);
                    junk[4..8].copy_from_slice(&plen.to_le_bytes());
                }
            }
            let mut s = if round % 2 == 0 {
                Host::connect(addr, rng.gen(), rng.gen()).0.stream
            } else {
                TcpStream::connect(addr).unwrap()
            };
            let _ = s.write_all(&junk);
        }

        // Thousands of connections: accepted, some half-open handshakes,
        // all closed by the host.
        for i in 0..2000 {
            let s = TcpStream::connect(addr).unwrap();
            if i % 3 == 0 {
                let mut s = s;
                let n = pdu::encode_ic_req(
                    &mut b,
                    &wc_nvme_wire::IcReq {
                        pfv: 0,
                        hpda: 0,
                        dgst: 0,
                        maxr2t: 0,
                    },
                )
                .unwrap();
                let _ = s.write_all(&b[..n]);
            }
        }

        // The good host never noticed.
        check_good(&mut good, 2);
        let cid = good_admin.cid();
        assert!(good_admin
            .exec(wc_nvme_wire::command::keep_alive(cid), &[], 0)
            .0
            .status
            .is_success());
        let _ = flags::DATA_LAST;

        drop(good);
        drop(good_admin);
    }
    assert!(
        wait_for(20, || wc_nvmf::live_connections() == base_conns),
        "connections leak: {} live, {} at start",
        wc_nvmf::live_connections(),
        base_conns
    );
    assert!(
        wait_for(10, || fd_count() <= base_fds),
        "descriptors leak: {} open, {} at start: {:?}",
        fd_count(),
        base_fds,
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .collect::<Vec<_>>()
    );
}
