//! A small blocking NVMe/TCP host built on `wc-nvme-wire`, for tests: it
//! speaks the protocol the way a real initiator does (ICReq, Connect,
//! properties, in-capsule or R2T/H2CData writes, C2HData reads) and lets a
//! test break it on purpose.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use wc_nvme_wire::command::{IdentifyCommand, RwCommand};
use wc_nvme_wire::fabrics::{
    property, ConnectCommand, ConnectData, PropertyCommand, CNTLID_DYNAMIC,
};
use wc_nvme_wire::pdu::{self, dgst, flags, MAX_HEADER_LEN};
use wc_nvme_wire::*;
use wc_reactor::Runtime;

pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";

/// One runtime for the whole test binary (the target's state is global).
pub fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let rt = wc_bdev::testing::test_runtime(2);
        rt.main()
            .call_blocking(|| {
                let mut p = serde_json::Map::new();
                p.insert("trtype".into(), "TCP".into());
                wc_nvmf::target::create_transport(&p)
            })
            .expect("reactor runs")
            .expect("transport");
        rt
    })
}

/// Runs `f` on the main reactor (the control plane's home).
pub fn on_main<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    rt().main().call_blocking(f).expect("main reactor runs")
}

/// A free loopback port.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Creates subsystem `nqn` with a malloc namespace and a listener; returns
/// the listener's address.
pub fn setup_subsystem(nqn: &str, bdev: &str, blocks: u64, allow_any: bool) -> SocketAddr {
    rt();
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new(bdev, blocks, 512)).unwrap();
    let port = free_port();
    let (nqn2, bdev2) = (nqn.to_string(), bdev.to_string());
    on_main(move || {
        use wc_nvmf::target::*;
        create_subsystem(SubsystemArgs {
            nqn: nqn2.clone(),
            serial_number: Some("WC123".into()),
            model_number: None,
            allow_any_host: allow_any,
            max_namespaces: None,
            min_cntlid: None,
            max_cntlid: None,
        })
        .unwrap();
        add_ns(
            &nqn2,
            NsArgs {
                bdev_name: bdev2,
                nsid: None,
                nguid: None,
                eui64: None,
                uuid: None,
            },
        )
        .unwrap();
        let (a, sa) =
            parse_listen_address("TCP", None, "127.0.0.1", Some(&port.to_string())).unwrap();
        add_listener(&nqn2, a, sa).unwrap();
    });
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// A PDU as the host received it.
#[derive(Debug)]
pub struct Rx {
    pub header: PduHeader,
    pub flags: u8,
    pub data: Vec<u8>,
}

pub struct Host {
    pub s: TcpStream,
    pub digests: Digests,
    framer: Framer,
    buf: Vec<u8>,
    next_cid: u16,
    pub icd: usize,
    pub maxh2c: u32,
    pub cpda: u8,
}

impl Host {
    /// TCP connect plus ICReq/ICResp.
    pub fn connect(addr: SocketAddr, hdgst: bool, ddgst: bool) -> Host {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut h = Host {
            s,
            digests: Digests::default(),
            framer: Framer::new(Role::Host),
            buf: Vec::new(),
            next_cid: 1,
            icd: 8192,
            maxh2c: 0,
            cpda: 0,
        };
        let mut b = [0u8; 128];
        let d = (hdgst as u8 * dgst::HDGST_ENABLE) | (ddgst as u8 * dgst::DDGST_ENABLE);
        let n = pdu::encode_ic_req(
            &mut b,
            &IcReq {
                pfv: 0,
                hpda: 0,
                dgst: d,
                maxr2t: 0,
            },
        )
        .unwrap();
        h.s.write_all(&b[..n]).unwrap();
        match h.recv().header {
            PduHeader::IcResp(r) => {
                h.digests = Digests {
                    header: r.dgst & dgst::HDGST_ENABLE != 0,
                    data: r.dgst & dgst::DDGST_ENABLE != 0,
                };
                h.maxh2c = r.maxh2cdata;
                h.cpda = r.cpda;
                h.framer.initialized(h.digests, 16 << 20);
            }
            other => panic!("expected ICResp, got {other:?}"),
        }
        h
    }

    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        self.next_cid
    }

    /// Reads one whole PDU (panics on a framing error: tests that expect
    /// errors use [`Host::try_recv`]).
    pub fn recv(&mut self) -> Rx {
        self.try_recv().expect("a PDU")
    }

    /// Reads one PDU; `Err` on EOF or a decode error.
    pub fn try_recv(&mut self) -> Result<Rx, String> {
        loop {
            match self.framer.poll(&self.buf) {
                Ok(Frame::Need(n)) => {
                    let mut tmp = vec![0u8; n.max(4096)];
                    let got = self.s.read(&mut tmp).map_err(|e| e.to_string())?;
                    if got == 0 {
                        return Err("EOF".into());
                    }
                    self.buf.extend_from_slice(&tmp[..got]);
                }
                Ok(Frame::Header(l)) => {
                    while self.buf.len() < l.plen {
                        let mut tmp = vec![0u8; l.plen - self.buf.len()];
                        let got = self.s.read(&mut tmp).map_err(|e| e.to_string())?;
                        if got == 0 {
                            return Err("EOF".into());
                        }
                        self.buf.extend_from_slice(&tmp[..got]);
                    }
                    let p = Pdu::decode(&self.buf[..l.plen], &l).map_err(|e| e.to_string())?;
                    let rx = Rx {
                        header: p.header,
                        flags: l.ch.flags,
                        data: p.data.to_vec(),
                    };
                    self.buf.drain(..l.plen);
                    return Ok(rx);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Sends a command capsule with `data` in the capsule.
    pub fn send_capsule(&mut self, sqe: &Sqe, data: &[u8]) {
        let mut h = [0u8; MAX_HEADER_LEN + 8];
        let n = pdu::encode_capsule_cmd(&mut h, sqe, data.len(), self.digests, self.cpda).unwrap();
        let mut out = h[..n].to_vec();
        out.extend_from_slice(data);
        if self.digests.data && !data.is_empty() {
            out.extend_from_slice(&crc32c(data).to_le_bytes());
        }
        self.s.write_all(&out).unwrap();
    }

    pub fn send_h2c(&mut self, cccid: u16, ttag: u16, datao: u32, data: &[u8], last: bool) {
        let mut h = [0u8; 64];
        let d = DataHeader {
            cccid,
            ttag,
            datao,
            datal: data.len() as u32,
        };
        let n = pdu::encode_h2c_data(&mut h, &d, last, self.digests, self.cpda).unwrap();
        let mut out = h[..n].to_vec();
        out.extend_from_slice(data);
        if self.digests.data {
            out.extend_from_slice(&crc32c(data).to_le_bytes());
        }
        self.s.write_all(&out).unwrap();
    }

    /// Runs one command to completion: `out` is written (in the capsule up
    /// to the in-capsule limit, else after R2T), `in_len` bytes are read.
    pub fn exec(&mut self, sqe: Sqe, out: &[u8], in_len: usize) -> (Cqe, Vec<u8>) {
        let cid = sqe.cid;
        let inline = !out.is_empty() && out.len() <= self.icd;
        let len = if out.is_empty() { in_len } else { out.len() };
        let sgl = if inline {
            SglDescriptor::in_capsule(len as u32)
        } else {
            SglDescriptor::transport(len as u32)
        };
        let sqe = sqe.with_sgl(sgl);
        self.send_capsule(&sqe, if inline { out } else { &[] });
        let mut data = vec![0u8; in_len];
        loop {
            let rx = self.recv();
            match rx.header {
                PduHeader::R2T(r) => {
                    assert_eq!(r.cccid, cid);
                    let mut off = r.r2to;
                    let end = r.r2to + r.r2tl;
                    while off < end {
                        let n = (end - off).min(self.maxh2c);
                        let chunk = &out[off as usize..(off + n) as usize];
                        self.send_h2c(cid, r.ttag, off, chunk, off + n == end);
                        off += n;
                    }
                }
                PduHeader::C2HData(d) => {
                    assert_eq!(d.cccid, cid);
                    data[d.datao as usize..(d.datao + d.datal) as usize].copy_from_slice(&rx.data);
                    if rx.flags & flags::DATA_SUCCESS != 0 {
                        let cqe = Cqe {
                            cid,
                            ..Cqe::default()
                        };
                        return (cqe, data);
                    }
                }
                PduHeader::CapsuleResp(c) => {
                    assert_eq!(c.cid, cid);
                    return (c, data);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    pub fn fabric_connect(
        &mut self,
        qid: u16,
        sqsize: u32,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        kato: u32,
    ) -> Cqe {
        let cid = self.cid();
        let sqe = ConnectCommand {
            recfmt: 0,
            qid,
            sqsize,
            cattr: 0,
            kato,
        }
        .build(cid)
        .unwrap();
        let mut d = [0u8; 1024];
        ConnectData {
            hostid: [0x11; 16],
            cntlid,
            subnqn,
            hostnqn,
        }
        .encode(&mut d)
        .unwrap();
        self.exec(sqe, &d, 0).0
    }

    pub fn prop_get(&mut self, offset: u32, size8: bool) -> u64 {
        let cid = self.cid();
        let c = self
            .exec(
                PropertyCommand {
                    size8,
                    offset,
                    value: 0,
                }
                .build_get(cid),
                &[],
                0,
            )
            .0;
        assert!(c.status.is_success(), "{}", c.status);
        c.result_u64()
    }

    pub fn prop_set(&mut self, offset: u32, value: u64) -> Cqe {
        let cid = self.cid();
        self.exec(
            PropertyCommand {
                size8: false,
                offset,
                value,
            }
            .build_set(cid),
            &[],
            0,
        )
        .0
    }

    /// Admin queue: Connect, enable (CC.EN, wait CSTS.RDY); returns cntlid.
    pub fn admin(addr: SocketAddr, subnqn: &str, digests: (bool, bool), kato: u32) -> (Host, u16) {
        let mut h = Host::connect(addr, digests.0, digests.1);
        let c = h.fabric_connect(0, 32, subnqn, HOSTNQN, CNTLID_DYNAMIC, kato);
        assert!(c.status.is_success(), "connect: {}", c.status);
        let cntlid = c.dw0 as u16;
        let cc = property::cc::EN
            | (6 << property::cc::IOSQES_SHIFT)
            | (4 << property::cc::IOCQES_SHIFT);
        assert!(h.prop_set(property::CC, cc as u64).status.is_success());
        assert_eq!(
            h.prop_get(property::CSTS, false) as u32 & property::csts::RDY,
            1
        );
        (h, cntlid)
    }

    /// An I/O queue of controller `cntlid`.
    pub fn io(
        addr: SocketAddr,
        subnqn: &str,
        digests: (bool, bool),
        cntlid: u16,
        qid: u16,
    ) -> Host {
        let mut h = Host::connect(addr, digests.0, digests.1);
        h.icd = 4096;
        let c = h.fabric_connect(qid, 128, subnqn, HOSTNQN, cntlid, 0);
        assert!(c.status.is_success(), "io connect: {}", c.status);
        h
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> (Cqe, Vec<u8>) {
        let cid = self.cid();
        self.exec(
            IdentifyCommand {
                cns,
                cntid: 0,
                csi: 0,
                nsid,
            }
            .build(cid),
            &[],
            4096,
        )
    }

    pub fn write(&mut self, nsid: u32, slba: u64, data: &[u8], fua: bool) -> Cqe {
        let cid = self.cid();
        let rw = RwCommand {
            slba,
            nlb: (data.len() / 512) as u32,
            fua,
            deac: false,
        };
        self.exec(rw.build(opcode::io::WRITE, cid, nsid).unwrap(), data, 0)
            .0
    }

    pub fn read(&mut self, nsid: u32, slba: u64, len: usize) -> (Cqe, Vec<u8>) {
        let cid = self.cid();
        let rw = RwCommand {
            slba,
            nlb: (len / 512) as u32,
            fua: false,
            deac: false,
        };
        self.exec(rw.build(opcode::io::READ, cid, nsid).unwrap(), &[], len)
    }
}

/// Open file descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits until `cond` holds or `secs` pass.
pub fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 31 + seed * 7) % 251) as u8)
        .collect()
}

pub type Shared<T> = Arc<T>;
