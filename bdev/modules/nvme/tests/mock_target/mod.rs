//! A small NVMe/TCP target for the initiator's tests, built on
//! `wc-nvme-wire`'s controller-side encoders: one in-memory namespace,
//! blocking threads (one per connection), and switches that make it
//! misbehave (stop answering, corrupt a data digest, send a short read or
//! a garbage PDU, drop every connection, refuse connections).
//!
//! It serves exactly what a host needs (Connect, Property Get/Set,
//! Identify controller / active namespaces / namespace, Set Features
//! number of queues, Keep Alive; Read, Write with in-capsule data or
//! R2T/H2CData, Flush, Write Zeroes, Dataset Management) and answers
//! anything else with Invalid Opcode.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use wc_nvme_wire::command::{
    self, feature, DsmCommand, FeatureCommand, IdentifyCommand, RwCommand,
};
use wc_nvme_wire::fabrics::{self, property, Capabilities, ConnectCommand, PropertyCommand};
use wc_nvme_wire::identify::{self, IdentifyController, IdentifyNamespace, IDENTIFY_LEN};
use wc_nvme_wire::opcode::{admin, fctype, io, FABRICS};
use wc_nvme_wire::pdu::{self, dgst, Digests, IcResp, PduHeader};
use wc_nvme_wire::{CommonHeader, Cqe, DataHeader, DataPlacement, PduLayout, Sqe, Status, R2T};

/// Ways to misbehave, switched at run time.
#[derive(Default)]
pub struct Faults {
    /// Swallow every command (no responses at all).
    pub stop_answering: AtomicBool,
    /// Corrupt the data digest of the next N C2HData PDUs.
    pub corrupt_ddgst: AtomicU32,
    /// Send the next N reads one block short, then a success response.
    pub short_reads: AtomicU32,
    /// Answer the next N commands with a garbage PDU instead.
    pub garbage: AtomicU32,
    /// Refuse new connections (close them at once).
    pub refuse: AtomicBool,
    /// Reads finish with C2HData SUCCESS instead of a CapsuleResp.
    pub c2h_success: AtomicBool,
}

/// Counters.
#[derive(Default)]
pub struct Stats {
    pub connects: AtomicU64,
    pub keep_alives: AtomicU64,
    pub r2ts: AtomicU64,
    pub in_capsule_writes: AtomicU64,
    pub flushes: AtomicU64,
    pub io_commands: AtomicU64,
}

pub struct Shared {
    pub data: Mutex<Vec<u8>>,
    pub block_size: u32,
    pub subnqn: String,
    pub faults: Faults,
    pub stats: Stats,
    /// In-capsule data size of I/O queues.
    pub icd: u32,
    pub maxh2cdata: u32,
    conns: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

pub struct MockTarget {
    pub port: u16,
    pub shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    listener: Option<TcpListener>,
}

impl MockTarget {
    /// A target on 127.0.0.1 (a free port) with `blocks` blocks of
    /// `block_size` bytes.
    pub fn start(subnqn: &str, block_size: u32, blocks: u64) -> MockTarget {
        let shared = Arc::new(Shared {
            data: Mutex::new(vec![0; (block_size as u64 * blocks) as usize]),
            block_size,
            subnqn: subnqn.to_string(),
            faults: Faults::default(),
            stats: Stats::default(),
            icd: 4096,
            maxh2cdata: 8192,
            conns: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        let mut t = MockTarget {
            port,
            shared,
            accept: None,
            listener: None,
        };
        t.listen(listener);
        t
    }

    fn listen(&mut self, listener: TcpListener) {
        self.shared.stop.store(false, Ordering::SeqCst);
        let l2 = listener.try_clone().unwrap();
        let shared = self.shared.clone();
        self.accept = Some(std::thread::spawn(move || {
            for s in l2.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(s) = s else { continue };
                if shared.faults.refuse.load(Ordering::SeqCst) {
                    let _ = s.shutdown(Shutdown::Both);
                    continue;
                }
                shared.conns.lock().unwrap().push(s.try_clone().unwrap());
                let sh = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(s, &sh);
                });
            }
        }));
        self.listener = Some(listener);
    }

    /// Closes the listener and every connection (the target "dies").
    pub fn kill(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        self.listener = None;
        self.drop_connections();
    }

    /// Closes every connection, keeping the listener.
    pub fn drop_connections(&self) {
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Listens again on the same port after [`kill`](Self::kill).
    pub fn restart(&mut self) {
        let mut tries = 0;
        let l = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("rebind {}: {e}", self.port),
            }
        };
        self.listen(l);
    }

    /// Bytes of block `lba`.
    pub fn block(&self, lba: u64) -> Vec<u8> {
        let bs = self.shared.block_size as usize;
        let d = self.shared.data.lock().unwrap();
        d[lba as usize * bs..(lba as usize + 1) * bs].to_vec()
    }
}

impl Drop for MockTarget {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_exact(s: &mut TcpStream, b: &mut [u8]) -> std::io::Result<()> {
    s.read_exact(b)
}

struct Conn<'a> {
    s: TcpStream,
    sh: &'a Shared,
    digests: Digests,
    qid: u16,
    cc: u32,
    /// Commands that arrived while the target waited for H2CData.
    backlog: std::collections::VecDeque<(Sqe, Vec<u8>)>,
}

fn serve(s: TcpStream, sh: &Shared) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut c = Conn {
        s,
        sh,
        digests: Digests::default(),
        qid: 0,
        cc: 0,
        backlog: Default::default(),
    };
    // ICReq.
    let mut ic = [0u8; pdu::IC_LEN];
    read_exact(&mut c.s, &mut ic)?;
    let ch = CommonHeader::decode(&ic).map_err(inval)?;
    let layout = PduLayout::from_common(ch, Digests::default(), 0).map_err(inval)?;
    let PduHeader::IcReq(req) = pdu::decode_header(&ic, &layout).map_err(inval)? else {
        return Err(inval("expected ICReq"));
    };
    c.digests = Digests {
        header: req.dgst & dgst::HDGST_ENABLE != 0,
        data: req.dgst & dgst::DDGST_ENABLE != 0,
    };
    let resp = IcResp {
        pfv: pdu::PFV_1_0,
        cpda: 0,
        dgst: req.dgst,
        maxh2cdata: sh.maxh2cdata,
    };
    let mut out = [0u8; pdu::IC_LEN];
    pdu::encode_ic_resp(&mut out, &resp).map_err(inval)?;
    c.s.write_all(&out)?;
    loop {
        let (sqe, icd) = match c.backlog.pop_front() {
            Some(x) => x,
            None => {
                let (layout, buf) = c.read_pdu()?;
                let PduHeader::CapsuleCmd(sqe) =
                    pdu::decode_header(&buf, &layout).map_err(inval)?
                else {
                    return Err(inval("expected a command capsule"));
                };
                pdu::check_data_digest(&buf, &layout).map_err(inval)?;
                (sqe, buf[layout.data_range()].to_vec())
            }
        };
        if sh.faults.stop_answering.load(Ordering::SeqCst) {
            continue;
        }
        if take_one(&sh.faults.garbage) {
            c.s.write_all(&[0xEE; 64])?;
            continue;
        }
        c.command(sqe, icd)?;
    }
}

fn take_one(a: &AtomicU32) -> bool {
    a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

fn inval<E: std::fmt::Debug>(e: E) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e:?}"))
}

impl Conn<'_> {
    fn read_pdu(&mut self) -> std::io::Result<(PduLayout, Vec<u8>)> {
        let mut h = [0u8; pdu::CH_LEN];
        read_exact(&mut self.s, &mut h)?;
        let ch = CommonHeader::decode(&h).map_err(inval)?;
        let layout = PduLayout::from_common(ch, self.digests, 1 << 20).map_err(inval)?;
        let mut buf = vec![0u8; layout.plen];
        buf[..8].copy_from_slice(&h);
        read_exact(&mut self.s, &mut buf[8..])?;
        Ok((layout, buf))
    }

    fn respond(&mut self, sqe: &Sqe, status: Status, dw0: u32) -> std::io::Result<()> {
        let cqe = Cqe {
            dw0,
            dw1: 0,
            sqhd: 0,
            sqid: self.qid,
            cid: sqe.cid,
            status,
        };
        let mut out = [0u8; 64];
        let n = pdu::encode_capsule_resp(&mut out, &cqe, self.digests).map_err(inval)?;
        self.s.write_all(&out[..n])
    }

    fn respond64(&mut self, sqe: &Sqe, v: u64) -> std::io::Result<()> {
        let cqe = Cqe {
            dw0: v as u32,
            dw1: (v >> 32) as u32,
            sqhd: 0,
            sqid: self.qid,
            cid: sqe.cid,
            status: Status::SUCCESS,
        };
        let mut out = [0u8; 64];
        let n = pdu::encode_capsule_resp(&mut out, &cqe, self.digests).map_err(inval)?;
        self.s.write_all(&out[..n])
    }

    /// Sends `data` to the host for command `cid`; with `success` no
    /// CapsuleResp follows.
    fn c2h(&mut self, cid: u16, data: &[u8], success: bool) -> std::io::Result<()> {
        let d = DataHeader {
            cccid: cid,
            ttag: 0,
            datao: 0,
            datal: data.len() as u32,
        };
        let mut out = [0u8; 64];
        let n =
            pdu::encode_c2h_data(&mut out, &d, true, success, self.digests, 0).map_err(inval)?;
        let mut v = out[..n].to_vec();
        v.extend_from_slice(data);
        if self.digests.data {
            let mut crc = wc_nvme_wire::crc32c(data);
            if take_one(&self.sh.faults.corrupt_ddgst) {
                crc ^= 0xdead_beef;
            }
            v.extend_from_slice(&crc.to_le_bytes());
        }
        self.s.write_all(&v)
    }

    /// Gets `len` bytes of write data for `sqe` (in capsule or by R2T).
    fn write_data(&mut self, sqe: &Sqe, icd: Vec<u8>, len: usize) -> std::io::Result<Vec<u8>> {
        match sqe.sgl.placement() {
            Ok(DataPlacement::InCapsule { .. }) => {
                self.sh
                    .stats
                    .in_capsule_writes
                    .fetch_add(1, Ordering::Relaxed);
                Ok(icd)
            }
            _ => {
                self.sh.stats.r2ts.fetch_add(1, Ordering::Relaxed);
                let r = R2T {
                    cccid: sqe.cid,
                    ttag: 1,
                    r2to: 0,
                    r2tl: len as u32,
                };
                let mut out = [0u8; 64];
                let n = pdu::encode_r2t(&mut out, &r, self.digests).map_err(inval)?;
                self.s.write_all(&out[..n])?;
                let mut data = vec![0u8; len];
                let mut got = 0;
                while got < len {
                    let (layout, buf) = self.read_pdu()?;
                    let d = match pdu::decode_header(&buf, &layout).map_err(inval)? {
                        PduHeader::H2CData(d) => d,
                        PduHeader::CapsuleCmd(next) => {
                            pdu::check_data_digest(&buf, &layout).map_err(inval)?;
                            self.backlog
                                .push_back((next, buf[layout.data_range()].to_vec()));
                            continue;
                        }
                        _ => return Err(inval("expected H2CData")),
                    };
                    pdu::check_data_digest(&buf, &layout).map_err(inval)?;
                    if d.datao as usize != got || d.datal as usize > self.sh.maxh2cdata as usize {
                        return Err(inval("H2CData out of order or too long"));
                    }
                    let src = &buf[layout.data_range()];
                    data[got..got + src.len()].copy_from_slice(src);
                    got += src.len();
                }
                Ok(data)
            }
        }
    }

    fn command(&mut self, sqe: Sqe, icd: Vec<u8>) -> std::io::Result<()> {
        if sqe.opcode == FABRICS {
            return self.fabrics(sqe, icd);
        }
        if self.qid == 0 {
            return self.admin(sqe);
        }
        self.sh.stats.io_commands.fetch_add(1, Ordering::Relaxed);
        let bs = self.sh.block_size as usize;
        let blocks = self.sh.data.lock().unwrap().len() / bs;
        match sqe.opcode {
            io::READ | io::WRITE | io::WRITE_ZEROES => {
                let rw = RwCommand::parse(&sqe);
                let end = rw.slba as usize + rw.nlb as usize;
                if end > blocks || sqe.nsid != 1 {
                    return self.respond(&sqe, Status::LBA_OUT_OF_RANGE, 0);
                }
                let range = rw.slba as usize * bs..end * bs;
                match sqe.opcode {
                    io::READ => {
                        let mut data = self.sh.data.lock().unwrap()[range].to_vec();
                        if take_one(&self.sh.faults.short_reads) {
                            data.truncate(data.len() - bs);
                            self.c2h(sqe.cid, &data, false)?;
                            return self.respond(&sqe, Status::SUCCESS, 0);
                        }
                        if self.sh.faults.c2h_success.load(Ordering::SeqCst) {
                            return self.c2h(sqe.cid, &data, true);
                        }
                        self.c2h(sqe.cid, &data, false)?;
                        self.respond(&sqe, Status::SUCCESS, 0)
                    }
                    io::WRITE => {
                        let data = self.write_data(&sqe, icd, range.len())?;
                        self.sh.data.lock().unwrap()[range].copy_from_slice(&data);
                        self.respond(&sqe, Status::SUCCESS, 0)
                    }
                    _ => {
                        self.sh.data.lock().unwrap()[range].fill(0);
                        self.respond(&sqe, Status::SUCCESS, 0)
                    }
                }
            }
            io::FLUSH => {
                self.sh.stats.flushes.fetch_add(1, Ordering::Relaxed);
                self.respond(&sqe, Status::SUCCESS, 0)
            }
            io::DATASET_MANAGEMENT => {
                let d = DsmCommand::parse(&sqe);
                let data = self.write_data(&sqe, icd, d.data_len())?;
                for r in command::dsm_ranges(&data) {
                    let end = r.slba as usize + r.nlb as usize;
                    if end > blocks {
                        return self.respond(&sqe, Status::LBA_OUT_OF_RANGE, 0);
                    }
                    if d.deallocate {
                        self.sh.data.lock().unwrap()[r.slba as usize * bs..end * bs].fill(0);
                    }
                }
                self.respond(&sqe, Status::SUCCESS, 0)
            }
            _ => self.respond(&sqe, Status::INVALID_OPCODE, 0),
        }
    }

    fn fabrics(&mut self, sqe: Sqe, icd: Vec<u8>) -> std::io::Result<()> {
        match sqe.fctype() {
            fctype::CONNECT => {
                let c = ConnectCommand::parse(&sqe);
                let d = fabrics::ConnectData::decode(&icd).map_err(inval)?;
                if d.subnqn != self.sh.subnqn {
                    return self.respond(&sqe, Status(0x0184), 0);
                }
                self.qid = c.qid;
                self.sh.stats.connects.fetch_add(1, Ordering::Relaxed);
                self.respond(&sqe, Status::SUCCESS, fabrics::connect_success_dw0(1))
            }
            fctype::PROPERTY_GET => {
                let p = PropertyCommand::parse(&sqe);
                let v: u64 = match p.offset {
                    property::CAP => Capabilities {
                        mqes: 128,
                        cqr: true,
                        timeout_500ms: 2,
                        css_nvm: true,
                        mpsmin: 0,
                        mpsmax: 0,
                    }
                    .to_u64(),
                    property::VS => property::VS_1_3 as u64,
                    property::CC => self.cc as u64,
                    property::CSTS => (self.cc & property::cc::EN) as u64,
                    _ => return self.respond(&sqe, Status::INVALID_FIELD, 0),
                };
                self.respond64(&sqe, v)
            }
            fctype::PROPERTY_SET => {
                let p = PropertyCommand::parse(&sqe);
                if p.offset == property::CC {
                    self.cc = p.value as u32;
                }
                self.respond(&sqe, Status::SUCCESS, 0)
            }
            _ => self.respond(&sqe, Status::INVALID_OPCODE, 0),
        }
    }

    fn admin(&mut self, sqe: Sqe) -> std::io::Result<()> {
        match sqe.opcode {
            admin::IDENTIFY => {
                let id = IdentifyCommand::parse(&sqe);
                let mut b = vec![0u8; IDENTIFY_LEN];
                match id.cns {
                    identify::cns::CONTROLLER => IdentifyController {
                        vid: 0,
                        ssvid: 0,
                        serial: "MOCK0001",
                        model: "mock target",
                        firmware: "1",
                        mdts: 0,
                        cntlid: 1,
                        ver: property::VS_1_3,
                        oaes: 0,
                        cntrltype: identify::cntrltype::IO,
                        oacs: 0,
                        acl: 3,
                        aerl: 3,
                        lpa: 0,
                        elpe: 0,
                        kas: 1,
                        sqes: 0x66,
                        cqes: 0x44,
                        maxcmd: 128,
                        nn: 1,
                        oncs: identify::oncs::DSM | identify::oncs::WRITE_ZEROES,
                        vwc: 1,
                        sgls: 1 | 1 << 20,
                        mnan: 0,
                        subnqn: &self.sh.subnqn,
                        ioccsz: (64 + self.sh.icd) / 16,
                        iorcsz: 1,
                        icdoff: 0,
                        fcatt: 0,
                        msdbd: 1,
                    }
                    .encode(&mut b)
                    .map_err(inval)?,
                    identify::cns::ACTIVE_NS_LIST => {
                        identify::encode_active_ns_list(&mut b, id.nsid, [1]).map_err(inval)?;
                    }
                    identify::cns::NAMESPACE => {
                        let bs = self.sh.block_size;
                        let n = (self.sh.data.lock().unwrap().len() / bs as usize) as u64;
                        IdentifyNamespace {
                            nsze: n,
                            ncap: n,
                            nuse: n,
                            nsfeat: 0,
                            nlbaf: 0,
                            flbas: 0,
                            dlfeat: 0,
                            nmic: 0,
                            nguid: [7; 16],
                            eui64: [0; 8],
                            lbads: bs.trailing_zeros() as u8,
                        }
                        .encode(&mut b)
                        .map_err(inval)?;
                    }
                    _ => return self.respond(&sqe, Status::INVALID_FIELD, 0),
                }
                self.c2h(sqe.cid, &b, false)?;
                self.respond(&sqe, Status::SUCCESS, 0)
            }
            admin::SET_FEATURES => {
                let f = FeatureCommand::parse(&sqe);
                if f.fid == feature::NUMBER_OF_QUEUES {
                    return self.respond(&sqe, Status::SUCCESS, feature::num_queues_value(4, 4));
                }
                self.respond(&sqe, Status::SUCCESS, 0)
            }
            admin::KEEP_ALIVE => {
                self.sh.stats.keep_alives.fetch_add(1, Ordering::Relaxed);
                self.respond(&sqe, Status::SUCCESS, 0)
            }
            _ => self.respond(&sqe, Status::INVALID_OPCODE, 0),
        }
    }
}
