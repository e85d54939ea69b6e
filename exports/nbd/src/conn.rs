//! Connections: one state machine per client socket, owned by one reactor.
//!
//! Each reactor that serves connections has one epoll instance, polled with
//! a zero timeout from an active poller (`nbd_conns`), and a timed poller
//! (`nbd_sweep`) that closes connections whose export was deleted or whose
//! server was stopped, and handshakes that take too long. Both pollers
//! exist only while the reactor has connections.
//!
//! A connection reads whatever the socket has into a receive buffer, feeds
//! it to the [`Negotiator`] and then the [`Decoder`], submits each request
//! to the reactor's channel of the export's bdev, and queues replies as the
//! bdev completes them (so replies leave in completion order). Requests in
//! flight and data buffers held are bounded; past the bound the connection
//! stops reading (and so stops the client) until completions drain.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wc_bdev::{BdevChannel, DmaBuf, Io, IoCompletion};
use wc_reactor::epoll::Epoll;
use wc_reactor::{PollStatus, PollerHandle, ReactorHandle};

use crate::decode::{Command, Decoder, Event};
use crate::negotiate::{Catalog, HsEvent, Negotiator};
use crate::proto::{self, errno, Geometry};
use crate::server::{Export, Server};
use crate::stream::NbdStream;

/// Receive buffer: holds at least one whole option (64 KiB + header).
const RX_CAP: usize = 256 * 1024;
/// Requests in flight per connection before it stops reading.
const MAX_INFLIGHT: usize = 128;
/// Data bytes held per connection (write payloads in flight, read data in
/// flight or queued for sending) before it stops reading.
const MAX_BUFFERED: usize = 64 << 20;
/// A client must finish the handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Reads per wake-up, so one busy client cannot starve the others.
const READS_PER_PUMP: usize = 16;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
static ROUND_ROBIN: AtomicUsize = AtomicUsize::new(0);

/// Hands an accepted connection to the next reactor, round-robin (from a
/// reactor: its siblings; elsewhere nothing can serve it and it is
/// dropped).
pub(crate) fn dispatch(stream: NbdStream, server: Arc<Server>) {
    let Some(r) = wc_reactor::try_current() else {
        return;
    };
    let all = r.siblings();
    let i = ROUND_ROBIN.fetch_add(1, Ordering::Relaxed) % all.len().max(1);
    match all.get(i) {
        Some(h) => serve_on(h, stream, Some(server)),
        None => drop(stream),
    }
}

/// Serves an already connected client socket on reactor `reactor`: the
/// server's greeting is sent and the handshake starts there. `server` ties
/// the connection to a listener (it closes when that stops).
pub(crate) fn serve_on(reactor: &ReactorHandle, stream: NbdStream, server: Option<Arc<Server>>) {
    reactor.send(move || adopt(stream, server));
}

/// Per-reactor state: the epoll instance and the connections it serves.
struct NbdReactor {
    ep: Option<Epoll>,
    conns: RefCell<HashMap<u64, Rc<ConnCell>>>,
    pollers: RefCell<Option<(PollerHandle, PollerHandle)>>,
}

impl NbdReactor {
    fn new() -> NbdReactor {
        let ep = Epoll::new()
            .map_err(|e| tracing::error!("NBD: epoll_create1 failed: {e}"))
            .ok();
        NbdReactor {
            ep,
            conns: RefCell::new(HashMap::new()),
            pollers: RefCell::new(None),
        }
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, id: u64) -> io::Result<()> {
        match &self.ep {
            Some(ep) => ep.ctl(op, fd, events, id),
            None => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    fn poll(&self) -> PollStatus {
        let Some(ep) = &self.ep else {
            return PollStatus::Idle;
        };
        let mut buf = Epoll::ready_buf();
        let mut any = false;
        for (id, events) in ep.poll_now(&mut buf) {
            any = true;
            let conn = self.conns.borrow().get(&id).cloned();
            if let Some(c) = conn {
                c.on_event(events);
                if c.is_dead() {
                    self.reap(id);
                }
            }
        }
        PollStatus::from(any)
    }

    fn sweep(&self) -> PollStatus {
        let conns: Vec<Rc<ConnCell>> = self.conns.borrow().values().cloned().collect();
        for c in conns {
            c.check_liveness();
            if c.is_dead() {
                self.reap(c.id);
            }
        }
        PollStatus::Idle
    }

    /// Forgets a dead connection (closing its socket).
    fn reap(&self, id: u64) {
        let Ok(mut conns) = self.conns.try_borrow_mut() else {
            return; // the sweep will get it
        };
        let Some(c) = conns.remove(&id) else { return };
        let empty = conns.is_empty();
        drop(conns);
        if let Ok(inner) = c.inner.try_borrow() {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, inner.stream.as_raw_fd(), 0, id);
        }
        drop(c);
        if empty {
            if let Some((a, b)) = self.pollers.borrow_mut().take() {
                a.unregister();
                b.unregister();
            }
        }
    }
}

/// Runs the liveness sweep on the current reactor now (after an export
/// was deleted or a server stopped), so its connections close at once.
pub(crate) fn sweep_now() {
    if let Some(nr) = local() {
        nr.sweep();
    }
}

fn local() -> Option<Rc<NbdReactor>> {
    wc_reactor::try_current().map(|r| r.local(NbdReactor::new))
}

/// Takes over `stream` on the current reactor.
fn adopt(stream: NbdStream, server: Option<Arc<Server>>) {
    let Some(nr) = local() else { return };
    if let Err(e) = stream.prepare() {
        tracing::warn!("NBD: cannot set up a client socket: {e}");
        return;
    }
    let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let fd = stream.as_raw_fd();
    let cell = Rc::new_cyclic(|me: &Weak<ConnCell>| {
        let completer: Rc<dyn IoCompletion> = Rc::new(Completer { conn: me.clone() });
        ConnCell {
            id,
            inner: RefCell::new(Conn::new(stream, server, completer)),
        }
    });
    let events = libc::EPOLLIN as u32;
    if let Err(e) = nr.ctl(libc::EPOLL_CTL_ADD, fd, events, id) {
        tracing::warn!("NBD: cannot watch a client socket: {e}");
        return;
    }
    if let Ok(mut c) = cell.inner.try_borrow_mut() {
        c.interest = events;
    }
    nr.conns.borrow_mut().insert(id, cell.clone());
    if nr.pollers.borrow().is_none() {
        if let Some(r) = wc_reactor::try_current() {
            let a = nr.clone();
            let p1 = r.register_poller("nbd_conns", None, move || a.poll());
            let b = nr.clone();
            let p2 = r.register_poller("nbd_sweep", Some(Duration::from_millis(100)), move || {
                b.sweep()
            });
            *nr.pollers.borrow_mut() = Some((p1, p2));
        }
    }
    cell.kick(&nr);
}

/// The connection's completion callback: a weak link, so I/O that
/// completes after the connection is gone is simply dropped.
struct Completer {
    conn: Weak<ConnCell>,
}

impl IoCompletion for Completer {
    fn io_done(&self, io: Io, ctx: u64) {
        let Some(c) = self.conn.upgrade() else {
            return;
        };
        match c.inner.try_borrow_mut() {
            Ok(mut inner) => inner.io_done(io, ctx),
            // Cannot happen: completions never run inside our own calls.
            Err(_) => {
                tracing::error!("NBD: completion re-entered a connection; reply dropped");
                return;
            }
        }
        if let Some(nr) = local() {
            c.kick(&nr);
        }
    }
}

struct ConnCell {
    id: u64,
    inner: RefCell<Conn>,
}

impl ConnCell {
    fn is_dead(&self) -> bool {
        self.inner.try_borrow().map(|c| c.dead).unwrap_or(false)
    }

    fn on_event(&self, events: u32) {
        let Ok(mut c) = self.inner.try_borrow_mut() else {
            return;
        };
        if events & libc::EPOLLERR as u32 != 0 {
            c.dead = true;
            return;
        }
        c.pump();
        if events & libc::EPOLLHUP as u32 != 0 {
            // Hung up both ways (a Unix peer that closed): what could be
            // read was submitted above; replies cannot be sent any more, so
            // I/O in flight completes and is dropped.
            c.dead = true;
            return;
        }
        c.update_interest(self.id);
    }

    fn check_liveness(&self) {
        if let Ok(mut c) = self.inner.try_borrow_mut() {
            c.check_liveness();
        }
    }

    /// Progress after a completion or adoption; reaps when finished.
    fn kick(&self, nr: &NbdReactor) {
        let dead = match self.inner.try_borrow_mut() {
            Ok(mut c) => {
                c.pump();
                c.update_interest(self.id);
                c.dead
            }
            Err(_) => false,
        };
        if dead {
            nr.reap(self.id);
        }
    }
}

/// Counts a connection in its export while it is in the transmission phase.
struct ExportUse(Arc<Export>);

impl ExportUse {
    fn new(e: Arc<Export>) -> ExportUse {
        e.connections.fetch_add(1, Ordering::Relaxed);
        ExportUse(e)
    }
}

impl Drop for ExportUse {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a connection in its server.
struct ServerUse(Arc<Server>);

impl Drop for ServerUse {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Transmission {
    export: ExportUse,
    chan: Rc<BdevChannel>,
    decoder: Decoder,
}

enum Phase {
    Handshake(Negotiator),
    Transmission(Transmission),
}

enum Out {
    Bytes(Vec<u8>),
    Header([u8; proto::SIMPLE_REPLY_LEN]),
    Data(DmaBuf),
}

impl Out {
    fn bytes(&self) -> &[u8] {
        match self {
            Out::Bytes(b) => b,
            Out::Header(h) => h,
            Out::Data(d) => d,
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Read(usize),
    Write(usize),
    /// TRIM / WRITE_ZEROES with FUA: flush before replying.
    ThenFlush,
    Plain,
}

struct Slot {
    handle: u64,
    kind: Kind,
}

/// The live catalog: exports of the process, with this reactor's channel.
struct LiveCatalog;

impl Catalog for LiveCatalog {
    type Export = (Arc<Export>, Rc<BdevChannel>);

    fn find(&mut self, name: &str) -> Option<(Self::Export, Geometry, String)> {
        let e = crate::server::find_export(name)?;
        if e.removed.load(Ordering::Acquire) {
            return None;
        }
        let chan = e.desc.channel().ok()?;
        let (g, d) = (e.geom, format!("bdev {}", e.bdev_name));
        Some(((e, chan), g, d))
    }

    fn names(&self) -> Vec<String> {
        crate::server::export_names()
    }
}

struct Conn {
    stream: NbdStream,
    server: Option<ServerUse>,
    phase: Phase,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    rx_eof: bool,
    tx: VecDeque<Out>,
    tx_off: usize,
    interest: u32,
    inflight: usize,
    buffered: usize,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    /// Finish what is in flight, send the replies, then close.
    closing: bool,
    dead: bool,
    started: Instant,
    completer: Rc<dyn IoCompletion>,
}

impl Conn {
    fn new(
        stream: NbdStream,
        server: Option<Arc<Server>>,
        completer: Rc<dyn IoCompletion>,
    ) -> Conn {
        let server = server.map(|s| {
            s.connections.fetch_add(1, Ordering::Relaxed);
            ServerUse(s)
        });
        let mut tx = VecDeque::new();
        tx.push_back(Out::Bytes(proto::greeting().to_vec()));
        Conn {
            stream,
            server,
            phase: Phase::Handshake(Negotiator::new()),
            rx: vec![0u8; RX_CAP].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            rx_eof: false,
            tx,
            tx_off: 0,
            interest: 0,
            inflight: 0,
            buffered: 0,
            slots: Vec::new(),
            free_slots: Vec::new(),
            closing: false,
            dead: false,
            started: Instant::now(),
            completer,
        }
    }

    fn check_liveness(&mut self) {
        let server_gone = self
            .server
            .as_ref()
            .is_some_and(|s| s.0.closed.load(Ordering::Acquire));
        let export_gone = match &self.phase {
            Phase::Transmission(t) => t.export.0.removed.load(Ordering::Acquire),
            Phase::Handshake(_) => self.started.elapsed() > HANDSHAKE_TIMEOUT,
        };
        if server_gone || export_gone {
            self.stream.shutdown();
            self.dead = true;
        }
    }

    /// Below the in-flight and buffer bounds: more requests may be parsed.
    fn has_room(&self) -> bool {
        self.inflight < MAX_INFLIGHT && self.buffered < MAX_BUFFERED
    }

    /// Whether the socket should be read now.
    fn wants_input(&self) -> bool {
        if self.dead || self.closing || self.rx_eof {
            return false;
        }
        let space = self.rx_end < self.rx.len() || self.rx_start > 0;
        let parse = match &self.phase {
            Phase::Handshake(_) => true,
            Phase::Transmission(t) => self.has_room() || !t.decoder.at_boundary(),
        };
        space && parse
    }

    /// Reads, parses, submits and sends as far as possible right now.
    fn pump(&mut self) {
        for _ in 0..READS_PER_PUMP {
            self.process_rx();
            if !self.wants_input() {
                break;
            }
            if self.rx_end == self.rx.len() {
                // Compact: an unfinished message moves to the front.
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            match self.stream.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => {
                    // The client is done sending: finish what it asked for
                    // (what is buffered is still parsed and served).
                    self.rx_eof = true;
                    if matches!(self.phase, Phase::Handshake(_)) {
                        self.dead = true;
                    }
                    break;
                }
                Ok(n) => self.rx_end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.dead = true;
                    break;
                }
            }
        }
        self.process_rx();
        self.flush_tx();
        if (self.closing || self.rx_eof) && self.inflight == 0 && self.tx.is_empty() {
            self.dead = true;
        }
    }

    /// Parses what is buffered and acts on it.
    fn process_rx(&mut self) {
        while !self.dead && !self.closing {
            let input = &self.rx[self.rx_start..self.rx_end];
            let (used, progressed) = match &mut self.phase {
                Phase::Handshake(neg) => {
                    let mut out = Vec::new();
                    let (used, ev) = neg.next(input, &mut LiveCatalog, &mut out);
                    if !out.is_empty() {
                        self.tx.push_back(Out::Bytes(out));
                    }
                    let progressed = used > 0 || ev.is_some();
                    match ev {
                        None => {}
                        Some(HsEvent::Go {
                            export: (export, chan),
                            geometry,
                        }) => {
                            self.phase = Phase::Transmission(Transmission {
                                export: ExportUse::new(export),
                                chan,
                                decoder: Decoder::new(geometry),
                            });
                        }
                        Some(HsEvent::Abort) => self.closing = true,
                        Some(HsEvent::Close(why)) => {
                            tracing::debug!("NBD: closing a client during handshake: {why}");
                            self.dead = true;
                        }
                    }
                    (used, progressed)
                }
                Phase::Transmission(t) => {
                    if t.decoder.at_boundary()
                        && !(self.inflight < MAX_INFLIGHT && self.buffered < MAX_BUFFERED)
                    {
                        break;
                    }
                    let (used, ev) = t.decoder.next(input);
                    let progressed = used > 0 || ev.is_some();
                    self.rx_start += used;
                    match ev {
                        None => {}
                        Some(Event::Request { handle, cmd }) => self.submit(handle, cmd),
                        Some(Event::Error { handle, error }) => self.reply(handle, error),
                        Some(Event::Disconnect) => self.closing = true,
                        Some(Event::Close(why)) => {
                            tracing::debug!("NBD: closing a client: {why}");
                            self.dead = true;
                        }
                    }
                    (0, progressed)
                }
            };
            self.rx_start += used;
            if !progressed {
                break;
            }
        }
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
    }

    fn reply(&mut self, handle: u64, error: u32) {
        self.tx
            .push_back(Out::Header(proto::simple_reply(error, handle)));
    }

    fn alloc_slot(&mut self, handle: u64, kind: Kind) -> u64 {
        let s = Slot { handle, kind };
        self.inflight += 1;
        match self.free_slots.pop() {
            Some(i) => {
                self.slots[i] = Some(s);
                i as u64
            }
            None => {
                self.slots.push(Some(s));
                (self.slots.len() - 1) as u64
            }
        }
    }

    fn submit(&mut self, handle: u64, cmd: Command) {
        let Phase::Transmission(t) = &self.phase else {
            return;
        };
        let chan = t.chan.clone();
        let g = *t.decoder.geometry();
        let bs = u64::from(g.block_size.max(1));
        let cb = self.completer.clone();
        match cmd {
            Command::Read { offset, len } => {
                let len = len as usize;
                let Some(buf) = DmaBuf::try_new(len) else {
                    return self.reply(handle, errno::ENOMEM);
                };
                self.buffered += len;
                let slot = self.alloc_slot(handle, Kind::Read(len));
                chan.read(offset / bs, buf, &cb, slot);
            }
            Command::Write { offset, data, fua } => {
                let len = data.len();
                self.buffered += len;
                let slot = self.alloc_slot(handle, Kind::Write(len));
                chan.write(offset / bs, data, fua, &cb, slot);
            }
            Command::Flush => {
                let slot = self.alloc_slot(handle, Kind::Plain);
                chan.flush(0, g.size / bs, &cb, slot);
            }
            Command::Trim { offset, len, fua } | Command::WriteZeroes { offset, len, fua } => {
                let trim = matches!(cmd, Command::Trim { .. });
                let kind = if fua && g.flush {
                    Kind::ThenFlush
                } else {
                    Kind::Plain
                };
                let slot = self.alloc_slot(handle, kind);
                let n = u64::from(len) / bs;
                if trim {
                    chan.unmap(offset / bs, n, &cb, slot);
                } else {
                    chan.write_zeroes(offset / bs, n, &cb, slot);
                }
            }
        }
    }

    fn io_done(&mut self, mut io: Io, ctx: u64) {
        let i = ctx as usize;
        let Some(slot) = self.slots.get_mut(i).and_then(Option::take) else {
            return;
        };
        let status = io.status();
        let error = if status.is_success() {
            0
        } else {
            proto::wire_errno(status.errno())
        };
        match slot.kind {
            Kind::ThenFlush if error == 0 => {
                // Reuse the slot for the flush that makes it durable.
                let size = match &self.phase {
                    Phase::Transmission(t) => Some((t.chan.clone(), *t.decoder.geometry())),
                    Phase::Handshake(_) => None,
                };
                drop(io);
                match size {
                    Some((chan, g)) => {
                        self.slots[i] = Some(Slot {
                            handle: slot.handle,
                            kind: Kind::Plain,
                        });
                        let bs = u64::from(g.block_size.max(1));
                        chan.flush(0, g.size / bs, &self.completer, ctx);
                        return;
                    }
                    None => self.reply(slot.handle, errno::EIO),
                }
            }
            Kind::Read(len) => {
                let buf = if error == 0 { io.take_buf() } else { None };
                drop(io);
                match buf {
                    Some(b) if b.len() == len => {
                        self.tx
                            .push_back(Out::Header(proto::simple_reply(0, slot.handle)));
                        self.tx.push_back(Out::Data(b));
                    }
                    _ => {
                        self.buffered = self.buffered.saturating_sub(len);
                        let e = if error == 0 { errno::EIO } else { error };
                        self.reply(slot.handle, e);
                    }
                }
            }
            Kind::Write(len) => {
                drop(io);
                self.buffered = self.buffered.saturating_sub(len);
                self.reply(slot.handle, error);
            }
            Kind::ThenFlush | Kind::Plain => {
                drop(io);
                self.reply(slot.handle, error);
            }
        }
        self.inflight = self.inflight.saturating_sub(1);
        self.free_slots.push(i);
    }

    /// Sends queued replies until the socket is full.
    fn flush_tx(&mut self) {
        while !self.tx.is_empty() && !self.dead {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(32);
            for (k, o) in self.tx.iter().take(32).enumerate() {
                let b = o.bytes();
                slices.push(IoSlice::new(if k == 0 { &b[self.tx_off..] } else { b }));
            }
            match self.stream.write_vectored(&slices) {
                Ok(0) => self.dead = true,
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.dead = true,
            }
        }
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.tx.front() else { break };
            let left = front.bytes().len() - self.tx_off;
            if n < left {
                self.tx_off += n;
                return;
            }
            n -= left;
            self.tx_off = 0;
            if let Some(Out::Data(d)) = self.tx.pop_front() {
                self.buffered = self.buffered.saturating_sub(d.len());
            }
        }
    }

    fn update_interest(&mut self, id: u64) {
        if self.dead {
            return;
        }
        let (readable, writable) = (self.wants_input(), !self.tx.is_empty());
        if let Some(nr) = local() {
            let fd = self.stream.as_raw_fd();
            let set = match &nr.ep {
                Some(ep) => ep.set_interest(fd, id, &mut self.interest, readable, writable),
                None => Err(io::Error::from_raw_os_error(libc::EBADF)),
            };
            if set.is_err() {
                self.dead = true;
            }
        }
    }
}
