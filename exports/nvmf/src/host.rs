//! A minimal blocking NVMe/TCP host on `wc-nvme-wire`: ICReq, Connect,
//! Property Get/Set, in-capsule or R2T/H2CData writes, C2HData reads, and
//! pipelined I/O. For tests (ours, the integration suite) and the loopback
//! benchmark tool, not a bdev: the NVMe/TCP initiator bdev is its own
//! module. Every wire error comes back as a [`HostError`].

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use wc_nvme_wire::command::{IdentifyCommand, RwCommand};
use wc_nvme_wire::fabrics::{
    property, ConnectCommand, ConnectData, PropertyCommand, CNTLID_DYNAMIC,
};
use wc_nvme_wire::pdu::{self, dgst, flags, MAX_HEADER_LEN};
use wc_nvme_wire::{
    crc32c, opcode, Cqe, DataHeader, Digests, Frame, Framer, IcReq, Pdu, PduHeader, Role,
    SglDescriptor, Sqe, Status, WireError,
};

/// What went wrong on the host side.
#[derive(Debug)]
pub enum HostError {
    Io(io::Error),
    Wire(WireError),
    /// The controller sent something the host did not expect.
    Protocol(String),
    /// The connection closed.
    Closed,
    /// A command completed with an error status.
    Status(Status),
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostError::Io(e) => write!(f, "I/O error: {e}"),
            HostError::Wire(e) => write!(f, "wire error: {e}"),
            HostError::Protocol(m) => write!(f, "protocol error: {m}"),
            HostError::Closed => f.write_str("connection closed"),
            HostError::Status(s) => write!(f, "NVMe status {s}"),
        }
    }
}

impl std::error::Error for HostError {}

impl From<io::Error> for HostError {
    fn from(e: io::Error) -> Self {
        HostError::Io(e)
    }
}

impl From<WireError> for HostError {
    fn from(e: WireError) -> Self {
        HostError::Wire(e)
    }
}

pub type Result<T> = std::result::Result<T, HostError>;

/// A received PDU.
#[derive(Debug, Clone)]
pub struct Rx {
    pub header: PduHeader,
    pub flags: u8,
    pub data: Vec<u8>,
}

/// One NVMe/TCP connection (one queue pair) of a host.
pub struct Host {
    pub stream: TcpStream,
    pub digests: Digests,
    framer: Framer,
    /// Receive buffer: bytes `[start, end)` are unparsed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Busy-poll the socket instead of sleeping in `read`.
    polling: bool,
    next_cid: u16,
    /// In-capsule data limit for writes (8 KiB admin, IOCCSZ on I/O queues).
    pub icd: usize,
    pub maxh2c: u32,
    pub cpda: u8,
}

/// Default host NQN of the test host.
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";

impl Host {
    /// TCP connect plus ICReq/ICResp.
    pub fn connect(addr: SocketAddr, hdgst: bool, ddgst: bool) -> Result<Host> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut h = Host {
            stream,
            digests: Digests::default(),
            framer: Framer::new(Role::Host),
            buf: vec![0u8; 256 * 1024],
            start: 0,
            end: 0,
            polling: false,
            next_cid: 0,
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
        )?;
        h.stream.write_all(&b[..n])?;
        match h.recv()?.header {
            PduHeader::IcResp(r) => {
                h.digests = Digests {
                    header: r.dgst & dgst::HDGST_ENABLE != 0,
                    data: r.dgst & dgst::DDGST_ENABLE != 0,
                };
                h.maxh2c = r.maxh2cdata;
                h.cpda = r.cpda;
                h.framer.initialized(h.digests, 16 << 20);
                Ok(h)
            }
            other => Err(HostError::Protocol(format!(
                "expected ICResp, got {other:?}"
            ))),
        }
    }

    /// A fresh command id.
    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    /// Reads one whole PDU.
    pub fn recv(&mut self) -> Result<Rx> {
        let (header, flags, data) = self.recv_ref()?;
        Ok(Rx {
            header,
            flags,
            data: data.to_vec(),
        })
    }

    /// Reads one whole PDU; its data is borrowed from the receive buffer
    /// until the next call (no copy, no allocation).
    pub fn recv_ref(&mut self) -> Result<(PduHeader, u8, &[u8])> {
        loop {
            match self.framer.poll(&self.buf[self.start..self.end])? {
                Frame::Need(n) => self.fill(n)?,
                Frame::Header(l) => {
                    if self.end - self.start < l.plen {
                        let n = l.plen - (self.end - self.start);
                        self.fill(n)?;
                        continue;
                    }
                    let at = self.start;
                    self.start += l.plen;
                    if self.start == self.end {
                        // Nothing buffered after this PDU: the next read
                        // starts at the front (the data stays valid until
                        // then).
                        self.start = 0;
                        self.end = 0;
                    }
                    let p = Pdu::decode(&self.buf[at..at + l.plen], &l)?;
                    return Ok((p.header, l.ch.flags, p.data));
                }
            }
        }
    }

    /// Reads at least `at_least` more bytes into the receive buffer.
    fn fill(&mut self, at_least: usize) -> Result<()> {
        if self.buf.len() - self.end < at_least {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < at_least {
                let want = self.end + at_least.max(64 * 1024);
                self.buf.resize(want, 0);
            }
        }
        let mut got = 0;
        while got < at_least {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(HostError::Closed),
                Ok(n) => {
                    self.end += n;
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.polling && e.kind() == io::ErrorKind::WouldBlock => {
                    std::hint::spin_loop();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Busy-polls the socket (non-blocking reads in a loop, as a polling
    /// initiator does) instead of sleeping in `read`: no wake-up latency,
    /// one core spent.
    pub fn set_polling(&mut self, on: bool) -> Result<()> {
        self.stream.set_nonblocking(on)?;
        self.polling = on;
        Ok(())
    }

    /// Sends a command capsule with `data` in the capsule.
    pub fn send_capsule(&mut self, sqe: &Sqe, data: &[u8]) -> Result<()> {
        let mut h = [0u8; MAX_HEADER_LEN + 8];
        let n = pdu::encode_capsule_cmd(&mut h, sqe, data.len(), self.digests, self.cpda)?;
        let mut out = Vec::with_capacity(n + data.len() + 4);
        out.extend_from_slice(&h[..n]);
        out.extend_from_slice(data);
        if self.digests.data && !data.is_empty() {
            out.extend_from_slice(&crc32c(data).to_le_bytes());
        }
        self.write_all(&out)?;
        Ok(())
    }

    /// Appends a command capsule with in-capsule `data` to `out` (to send
    /// many with one write: [`Host::send_raw`]).
    pub fn encode_capsule(&self, out: &mut Vec<u8>, sqe: &Sqe, data: &[u8]) -> Result<()> {
        let mut h = [0u8; MAX_HEADER_LEN + 8];
        let n = pdu::encode_capsule_cmd(&mut h, sqe, data.len(), self.digests, self.cpda)?;
        out.extend_from_slice(&h[..n]);
        out.extend_from_slice(data);
        if self.digests.data && !data.is_empty() {
            out.extend_from_slice(&crc32c(data).to_le_bytes());
        }
        Ok(())
    }

    /// Writes all of `bytes`, spinning on a full socket when polling.
    fn write_all(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            match self.stream.write(bytes) {
                Ok(0) => return Err(HostError::Closed),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.polling && e.kind() == io::ErrorKind::WouldBlock => {
                    std::hint::spin_loop();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Sends bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.write_all(bytes)?;
        Ok(())
    }

    /// Whether received bytes wait to be parsed (the next [`Host::recv`]
    /// may not need the socket).
    pub fn has_buffered(&self) -> bool {
        self.start < self.end
    }

    /// Sends one H2CData PDU.
    pub fn send_h2c(
        &mut self,
        cccid: u16,
        ttag: u16,
        datao: u32,
        data: &[u8],
        last: bool,
    ) -> Result<()> {
        let mut h = [0u8; 64];
        let d = DataHeader {
            cccid,
            ttag,
            datao,
            datal: data.len() as u32,
        };
        let n = pdu::encode_h2c_data(&mut h, &d, last, self.digests, self.cpda)?;
        let mut out = Vec::with_capacity(n + data.len() + 4);
        out.extend_from_slice(&h[..n]);
        out.extend_from_slice(data);
        if self.digests.data {
            out.extend_from_slice(&crc32c(data).to_le_bytes());
        }
        self.write_all(&out)?;
        Ok(())
    }

    /// Sends `sqe` with its data: in the capsule up to the in-capsule
    /// limit, else described for R2T (answered in [`Host::handle`]).
    pub fn submit(&mut self, sqe: Sqe, out: &[u8], in_len: usize) -> Result<()> {
        let inline = !out.is_empty() && out.len() <= self.icd;
        let len = if out.is_empty() { in_len } else { out.len() };
        let sgl = if len == 0 {
            SglDescriptor::in_capsule(0)
        } else if inline {
            SglDescriptor::in_capsule(len as u32)
        } else {
            SglDescriptor::transport(len as u32)
        };
        self.send_capsule(&sqe.with_sgl(sgl), if inline { out } else { &[] })
    }

    /// Answers an R2T with H2CData from `out`.
    pub fn answer_r2t(&mut self, r: &wc_nvme_wire::R2T, out: &[u8]) -> Result<()> {
        let end = r
            .r2to
            .checked_add(r.r2tl)
            .filter(|e| *e as usize <= out.len())
            .ok_or_else(|| HostError::Protocol(format!("R2T beyond the data: {r:?}")))?;
        let mut off = r.r2to;
        while off < end {
            let n = (end - off).min(self.maxh2c.max(4096));
            let chunk = &out[off as usize..(off + n) as usize];
            self.send_h2c(r.cccid, r.ttag, off, chunk, off + n == end)?;
            off += n;
        }
        Ok(())
    }

    /// Runs one command to completion: writes `out`, reads `in_len` bytes.
    pub fn exec(&mut self, sqe: Sqe, out: &[u8], in_len: usize) -> Result<(Cqe, Vec<u8>)> {
        let cid = sqe.cid;
        self.submit(sqe, out, in_len)?;
        let mut data = vec![0u8; in_len];
        loop {
            let rx = self.recv()?;
            match rx.header {
                PduHeader::R2T(r) if r.cccid == cid => self.answer_r2t(&r, out)?,
                PduHeader::C2HData(d) if d.cccid == cid => {
                    let end = d.datao as usize + d.datal as usize;
                    if end > data.len() {
                        return Err(HostError::Protocol("C2HData beyond the buffer".into()));
                    }
                    data[d.datao as usize..end].copy_from_slice(&rx.data);
                    if rx.flags & flags::DATA_SUCCESS != 0 {
                        let cqe = Cqe {
                            cid,
                            ..Cqe::default()
                        };
                        return Ok((cqe, data));
                    }
                }
                PduHeader::CapsuleResp(c) if c.cid == cid => return Ok((c, data)),
                other => {
                    return Err(HostError::Protocol(format!("unexpected {other:?}")));
                }
            }
        }
    }

    /// Fabrics Connect of queue `qid`.
    pub fn fabric_connect(
        &mut self,
        qid: u16,
        sqsize: u32,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        kato: u32,
    ) -> Result<Cqe> {
        let cid = self.cid();
        let sqe = ConnectCommand {
            recfmt: 0,
            qid,
            sqsize,
            cattr: 0,
            kato,
        }
        .build(cid)?;
        let mut d = [0u8; 1024];
        ConnectData {
            hostid: [0x11; 16],
            cntlid,
            subnqn,
            hostnqn,
        }
        .encode(&mut d)?;
        Ok(self.exec(sqe, &d, 0)?.0)
    }

    pub fn prop_get(&mut self, offset: u32, size8: bool) -> Result<u64> {
        let cid = self.cid();
        let sqe = PropertyCommand {
            size8,
            offset,
            value: 0,
        }
        .build_get(cid);
        let c = self.exec(sqe, &[], 0)?.0;
        ok(c.status)?;
        Ok(c.result_u64())
    }

    pub fn prop_set(&mut self, offset: u32, value: u64) -> Result<Cqe> {
        let cid = self.cid();
        let sqe = PropertyCommand {
            size8: false,
            offset,
            value,
        }
        .build_set(cid);
        Ok(self.exec(sqe, &[], 0)?.0)
    }

    /// Admin queue: Connect, enable (CC.EN, then CSTS.RDY). Returns the
    /// host and the controller id.
    pub fn admin(
        addr: SocketAddr,
        subnqn: &str,
        digests: (bool, bool),
        kato: u32,
    ) -> Result<(Host, u16)> {
        let mut h = Host::connect(addr, digests.0, digests.1)?;
        let c = h.fabric_connect(0, 32, subnqn, HOSTNQN, CNTLID_DYNAMIC, kato)?;
        ok(c.status)?;
        let cntlid = c.dw0 as u16;
        let cc = property::cc::EN
            | (6 << property::cc::IOSQES_SHIFT)
            | (4 << property::cc::IOCQES_SHIFT);
        ok(h.prop_set(property::CC, cc as u64)?.status)?;
        if h.prop_get(property::CSTS, false)? as u32 & property::csts::RDY == 0 {
            return Err(HostError::Protocol("controller not ready".into()));
        }
        Ok((h, cntlid))
    }

    /// I/O queue `qid` of controller `cntlid`, `depth` entries.
    pub fn io(
        addr: SocketAddr,
        subnqn: &str,
        digests: (bool, bool),
        cntlid: u16,
        qid: u16,
        depth: u32,
    ) -> Result<Host> {
        let mut h = Host::connect(addr, digests.0, digests.1)?;
        h.icd = 4096;
        let c = h.fabric_connect(qid, depth, subnqn, HOSTNQN, cntlid, 0)?;
        ok(c.status)?;
        Ok(h)
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> Result<(Cqe, Vec<u8>)> {
        let cid = self.cid();
        let sqe = IdentifyCommand {
            cns,
            cntid: 0,
            csi: 0,
            nsid,
        }
        .build(cid);
        self.exec(sqe, &[], 4096)
    }

    /// Writes `data` (a multiple of 512-byte blocks) at `slba`.
    pub fn write(&mut self, nsid: u32, slba: u64, data: &[u8], fua: bool) -> Result<Cqe> {
        let cid = self.cid();
        let sqe = RwCommand {
            slba,
            nlb: (data.len() / 512) as u32,
            fua,
            deac: false,
        }
        .build(opcode::io::WRITE, cid, nsid)?;
        Ok(self.exec(sqe, data, 0)?.0)
    }

    /// Reads `len` bytes (512-byte blocks) at `slba`.
    pub fn read(&mut self, nsid: u32, slba: u64, len: usize) -> Result<(Cqe, Vec<u8>)> {
        let cid = self.cid();
        let sqe = RwCommand {
            slba,
            nlb: (len / 512) as u32,
            fua: false,
            deac: false,
        }
        .build(opcode::io::READ, cid, nsid)?;
        self.exec(sqe, &[], len)
    }
}

/// `Err(HostError::Status)` unless `s` is a success.
pub fn ok(s: Status) -> Result<()> {
    if s.is_success() {
        Ok(())
    } else {
        Err(HostError::Status(s))
    }
}
