//! The Unix-socket JSON-RPC server.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

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

/// A dispatcher that runs handlers right away on the connection's reader thread.
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

enum Outgoing {
    Data(String),
    /// Flush what came before, then close the connection.
    Close,
}

struct Shared {
    registry: Registry,
    gate: PauseHandle,
    opts: ServerOptions,
    active: AtomicUsize,
    stopping: AtomicBool,
    conns: Mutex<ConnTable>,
}

#[derive(Default)]
struct ConnTable {
    next_id: u64,
    /// A handle on each live connection, so that `stop` can shut it down.
    live: HashMap<u64, UnixStream>,
}

/// Held by a connection's reader and writer threads; the slot is freed when both are done.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.shared.conns).live.remove(&self.id);
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
        tracing::debug!(conn = self.id, "RPC connection closed");
    }
}

#[cfg(target_os = "linux")]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: libc::c_int = 0;

/// Writes all of `buf`, without raising SIGPIPE if the peer is gone.
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    while !buf.is_empty() {
        // SAFETY: `fd` is a socket owned by `stream`, which outlives the call, and `buf`
        // points to `buf.len()` initialised bytes that `send` only reads.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), SEND_FLAGS) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = buf.get(n.unsigned_abs()..).unwrap_or_default();
    }
    Ok(())
}

fn writer_main(stream: UnixStream, rx: Receiver<Outgoing>, guard: Arc<ConnGuard>) {
    while let Ok(msg) = rx.recv() {
        match msg {
            Outgoing::Data(text) => {
                if let Err(e) = send_all(&stream, text.as_bytes()) {
                    tracing::debug!(conn = guard.id, "RPC send failed: {e}");
                    let _ = stream.shutdown(Shutdown::Both);
                    break;
                }
            }
            Outgoing::Close => {
                let _ = stream.shutdown(Shutdown::Both);
                break;
            }
        }
    }
}

enum Flow {
    Continue,
    Close,
}

struct Conn {
    shared: Arc<Shared>,
    tx: Sender<Outgoing>,
    id: u64,
}

impl Conn {
    fn send(&self, text: String) {
        let _ = self.tx.send(Outgoing::Data(text));
    }

    fn parse_error_and_close(&self) {
        self.send(format_error(&Id::Null, &RpcError::parse_error()) + "\n");
        let _ = self.tx.send(Outgoing::Close);
    }

    /// Parses every complete JSON value at the front of `buf` and drops the consumed bytes.
    fn process(&self, buf: &mut Vec<u8>) -> Flow {
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

    fn handle(&self, raw: &str) -> Flow {
        match parse_incoming(raw) {
            Err(_) => {
                tracing::debug!(conn = self.id, "RPC request could not be decoded");
                self.parse_error_and_close();
                Flow::Close
            }
            Ok(Incoming::Single(Err(e))) => {
                self.send(format_error(&Id::Null, &e) + "\n");
                Flow::Continue
            }
            Ok(Incoming::Single(Ok(req))) => {
                let tx = self.tx.clone();
                let id = req.id.clone();
                let responder = Responder::new(move |result| {
                    if let Some(text) = format_reply(&id, &result) {
                        let _ = tx.send(Outgoing::Data(text + "\n"));
                    }
                });
                self.submit(req, responder);
                Flow::Continue
            }
            Ok(Incoming::Batch(items)) => {
                let batch = Arc::new(Batch {
                    slots: Mutex::new(BatchSlots {
                        replies: vec![None; items.len()],
                        // +1: the batch cannot complete before every element is submitted.
                        remaining: items.len() + 1,
                    }),
                    tx: self.tx.clone(),
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
    tx: Sender<Outgoing>,
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
            if !parts.is_empty() {
                let _ = self
                    .tx
                    .send(Outgoing::Data(format!("[{}]\n", parts.join(","))));
            }
        }
    }
}

fn reader_main(conn: Conn, mut stream: UnixStream, _guard: Arc<ConnGuard>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => {
                if !buf.iter().all(u8::is_ascii_whitespace) {
                    tracing::debug!(conn = conn.id, "RPC peer closed with a partial request");
                }
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(conn = conn.id, "RPC recv failed: {e}");
                break;
            }
        };
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Flow::Close = conn.process(&mut buf) {
            break;
        }
        if buf.len() >= conn.shared.opts.max_request_bytes {
            tracing::error!(
                conn = conn.id,
                "RPC request exceeds {} bytes; closing connection",
                conn.shared.opts.max_request_bytes
            );
            conn.parse_error_and_close();
            break;
        }
    }
    // Dropping `conn.tx` lets the writer finish once outstanding requests have answered.
}

// ---------------------------------------------------------------------------------------
// Listener

fn poll_readable(fds: &mut [libc::pollfd]) -> io::Result<()> {
    let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
    // SAFETY: `fds` is a valid, exclusively borrowed slice of `nfds` pollfd structs for the
    // duration of the call; poll only writes their `revents` fields.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn acceptor_main(listener: UnixListener, wake: UnixStream, shared: Arc<Shared>) {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        for p in fds.iter_mut() {
            p.revents = 0;
        }
        if let Err(e) = poll_readable(&mut fds) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!("RPC listener poll failed: {e}");
                thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        if shared.stopping.load(Ordering::Acquire) || fds[1].revents != 0 {
            break;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => start_connection(&shared, stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted =>
                {
                    continue
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!("RPC accept failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
    }
}

fn start_connection(shared: &Arc<Shared>, stream: UnixStream) {
    if shared.active.load(Ordering::Acquire) >= shared.opts.max_connections {
        tracing::error!(
            "Could not accept RPC connection: too many open connections (max {})",
            shared.opts.max_connections
        );
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
    if let Err(e) = stream.set_nonblocking(false) {
        tracing::error!("RPC connection setup failed: {e}");
        return;
    }
    let (writer_stream, table_stream) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(w), Ok(t)) => (w, t),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("RPC connection setup failed: {e}");
            return;
        }
    };
    let id = {
        let mut t = lock(&shared.conns);
        t.next_id += 1;
        let id = t.next_id;
        t.live.insert(id, table_stream);
        id
    };
    shared.active.fetch_add(1, Ordering::AcqRel);
    // From here on, dropping the last guard frees the slot and the table entry.
    let guard = Arc::new(ConnGuard {
        shared: Arc::clone(shared),
        id,
    });
    tracing::debug!(conn = id, "RPC connection accepted");

    let (tx, rx) = mpsc::channel();
    let g = Arc::clone(&guard);
    let spawned = thread::Builder::new()
        .name(format!("wc-rpc-w{id}"))
        .spawn(move || writer_main(writer_stream, rx, g))
        .and_then(|_| {
            let conn = Conn {
                shared: Arc::clone(shared),
                tx,
                id,
            };
            thread::Builder::new()
                .name(format!("wc-rpc-r{id}"))
                .spawn(move || reader_main(conn, stream, guard))
        });
    if let Err(e) = spawned {
        tracing::error!("RPC connection thread spawn failed: {e}");
        if let Some(s) = lock(&shared.conns).live.get(&id) {
            let _ = s.shutdown(Shutdown::Both);
        }
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
    wake: Option<UnixStream>,
    acceptor: Option<JoinHandle<()>>,
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
    /// path `<p>` in use. Specify another." if another process holds it), removes a stale socket file, binds, sets the
    /// socket's mode (0600 unless overridden) and starts the acceptor thread.
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
        let listener = UnixListener::bind(&path).map_err(|e| {
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
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(cleanup_all)?;

        let shared = Arc::new(Shared {
            registry,
            gate: PauseHandle::new(dispatcher, opts.start_paused),
            opts,
            active: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(ConnTable::default()),
        });
        let s = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name("wc-rpc-accept".into())
            .spawn(move || acceptor_main(listener, wake_rx, s))
            .map_err(cleanup_all)?;
        tracing::info!("RPC server listening on {} (mode {mode:o})", path.display());
        Ok(RpcServer {
            shared,
            path,
            lock_path,
            lock_file: Some(lock_file),
            wake: Some(wake_tx),
            acceptor: Some(acceptor),
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
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(mut w) = self.wake.take() {
            let _ = w.write_all(b"x");
        }
        if acceptor.join().is_err() {
            tracing::error!("RPC acceptor thread panicked");
        }
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!("Cannot remove RPC socket {}: {e}", self.path.display());
        }
        let _ = fs::remove_file(&self.lock_path);
        // Closing the file releases the flock.
        self.lock_file = None;
        let live: Vec<UnixStream> = lock(&self.shared.conns)
            .live
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in &live {
            let _ = s.shutdown(Shutdown::Both);
        }
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
