//! One NVMe/TCP queue pair, host side: the TCP connection, ICReq/ICResp,
//! Fabrics Connect, and the command slots (one per command that may be
//! outstanding, preallocated: the I/O path does not allocate).
//!
//! The queue pair is a state machine driven by [`Qpair::poll`], called by
//! its owner's reactor poller; nothing here blocks. Commands go out in
//! capsules (with their data when it fits the target's in-capsule size),
//! larger writes answer the target's R2Ts with H2CData PDUs, reads land
//! from C2HData PDUs straight into the bdev I/O's buffers.
//!
//! Anything the target sends that breaks the protocol (a PDU of the wrong
//! type or size, a digest that does not match, data beyond a command, an
//! unknown command ID) ends the connection with an error: the owner then
//! takes the unfinished I/O back ([`Qpair::take_unfinished`]) and the
//! controller reconnects.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::time::Duration;

use futures::channel::oneshot;
use wc_bdev::{Io, IoStatus, IoType};
use wc_nvme_wire::pdu::{self, Digests, IcReq, PduHeader, R2T};
use wc_nvme_wire::{Cqe, Frame, Framer, Role, SglDescriptor, Sqe, Status, WireError};

use crate::cmd;
use crate::sock::{Conn, ConnectPoll};

/// Largest data one command carries (bdev I/O above it is split): bounds
/// the receive buffer, which must hold a whole C2HData PDU.
pub(crate) const MAX_XFER: u32 = 128 * 1024;
/// Receive buffer: one maximal C2HData PDU plus headers and digests.
const RX_CAP: usize = MAX_XFER as usize + 512;
/// NVMe/TCP: the admin queue takes 8 KiB of in-capsule data.
pub(crate) const ADMIN_ICD: u32 = 8192;
/// Reads per poll, so one busy queue cannot starve the reactor.
const READS_PER_POLL: usize = 8;
/// Pieces one `writev` gathers (headers and write data).
const TX_IOV: usize = 256;

/// Why a queue pair stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QpError {
    /// The socket failed or closed.
    Io(String),
    /// The target broke the protocol.
    Protocol(String),
    /// The target refused the connection parameters.
    Refused(String),
    /// Something took longer than allowed.
    Timeout(&'static str),
    /// The queue pair was closed by us.
    Closed,
}

impl std::fmt::Display for QpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QpError::Io(s) => write!(f, "connection error: {s}"),
            QpError::Protocol(s) => write!(f, "protocol error: {s}"),
            QpError::Refused(s) => write!(f, "refused: {s}"),
            QpError::Timeout(s) => write!(f, "timed out: {s}"),
            QpError::Closed => write!(f, "closed"),
        }
    }
}

fn proto(e: WireError) -> QpError {
    QpError::Protocol(e.to_string())
}

/// What a queue pair is told when it is created.
#[derive(Debug, Clone)]
pub(crate) struct QpConfig {
    pub addr: std::net::SocketAddr,
    /// 0 for the admin queue.
    pub qid: u16,
    /// Commands outstanding at once (the SQ has one entry more).
    pub depth: u16,
    pub hdgst: bool,
    pub ddgst: bool,
    pub connect_timeout: Duration,
    pub hostnqn: String,
    pub subnqn: String,
    pub hostid: [u8; 16],
    /// 0xFFFF (dynamic) for the admin queue, the admin's CNTLID for I/O.
    pub cntlid: u16,
    /// Keep-alive timeout in ms (admin queue only).
    pub kato_ms: u32,
    pub sq_flow_control: bool,
    /// In-capsule data the target takes on this queue (bytes).
    pub icd: u32,
}

/// Connection phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Not connected (never started, or closed after an error).
    Down,
    /// TCP connect in progress.
    TcpConnecting,
    /// ICReq sent, waiting for ICResp.
    IcWait,
    /// Fabrics Connect sent.
    FabricsConnect,
    /// Commands flow.
    Ready,
}

/// Result of an admin command: its completion and the data it returned.
pub(crate) type AdminReply = Result<(Cqe, Vec<u8>), QpError>;

enum SlotKind {
    Free,
    /// A piece of bdev I/O `parent` (index into the parent table), `off`
    /// bytes into its data.
    Io {
        parent: u16,
        off: u64,
    },
    /// An admin command awaited by a task; `data` in or out.
    Admin {
        data: Vec<u8>,
        tx: Option<oneshot::Sender<AdminReply>>,
    },
    /// The Fabrics Connect of this queue pair.
    Connect,
    /// A Keep Alive the queue pair sends on its own.
    KeepAlive,
}

struct Slot {
    kind: SlotKind,
    /// Data bytes of the command.
    len: u32,
    /// Data goes host to controller.
    write: bool,
    /// C2H data bytes received so far.
    received: u32,
    /// The last C2HData carried SUCCESS: no CapsuleResp follows.
    done_by_data: bool,
    /// Range of a DSM (one 16-byte range per command).
    dsm: [u8; 16],
    /// When it was sent (ticks), for timeouts.
    started: u64,
}

struct Parent {
    io: Option<Io>,
    pending: u16,
    status: IoStatus,
}

/// Write data that leaves from the bdev I/O's own buffers (no copy into
/// `tx`): it goes out after the first `at` bytes of `tx`.
struct TxData {
    at: usize,
    parent: u16,
    off: u64,
    len: usize,
    /// End of this data in the whole outgoing stream (tx and data).
    end: usize,
}

/// One queue pair.
pub(crate) struct Qpair {
    cfg: QpConfig,
    phase: Phase,
    conn: Option<Conn>,
    deadline: u64,
    framer: Framer,
    digests: Digests,
    cpda: u8,
    maxh2cdata: u32,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    tx: Vec<u8>,
    /// Write data interleaved with `tx`, in stream order.
    tx_data: VecDeque<TxData>,
    /// Bytes of `tx_data` queued.
    tx_data_len: usize,
    /// Bytes of the stream (tx and tx_data) already sent.
    tx_sent: usize,
    slots: Vec<Slot>,
    free: Vec<u16>,
    parents: Vec<Parent>,
    free_parents: Vec<u16>,
    /// CNTLID the target gave in the Connect response.
    cntlid: u16,
    /// Why the last connection ended.
    last_error: Option<QpError>,
    /// Keep Alives sent and answered (diagnostics, tests).
    pub keep_alives: u64,
}

/// `Slot::started` of a command without a timeout (an AER).
const UNTIMED: u64 = u64::MAX;

fn ticks_of(d: Duration) -> u64 {
    wc_reactor::tick::duration_to_ticks(d)
}

impl Qpair {
    pub(crate) fn new(cfg: QpConfig) -> Qpair {
        let depth = cfg.depth.max(1) as usize;
        let slots = (0..depth)
            .map(|_| Slot {
                kind: SlotKind::Free,
                len: 0,
                write: false,
                received: 0,
                done_by_data: false,
                dsm: [0; 16],
                started: 0,
            })
            .collect();
        let parents = (0..depth)
            .map(|_| Parent {
                io: None,
                pending: 0,
                status: IoStatus::Success,
            })
            .collect();
        Qpair {
            cfg,
            phase: Phase::Down,
            conn: None,
            deadline: 0,
            framer: Framer::new(Role::Host),
            digests: Digests::default(),
            cpda: 0,
            maxh2cdata: 0,
            rx: vec![0; RX_CAP],
            rx_start: 0,
            rx_end: 0,
            tx: Vec::with_capacity(64 * 1024),
            tx_data: VecDeque::with_capacity(depth),
            tx_data_len: 0,
            tx_sent: 0,
            slots,
            free: (0..depth as u16).rev().collect(),
            parents,
            free_parents: (0..depth as u16).rev().collect(),
            cntlid: 0,
            last_error: None,
            keep_alives: 0,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    pub(crate) fn cntlid(&self) -> u16 {
        self.cntlid
    }

    pub(crate) fn last_error(&self) -> Option<&QpError> {
        self.last_error.as_ref()
    }

    /// Starts connecting (TCP, then ICReq, then Fabrics Connect).
    pub(crate) fn start(&mut self) -> Result<(), QpError> {
        self.reset_buffers();
        self.last_error = None;
        let conn = Conn::start(self.cfg.addr).map_err(|e| QpError::Io(e.to_string()))?;
        self.conn = Some(conn);
        self.phase = Phase::TcpConnecting;
        self.deadline = wc_reactor::tick::ticks() + ticks_of(self.cfg.connect_timeout);
        Ok(())
    }

    fn reset_buffers(&mut self) {
        self.framer = Framer::new(Role::Host);
        self.digests = Digests::default();
        self.rx_start = 0;
        self.rx_end = 0;
        self.tx.clear();
        self.tx_data.clear();
        self.tx_data_len = 0;
        self.tx_sent = 0;
    }

    /// Commands outstanding.
    pub(crate) fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Tick at which the oldest outstanding command was sent.
    pub(crate) fn oldest_started(&self) -> Option<u64> {
        self.slots
            .iter()
            .filter(|s| !matches!(s.kind, SlotKind::Free) && s.started != UNTIMED)
            .map(|s| s.started)
            .min()
    }

    /// Drives the connection: connect steps, sending, receiving. `Ok(true)`
    /// when it did work; an error means the connection is gone (call
    /// [`take_unfinished`](Self::take_unfinished)).
    pub(crate) fn poll(&mut self) -> Result<bool, QpError> {
        let r = self.poll_inner();
        if let Err(e) = &r {
            self.fail(e.clone());
        }
        r
    }

    fn poll_inner(&mut self) -> Result<bool, QpError> {
        match self.phase {
            Phase::Down => Ok(false),
            Phase::TcpConnecting => {
                let Some(conn) = self.conn.as_mut() else {
                    return Err(QpError::Closed);
                };
                match conn
                    .poll_connect()
                    .map_err(|e| QpError::Io(e.to_string()))?
                {
                    ConnectPoll::Pending => {
                        self.check_deadline("TCP connect")?;
                        Ok(false)
                    }
                    ConnectPoll::Ready => {
                        self.send_ic_req()?;
                        self.phase = Phase::IcWait;
                        self.flush()?;
                        Ok(true)
                    }
                }
            }
            Phase::IcWait | Phase::FabricsConnect => {
                let busy = self.flush()? | self.receive()?;
                if self.phase != Phase::Ready {
                    self.check_deadline("NVMe/TCP connection setup")?;
                }
                Ok(busy)
            }
            Phase::Ready => {
                let mut busy = self.flush()?;
                busy |= self.receive()?;
                busy |= self.flush()?;
                Ok(busy)
            }
        }
    }

    fn check_deadline(&self, what: &'static str) -> Result<(), QpError> {
        if wc_reactor::tick::ticks() > self.deadline {
            Err(QpError::Timeout(what))
        } else {
            Ok(())
        }
    }

    fn send_ic_req(&mut self) -> Result<(), QpError> {
        let mut dgst = 0;
        if self.cfg.hdgst {
            dgst |= pdu::dgst::HDGST_ENABLE;
        }
        if self.cfg.ddgst {
            dgst |= pdu::dgst::DDGST_ENABLE;
        }
        let req = IcReq {
            pfv: pdu::PFV_1_0,
            hpda: 0,
            dgst,
            maxr2t: 0,
        };
        let mut b = [0u8; pdu::IC_LEN];
        pdu::encode_ic_req(&mut b, &req).map_err(proto)?;
        self.tx.extend_from_slice(&b);
        Ok(())
    }

    /// Writes queued bytes (headers from `tx`, write data from the I/O
    /// buffers, one `writev`) until the socket stops taking them.
    fn flush(&mut self) -> Result<bool, QpError> {
        let mut busy = false;
        let total = self.tx.len() + self.tx_data_len;
        while self.tx_sent < total {
            let Some(conn) = self.conn.as_mut() else {
                return Err(QpError::Closed);
            };
            let mut iov = [IoSlice::new(&[]); TX_IOV];
            let k = gather(
                &self.tx,
                &self.tx_data,
                &self.parents,
                self.tx_sent,
                &mut iov,
            )
            .ok_or_else(|| QpError::Protocol("queued write data lost its I/O".into()))?;
            match conn.write_vectored(&iov[..k]) {
                Ok(0) => return Err(QpError::Io("connection closed while sending".into())),
                Ok(n) => {
                    self.tx_sent += n;
                    busy = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(QpError::Io(e.to_string())),
            }
        }
        if self.tx_sent == total {
            self.tx.clear();
            self.tx_data.clear();
            self.tx_data_len = 0;
            self.tx_sent = 0;
        }
        Ok(busy)
    }

    /// Reads and handles every whole PDU the socket has.
    fn receive(&mut self) -> Result<bool, QpError> {
        let mut busy = false;
        for _ in 0..READS_PER_POLL {
            if self.rx_end == self.rx.len() {
                // Make room: move the partial PDU to the front.
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            let Some(conn) = self.conn.as_mut() else {
                return Err(QpError::Closed);
            };
            let room = self.rx.len() - self.rx_end;
            let n = match conn.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err(QpError::Io("target closed the connection".into())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(QpError::Io(e.to_string())),
            };
            self.rx_end += n;
            busy = true;
            self.parse()?;
            if self.rx_start == self.rx_end {
                self.rx_start = 0;
                self.rx_end = 0;
            }
            if n < room {
                // The socket is empty: another read would only say EAGAIN.
                // The next poll reads again.
                break;
            }
        }
        Ok(busy)
    }

    fn parse(&mut self) -> Result<(), QpError> {
        loop {
            let avail = &self.rx[self.rx_start..self.rx_end];
            let layout = match self.framer.poll(avail).map_err(proto)? {
                Frame::Need(_) => return Ok(()),
                Frame::Header(l) => l,
            };
            if layout.plen > self.rx.len() {
                return Err(QpError::Protocol(format!(
                    "PDU of {} bytes exceeds the receive buffer",
                    layout.plen
                )));
            }
            if avail.len() < layout.plen {
                if self.rx_start + layout.plen > self.rx.len() {
                    self.rx.copy_within(self.rx_start..self.rx_end, 0);
                    self.rx_end -= self.rx_start;
                    self.rx_start = 0;
                }
                return Ok(());
            }
            let start = self.rx_start;
            self.rx_start += layout.plen;
            self.handle_pdu(start, layout)?;
        }
    }

    fn handle_pdu(&mut self, start: usize, layout: pdu::PduLayout) -> Result<(), QpError> {
        let buf = &self.rx[start..start + layout.plen];
        let header = pdu::decode_header(buf, &layout).map_err(proto)?;
        match header {
            PduHeader::IcResp(r) => {
                if self.phase != Phase::IcWait {
                    return Err(QpError::Protocol("ICResp after initialization".into()));
                }
                let hd = r.dgst & pdu::dgst::HDGST_ENABLE != 0;
                let dd = r.dgst & pdu::dgst::DDGST_ENABLE != 0;
                if hd != self.cfg.hdgst || dd != self.cfg.ddgst {
                    return Err(QpError::Refused(format!(
                        "target answered digests header={hd} data={dd}, asked header={} data={}",
                        self.cfg.hdgst, self.cfg.ddgst
                    )));
                }
                self.digests = Digests {
                    header: hd,
                    data: dd,
                };
                self.cpda = r.cpda;
                self.maxh2cdata = r.maxh2cdata;
                self.framer.initialized(self.digests, MAX_XFER);
                self.send_connect()?;
                self.phase = Phase::FabricsConnect;
                Ok(())
            }
            PduHeader::CapsuleResp(cqe) => self.on_cqe(cqe),
            PduHeader::C2HData(d) => {
                pdu::check_data_digest(buf, &layout).map_err(proto)?;
                let last = layout.ch.flags & pdu::flags::DATA_LAST != 0;
                let success = layout.ch.flags & pdu::flags::DATA_SUCCESS != 0;
                self.on_c2h(start, &layout, d, last, success)
            }
            PduHeader::R2T(r) => self.on_r2t(r),
            PduHeader::C2HTermReq(t) => Err(QpError::Protocol(format!(
                "target terminated the connection (FES {:#x}, FEI {:#x})",
                t.fes, t.fei
            ))),
            other => Err(QpError::Protocol(format!(
                "unexpected PDU from the target: {other:?}"
            ))),
        }
    }

    fn slot_for(&self, cid: u16, what: &str) -> Result<usize, QpError> {
        let i = cid as usize;
        match self.slots.get(i) {
            Some(s) if !matches!(s.kind, SlotKind::Free) => Ok(i),
            _ => Err(QpError::Protocol(format!(
                "{what} for command {cid}, which is not outstanding"
            ))),
        }
    }

    fn on_c2h(
        &mut self,
        start: usize,
        layout: &pdu::PduLayout,
        d: pdu::DataHeader,
        last: bool,
        success: bool,
    ) -> Result<(), QpError> {
        let i = self.slot_for(d.cccid, "C2HData")?;
        let (len, write, received) = {
            let s = &self.slots[i];
            (s.len, s.write, s.received)
        };
        if write || d.datao != received || d.datao as u64 + d.datal as u64 > len as u64 {
            return Err(QpError::Protocol(format!(
                "C2HData for command {} at offset {} length {} does not fit its {} byte read \
                 ({} received)",
                d.cccid, d.datao, d.datal, len, received
            )));
        }
        let data_start = start + layout.data_offset;
        let data = &self.rx[data_start..data_start + layout.data_len];
        let slot = &mut self.slots[i];
        match &mut slot.kind {
            SlotKind::Io { parent, off } => {
                let at = *off + d.datao as u64;
                if let Some(io) = self.parents[*parent as usize].io.as_mut() {
                    copy_into_io(io, at, data);
                }
            }
            SlotKind::Admin { data: buf, .. } => {
                let at = d.datao as usize;
                let n = data.len().min(buf.len().saturating_sub(at));
                buf[at..at + n].copy_from_slice(&data[..n]);
            }
            SlotKind::Connect | SlotKind::KeepAlive | SlotKind::Free => {
                return Err(QpError::Protocol(format!(
                    "C2HData for command {} that reads nothing",
                    d.cccid
                )))
            }
        }
        slot.received += d.datal;
        if success {
            if slot.received != slot.len {
                return Err(QpError::Protocol(format!(
                    "C2HData with SUCCESS after {} of {} bytes",
                    slot.received, slot.len
                )));
            }
            slot.done_by_data = true;
            let cqe = Cqe {
                cid: d.cccid,
                ..Cqe::default()
            };
            self.complete(i, cqe);
        } else if last && slot.received != slot.len {
            // The target may still send the CapsuleResp; the short read is
            // caught there.
        }
        Ok(())
    }

    fn on_r2t(&mut self, r: R2T) -> Result<(), QpError> {
        let i = self.slot_for(r.cccid, "R2T")?;
        let s = &self.slots[i];
        let end = r.r2to as u64 + r.r2tl as u64;
        if !s.write || end > s.len as u64 {
            return Err(QpError::Protocol(format!(
                "R2T for command {} offset {} length {} outside its {} byte write",
                r.cccid, r.r2to, r.r2tl, s.len
            )));
        }
        let chunk = self.maxh2cdata.max(4096);
        let mut off = r.r2to;
        while off < end as u32 {
            let n = chunk.min(end as u32 - off);
            let last = off + n == end as u32;
            let dh = pdu::DataHeader {
                cccid: r.cccid,
                ttag: r.ttag,
                datao: off,
                datal: n,
            };
            let mut hb = [0u8; 128];
            let hlen =
                pdu::encode_h2c_data(&mut hb, &dh, last, self.digests, self.cpda).map_err(proto)?;
            self.tx.extend_from_slice(&hb[..hlen]);
            self.append_data(i, off as u64, n as usize);
            off += n;
        }
        Ok(())
    }

    /// Appends `n` data bytes of slot `i` from `off` (and the data digest):
    /// bdev I/O data without digests is sent from the I/O's buffers.
    fn append_data(&mut self, i: usize, off: u64, n: usize) {
        if let SlotKind::Io { parent, off: base } = self.slots[i].kind {
            if !self.digests.data && self.parents[parent as usize].io.is_some() {
                self.tx_data_len += n;
                self.tx_data.push_back(TxData {
                    at: self.tx.len(),
                    parent,
                    off: base + off,
                    len: n,
                    end: self.tx.len() + self.tx_data_len,
                });
                return;
            }
        }
        let at = self.tx.len();
        self.tx.resize(at + n, 0);
        let dst = &mut self.tx[at..at + n];
        match &self.slots[i].kind {
            SlotKind::Io { parent, off: base } => {
                if let Some(io) = self.parents[*parent as usize].io.as_ref() {
                    copy_from_io(io, *base + off, dst);
                }
            }
            SlotKind::Admin { data, .. } => {
                let o = off as usize;
                dst.copy_from_slice(&data[o..o + n]);
            }
            SlotKind::Connect | SlotKind::KeepAlive | SlotKind::Free => {}
        }
        if self.digests.data {
            let d = wc_nvme_wire::digest::crc32c(&self.tx[at..at + n]);
            self.tx.extend_from_slice(&d.to_le_bytes());
        }
    }

    fn on_cqe(&mut self, cqe: Cqe) -> Result<(), QpError> {
        let i = self.slot_for(cqe.cid, "CapsuleResp")?;
        let s = &self.slots[i];
        if s.done_by_data {
            return Err(QpError::Protocol(format!(
                "CapsuleResp for command {} after a C2HData with SUCCESS",
                cqe.cid
            )));
        }
        if matches!(s.kind, SlotKind::Connect) {
            self.slots[i].kind = SlotKind::Free;
            self.free.push(i as u16);
            if cqe.status != Status::SUCCESS {
                return Err(QpError::Refused(format!(
                    "Fabrics Connect of queue {} failed with status {:#06x}",
                    self.cfg.qid, cqe.status.0
                )));
            }
            self.cntlid = cqe.dw0 as u16;
            self.phase = Phase::Ready;
            return Ok(());
        }
        if let SlotKind::Io { parent, .. } = s.kind {
            // The I/O's buffers go back to its owner when this completes
            // it: none of its write data may still be waiting to be sent
            // from them (a target answering before it has all the data).
            if s.write && self.parents[parent as usize].pending <= 1 && self.data_unsent(parent) {
                return Err(QpError::Protocol(format!(
                    "write command {} completed before its data was sent",
                    cqe.cid
                )));
            }
        }
        self.complete(i, cqe);
        Ok(())
    }

    /// Whether write data of bdev I/O `parent` still waits to be sent.
    fn data_unsent(&self, parent: u16) -> bool {
        self.tx_data
            .iter()
            .any(|d| d.parent == parent && d.end > self.tx_sent)
    }

    /// Finishes slot `i` with `cqe`.
    fn complete(&mut self, i: usize, cqe: Cqe) {
        let slot = &mut self.slots[i];
        let kind = std::mem::replace(&mut slot.kind, SlotKind::Free);
        let (got, len) = (slot.received, slot.len);
        let short_read = !slot.write && got != len && cqe.status == Status::SUCCESS;
        slot.received = 0;
        slot.done_by_data = false;
        self.free.push(i as u16);
        match kind {
            SlotKind::Io { parent, .. } => {
                let status = if short_read {
                    tracing::warn!(
                        "nvme queue {}: read command {i} completed after {got} of {len} bytes",
                        self.cfg.qid
                    );
                    IoStatus::Failed(libc::EIO)
                } else {
                    cmd::io_status(cqe.status)
                };
                self.finish_piece(parent, status);
            }
            SlotKind::Admin { data, tx } => {
                if let Some(tx) = tx {
                    let _ = tx.send(Ok((cqe, data)));
                }
            }
            SlotKind::KeepAlive => self.keep_alives += 1,
            SlotKind::Connect | SlotKind::Free => {}
        }
    }

    fn finish_piece(&mut self, parent: u16, status: IoStatus) {
        let p = &mut self.parents[parent as usize];
        if !status.is_success() && p.status.is_success() {
            p.status = status;
        }
        p.pending = p.pending.saturating_sub(1);
        if p.pending == 0 {
            let st = p.status;
            if let Some(io) = p.io.take() {
                io.complete(st);
            }
            self.free_parents.push(parent);
        }
    }

    fn alloc_slot(&mut self) -> Option<usize> {
        let i = self.free.pop()? as usize;
        let s = &mut self.slots[i];
        s.received = 0;
        s.done_by_data = false;
        s.started = wc_reactor::tick::ticks();
        Some(i)
    }

    /// Queues capsule `sqe` (its CID set to slot `i`) with in-capsule data
    /// when the write fits, else with a transport SGL.
    fn send_capsule(&mut self, i: usize, mut sqe: Sqe) -> Result<(), QpError> {
        sqe.cid = i as u16;
        let (len, write) = (self.slots[i].len, self.slots[i].write);
        let in_capsule = write && len > 0 && len <= self.cfg.icd;
        sqe = if len == 0 {
            sqe.with_sgl(SglDescriptor::default())
        } else if in_capsule {
            sqe.with_sgl(SglDescriptor::in_capsule(len))
        } else {
            sqe.with_sgl(SglDescriptor::transport(len))
        };
        let data_len = if in_capsule { len as usize } else { 0 };
        let mut hb = [0u8; 256];
        let hlen = pdu::encode_capsule_cmd(&mut hb, &sqe, data_len, self.digests, self.cpda)
            .map_err(proto)?;
        self.tx.extend_from_slice(&hb[..hlen]);
        if in_capsule {
            self.append_data(i, 0, data_len);
        }
        Ok(())
    }

    fn send_connect(&mut self) -> Result<(), QpError> {
        let Some(i) = self.alloc_slot() else {
            return Err(QpError::Protocol("no slot for Fabrics Connect".into()));
        };
        let data = cmd::connect_data(
            &self.cfg.hostid,
            self.cfg.cntlid,
            &self.cfg.subnqn,
            &self.cfg.hostnqn,
        );
        let sqe = cmd::connect(
            self.cfg.qid,
            self.cfg.depth,
            self.cfg.kato_ms,
            self.cfg.sq_flow_control,
        );
        let s = &mut self.slots[i];
        s.kind = SlotKind::Admin {
            data: data.to_vec(),
            tx: None,
        };
        s.len = data.len() as u32;
        s.write = true;
        // The admin queue takes 8 KiB in capsule, an I/O queue IOCCSZ: the
        // 1 KiB of Connect data always fits (Connect needs it in capsule).
        let icd = self.cfg.icd;
        self.cfg.icd = icd.max(data.len() as u32);
        let r = self.send_capsule(i, sqe);
        self.cfg.icd = icd;
        self.slots[i].kind = SlotKind::Connect;
        r
    }

    /// Sends an admin command; the reply arrives on the returned channel
    /// (cancelled if the connection drops first). `data` is the buffer the
    /// command reads (`write`) or fills.
    pub(crate) fn submit_admin(
        &mut self,
        sqe: Sqe,
        data: Vec<u8>,
        write: bool,
    ) -> Result<oneshot::Receiver<AdminReply>, QpError> {
        self.submit_admin_in_slot(sqe, data, write)
            .map(|(_, rx)| rx)
    }

    fn submit_admin_in_slot(
        &mut self,
        sqe: Sqe,
        data: Vec<u8>,
        write: bool,
    ) -> Result<(usize, oneshot::Receiver<AdminReply>), QpError> {
        if self.phase != Phase::Ready {
            return Err(QpError::Closed);
        }
        let i = self
            .alloc_slot()
            .ok_or(QpError::Protocol("admin queue full".into()))?;
        let (tx, rx) = oneshot::channel();
        let s = &mut self.slots[i];
        s.len = data.len() as u32;
        s.write = write;
        s.kind = SlotKind::Admin { data, tx: Some(tx) };
        self.send_capsule(i, sqe)?;
        Ok((i, rx))
    }

    /// Sends an Asynchronous Event Request: an admin command the target
    /// answers only when it has an event, so it is left out of the
    /// command timeouts ([`oldest_started`](Self::oldest_started)).
    pub(crate) fn submit_aer(&mut self) -> Result<oneshot::Receiver<AdminReply>, QpError> {
        let (i, rx) = self.submit_admin_in_slot(cmd::async_event_request(), Vec::new(), false)?;
        self.slots[i].started = UNTIMED;
        Ok(rx)
    }

    /// Sends a Keep Alive unless one is outstanding.
    pub(crate) fn keep_alive(&mut self) -> Result<(), QpError> {
        if self.phase != Phase::Ready
            || self
                .slots
                .iter()
                .any(|s| matches!(s.kind, SlotKind::KeepAlive))
        {
            return Ok(());
        }
        let Some(i) = self.alloc_slot() else {
            return Ok(());
        };
        let s = &mut self.slots[i];
        s.len = 0;
        s.write = false;
        s.kind = SlotKind::KeepAlive;
        self.send_capsule(i, cmd::keep_alive())
    }

    /// Commands bdev I/O `io` on namespace `nsid` needs (pieces of at most
    /// `max_blocks`, or the type's own limit).
    pub(crate) fn pieces(io: &Io, max_blocks: u64) -> usize {
        let n = io.num_blocks();
        let per = cmd::max_blocks_per_command(io.io_type(), max_blocks);
        if n == 0 {
            return 1;
        }
        n.div_ceil(per) as usize
    }

    /// Starts bdev I/O `io` on namespace `nsid`; gives it back when there
    /// are not enough free slots (the caller queues it).
    pub(crate) fn submit_io(&mut self, io: Io, nsid: u32, max_blocks: u64) -> Result<(), Io> {
        if self.phase != Phase::Ready {
            return Err(io);
        }
        let pieces = Self::pieces(&io, max_blocks);
        if pieces > self.free.len() || self.free_parents.is_empty() {
            return Err(io);
        }
        let Some(pi) = self.free_parents.pop() else {
            return Err(io);
        };
        let t = io.io_type();
        let bs = io.block_size() as u64;
        let per = cmd::max_blocks_per_command(t, max_blocks);
        let (first, total) = (io.offset_blocks(), io.num_blocks());
        let fua = io.fua();
        let p = &mut self.parents[pi as usize];
        p.io = Some(io);
        p.pending = pieces as u16;
        p.status = IoStatus::Success;
        let mut done = 0u64;
        for _ in 0..pieces {
            let n = if t == IoType::Flush {
                0
            } else {
                per.min(total - done)
            };
            let Some(i) = self.alloc_slot() else {
                // Counted above: cannot happen; fail the piece rather than
                // lose the I/O.
                self.finish_piece(pi, IoStatus::Failed(libc::EIO));
                continue;
            };
            let lba = first + done;
            let s = &mut self.slots[i];
            s.kind = SlotKind::Io {
                parent: pi,
                off: done * bs,
            };
            let (sqe, len, write) = match t {
                IoType::Read => (cmd::read(nsid, lba, n as u32), (n * bs) as u32, false),
                IoType::Write => (cmd::write(nsid, lba, n as u32, fua), (n * bs) as u32, true),
                IoType::Flush => (cmd::flush(nsid), 0, false),
                IoType::WriteZeroes => (cmd::write_zeroes(nsid, lba, n as u32), 0, false),
                IoType::Unmap => {
                    s.dsm = cmd::dsm_range(lba, n as u32);
                    (cmd::dsm_deallocate(nsid), 16, true)
                }
                // Not advertised (io_type_supported): the channel never
                // hands one over; a flush is the harmless answer.
                IoType::Reset => (cmd::flush(nsid), 0, false),
            };
            s.len = len;
            s.write = write;
            if let Err(e) = self.send_unit(i, sqe, t) {
                tracing::warn!("nvme queue {}: cannot encode a command: {e}", self.cfg.qid);
                self.complete(
                    i,
                    Cqe {
                        status: Status::INTERNAL_ERROR,
                        ..Cqe::default()
                    },
                );
            }
            done += n;
        }
        Ok(())
    }

    fn send_unit(&mut self, i: usize, sqe: Sqe, t: IoType) -> Result<(), QpError> {
        if t != IoType::Unmap {
            return self.send_capsule(i, sqe);
        }
        // DSM: the 16-byte range goes in capsule, from the slot itself.
        let mut sqe = sqe;
        sqe.cid = i as u16;
        let sqe = sqe.with_sgl(SglDescriptor::in_capsule(16));
        let mut hb = [0u8; 256];
        let hlen =
            pdu::encode_capsule_cmd(&mut hb, &sqe, 16, self.digests, self.cpda).map_err(proto)?;
        self.tx.extend_from_slice(&hb[..hlen]);
        let range = self.slots[i].dsm;
        self.tx.extend_from_slice(&range);
        if self.digests.data {
            let d = wc_nvme_wire::digest::crc32c(&range);
            self.tx.extend_from_slice(&d.to_le_bytes());
        }
        Ok(())
    }

    /// Marks the connection dead with `e` (closing the socket).
    pub(crate) fn fail(&mut self, e: QpError) {
        if self.phase != Phase::Down {
            tracing::debug!("nvme queue {}: {e}", self.cfg.qid);
        }
        if let Some(c) = self.conn.take() {
            c.shutdown();
        }
        self.phase = Phase::Down;
        self.last_error = Some(e);
    }

    /// Closes the connection (if any) and hands back every unfinished bdev
    /// I/O, in submission order as far as it is known; admin waiters see
    /// their channel cancelled.
    pub(crate) fn take_unfinished(&mut self, out: &mut VecDeque<Io>) {
        if self.phase != Phase::Down {
            self.fail(QpError::Closed);
        }
        for (i, s) in self.slots.iter_mut().enumerate() {
            if !matches!(s.kind, SlotKind::Free) {
                s.kind = SlotKind::Free;
                s.received = 0;
                s.done_by_data = false;
                self.free.push(i as u16);
            }
        }
        for (i, p) in self.parents.iter_mut().enumerate() {
            if let Some(io) = p.io.take() {
                out.push_back(io);
                p.pending = 0;
                self.free_parents.push(i as u16);
            }
        }
        self.reset_buffers();
    }
}

/// Fills `iov` with the unsent part of the outgoing stream, `tx`
/// interleaved with the write data of `data` (read in place from the
/// bdev I/Os of `parents`), skipping the first `sent` bytes. Returns the
/// number of pieces filled; None when an I/O whose data is queued is gone
/// (on_cqe prevents that).
fn gather<'a>(
    tx: &'a [u8],
    data: &VecDeque<TxData>,
    parents: &'a [Parent],
    sent: usize,
    iov: &mut [IoSlice<'a>],
) -> Option<usize> {
    let mut k = 0;
    let mut skip = sent;
    let mut push = |piece: &'a [u8], k: &mut usize| -> bool {
        if skip >= piece.len() {
            skip -= piece.len();
            return true;
        }
        if *k == iov.len() {
            return false;
        }
        iov[*k] = IoSlice::new(&piece[skip..]);
        skip = 0;
        *k += 1;
        true
    };
    let mut at = 0;
    for d in data {
        if !push(&tx[at..d.at], &mut k) {
            return Some(k);
        }
        at = d.at;
        let io = parents[d.parent as usize].io.as_ref()?;
        let (start, end) = (d.off, d.off + d.len as u64);
        let mut seg_off = 0u64;
        for v in io.iovs() {
            let seg_end = seg_off + v.len as u64;
            let (lo, hi) = (start.max(seg_off), end.min(seg_end));
            if lo < hi {
                // The bdev I/O (borrowed in `parents`) owns its segments
                // until it completes; on_cqe refuses a completion while
                // its data is unsent, and the data is only read here.
                // SAFETY: the segment outlives the slice; `lo..hi` is in it.
                let piece = unsafe {
                    std::slice::from_raw_parts(
                        v.base.add((lo - seg_off) as usize),
                        (hi - lo) as usize,
                    )
                };
                if !push(piece, &mut k) {
                    return Some(k);
                }
            }
            seg_off = seg_end;
        }
    }
    push(&tx[at..], &mut k);
    Some(k)
}

/// Copies `src` into `io`'s segments starting `at` bytes into its data.
fn copy_into_io(io: &mut Io, at: u64, src: &[u8]) {
    let end = at + src.len() as u64;
    io.for_each_segment_mut(|seg_off, seg| {
        let seg_end = seg_off + seg.len() as u64;
        let lo = at.max(seg_off);
        let hi = end.min(seg_end);
        if lo < hi {
            let d = &mut seg[(lo - seg_off) as usize..(hi - seg_off) as usize];
            d.copy_from_slice(&src[(lo - at) as usize..(hi - at) as usize]);
        }
    });
}

/// Copies `dst.len()` bytes of `io`'s data from `at` into `dst`.
fn copy_from_io(io: &Io, at: u64, dst: &mut [u8]) {
    let end = at + dst.len() as u64;
    io.for_each_segment(|seg_off, seg| {
        let seg_end = seg_off + seg.len() as u64;
        let lo = at.max(seg_off);
        let hi = end.min(seg_end);
        if lo < hi {
            dst[(lo - at) as usize..(hi - at) as usize]
                .copy_from_slice(&seg[(lo - seg_off) as usize..(hi - seg_off) as usize]);
        }
    });
}
