//! Queue pairs: one NVMe/TCP connection each, owned by one reactor.
//!
//! Accepted sockets are handed round-robin to the reactors. Each reactor
//! with connections runs one epoll instance polled with a zero timeout by
//! an active poller (`nvmf_tcp_conns`) and a 100 ms sweep (`nvmf_tcp_sweep`:
//! keep-alive, deleted subsystems and controllers, handshake timeouts),
//! as the NBD export does.
//!
//! A connection reads into a receive buffer and frames PDUs with the wire
//! crate's [`Framer`]. Command data (in-capsule, or H2CData after our R2T)
//! goes into the command's slot of a per-queue-pair [`Arena`] made at
//! Connect, sized by SQSIZE and the transport's maximum I/O: whatever part
//! of the data is not yet in the receive buffer is read from the socket
//! straight into the slot (no copy). Bdev I/O runs on the slot buffer, and
//! read data leaves from it (C2HData) by `writev`. Nothing is allocated per
//! I/O. A connection that dies with I/O in flight is kept (socket shut)
//! until the bdev has completed it, so no buffer goes away under an I/O.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wc_bdev::{BdevChannel, Io, IoCompletion, IoStatus, IoVec};
use wc_nvme_wire::command::{dsm_ranges, DsmCommand, RwCommand};
use wc_nvme_wire::fabrics::{
    connect_data_offset, connect_invalid_param_dw0, connect_success_dw0, ConnectCommand,
    ConnectData, CNTLID_DYNAMIC, CONNECT_DATA_LEN,
};
use wc_nvme_wire::log::ErrorLogEntry;
use wc_nvme_wire::opcode::{self, fctype, io as io_op, Direction};
use wc_nvme_wire::pdu::{self, dgst, DIGEST_LEN, PFV_1_0};
use wc_nvme_wire::{
    crc32c, decode_header, Cqe, DataHeader, DataPlacement, Digests, Frame, Framer, IcResp,
    PduHeader, PduLayout, Role, Sqe, Status, TermFes, WireError, R2T,
};
use wc_reactor::epoll::Epoll;
use wc_reactor::{PollStatus, PollerHandle, ReactorHandle};

use crate::admin::{self, Outcome, MAX_AERS};
use crate::arena::Arena;
use crate::opts::TransportOpts;
use crate::subsystem::{Controller, Namespace, QpairInfo, Subsystem};
use crate::target::{self, Listener};

/// Receive buffer: many small PDUs per read; large data bypasses it.
const RX_CAP: usize = 64 * 1024;
/// Data still missing at least this large is read straight into its slot.
const DIRECT_READ_MIN: usize = 4096;
/// ICReq and Connect must come within this time of the accept.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reads per wake-up, so one busy host cannot starve the others.
const READS_PER_PUMP: usize = 16;
/// A connection that read bytes within this many of its reactor's
/// iterations is "hot": read directly each iteration, without asking
/// epoll first (at depth the next commands are usually already there, and
/// an empty read costs what an empty epoll_wait does, so staying hot
/// through a pause costs nothing: 64 Ki busy iterations are tens of ms,
/// longer than a host's stall on a shared machine; 4 Ki went cold in them).
const HOT_IDLE_POLLS: u32 = 64 * 1024;
/// While connections are hot, epoll is still asked every this many
/// iterations (other connections, hang-ups, room to send).
const EPOLL_EVERY: u32 = 16;
/// Hot connections per reactor at most (a flood of connections must not
/// turn into a read per connection per iteration).
const MAX_HOT: usize = 8;
/// Largest SQSIZE of the admin queue (SPDK's default max_aq_depth is 128).
const MIN_SLOT_SIZE: usize = 16 * 1024;
/// The largest H2CData payload we accept (and announce in ICResp).
const MAX_H2C_DATA: u32 = 128 * 1024;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
static ROUND_ROBIN: AtomicUsize = AtomicUsize::new(0);
static LIVE_CONNS: AtomicUsize = AtomicUsize::new(0);

/// Connections alive in the process (tests check that they all go).
pub fn live_connections() -> usize {
    LIVE_CONNS.load(Ordering::Acquire)
}

/// Hands an accepted connection to the next reactor, round-robin.
pub(crate) fn dispatch(stream: TcpStream, peer: SocketAddr, listener: Arc<Listener>) {
    let Some(opts) = target::transport() else {
        return;
    };
    let Some(r) = wc_reactor::try_current() else {
        return;
    };
    let all = r.siblings();
    let i = ROUND_ROBIN.fetch_add(1, Ordering::Relaxed) % all.len().max(1);
    if let Some(h) = all.get(i) {
        h.send(move || adopt(stream, peer, listener, opts));
    }
}

/// Per-reactor state: the epoll instance and the connections it serves.
struct NvmfReactor {
    ep: Option<Epoll>,
    conns: RefCell<HashMap<u64, Rc<ConnCell>>>,
    /// Connections with completions to send: flushed once per reactor
    /// iteration, so the responses of a batch of completions leave in one
    /// `writev`.
    to_flush: RefCell<Vec<u64>>,
    /// Hot connections (see HOT_IDLE_POLLS).
    hot: RefCell<Vec<u64>>,
    iteration: Cell<u32>,
    pollers: RefCell<Option<(PollerHandle, PollerHandle)>>,
    handle: ReactorHandle,
}

impl NvmfReactor {
    fn new() -> NvmfReactor {
        let ep = Epoll::new()
            .map_err(|e| tracing::error!("nvmf: epoll_create1 failed: {e}"))
            .ok();
        NvmfReactor {
            ep,
            conns: RefCell::new(HashMap::new()),
            to_flush: RefCell::new(Vec::with_capacity(64)),
            hot: RefCell::new(Vec::with_capacity(16)),
            iteration: Cell::new(0),
            pollers: RefCell::new(None),
            handle: wc_reactor::current().handle(),
        }
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, id: u64) -> io::Result<()> {
        match &self.ep {
            Some(ep) => ep.ctl(op, fd, events, id),
            None => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    fn poll(&self) -> PollStatus {
        let mut any = self.flush_completions();
        any |= self.poll_hot();
        let Some(ep) = &self.ep else {
            return PollStatus::from(any);
        };
        let it = self.iteration.get().wrapping_add(1);
        self.iteration.set(it);
        // A sleeping reactor polls rarely anyway: epoll each time, so
        // cold connections do not wait 16 sleeps.
        if !self.hot.borrow().is_empty() && it % EPOLL_EVERY != 0 && !self.handle.in_interrupt() {
            return PollStatus::from(any);
        }
        let mut buf = Epoll::ready_buf();
        for (id, events) in ep.poll_now(&mut buf) {
            any = true;
            let conn = self.conns.borrow().get(&id).cloned();
            if let Some(c) = conn {
                if c.hot.get() && events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 == 0 {
                    // Read (and flushed) by poll_hot this iteration.
                    continue;
                }
                if c.on_event(events) && !c.hot.get() && self.hot.borrow().len() < MAX_HOT {
                    c.hot.set(true);
                    self.hot.borrow_mut().push(id);
                }
                self.reap_if_done(&c);
            }
        }
        PollStatus::from(any)
    }

    /// Reads the hot connections directly; those idle for HOT_IDLE_POLLS
    /// iterations go back to waiting for epoll. Returns whether any read
    /// bytes.
    fn poll_hot(&self) -> bool {
        let mut any = false;
        let mut i = 0;
        loop {
            let Some(id) = self.hot.borrow().get(i).copied() else {
                break;
            };
            let conn = self.conns.borrow().get(&id).cloned();
            let keep = match conn {
                Some(c) => {
                    let (read, hot) = c.pump_hot();
                    any |= read;
                    self.reap_if_done(&c);
                    c.hot.set(hot);
                    hot
                }
                None => false,
            };
            if keep {
                i += 1;
            } else {
                self.hot.borrow_mut().swap_remove(i);
            }
        }
        any
    }

    /// Sends what completions queued since the last iteration.
    fn flush_completions(&self) -> bool {
        let mut any = false;
        loop {
            let Some(id) = self.to_flush.borrow_mut().pop() else {
                break;
            };
            any = true;
            let conn = self.conns.borrow().get(&id).cloned();
            if let Some(c) = conn {
                if let Ok(mut inner) = c.inner.try_borrow_mut() {
                    inner.flush_queued = false;
                    inner.send_completions();
                }
                self.reap_if_done(&c);
            }
        }
        any
    }

    fn sweep(&self) -> PollStatus {
        let conns: Vec<Rc<ConnCell>> = self.conns.borrow().values().cloned().collect();
        for c in conns {
            if let Ok(mut inner) = c.inner.try_borrow_mut() {
                inner.check_liveness();
                inner.pump();
            }
            self.reap_if_done(&c);
        }
        PollStatus::Idle
    }

    /// Forgets a connection that is dead and has no I/O in flight.
    fn reap_if_done(&self, c: &Rc<ConnCell>) {
        let done = match c.inner.try_borrow_mut() {
            Ok(mut inner) => {
                if inner.dead {
                    inner.teardown();
                }
                inner.dead && inner.inflight_io() == 0
            }
            Err(_) => false,
        };
        if !done {
            return;
        }
        let Ok(mut conns) = self.conns.try_borrow_mut() else {
            return;
        };
        if conns.remove(&c.id).is_none() {
            return;
        }
        let empty = conns.is_empty();
        drop(conns);
        if let Ok(inner) = c.inner.try_borrow() {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, inner.stream.as_raw_fd(), 0, c.id);
        }
        if empty {
            if let Some((a, b)) = self.pollers.borrow_mut().take() {
                a.unregister();
                b.unregister();
            }
        }
    }
}

fn local() -> Option<Rc<NvmfReactor>> {
    wc_reactor::try_current().map(|r| r.local(NvmfReactor::new))
}

/// Runs the liveness sweep on the current reactor now (after a subsystem
/// or controller went away), so its connections close at once.
pub(crate) fn sweep_now() {
    if let Some(nr) = local() {
        nr.sweep();
    }
}

/// Completes parked Asynchronous Event Requests of admin connection `id`
/// (on its reactor) with the controller's pending events.
pub(crate) fn deliver_events(id: u64) {
    let Some(nr) = local() else { return };
    let c = nr.conns.borrow().get(&id).cloned();
    if let Some(c) = c {
        c.kick(&nr);
    }
}

fn adopt(stream: TcpStream, peer: SocketAddr, listener: Arc<Listener>, opts: Arc<TransportOpts>) {
    let Some(nr) = local() else { return };
    if stream.set_nonblocking(true).is_err() || stream.set_nodelay(true).is_err() {
        return;
    }
    if opts.sock_priority > 0 {
        let prio = opts.sock_priority as libc::c_int;
        // SAFETY: the descriptor is open (owned by `stream`); the option
        // value is a c_int that lives across the call, its size given.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PRIORITY,
                &prio as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::warn!("nvmf: SO_PRIORITY {prio}: {}", io::Error::last_os_error());
        }
    }
    let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let fd = stream.as_raw_fd();
    let thread = format!("nvmf_tgt_poll_group_{:03}", nr.handle.index());
    let cell = Rc::new_cyclic(|me: &Weak<ConnCell>| {
        let completer: Rc<dyn IoCompletion> = Rc::new(Completer { conn: me.clone() });
        ConnCell {
            id,
            hot: Cell::new(false),
            inner: RefCell::new(Conn::new(
                id, stream, peer, listener, opts, completer, thread,
            )),
        }
    });
    let events = libc::EPOLLIN as u32;
    if let Err(e) = nr.ctl(libc::EPOLL_CTL_ADD, fd, events, id) {
        tracing::warn!("nvmf: cannot watch a connection: {e}");
        return;
    }
    if let Ok(mut c) = cell.inner.try_borrow_mut() {
        c.interest = events;
    }
    nr.conns.borrow_mut().insert(id, cell.clone());
    if nr.pollers.borrow().is_none() {
        if let Some(r) = wc_reactor::try_current() {
            let a = nr.clone();
            let p1 = r.register_poller("nvmf_tcp_conns", None, move || a.poll());
            let b = nr.clone();
            let p2 = r.register_poller(
                "nvmf_tcp_sweep",
                Some(Duration::from_millis(100)),
                move || b.sweep(),
            );
            *nr.pollers.borrow_mut() = Some((p1, p2));
        }
    }
    cell.kick(&nr);
}

/// The connection's completion callback: a weak link (a connection is
/// only forgotten once nothing is in flight, so it is always there).
struct Completer {
    conn: Weak<ConnCell>,
}

impl IoCompletion for Completer {
    fn io_done(&self, io: Io, ctx: u64) {
        let Some(c) = self.conn.upgrade() else {
            return;
        };
        let queue = match c.inner.try_borrow_mut() {
            Ok(mut inner) => {
                inner.io_done(io, ctx);
                !std::mem::replace(&mut inner.flush_queued, true)
            }
            Err(_) => {
                tracing::error!("nvmf: completion re-entered a connection");
                return;
            }
        };
        if queue {
            if let Some(nr) = local() {
                nr.to_flush.borrow_mut().push(c.id);
            }
        }
    }
}

struct ConnCell {
    id: u64,
    /// On its reactor's hot list.
    hot: Cell<bool>,
    inner: RefCell<Conn>,
}

impl ConnCell {
    /// Handles an epoll event; returns whether bytes were read.
    fn on_event(&self, events: u32) -> bool {
        let Ok(mut c) = self.inner.try_borrow_mut() else {
            return false;
        };
        if events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
            c.kill("socket error or hang-up");
            return false;
        }
        let before = c.rx_bytes;
        c.pump();
        c.update_interest();
        c.idle_polls = 0;
        c.rx_bytes != before && !c.dead
    }

    /// Reads a hot connection without an epoll event: (bytes were read,
    /// still hot).
    fn pump_hot(&self) -> (bool, bool) {
        let Ok(mut c) = self.inner.try_borrow_mut() else {
            return (false, true);
        };
        let before = c.rx_bytes;
        c.pump();
        c.update_interest();
        let read = c.rx_bytes != before;
        c.idle_polls = if read { 0 } else { c.idle_polls + 1 };
        (read, !c.dead && c.idle_polls < HOT_IDLE_POLLS)
    }

    fn kick(&self, nr: &NvmfReactor) {
        if let Ok(mut c) = self.inner.try_borrow_mut() {
            c.pump();
            c.update_interest();
        }
        if let Some(me) = nr.conns.borrow().get(&self.id).cloned() {
            nr.reap_if_done(&me);
        }
    }
}

/// Where incoming data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// Slot `slot`'s buffer, from `off`.
    Slot { slot: u16, off: usize },
    /// The Connect data buffer (before the queue exists).
    Connect,
    /// Nowhere: data of a command already failed.
    Discard,
}

/// What to do once a PDU's data is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Run the command in the slot.
    Exec(u16),
    /// Complete the slot's command with this status.
    Fail(u16, Status),
    /// Answer a command that got no slot.
    Reply(u16, Status),
    Connect(Sqe),
    /// An H2CData PDU for the slot arrived.
    H2C(u16),
}

#[derive(Debug, Clone, Copy)]
enum RxState {
    /// Expecting a PDU header.
    Header,
    /// Receiving PDU data.
    Data {
        pad: usize,
        sink: Sink,
        len: usize,
        got: usize,
        ddgst: bool,
        digest: [u8; 4],
        digest_got: usize,
        after: After,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Waiting for H2CData after our R2T; `got` bytes so far.
    Receiving {
        got: u32,
    },
    /// Executing (bdev I/O or a parked AER).
    Executing,
    /// Response (and data) queued for sending.
    Sending,
}

/// What multi-step I/O commands do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Single,
    /// Write Zeroes with FUA: flush afterwards.
    ThenFlush,
    /// Compare: the read of the stored data is running.
    Compare,
}

struct Slot {
    state: SlotState,
    sqe: Sqe,
    /// Bytes the command moves (SGL length).
    data_len: u32,
    /// Bdev I/Os outstanding for the command.
    pending: u32,
    status: Status,
    step: Step,
    /// Data for the host when the command succeeds.
    to_host: u32,
}

impl Slot {
    fn free() -> Slot {
        Slot {
            state: SlotState::Free,
            sqe: Sqe::default(),
            data_len: 0,
            pending: 0,
            status: Status::SUCCESS,
            step: Step::Single,
            to_host: 0,
        }
    }
}

/// The namespace view of an I/O queue pair: refreshed when the
/// subsystem's namespace generation moves.
struct NsCache {
    gen: u64,
    entries: Vec<(Arc<Namespace>, Rc<BdevChannel>)>,
}

impl NsCache {
    fn get(&mut self, subsys: &Subsystem, nsid: u32) -> Option<(Arc<Namespace>, Rc<BdevChannel>)> {
        let gen = subsys.ns_gen.load(Ordering::Acquire);
        if gen != self.gen {
            self.gen = gen;
            self.entries.clear();
        }
        if let Some(e) = self.entries.iter().find(|(n, _)| n.nsid == nsid) {
            if !e.0.removed.load(Ordering::Acquire) {
                return Some(e.clone());
            }
            return None;
        }
        let ns = subsys.namespace(nsid)?;
        let chan = ns.desc.channel().ok()?;
        self.entries.push((ns.clone(), chan.clone()));
        Some((ns, chan))
    }
}

/// A connected queue pair.
struct Queue {
    ctrlr: Arc<Controller>,
    qid: u16,
    sqsize: u32,
    arena: Arena,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Bdev I/Os in flight on this queue.
    inflight_io: usize,
    ns: NsCache,
    /// Slots of parked Asynchronous Event Requests.
    aers: Vec<u16>,
    sqhd: u16,
    icd_limit: u32,
}

/// An item to send: a PDU header, then optionally data from a slot and its
/// digest; when it is all out the slot may be released.
struct TxItem {
    hdr: [u8; pdu::TERM_REQ_MAX_PLEN],
    hdr_len: u8,
    data: Option<(u16, u32, u32)>,
    ddgst: [u8; 4],
    ddgst_len: u8,
    release: Option<u16>,
}

impl TxItem {
    fn len(&self) -> usize {
        self.hdr_len as usize
            + self.data.map(|d| d.2 as usize).unwrap_or(0)
            + self.ddgst_len as usize
    }
}

struct Conn {
    id: u64,
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    opts: Arc<TransportOpts>,
    framer: Framer,
    digests: Digests,
    /// Host PDU data alignment (for C2HData).
    hpda: u8,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    rx_state: RxState,
    /// Bytes read from the socket so far (hot-connection bookkeeping).
    rx_bytes: u64,
    /// Reactor iterations since the last read that got bytes.
    idle_polls: u32,
    tx: VecDeque<TxItem>,
    tx_off: usize,
    interest: u32,
    q: Option<Queue>,
    connect_buf: Box<[u8; CONNECT_DATA_LEN]>,
    started: Instant,
    /// A terminate request or Disconnect is queued: send, then close.
    closing: bool,
    dead: bool,
    torn_down: bool,
    /// Queued on the reactor's flush list.
    flush_queued: bool,
    completer: Rc<dyn IoCompletion>,
    thread: String,
}

impl Drop for Conn {
    fn drop(&mut self) {
        LIVE_CONNS.fetch_sub(1, Ordering::AcqRel);
    }
}

fn map_errno(e: i32, write: bool) -> Status {
    match e {
        libc::ENODEV | libc::ENXIO => Status::NAMESPACE_NOT_READY,
        libc::ECANCELED => Status::ABORT_REQUESTED,
        libc::EOPNOTSUPP => Status::INVALID_OPCODE.with_dnr(),
        libc::EINVAL | libc::ERANGE => Status::LBA_OUT_OF_RANGE.with_dnr(),
        libc::EROFS | libc::EPERM | libc::EACCES => Status::ACCESS_DENIED.with_dnr(),
        libc::ENOMEM | libc::EAGAIN | libc::EBUSY => Status::INTERNAL_ERROR,
        _ if write => Status::WRITE_FAULT,
        _ => Status::UNRECOVERED_READ_ERROR,
    }
}

impl Conn {
    fn new(
        id: u64,
        stream: TcpStream,
        peer: SocketAddr,
        listener: Arc<Listener>,
        opts: Arc<TransportOpts>,
        completer: Rc<dyn IoCompletion>,
        thread: String,
    ) -> Conn {
        LIVE_CONNS.fetch_add(1, Ordering::AcqRel);
        Conn {
            id,
            stream,
            peer,
            listener,
            opts,
            framer: Framer::new(Role::Controller),
            digests: Digests::default(),
            hpda: 0,
            rx: vec![0u8; RX_CAP].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            rx_state: RxState::Header,
            rx_bytes: 0,
            idle_polls: 0,
            tx: VecDeque::with_capacity(16),
            tx_off: 0,
            interest: 0,
            q: None,
            connect_buf: Box::new([0u8; CONNECT_DATA_LEN]),
            started: Instant::now(),
            closing: false,
            dead: false,
            torn_down: false,
            flush_queued: false,
            completer,
            thread,
        }
    }

    fn inflight_io(&self) -> usize {
        self.q.as_ref().map(|q| q.inflight_io).unwrap_or(0)
    }

    fn kill(&mut self, why: &str) {
        if !self.dead {
            tracing::debug!(
                "nvmf: closing connection {} from {}: {why}",
                self.id,
                self.peer
            );
            self.dead = true;
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }

    /// Unregisters the queue pair once the connection is dead: the admin
    /// queue takes its controller with it.
    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let Some(q) = &self.q else { return };
        {
            let mut s = q.ctrlr.state();
            s.qpairs.retain(|p| p.conn_id != self.id);
            if let Some(u) = s.qids.get_mut(q.qid as usize) {
                *u = false;
            }
        }
        if q.qid == 0 {
            q.ctrlr.destroy();
        }
    }

    fn check_liveness(&mut self) {
        if self.dead {
            return;
        }
        if let Some(q) = &mut self.q {
            // Let go of removed namespaces (their descriptors) even when no
            // I/O comes to refresh the cache.
            let gen = q.ctrlr.subsys.ns_gen.load(Ordering::Acquire);
            if gen != q.ns.gen {
                q.ns.gen = gen;
                q.ns.entries.clear();
            }
        }
        match &self.q {
            None => {
                if self.started.elapsed() > HANDSHAKE_TIMEOUT {
                    self.kill("no Connect in time");
                }
            }
            Some(q) => {
                let c = &q.ctrlr;
                if c.is_dead() || c.subsys.deleted.load(Ordering::Acquire) {
                    self.kill("controller or subsystem went away");
                } else if q.qid == 0 && c.keep_alive_expired() {
                    tracing::info!(
                        "nvmf: keep-alive timeout of controller {} ({}), tearing it down",
                        c.cntlid,
                        c.hostnqn
                    );
                    c.destroy();
                    self.kill("keep-alive timeout");
                } else if !c.subsys.discovery && !c.subsys.has_listener(&self.listener.addr) {
                    self.kill("listener removed");
                } else if self.listener.closed.load(Ordering::Acquire) {
                    self.kill("listener closed");
                }
            }
        }
    }

    fn wants_input(&self) -> bool {
        !self.dead && !self.closing && (self.rx_end < self.rx.len() || self.rx_start > 0)
    }

    /// Reads, frames, executes and sends as far as possible right now.
    fn pump(&mut self) {
        if self.dead {
            return;
        }
        for _ in 0..READS_PER_PUMP {
            self.process_rx();
            if !self.wants_input() {
                break;
            }
            match self.direct_read() {
                Some(true) => continue,
                Some(false) => break,
                None => {}
            }
            if self.rx_end == self.rx.len() {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            let room = self.rx.len() - self.rx_end;
            match self.stream.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => {
                    self.kill("host closed the connection");
                    break;
                }
                // A read that did not fill the buffer emptied the socket:
                // another would only return EAGAIN (a syscall per wake-up
                // for nothing). The epoll watch is level-triggered, so
                // bytes that arrive meanwhile wake us again.
                Ok(n) if n < room => {
                    self.rx_end += n;
                    self.rx_bytes += n as u64;
                    break;
                }
                Ok(n) => {
                    self.rx_end += n;
                    self.rx_bytes += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.kill(&format!("read: {e}"));
                    break;
                }
            }
        }
        self.process_rx();
        self.deliver_aens();
        self.flush_tx();
        if self.closing && self.tx.is_empty() {
            self.kill("terminated");
        }
    }

    /// After completions: AENs, responses, and a close that waited for
    /// them (no socket read: the epoll poller does that).
    fn send_completions(&mut self) {
        if self.dead {
            return;
        }
        self.deliver_aens();
        self.flush_tx();
        if self.closing && self.tx.is_empty() {
            self.kill("terminated");
        }
        self.update_interest();
    }

    /// When a large part of a PDU's data is missing and nothing is
    /// buffered, reads it straight into its slot (and what follows into
    /// the receive buffer). None when it did not apply; else whether the
    /// socket may have more (the read filled both buffers).
    fn direct_read(&mut self) -> Option<bool> {
        let RxState::Data {
            pad: 0,
            sink: Sink::Slot { slot, off },
            len,
            got,
            ..
        } = self.rx_state
        else {
            return None;
        };
        if self.rx_start != self.rx_end || len - got < DIRECT_READ_MIN {
            return None;
        }
        let Some(q) = &self.q else { return None };
        self.rx_start = 0;
        self.rx_end = 0;
        let room = len - got + self.rx.len();
        // SAFETY: the slot is in Receiving/Executing-before-submit state:
        // no bdev I/O uses its buffer while its data is being received, and
        // no other slice of it is alive.
        let dst = unsafe { q.arena.slice_mut(slot as usize, off + got, len - got) };
        let mut iov = [IoSliceMut::new(dst), IoSliceMut::new(&mut self.rx[..])];
        match self.stream.read_vectored(&mut iov) {
            Ok(0) => self.kill("host closed the connection"),
            Ok(n) => {
                self.rx_bytes += n as u64;
                let direct = n.min(len - got);
                self.rx_end = n - direct;
                if let RxState::Data { got: g, .. } = &mut self.rx_state {
                    *g += direct;
                }
                return Some(n == room);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Some(true),
            Err(e) => self.kill(&format!("read: {e}")),
        }
        Some(false)
    }

    fn process_rx(&mut self) {
        while !self.dead && !self.closing {
            let progressed = match self.rx_state {
                RxState::Header => self.rx_header(),
                RxState::Data { .. } => self.rx_data(),
            };
            if !progressed {
                break;
            }
        }
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
    }

    /// Frames and handles the next PDU header. Returns whether it moved.
    fn rx_header(&mut self) -> bool {
        let avail = &self.rx[self.rx_start..self.rx_end];
        let layout = match self.framer.poll(avail) {
            Ok(Frame::Need(_)) => return false,
            Ok(Frame::Header(l)) => l,
            Err(e) => {
                let hdr_len = avail.len().min(pdu::MAX_HEADER_LEN);
                let mut offending = [0u8; pdu::MAX_HEADER_LEN];
                offending[..hdr_len].copy_from_slice(&avail[..hdr_len]);
                self.fatal(&e, &offending[..hdr_len]);
                return false;
            }
        };
        // Terminate requests and ICReq are small: wait for all of them.
        let small = matches!(
            layout.ch.pdu_type,
            wc_nvme_wire::PduType::IcReq | wc_nvme_wire::PduType::H2CTermReq
        );
        if small && avail.len() < layout.plen {
            return false;
        }
        let header = match decode_header(avail, &layout) {
            Ok(h) => h,
            Err(e) => {
                let mut offending = [0u8; pdu::MAX_HEADER_LEN];
                let n = layout.header_len.min(pdu::MAX_HEADER_LEN);
                offending[..n].copy_from_slice(&avail[..n]);
                self.fatal(&e, &offending[..n]);
                return false;
            }
        };
        match header {
            PduHeader::IcReq(r) => {
                self.rx_start += layout.plen;
                self.on_ic_req(r);
            }
            PduHeader::H2CTermReq(t) => {
                tracing::info!(
                    "nvmf: host {} terminated the connection (FES {:#x}, FEI {:#x})",
                    self.peer,
                    t.fes,
                    t.fei
                );
                self.rx_start += layout.plen;
                self.kill("host sent H2CTermReq");
            }
            PduHeader::CapsuleCmd(sqe) => {
                self.rx_start += layout.header_len;
                self.on_capsule(sqe, &layout);
            }
            PduHeader::H2CData(d) => {
                self.rx_start += layout.header_len;
                self.on_h2c(d, &layout);
            }
            other => {
                let _ = other;
                self.fatal(&WireError::UnexpectedPdu(layout.ch.pdu_type as u8), &[]);
            }
        }
        true
    }

    fn begin_data(&mut self, layout: &PduLayout, sink: Sink, after: After) {
        if layout.data_len == 0 {
            self.rx_state = RxState::Header;
            self.finish_data(after, true);
            return;
        }
        self.rx_state = RxState::Data {
            pad: layout.data_offset - layout.header_len,
            sink,
            len: layout.data_len,
            got: 0,
            ddgst: layout.ddgst,
            digest: [0; 4],
            digest_got: 0,
            after,
        };
    }

    /// Moves buffered bytes into the current data sink.
    fn rx_data(&mut self) -> bool {
        let RxState::Data {
            mut pad,
            sink,
            len,
            mut got,
            ddgst,
            mut digest,
            mut digest_got,
            after,
        } = self.rx_state
        else {
            return false;
        };
        let start = self.rx_start;
        let mut avail = self.rx_end - start;
        let mut used = 0;
        let skip = pad.min(avail);
        pad -= skip;
        used += skip;
        avail -= skip;
        let n = (len - got).min(avail);
        if n > 0 {
            let src = &self.rx[start + used..start + used + n];
            match sink {
                Sink::Slot { slot, off } => {
                    if let Some(q) = &self.q {
                        // SAFETY: the slot receives data: no bdev I/O uses
                        // its buffer and no other slice of it is alive.
                        let dst = unsafe { q.arena.slice_mut(slot as usize, off + got, n) };
                        dst.copy_from_slice(src);
                    }
                }
                Sink::Connect => self.connect_buf[got..got + n].copy_from_slice(src),
                Sink::Discard => {}
            }
            got += n;
            used += n;
            avail -= n;
        }
        if got == len && ddgst && digest_got < DIGEST_LEN {
            let k = (DIGEST_LEN - digest_got).min(avail);
            digest[digest_got..digest_got + k]
                .copy_from_slice(&self.rx[start + used..start + used + k]);
            digest_got += k;
            used += k;
        }
        self.rx_start += used;
        let complete = got == len && (!ddgst || digest_got == DIGEST_LEN);
        if !complete {
            self.rx_state = RxState::Data {
                pad,
                sink,
                len,
                got,
                ddgst,
                digest,
                digest_got,
                after,
            };
            return used > 0;
        }
        self.rx_state = RxState::Header;
        let mut digest_ok = true;
        if ddgst {
            let computed = match sink {
                Sink::Slot { slot, off } => self.q.as_ref().map(|q| {
                    // SAFETY: as above, the slot is ours until we submit.
                    crc32c(unsafe { q.arena.slice(slot as usize, off, len) })
                }),
                Sink::Connect => Some(crc32c(&self.connect_buf[..len])),
                Sink::Discard => None,
            };
            if let Some(c) = computed {
                digest_ok = wc_nvme_wire::check_digest_value(digest, c).is_ok();
            }
            if !digest_ok {
                tracing::warn!("nvmf: data digest error from {}", self.peer);
            }
        }
        self.finish_data(after, digest_ok);
        true
    }

    fn finish_data(&mut self, after: After, digest_ok: bool) {
        let bad = Status::TRANSIENT_TRANSPORT_ERROR;
        match after {
            After::Exec(slot) if digest_ok => self.exec(slot),
            After::Exec(slot) => self.complete(slot, bad, 0, 0),
            After::Fail(slot, st) => self.complete(slot, st, 0, 0),
            After::Reply(cid, st) => self.reply_slotless(cid, st, 0),
            After::Connect(sqe) if digest_ok => self.on_connect(sqe),
            After::Connect(sqe) => self.reply_slotless(sqe.cid, bad, 0),
            After::H2C(slot) => {
                let Some(q) = &mut self.q else { return };
                let s = &mut q.slots[slot as usize];
                if !digest_ok {
                    s.status = bad;
                }
                let done = match s.state {
                    SlotState::Receiving { got } => got >= s.data_len,
                    _ => false,
                };
                if done {
                    s.state = SlotState::Executing;
                    if s.status.is_success() {
                        self.exec(slot);
                    } else {
                        let st = s.status;
                        self.complete(slot, st, 0, 0);
                    }
                }
            }
        }
    }

    /// A protocol error: C2HTermReq (when the error calls for one), then
    /// close.
    fn fatal(&mut self, e: &WireError, offending: &[u8]) {
        tracing::warn!("nvmf: protocol error from {}: {e}", self.peer);
        let (fes, fei) = e.term_fes().unwrap_or((TermFes::InvalidHeaderField, 0));
        let mut item = TxItem {
            hdr: [0; pdu::TERM_REQ_MAX_PLEN],
            hdr_len: 0,
            data: None,
            ddgst: [0; 4],
            ddgst_len: 0,
            release: None,
        };
        if let Ok(n) = pdu::encode_term_req(&mut item.hdr, false, fes, fei, offending) {
            item.hdr_len = n as u8;
            self.tx.push_back(item);
        }
        self.closing = true;
        self.rx_start = self.rx_end;
    }

    fn on_ic_req(&mut self, r: wc_nvme_wire::IcReq) {
        self.hpda = r.hpda;
        self.digests = Digests {
            header: r.dgst & dgst::HDGST_ENABLE != 0,
            data: r.dgst & dgst::DDGST_ENABLE != 0,
        };
        let limit = MAX_H2C_DATA.max(crate::opts::ADMIN_IN_CAPSULE);
        self.framer.initialized(self.digests, limit);
        let mut item = self.new_item();
        let resp = IcResp {
            pfv: PFV_1_0,
            cpda: 0,
            dgst: r.dgst & (dgst::HDGST_ENABLE | dgst::DDGST_ENABLE),
            maxh2cdata: MAX_H2C_DATA,
        };
        if let Ok(n) = pdu::encode_ic_resp(&mut item.hdr, &resp) {
            item.hdr_len = n as u8;
            self.tx.push_back(item);
        }
    }

    fn new_item(&self) -> TxItem {
        TxItem {
            hdr: [0; pdu::TERM_REQ_MAX_PLEN],
            hdr_len: 0,
            data: None,
            ddgst: [0; 4],
            ddgst_len: 0,
            release: None,
        }
    }

    /// A command capsule arrived (its data, if any, follows).
    fn on_capsule(&mut self, sqe: Sqe, layout: &PduLayout) {
        let Some(q) = &mut self.q else {
            // Before Connect only Connect is accepted, with its data in
            // the capsule.
            let connect = sqe.opcode == opcode::FABRICS && sqe.fctype() == fctype::CONNECT;
            if !connect {
                let st = Status::COMMAND_SEQUENCE_ERROR.with_dnr();
                return self.begin_data(layout, Sink::Discard, After::Reply(sqe.cid, st));
            }
            let ok = matches!(
                sqe.sgl.placement(),
                Ok(DataPlacement::InCapsule { offset: 0, length }) if length as usize == CONNECT_DATA_LEN
            ) && layout.data_len == CONNECT_DATA_LEN;
            if !ok {
                let st = Status::CONNECT_INVALID_PARAMETERS.with_dnr();
                return self.begin_data(layout, Sink::Discard, After::Reply(sqe.cid, st));
            }
            return self.begin_data(layout, Sink::Connect, After::Connect(sqe));
        };
        let Some(slot) = q.free.pop() else {
            // More commands than SQSIZE: the host broke flow control.
            let sqsize = q.sqsize as u64;
            self.fatal(
                &WireError::BadField {
                    field: "SQSIZE exceeded",
                    value: sqsize,
                },
                &[],
            );
            return;
        };
        q.sqhd = ((q.sqhd as u32 + 1) % q.sqsize.max(1)) as u16;
        let icd_limit = q.icd_limit;
        let slot_size = q.arena.slot_size();
        {
            let s = &mut q.slots[slot as usize];
            *s = Slot::free();
            s.state = SlotState::Executing;
            s.sqe = sqe;
        }
        let dir = if sqe.opcode == opcode::FABRICS {
            opcode::direction(sqe.fctype())
        } else {
            opcode::direction(sqe.opcode)
        };
        let placement = match sqe.sgl.placement() {
            Ok(p) => p,
            Err(st) => {
                return self.begin_data(layout, Sink::Discard, After::Fail(slot, st.with_dnr()))
            }
        };
        let (len, in_capsule) = match placement {
            DataPlacement::None => (0usize, false),
            DataPlacement::InCapsule { offset, length } => {
                if offset != 0 {
                    let st = Status::SGL_OFFSET_INVALID.with_dnr();
                    return self.begin_data(layout, Sink::Discard, After::Fail(slot, st));
                }
                (length as usize, true)
            }
            DataPlacement::Transport { length } => (length as usize, false),
        };
        if layout.data_len > icd_limit as usize {
            self.fatal(
                &WireError::BadPlen {
                    pdu_type: layout.ch.pdu_type as u8,
                    plen: layout.ch.plen,
                    why: "in-capsule data beyond the queue's limit",
                },
                &[],
            );
            return;
        }
        let bad_len = Status::DATA_SGL_LENGTH_INVALID.with_dnr();
        if len > slot_size {
            return self.begin_data(layout, Sink::Discard, After::Fail(slot, bad_len));
        }
        if in_capsule && (layout.data_len != len || dir != Direction::HostToController) {
            // Data longer or shorter than the command says, or data for a
            // command that moves none to us.
            return self.begin_data(layout, Sink::Discard, After::Fail(slot, bad_len));
        }
        if !in_capsule && layout.data_len > 0 {
            return self.begin_data(layout, Sink::Discard, After::Fail(slot, bad_len));
        }
        if let Some(q) = &mut self.q {
            q.slots[slot as usize].data_len = len as u32;
        }
        if in_capsule {
            return self.begin_data(layout, Sink::Slot { slot, off: 0 }, After::Exec(slot));
        }
        if len > 0 && dir == Direction::HostToController {
            // Check the command before asking for its data.
            if let Err(st) = self.precheck(slot) {
                return self.complete(slot, st, 0, 0);
            }
            if let Some(q) = &mut self.q {
                q.slots[slot as usize].state = SlotState::Receiving { got: 0 };
            }
            self.send_r2t(slot, sqe.cid, len as u32);
            return;
        }
        self.exec(slot);
    }

    fn send_r2t(&mut self, slot: u16, cid: u16, len: u32) {
        let mut item = self.new_item();
        let r = R2T {
            cccid: cid,
            ttag: slot,
            r2to: 0,
            r2tl: len,
        };
        if let Ok(n) = pdu::encode_r2t(&mut item.hdr, &r, self.digests) {
            item.hdr_len = n as u8;
            self.tx.push_back(item);
        }
    }

    fn on_h2c(&mut self, d: DataHeader, layout: &PduLayout) {
        let out_of_range = |why: &'static str, v: u64| WireError::BadField {
            field: why,
            value: v,
        };
        let Some(q) = &mut self.q else {
            return self.fatal(&WireError::UnexpectedPdu(layout.ch.pdu_type as u8), &[]);
        };
        let Some(s) = q.slots.get_mut(d.ttag as usize) else {
            return self.fatal(&out_of_range("TTAG", d.ttag as u64), &[]);
        };
        let SlotState::Receiving { got } = s.state else {
            return self.fatal(&out_of_range("TTAG", d.ttag as u64), &[]);
        };
        if s.sqe.cid != d.cccid {
            return self.fatal(&out_of_range("CCCID", d.cccid as u64), &[]);
        }
        if d.datao != got || d.datao as u64 + d.datal as u64 > s.data_len as u64 {
            tracing::warn!(
                "nvmf: H2CData out of range from {}: offset {} length {} (expected offset {}, total {})",
                self.peer,
                d.datao,
                d.datal,
                got,
                s.data_len
            );
            let mut item = self.new_item();
            if let Ok(n) = pdu::encode_term_req(
                &mut item.hdr,
                false,
                TermFes::DataTransferOutOfRange,
                0,
                &[],
            ) {
                item.hdr_len = n as u8;
                self.tx.push_back(item);
            }
            self.closing = true;
            self.rx_start = self.rx_end;
            return;
        }
        s.state = SlotState::Receiving { got: got + d.datal };
        let slot = d.ttag;
        self.begin_data(
            layout,
            Sink::Slot {
                slot,
                off: d.datao as usize,
            },
            After::H2C(slot),
        );
    }

    fn on_connect(&mut self, sqe: Sqe) {
        let cmd = ConnectCommand::parse(&sqe);
        let data = *self.connect_buf;
        let invalid = |in_data: bool, off: u16| {
            (
                Status::CONNECT_INVALID_PARAMETERS.with_dnr(),
                connect_invalid_param_dw0(in_data, off),
            )
        };
        let r = (|| -> Result<(Arc<Controller>, u16, u32), (Status, u32)> {
            if cmd.recfmt != 0 {
                return Err((Status::CONNECT_INCOMPATIBLE_FORMAT.with_dnr(), 0));
            }
            let d = ConnectData::decode(&data).map_err(|e| match e {
                WireError::BadField {
                    field: "SUBNQN", ..
                } => invalid(true, connect_data_offset::SUBNQN),
                _ => invalid(true, connect_data_offset::HOSTNQN),
            })?;
            let Some(subsys) = target::find_subsystem(d.subnqn) else {
                return Err(invalid(true, connect_data_offset::SUBNQN));
            };
            if !subsys.discovery && !subsys.has_listener(&self.listener.addr) {
                tracing::warn!(
                    "nvmf: {} may not connect to {} through {}:{}",
                    d.hostnqn,
                    subsys.nqn,
                    self.listener.addr.traddr,
                    self.listener.addr.trsvcid
                );
                return Err(invalid(true, connect_data_offset::SUBNQN));
            }
            if !subsys.host_allowed(d.hostnqn) {
                tracing::warn!("nvmf: host {} not allowed on {}", d.hostnqn, subsys.nqn);
                return Err((Status::CONNECT_INVALID_HOST.with_dnr(), 0));
            }
            // SQSIZE sits at byte 44 of the command.
            const SQSIZE_OFF: u16 = 44;
            if cmd.qid == 0 {
                if cmd.sqsize < 2 || cmd.sqsize > self.opts.max_aq_depth {
                    return Err(invalid(false, SQSIZE_OFF));
                }
                if d.cntlid != CNTLID_DYNAMIC {
                    return Err(invalid(true, connect_data_offset::CNTLID));
                }
                let nr = local().ok_or((Status::INTERNAL_ERROR, 0))?;
                let mut i = subsys.inner();
                let cntlid = subsys
                    .alloc_cntlid(&mut i)
                    .ok_or((Status::CONNECT_CONTROLLER_BUSY, 0))?;
                let kato = if subsys.discovery && cmd.kato == 0 {
                    0
                } else {
                    cmd.kato
                };
                let c = Arc::new(Controller::new(
                    cntlid,
                    subsys.clone(),
                    d.hostnqn,
                    d.hostid,
                    (nr.handle.clone(), self.id),
                    kato,
                    self.opts.max_io_qpairs_per_ctrlr,
                ));
                c.state().qids[0] = true;
                i.controllers.push(c.clone());
                Ok((c, 0, cmd.sqsize))
            } else {
                if cmd.sqsize < 2 || cmd.sqsize > self.opts.max_queue_depth {
                    return Err(invalid(false, SQSIZE_OFF));
                }
                let c = subsys
                    .inner()
                    .controllers
                    .iter()
                    .find(|c| c.cntlid == d.cntlid && c.hostnqn == d.hostnqn)
                    .cloned()
                    .ok_or_else(|| invalid(true, connect_data_offset::CNTLID))?;
                let mut s = c.state();
                if s.csts & wc_nvme_wire::fabrics::property::csts::RDY == 0 {
                    return Err((Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0));
                }
                let q = cmd.qid as usize;
                if q > s.num_io_queues as usize || s.qids.get(q).copied().unwrap_or(true) {
                    return Err((Status::INVALID_QUEUE_IDENTIFIER.with_dnr(), 0));
                }
                s.qids[q] = true;
                drop(s);
                Ok((c, cmd.qid, cmd.sqsize))
            }
        })();
        match r {
            Err((st, dw0)) => {
                self.reply_slotless(sqe.cid, st, dw0);
                // A failed Connect leaves the connection useless.
                self.closing = true;
            }
            Ok((ctrlr, qid, sqsize)) => {
                let slot_size = (self.opts.max_io_size as usize).max(MIN_SLOT_SIZE);
                let Some(arena) = Arena::new(sqsize as usize, slot_size) else {
                    ctrlr.state().qids[qid as usize] = false;
                    if qid == 0 {
                        ctrlr.destroy();
                    }
                    self.reply_slotless(sqe.cid, Status::INTERNAL_ERROR, 0);
                    self.closing = true;
                    return;
                };
                ctrlr.state().qpairs.push(QpairInfo {
                    conn_id: self.id,
                    qid,
                    thread: self.thread.clone(),
                    listen: self.listener.addr.clone(),
                    peer: self.peer,
                });
                ctrlr.touch_keep_alive();
                let cntlid = ctrlr.cntlid;
                tracing::info!(
                    "nvmf: {} connected queue {qid} (depth {sqsize}) of controller {cntlid} on {}",
                    ctrlr.hostnqn,
                    ctrlr.subsys.nqn
                );
                self.q = Some(Queue {
                    icd_limit: admin::in_capsule_limit(&self.opts, qid),
                    ctrlr,
                    qid,
                    sqsize,
                    arena,
                    slots: (0..sqsize).map(|_| Slot::free()).collect(),
                    free: (0..sqsize as u16).rev().collect(),
                    inflight_io: 0,
                    ns: NsCache {
                        gen: 0,
                        entries: Vec::new(),
                    },
                    aers: Vec::new(),
                    sqhd: 1,
                });
                self.reply_slotless(sqe.cid, Status::SUCCESS, connect_success_dw0(cntlid));
            }
        }
    }

    /// A response for a command that holds no slot.
    fn reply_slotless(&mut self, cid: u16, status: Status, dw0: u32) {
        let (sqhd, sqid) = self.q.as_ref().map(|q| (q.sqhd, q.qid)).unwrap_or((0, 0));
        let mut item = self.new_item();
        let cqe = Cqe {
            dw0,
            dw1: 0,
            sqhd,
            sqid,
            cid,
            status,
        };
        if let Ok(n) = pdu::encode_capsule_resp(&mut item.hdr, &cqe, self.digests) {
            item.hdr_len = n as u8;
            self.tx.push_back(item);
        }
    }

    /// Validates a command before its data is requested (writes).
    fn precheck(&mut self, slot: u16) -> Result<(), Status> {
        let Some(q) = &mut self.q else {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        };
        let sqe = q.slots[slot as usize].sqe;
        if q.qid == 0 || sqe.opcode == opcode::FABRICS {
            return Ok(());
        }
        let (ns, _) =
            q.ns.get(&q.ctrlr.subsys, sqe.nsid)
                .ok_or(Status::INVALID_NAMESPACE.with_dnr())?;
        match sqe.opcode {
            io_op::WRITE | io_op::COMPARE => {
                let len = q.slots[slot as usize].data_len;
                check_rw(&ns, &sqe, len).map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// Runs the command in `slot` (its data, if any, is in the slot).
    fn exec(&mut self, slot: u16) {
        let Some(q) = &mut self.q else { return };
        let sqe = q.slots[slot as usize].sqe;
        if sqe.opcode == opcode::FABRICS {
            return self.exec_fabrics(slot, sqe);
        }
        if q.qid == 0 {
            return self.exec_admin(slot, sqe);
        }
        self.exec_io(slot, sqe);
    }

    fn exec_fabrics(&mut self, slot: u16, sqe: Sqe) {
        let Some(q) = &mut self.q else { return };
        match sqe.fctype() {
            fctype::PROPERTY_GET | fctype::PROPERTY_SET if q.qid == 0 => {
                let set = sqe.fctype() == fctype::PROPERTY_SET;
                match admin::property(&q.ctrlr, &self.opts, &sqe, set) {
                    Outcome::Done {
                        status, dw0, dw1, ..
                    } => self.complete_dw(slot, status, dw0, dw1, 0),
                    Outcome::Park => {}
                }
            }
            fctype::DISCONNECT => {
                self.complete(slot, Status::SUCCESS, 0, 0);
                self.closing = true;
            }
            fctype::CONNECT => self.complete(slot, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0, 0),
            _ => self.complete(slot, Status::INVALID_OPCODE.with_dnr(), 0, 0),
        }
    }

    fn exec_admin(&mut self, slot: u16, sqe: Sqe) {
        let Some(q) = &mut self.q else { return };
        let ctrlr = q.ctrlr.clone();
        let size = q.arena.slot_size();
        // SAFETY: admin commands never hand their slot to a bdev; nothing
        // else refers to the slot while the command runs.
        let buf = unsafe { q.arena.slice_mut(slot as usize, 0, size) };
        let data_len = q.slots[slot as usize].data_len as usize;
        let out = admin::execute(&ctrlr, &self.opts, &sqe, buf);
        match out {
            Outcome::Park => {
                if q.aers.len() >= MAX_AERS {
                    return self.complete(
                        slot,
                        Status::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED.with_dnr(),
                        0,
                        0,
                    );
                }
                q.aers.push(slot);
            }
            Outcome::Done {
                status,
                dw0,
                dw1,
                data_len: n,
            } => {
                let dir = opcode::direction(sqe.opcode);
                let n = if dir == Direction::ControllerToHost {
                    n.min(data_len)
                } else {
                    0
                };
                if !status.is_success() {
                    ctrlr.log_error(ErrorLogEntry {
                        sqid: 0,
                        cid: sqe.cid,
                        status_field: status.to_wire(),
                        param_error_location: 0xffff,
                        nsid: sqe.nsid,
                        ..ErrorLogEntry::default()
                    });
                }
                self.complete_dw(slot, status, dw0, dw1, n as u32);
            }
        }
    }

    /// Completes parked AERs with the controller's pending events.
    fn deliver_aens(&mut self) {
        loop {
            let Some(q) = &mut self.q else { return };
            if q.aers.is_empty() {
                return;
            }
            let Some(ev) = q.ctrlr.state().pending_events.pop_front() else {
                return;
            };
            let slot = q.aers.remove(0);
            self.complete(slot, Status::SUCCESS, ev, 0);
        }
    }

    fn exec_io(&mut self, slot: u16, sqe: Sqe) {
        let Some(q) = &mut self.q else { return };
        let Some((ns, chan)) = q.ns.get(&q.ctrlr.subsys, sqe.nsid) else {
            return self.complete(slot, Status::INVALID_NAMESPACE.with_dnr(), 0, 0);
        };
        let len = q.slots[slot as usize].data_len;
        let base = q.arena.ptr(slot as usize);
        let bs = ns.block_size as u64;
        let cb = self.completer.clone();
        let ctx = slot as u64;
        let stats = &q.ctrlr.stats;
        match sqe.opcode {
            io_op::READ | io_op::WRITE | io_op::COMPARE => {
                let rw = match check_rw(&ns, &sqe, len) {
                    Ok(rw) => rw,
                    Err(st) => return self.complete(slot, st, 0, 0),
                };
                let bytes = rw.nlb as usize * bs as usize;
                match sqe.opcode {
                    io_op::READ => {
                        stats.read_cmds.fetch_add(1, Ordering::Relaxed);
                        stats.read_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                        let iov = [IoVec { base, len: bytes }];
                        q.slots[slot as usize].to_host = bytes as u32;
                        q.slots[slot as usize].pending = 1;
                        q.inflight_io += 1;
                        // SAFETY: the slot's buffer (slot_size >= bytes,
                        // checked by check_rw) is used by this read alone
                        // until it completes; the connection outlives it.
                        unsafe { chan.readv(rw.slba, rw.nlb as u64, &iov, &cb, ctx) };
                    }
                    io_op::WRITE => {
                        stats.write_cmds.fetch_add(1, Ordering::Relaxed);
                        stats.write_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                        let iov = [IoVec { base, len: bytes }];
                        q.slots[slot as usize].pending = 1;
                        q.inflight_io += 1;
                        // SAFETY: as for reads; the data stays unchanged
                        // until the write completes.
                        unsafe { chan.writev(rw.slba, rw.nlb as u64, &iov, rw.fua, &cb, ctx) };
                    }
                    _ => {
                        if bytes * 2 > q.arena.slot_size() {
                            return self.complete(slot, Status::INVALID_FIELD.with_dnr(), 0, 0);
                        }
                        // SAFETY: the second half of the slot lies inside
                        // it (checked above).
                        let second = unsafe { base.add(bytes) };
                        let iov = [IoVec {
                            base: second,
                            len: bytes,
                        }];
                        let s = &mut q.slots[slot as usize];
                        s.pending = 1;
                        s.step = Step::Compare;
                        s.to_host = bytes as u32;
                        q.inflight_io += 1;
                        // SAFETY: as for reads.
                        unsafe { chan.readv(rw.slba, rw.nlb as u64, &iov, &cb, ctx) };
                    }
                }
            }
            io_op::FLUSH => {
                if !chan.bdev().io_type_supported(wc_bdev::IoType::Flush) {
                    return self.complete(slot, Status::SUCCESS, 0, 0);
                }
                q.slots[slot as usize].pending = 1;
                q.inflight_io += 1;
                chan.flush(0, ns.num_blocks, &cb, ctx);
            }
            io_op::WRITE_ZEROES => {
                let rw = RwCommand::parse(&sqe);
                if rw.end_lba().is_none_or(|e| e > ns.num_blocks) {
                    return self.complete(slot, Status::LBA_OUT_OF_RANGE.with_dnr(), 0, 0);
                }
                let s = &mut q.slots[slot as usize];
                s.pending = 1;
                if rw.fua && chan.bdev().io_type_supported(wc_bdev::IoType::Flush) {
                    s.step = Step::ThenFlush;
                }
                q.inflight_io += 1;
                chan.write_zeroes(rw.slba, rw.nlb as u64, &cb, ctx);
            }
            io_op::DATASET_MANAGEMENT => {
                let dsm = DsmCommand::parse(&sqe);
                if len as usize != dsm.data_len() {
                    return self.complete(slot, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0, 0);
                }
                if !dsm.deallocate || !chan.bdev().io_type_supported(wc_bdev::IoType::Unmap) {
                    // Only advisory attributes, or nothing to deallocate
                    // with: deallocation is a hint.
                    return self.complete(slot, Status::SUCCESS, 0, 0);
                }
                let mut ranges = [(0u64, 0u64); 256];
                let mut n = 0usize;
                let mut out_of_range = false;
                {
                    // SAFETY: the ranges were received into the slot and
                    // no I/O uses it yet.
                    let data = unsafe { q.arena.slice(slot as usize, 0, len as usize) };
                    for r in dsm_ranges(data).take(ranges.len()) {
                        let end = r.slba.checked_add(r.nlb as u64);
                        if end.is_none_or(|e| e > ns.num_blocks) {
                            out_of_range = true;
                        } else if r.nlb > 0 {
                            ranges[n] = (r.slba, r.nlb as u64);
                            n += 1;
                        }
                    }
                }
                if out_of_range {
                    return self.complete(slot, Status::LBA_OUT_OF_RANGE.with_dnr(), 0, 0);
                }
                if n == 0 {
                    return self.complete(slot, Status::SUCCESS, 0, 0);
                }
                q.slots[slot as usize].pending = n as u32;
                q.inflight_io += n;
                for (slba, nlb) in &ranges[..n] {
                    chan.unmap(*slba, *nlb, &cb, ctx);
                }
            }
            _ => self.complete(slot, Status::INVALID_OPCODE.with_dnr(), 0, 0),
        }
    }

    fn io_done(&mut self, io: Io, ctx: u64) {
        let slot = ctx as u16;
        let status = io.status();
        let io_type = io.io_type();
        drop(io);
        let Some(q) = &mut self.q else { return };
        q.inflight_io = q.inflight_io.saturating_sub(1);
        let Some(s) = q.slots.get_mut(slot as usize) else {
            return;
        };
        s.pending = s.pending.saturating_sub(1);
        if !status.is_success() && s.status.is_success() {
            let write = !matches!(io_type, wc_bdev::IoType::Read);
            s.status = match status {
                IoStatus::Aborted => Status::ABORT_REQUESTED,
                other => map_errno(other.errno(), write),
            };
            q.ctrlr.stats.media_errors.fetch_add(1, Ordering::Relaxed);
        }
        if s.pending > 0 {
            return;
        }
        if self.dead {
            // Nobody to answer: just give the slot back.
            s.state = SlotState::Free;
            q.free.push(slot);
            return;
        }
        let st = s.status;
        match s.step {
            Step::ThenFlush if st.is_success() => {
                s.step = Step::Single;
                s.pending = 1;
                q.inflight_io += 1;
                let sqe = s.sqe;
                if let Some((ns, chan)) = q.ns.get(&q.ctrlr.subsys, sqe.nsid) {
                    chan.flush(0, ns.num_blocks, &self.completer, ctx);
                } else {
                    s.pending = 0;
                    q.inflight_io -= 1;
                    self.complete(slot, Status::NAMESPACE_NOT_READY, 0, 0);
                }
            }
            Step::Compare if st.is_success() => {
                let n = s.to_host as usize;
                // SAFETY: the read completed; the slot holds the host's
                // data in its first half and the stored data after it.
                let (a, b) = unsafe {
                    (
                        q.arena.slice(slot as usize, 0, n),
                        q.arena.slice(slot as usize, n, n),
                    )
                };
                let st = if a == b {
                    Status::SUCCESS
                } else {
                    Status::COMPARE_FAILURE.with_dnr()
                };
                self.complete(slot, st, 0, 0);
            }
            _ => {
                let to_host = if st.is_success() && s.sqe.opcode == io_op::READ {
                    s.to_host
                } else {
                    0
                };
                if !st.is_success() {
                    let sqe = s.sqe;
                    let qid = q.qid;
                    q.ctrlr.log_error(ErrorLogEntry {
                        sqid: qid,
                        cid: sqe.cid,
                        status_field: st.to_wire(),
                        param_error_location: 0xffff,
                        lba: RwCommand::parse(&sqe).slba,
                        nsid: sqe.nsid,
                        ..ErrorLogEntry::default()
                    });
                }
                self.complete(slot, st, 0, to_host);
            }
        }
    }

    fn complete(&mut self, slot: u16, status: Status, dw0: u32, to_host: u32) {
        self.complete_dw(slot, status, dw0, 0, to_host)
    }

    /// Queues the command's data (C2HData) and response (CapsuleResp, or
    /// the SUCCESS flag on the last data PDU); the slot is released once
    /// they are sent.
    fn complete_dw(&mut self, slot: u16, status: Status, dw0: u32, dw1: u32, to_host: u32) {
        let digests = self.digests;
        let hpda = self.hpda;
        let c2h_success = self.opts.c2h_success;
        let Some(q) = &mut self.q else { return };
        let Some(s) = q.slots.get_mut(slot as usize) else {
            return;
        };
        s.state = SlotState::Sending;
        let cid = s.sqe.cid;
        let ok = status.is_success();
        let mut items: [Option<TxItem>; 2] = [None, None];
        let success_flag = ok && to_host > 0 && c2h_success;
        if ok && to_host > 0 {
            let mut item = TxItem {
                hdr: [0; pdu::TERM_REQ_MAX_PLEN],
                hdr_len: 0,
                data: Some((slot, 0, to_host)),
                ddgst: [0; 4],
                ddgst_len: 0,
                release: if success_flag { Some(slot) } else { None },
            };
            let d = DataHeader {
                cccid: cid,
                ttag: 0,
                datao: 0,
                datal: to_host,
            };
            match pdu::encode_c2h_data(&mut item.hdr, &d, true, success_flag, digests, hpda) {
                Ok(n) => item.hdr_len = n as u8,
                Err(_) => return self.kill("cannot encode C2HData"),
            }
            if digests.data {
                // SAFETY: the command completed: no I/O uses the slot.
                let data = unsafe { q.arena.slice(slot as usize, 0, to_host as usize) };
                item.ddgst = crc32c(data).to_le_bytes();
                item.ddgst_len = DIGEST_LEN as u8;
            }
            items[0] = Some(item);
        }
        if !success_flag {
            let mut item = TxItem {
                hdr: [0; pdu::TERM_REQ_MAX_PLEN],
                hdr_len: 0,
                data: None,
                ddgst: [0; 4],
                ddgst_len: 0,
                release: Some(slot),
            };
            let cqe = Cqe {
                dw0,
                dw1,
                sqhd: q.sqhd,
                sqid: q.qid,
                cid,
                status,
            };
            match pdu::encode_capsule_resp(&mut item.hdr, &cqe, digests) {
                Ok(n) => item.hdr_len = n as u8,
                Err(_) => return self.kill("cannot encode CapsuleResp"),
            }
            items[1] = Some(item);
        }
        for it in items.into_iter().flatten() {
            self.tx.push_back(it);
        }
    }

    /// Sends queued PDUs until the socket is full.
    fn flush_tx(&mut self) {
        while !self.tx.is_empty() && !self.dead {
            // Up to 256 pieces per writev: a whole QD 128 batch of C2HData
            // (header + data) leaves in one call.
            let mut slices: [IoSlice<'_>; 256] = [IoSlice::new(&[]); 256];
            let mut k = 0;
            let mut skip = self.tx_off;
            for it in self.tx.iter() {
                if k + 3 > slices.len() {
                    break;
                }
                let data: &[u8] = match (it.data, &self.q) {
                    // SAFETY: a slot being sent has no I/O in flight; the
                    // arena lives as long as the connection.
                    (Some((slot, off, len)), Some(q)) => unsafe {
                        q.arena.slice(slot as usize, off as usize, len as usize)
                    },
                    _ => &[],
                };
                for part in [
                    &it.hdr[..it.hdr_len as usize],
                    data,
                    &it.ddgst[..it.ddgst_len as usize],
                ] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    slices[k] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    k += 1;
                }
            }
            match self.stream.write_vectored(&slices[..k]) {
                Ok(0) => self.kill("socket closed while sending"),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.kill(&format!("write: {e}")),
            }
        }
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.tx.front() else { break };
            let left = front.len() - self.tx_off;
            if n < left {
                self.tx_off += n;
                return;
            }
            n -= left;
            self.tx_off = 0;
            if let Some(it) = self.tx.pop_front() {
                if let (Some(slot), Some(q)) = (it.release, &mut self.q) {
                    if let Some(s) = q.slots.get_mut(slot as usize) {
                        s.state = SlotState::Free;
                        q.free.push(slot);
                    }
                }
            }
        }
    }

    fn update_interest(&mut self) {
        if self.dead {
            return;
        }
        let (readable, writable) = (self.wants_input(), !self.tx.is_empty());
        if let Some(nr) = local() {
            let fd = self.stream.as_raw_fd();
            let set = match &nr.ep {
                Some(ep) => ep.set_interest(fd, self.id, &mut self.interest, readable, writable),
                None => Err(io::Error::from_raw_os_error(libc::EBADF)),
            };
            if set.is_err() {
                self.kill("epoll_ctl failed");
            }
        }
    }
}

/// Checks a read/write/compare against the namespace and the SGL length.
fn check_rw(ns: &Namespace, sqe: &Sqe, sgl_len: u32) -> Result<RwCommand, Status> {
    let rw = RwCommand::parse(sqe);
    if rw.end_lba().is_none_or(|e| e > ns.num_blocks) {
        return Err(Status::LBA_OUT_OF_RANGE.with_dnr());
    }
    let bytes = rw.nlb as u64 * ns.block_size as u64;
    if bytes != sgl_len as u64 {
        return Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
    }
    Ok(rw)
}
