//! The Unix-socket JSON-RPC server.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::value::RawValue;

use crate::envelope::{format_error, format_reply, parse_incoming, Id, Incoming, Request};
use crate::error::RpcError;
use crate::registry::{Registry, Responder};

/// SPDK's `SPDK_JSONRPC_MAX_CONNS`.
pub const MAX_CONNECTIONS: usize = 64;
/// SPDK's `SPDK_JSONRPC_RECV_BUF_SIZE`: a single request must fit in it.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Default permission bits of the socket file: owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// A unit of work: run one request's handler.
pub type Job = Box<dyn FnOnce() + Send>;

/// How the server runs a request's handler: the target passes "send this closure to the
/// main reactor", tests pass [`inline_dispatcher`]. A dispatcher that drops a job instead of
/// running it makes the request answer `-32603`.
pub type Dispatcher = Arc<dyn Fn(Job) + Send + Sync>;

/// A dispatcher that runs handlers right away on the server's event-loop thread (handlers
/// must then answer later, not block, if they wait for anything).
pub fn inline_dispatcher() -> Dispatcher {
    Arc::new(|job: Job| job())
}

/// Tunables of [`RpcServer::start_with_options`]. The defaults are SPDK's.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Permission bits for the socket file; `None` means [`DEFAULT_SOCKET_MODE`] (0600).
    pub socket_mode: Option<u32>,
    /// Connections beyond this many are accepted and closed at once (default 64).
    pub max_connections: usize,
    /// Limit on a connection's unparsed bytes (default 256 KiB); beyond it the connection
    /// gets `-32700` and is closed.
    pub max_request_bytes: usize,
    /// Start with the dispatch gate closed (see [`RpcServer::pause`]), as SPDK does while
    /// subsystems initialise, so that no request slips through before the app pauses.
    pub start_paused: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            socket_mode: None,
            max_connections: MAX_CONNECTIONS,
            max_request_bytes: MAX_REQUEST_BYTES,
            start_paused: false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Pause gate

struct GateState {
    paused: bool,
    /// A `resume` is handing held jobs to the dispatcher; new jobs queue behind them.
    draining: bool,
    held: VecDeque<Job>,
}

struct GateInner {
    state: Mutex<GateState>,
    dispatcher: Dispatcher,
}

/// A cloneable handle on the server's dispatch gate, for code (such as a
/// `framework_start_init` handler) that must pause the server without owning it.
///
/// While paused, requests are still read and validated but their handlers are held, in
/// arrival order, until [`resume`](Self::resume). Nothing is rejected.
#[derive(Clone)]
pub struct PauseHandle {
    inner: Arc<GateInner>,
}

impl std::fmt::Debug for PauseHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PauseHandle")
            .field("paused", &self.is_paused())
            .finish()
    }
}

impl PauseHandle {
    fn new(dispatcher: Dispatcher, paused: bool) -> Self {
        Self {
            inner: Arc::new(GateInner {
                state: Mutex::new(GateState {
                    paused,
                    draining: false,
                    held: VecDeque::new(),
                }),
                dispatcher,
            }),
        }
    }

    /// Holds every request from now on.
    pub fn pause(&self) {
        lock(&self.inner.state).paused = true;
        tracing::debug!("RPC server paused");
    }

    /// Dispatches the held requests in order, then lets new ones through. Safe to call from
    /// a handler (even one run by an inline dispatcher during another `resume`).
    pub fn resume(&self) {
        let mut s = lock(&self.inner.state);
        s.paused = false;
        if s.draining {
            return;
        }
        tracing::debug!(held = s.held.len(), "RPC server resumed");
        s.draining = true;
        loop {
            if s.paused {
                break;
            }
            let Some(job) = s.held.pop_front() else { break };
            drop(s);
            (self.inner.dispatcher)(job);
            s = lock(&self.inner.state);
        }
        s.draining = false;
    }

    /// Whether the gate is closed.
    pub fn is_paused(&self) -> bool {
        lock(&self.inner.state).paused
    }

    fn submit(&self, job: Job) {
        {
            let mut s = lock(&self.inner.state);
            if s.paused || s.draining {
                s.held.push_back(job);
                return;
            }
        }
        (self.inner.dispatcher)(job);
    }

    fn discard_held(&self) {
        let held = std::mem::take(&mut lock(&self.inner.state).held);
        // Dropping the jobs drops their responders (-32603 to closed sockets), outside the lock.
        drop(held);
    }
}

// ---------------------------------------------------------------------------------------
// Connections

/// What handlers (on any thread) and the parser hand to the event loop, per connection,
/// in the order they happened.
enum Outgoing {
    /// One outstanding request finished; its reply text, if it has one (a successful
    /// notification has none).
    Finished(Option<String>),
    /// An error reply that answers no outstanding request (`-32600`, `-32700`).
    Error(String),
    /// Flush what came before, then close the connection.
    Close,
}

/// State shared by the event loop, the [`RpcServer`] handle and reply paths.
struct Shared {
    registry: Registry,
    gate: PauseHandle,
    opts: ServerOptions,
    /// Open connections, as last counted by the loop.
    active: AtomicUsize,
    stopping: AtomicBool,
    /// Replies and closes waiting for the loop, tagged with their connection id.
    outbox: Mutex<Vec<(u64, Outgoing)>>,
    waker: Waker,
}

impl Shared {
    /// Queues `msg` for connection `conn` and wakes the loop if it may be asleep.
    fn post(&self, conn: u64, msg: Outgoing) {
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        let was_empty = {
            let mut q = lock(&self.outbox);
            let was_empty = q.is_empty();
            q.push((conn, msg));
            was_empty
        };
        // A non-empty outbox has a wake-up on its way already.
        if was_empty {
            if let Err(e) = self.waker.wake() {
                tracing::error!("RPC event loop wake-up failed: {e}");
            }
        }
    }
}

#[cfg(target_os = "linux")]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: libc::c_int = libc::MSG_DONTWAIT;

/// Sends what the socket takes of `buf` now, without raising SIGPIPE if the peer is gone.
fn send_some(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `fd` is a socket owned by the caller's stream for the duration of the
        // call, and `buf` points to `buf.len()` initialised bytes that `send` only reads.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), SEND_FLAGS) };
        if n >= 0 {
            return Ok(n.unsigned_abs());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

enum Flow {
    Continue,
    Close,
}

/// Parses and submits a connection's requests. Everything it says goes through the
/// outbox, so that replies, errors and the close keep their order.
struct Requests<'a> {
    shared: &'a Arc<Shared>,
    id: u64,
    /// Requests (or batches) submitted; each posts exactly one `Finished`.
    submitted: usize,
}

impl Requests<'_> {
    fn parse_error_and_close(&self) {
        let text = format_error(&Id::Null, &RpcError::parse_error()) + "\n";
        self.shared.post(self.id, Outgoing::Error(text));
        self.shared.post(self.id, Outgoing::Close);
    }

    /// Parses every complete JSON value at the front of `buf` and drops the consumed bytes.
    fn process(&mut self, buf: &mut Vec<u8>) -> Flow {
        let mut consumed = 0;
        let mut flow = Flow::Continue;
        {
            let mut values =
                serde_json::Deserializer::from_slice(buf.as_slice()).into_iter::<&RawValue>();
            loop {
                match values.next() {
                    // Only whitespace is left.
                    None => {
                        consumed = buf.len();
                        break;
                    }
                    Some(Ok(raw)) => {
                        consumed = values.byte_offset();
                        if let Flow::Close = self.handle(raw.get()) {
                            flow = Flow::Close;
                            break;
                        }
                    }
                    // An incomplete value: wait for more bytes.
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => {
                        tracing::debug!(conn = self.id, "RPC parse error: {e}");
                        self.parse_error_and_close();
                        flow = Flow::Close;
                        break;
                    }
                }
            }
        }
        buf.drain(..consumed);
        flow
    }

    fn handle(&mut self, raw: &str) -> Flow {
        match parse_incoming(raw) {
            Err(_) => {
                tracing::debug!(conn = self.id, "RPC request could not be decoded");
                self.parse_error_and_close();
                Flow::Close
            }
            Ok(Incoming::Single(Err(e))) => {
                self.shared
                    .post(self.id, Outgoing::Error(format_error(&Id::Null, &e) + "\n"));
                Flow::Continue
            }
            Ok(Incoming::Single(Ok(req))) => {
                let shared = Arc::clone(self.shared);
                let (conn, id) = (self.id, req.id.clone());
                let responder = Responder::new(move |result| {
                    let text = format_reply(&id, &result).map(|t| t + "\n");
                    shared.post(conn, Outgoing::Finished(text));
                });
                self.submitted += 1;
                self.submit(req, responder);
                Flow::Continue
            }
            Ok(Incoming::Batch(items)) => {
                self.submitted += 1;
                let batch = Arc::new(Batch {
                    slots: Mutex::new(BatchSlots {
                        replies: vec![None; items.len()],
                        // +1: the batch cannot complete before every element is submitted.
                        remaining: items.len() + 1,
                    }),
                    shared: Arc::clone(self.shared),
                    conn: self.id,
                });
                for (index, item) in items.into_iter().enumerate() {
                    match item {
                        Err(e) => batch.complete(Some((index, Some(format_error(&Id::Null, &e))))),
                        Ok(req) => {
                            let b = Arc::clone(&batch);
                            let id = req.id.clone();
                            let responder = Responder::new(move |result| {
                                b.complete(Some((index, format_reply(&id, &result))));
                            });
                            self.submit(req, responder);
                        }
                    }
                }
                batch.complete(None);
                Flow::Continue
            }
        }
    }

    fn submit(&self, req: Request, responder: Responder) {
        let registry = self.shared.registry.clone();
        let Request { method, params, .. } = req;
        tracing::trace!(conn = self.id, method = %method, "RPC request");
        self.shared.gate.submit(Box::new(move || {
            registry.dispatch(&method, params, responder)
        }));
    }
}

struct BatchSlots {
    replies: Vec<Option<String>>,
    remaining: usize,
}

/// Collects a batch's replies; sends `[...]` once every element has answered.
struct Batch {
    slots: Mutex<BatchSlots>,
    shared: Arc<Shared>,
    conn: u64,
}

impl Batch {
    /// Records one element's reply (`None` inside: a notification's success), or with
    /// `None` releases the submission guard.
    fn complete(&self, reply: Option<(usize, Option<String>)>) {
        let done = {
            let mut s = lock(&self.slots);
            if let Some((index, text)) = reply {
                if let Some(slot) = s.replies.get_mut(index) {
                    *slot = text;
                }
            }
            s.remaining = s.remaining.saturating_sub(1);
            if s.remaining == 0 {
                Some(std::mem::take(&mut s.replies))
            } else {
                None
            }
        };
        if let Some(replies) = done {
            let parts: Vec<String> = replies.into_iter().flatten().collect();
            // An all-notification batch gets no reply at all.
            let text = (!parts.is_empty()).then(|| format!("[{}]\n", parts.join(",")));
            self.shared.post(self.conn, Outgoing::Finished(text));
        }
    }
}

/// One client connection, owned by the event loop.
struct Conn {
    id: u64,
    stream: UnixStream,
    /// Bytes read but not yet parsed (an incomplete request).
    inbuf: Vec<u8>,
    /// Replies not yet sent, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// Requests submitted whose reply has not come back yet.
    outstanding: usize,
    /// The peer sent EOF: answer what is outstanding, then close.
    read_closed: bool,
    /// A parse error or an oversized request was seen: nothing more is read.
    read_stopped: bool,
    /// Its `Close` came through the outbox: nothing more is queued, and the connection
    /// closes once what is queued has been sent.
    closing: bool,
    /// The peer closed both directions: once its last bytes are read, nobody is left to
    /// answer.
    peer_gone: bool,
    /// The connection is dead (send or recv failed): reap it.
    dead: bool,
}

/// Reads per readiness event before other connections get their turn.
const READS_PER_TURN: usize = 16;
const READ_CHUNK: usize = 64 * 1024;

enum ReadOutcome {
    /// Read until the socket had nothing more (or the connection is done reading).
    Drained,
    /// Stopped after [`READS_PER_TURN`] reads with more possibly waiting.
    More,
}

impl Conn {
    fn new(id: u64, stream: UnixStream) -> Conn {
        Conn {
            id,
            stream,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            outstanding: 0,
            read_closed: false,
            read_stopped: false,
            closing: false,
            peer_gone: false,
            dead: false,
        }
    }

    fn read(&mut self, shared: &Arc<Shared>, chunk: &mut [u8]) -> ReadOutcome {
        for _ in 0..READS_PER_TURN {
            if self.read_closed || self.read_stopped || self.dead {
                return ReadOutcome::Drained;
            }
            let n = match self.stream.read(chunk) {
                Ok(0) => {
                    if !self.inbuf.iter().all(u8::is_ascii_whitespace) {
                        tracing::debug!(conn = self.id, "RPC peer closed with a partial request");
                    }
                    self.read_closed = true;
                    return ReadOutcome::Drained;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(conn = self.id, "RPC recv failed: {e}");
                    self.dead = true;
                    return ReadOutcome::Drained;
                }
            };
            self.inbuf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
            let mut requests = Requests {
                shared,
                id: self.id,
                submitted: 0,
            };
            let flow = requests.process(&mut self.inbuf);
            self.outstanding += requests.submitted;
            if let Flow::Close = flow {
                self.read_stopped = true;
                self.inbuf = Vec::new();
            } else if self.inbuf.len() >= shared.opts.max_request_bytes {
                tracing::error!(
                    conn = self.id,
                    "RPC request exceeds {} bytes; closing connection",
                    shared.opts.max_request_bytes
                );
                requests.parse_error_and_close();
                self.read_stopped = true;
                self.inbuf = Vec::new();
            }
        }
        ReadOutcome::More
    }

    /// Takes one message from the outbox.
    fn deliver(&mut self, msg: Outgoing) {
        match msg {
            Outgoing::Finished(text) => {
                self.outstanding = self.outstanding.saturating_sub(1);
                if let Some(t) = text {
                    self.queue(&t);
                }
            }
            Outgoing::Error(text) => self.queue(&text),
            Outgoing::Close => self.closing = true,
        }
    }

    fn queue(&mut self, text: &str) {
        // After a parse error nothing else is sent, as in SPDK.
        if !self.closing {
            self.out.extend_from_slice(text.as_bytes());
        }
    }

    /// Sends queued replies until done or the socket is full.
    fn flush(&mut self) {
        while self.out_pos < self.out.len() && !self.dead {
            let pending = self.out.get(self.out_pos..).unwrap_or_default();
            match send_some(self.stream.as_raw_fd(), pending) {
                Ok(0) => self.dead = true,
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!(conn = self.id, "RPC send failed: {e}");
                    self.dead = true;
                }
            }
        }
        if self.out_pos >= self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            // Do not keep a large reply's buffer around for an idle connection.
            if self.out.capacity() > READ_CHUNK {
                self.out = Vec::new();
            }
        }
    }

    /// Whether the loop should close the connection now.
    fn finished(&self) -> bool {
        let flushed = self.out_pos >= self.out.len();
        self.dead
            || (self.closing && flushed)
            || (self.read_closed && (self.peer_gone || (self.outstanding == 0 && flushed)))
    }
}

// ---------------------------------------------------------------------------------------
// The event loop

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// Connection ids start here, so that a connection's token is its id.
const FIRST_CONN_ID: u64 = 2;

struct EventLoop {
    poll: Poll,
    listener: UnixListener,
    shared: Arc<Shared>,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    /// Connections that stopped reading after their turn with data possibly left.
    again: Vec<u64>,
    /// Accepting failed for lack of resources: retry after a pause.
    accept_backoff: bool,
    chunk: Vec<u8>,
}

fn token_of(id: u64) -> Token {
    Token(usize::try_from(id).unwrap_or(usize::MAX))
}

impl EventLoop {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        while !self.shared.stopping.load(Ordering::Acquire) {
            let timeout = if !self.again.is_empty() {
                Some(Duration::ZERO)
            } else if self.accept_backoff {
                Some(Duration::from_millis(10))
            } else {
                None
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("RPC event loop poll failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            if self.shared.stopping.load(Ordering::Acquire) {
                break;
            }
            let mut touched: Vec<u64> = std::mem::take(&mut self.again);
            let mut accept = self.accept_backoff;
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => accept = true,
                    WAKER => {}
                    Token(t) => {
                        let id = t as u64;
                        if let Some(c) = self.conns.get_mut(&id) {
                            // The peer closed both directions: nobody is left to answer.
                            if ev.is_read_closed() && ev.is_write_closed() {
                                c.peer_gone = true;
                            }
                            touched.push(id);
                        }
                    }
                }
            }
            // Connections first, so that slots of finished ones are free for new clients.
            for id in &touched {
                self.service(*id);
            }
            self.deliver_and_reap(&touched);
            if accept {
                self.accept();
            }
        }
        let n = self.conns.len();
        self.conns.clear();
        self.shared.active.store(0, Ordering::Release);
        tracing::debug!(closed = n, "RPC event loop finished");
    }

    /// Reads what a connection sent (until the socket is drained or its turn is over).
    fn service(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if let ReadOutcome::More = c.read(&self.shared, &mut self.chunk) {
            self.again.push(id);
        }
    }

    /// Hands queued replies to their connections, sends them, and closes the connections
    /// that are done (`extra`: ones with news of their own, such as an EOF).
    fn deliver_and_reap(&mut self, extra: &[u64]) {
        let queued = std::mem::take(&mut *lock(&self.shared.outbox));
        let mut dirty: Vec<u64> = extra.to_vec();
        for (id, msg) in queued {
            // Replies for a connection that is gone are dropped, as in SPDK.
            if let Some(c) = self.conns.get_mut(&id) {
                c.deliver(msg);
                dirty.push(id);
            }
        }
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty {
            let done = match self.conns.get_mut(&id) {
                Some(c) => {
                    c.flush();
                    c.finished()
                }
                None => false,
            };
            if done {
                self.close(id);
            }
        }
        self.shared
            .active
            .store(self.conns.len(), Ordering::Release);
    }

    fn close(&mut self, id: u64) {
        if let Some(mut c) = self.conns.remove(&id) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.again.retain(|&a| a != id);
            tracing::debug!(conn = id, "RPC connection closed");
        }
    }

    fn accept(&mut self) {
        self.accept_backoff = false;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!("RPC accept failed: {e}");
                    self.accept_backoff = true;
                    break;
                }
            }
        }
    }

    fn admit(&mut self, mut stream: UnixStream) {
        if self.conns.len() >= self.shared.opts.max_connections {
            // Replies may have finished some connections since the last look.
            self.deliver_and_reap(&[]);
        }
        if self.conns.len() >= self.shared.opts.max_connections {
            tracing::error!(
                "Could not accept RPC connection: too many open connections (max {})",
                self.shared.opts.max_connections
            );
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token_of(id),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::error!("RPC connection setup failed: {e}");
            return;
        }
        tracing::debug!(conn = id, "RPC connection accepted");
        self.conns.insert(id, Conn::new(id, stream));
        // Serve what it already sent (often everything, up to its close) right away:
        // a burst of short-lived clients then never holds slots a later one needs.
        self.service(id);
        self.deliver_and_reap(&[id]);
    }
}

/// The SPDK-compatible JSON-RPC server (see the crate docs for the threading model).
///
/// Dropping it is the same as [`stop`](Self::stop).
pub struct RpcServer {
    shared: Arc<Shared>,
    path: PathBuf,
    lock_path: PathBuf,
    lock_file: Option<File>,
    event_loop: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer")
            .field("path", &self.path)
            .field("connections", &self.connection_count())
            .field("paused", &self.is_paused())
            .finish()
    }
}

fn lock_path_for(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".lock");
    PathBuf::from(s)
}

/// Takes `<path>.lock` with `flock(LOCK_EX | LOCK_NB)`.
fn take_lock(path: &Path, lock_path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock_path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("Cannot open RPC lock file {}: {e}", lock_path.display()),
            )
        })?;
    // SAFETY: `file` owns a valid open descriptor for the duration of the call; flock takes
    // no pointers.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "RPC Unix domain socket path {} in use. Specify another.",
                    path.display()
                ),
            ));
        }
        return Err(io::Error::new(
            e.kind(),
            format!("Cannot lock {}: {e}", lock_path.display()),
        ));
    }
    Ok(file)
}

/// Removes a stale socket file at `path` (refusing to delete anything that is not a socket).
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl RpcServer {
    /// Starts listening on `path` with default [`ServerOptions`].
    pub fn start(
        path: impl AsRef<Path>,
        registry: Registry,
        dispatcher: Dispatcher,
    ) -> io::Result<RpcServer> {
        Self::start_with_options(path, registry, dispatcher, ServerOptions::default())
    }

    /// Starts listening on `path`.
    ///
    /// Takes `<path>.lock` (fails with `ErrorKind::AddrInUse` and "RPC Unix domain socket
    /// path `<p>` in use. Specify another." if another process holds it), removes a stale
    /// socket file, binds, sets the socket's mode (0600 unless overridden) and starts the
    /// event-loop thread that serves every connection.
    pub fn start_with_options(
        path: impl AsRef<Path>,
        registry: Registry,
        dispatcher: Dispatcher,
        opts: ServerOptions,
    ) -> io::Result<RpcServer> {
        let path = path.as_ref().to_path_buf();
        let lock_path = lock_path_for(&path);
        let lock_file = take_lock(&path, &lock_path)?;
        let cleanup_lock = |e: io::Error| {
            let _ = fs::remove_file(&lock_path);
            e
        };
        remove_stale_socket(&path).map_err(cleanup_lock)?;
        let listener = std::os::unix::net::UnixListener::bind(&path).map_err(|e| {
            cleanup_lock(io::Error::new(
                e.kind(),
                format!("Cannot listen on RPC socket {}: {e}", path.display()),
            ))
        })?;
        let cleanup_all = |e: io::Error| {
            let _ = fs::remove_file(&path);
            cleanup_lock(e)
        };
        let mode = opts.socket_mode.unwrap_or(DEFAULT_SOCKET_MODE);
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(cleanup_all)?;
        listener.set_nonblocking(true).map_err(cleanup_all)?;
        let mut listener = UnixListener::from_std(listener);
        let poll = Poll::new().map_err(cleanup_all)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(cleanup_all)?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(cleanup_all)?;

        let shared = Arc::new(Shared {
            registry,
            gate: PauseHandle::new(dispatcher, opts.start_paused),
            opts,
            active: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            outbox: Mutex::new(Vec::new()),
            waker,
        });
        let event_loop = EventLoop {
            poll,
            listener,
            shared: Arc::clone(&shared),
            conns: HashMap::new(),
            next_id: FIRST_CONN_ID,
            again: Vec::new(),
            accept_backoff: false,
            chunk: vec![0; READ_CHUNK],
        };
        let event_loop = thread::Builder::new()
            .name("wc-rpc".into())
            .spawn(move || event_loop.run())
            .map_err(cleanup_all)?;
        tracing::info!("RPC server listening on {} (mode {mode:o})", path.display());
        Ok(RpcServer {
            shared,
            path,
            lock_path,
            lock_file: Some(lock_file),
            event_loop: Some(event_loop),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Holds requests (read but not dispatched) until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.shared.gate.pause();
    }

    /// Dispatches held requests in arrival order and lets new ones through.
    pub fn resume(&self) {
        self.shared.gate.resume();
    }

    /// Whether requests are being held.
    pub fn is_paused(&self) -> bool {
        self.shared.gate.is_paused()
    }

    /// A cloneable handle on the pause gate (for handlers such as `framework_start_init`).
    pub fn pause_handle(&self) -> PauseHandle {
        self.shared.gate.clone()
    }

    /// The registry this server dispatches to.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// Open connections (including ones waiting for outstanding replies).
    pub fn connection_count(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Stops accepting, closes every connection, drops held requests and removes the socket
    /// and lock files. Idempotent. Handlers still running may answer; those replies are
    /// discarded.
    pub fn stop(&mut self) {
        let Some(event_loop) = self.event_loop.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::Release);
        if let Err(e) = self.shared.waker.wake() {
            tracing::error!("RPC event loop wake-up failed: {e}");
        }
        // The loop closes every connection on its way out.
        if event_loop.join().is_err() {
            tracing::error!("RPC event loop thread panicked");
        }
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!("Cannot remove RPC socket {}: {e}", self.path.display());
        }
        let _ = fs::remove_file(&self.lock_path);
        // Closing the file releases the flock.
        self.lock_file = None;
        lock(&self.shared.outbox).clear();
        self.shared.gate.discard_held();
        tracing::info!("RPC server on {} stopped", self.path.display());
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn gate_holds_and_releases_in_order() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let gate = PauseHandle::new(inline_dispatcher(), true);
        for i in 0..3 {
            let o = Arc::clone(&order);
            gate.submit(Box::new(move || lock(&o).push(i)));
        }
        assert!(lock(&order).is_empty());
        gate.resume();
        assert_eq!(*lock(&order), vec![0, 1, 2]);
        let o = Arc::clone(&order);
        gate.submit(Box::new(move || lock(&o).push(3)));
        assert_eq!(*lock(&order), vec![0, 1, 2, 3]);
    }

    #[test]
    fn gate_job_may_pause_and_resume_reentrantly() {
        let gate = PauseHandle::new(inline_dispatcher(), true);
        let count = Arc::new(AtomicU32::new(0));
        let g = gate.clone();
        let c = Arc::clone(&count);
        gate.submit(Box::new(move || {
            // A framework_start_init-like handler: pause, do work, resume.
            g.pause();
            c.fetch_add(1, Ordering::SeqCst);
            g.resume();
        }));
        let c = Arc::clone(&count);
        gate.submit(Box::new(move || {
            c.fetch_add(10, Ordering::SeqCst);
        }));
        gate.resume();
        assert_eq!(count.load(Ordering::SeqCst), 11);
        assert!(!gate.is_paused());
    }

    #[test]
    fn lock_path_appends_suffix() {
        assert_eq!(
            lock_path_for(Path::new("/var/tmp/spdk.sock")),
            PathBuf::from("/var/tmp/spdk.sock.lock")
        );
    }
}
