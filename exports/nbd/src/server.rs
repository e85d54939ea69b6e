//! Control plane: listeners, exports, the accept poller, and what
//! `save_config` writes. Everything here is called from the main reactor
//! (RPC handlers) and guarded by one process-wide mutex; the I/O path never
//! takes it (connections hold `Arc`s of what they use).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use wc_bdev::{BdevError, BdevEvent, Desc, IoType};
use wc_reactor::PollStatus;

use crate::proto::{Geometry, MAX_NAME_LEN, MAX_PAYLOAD};
use crate::stream::NbdStream;

/// Errors of the control operations, each with the errno its RPC reply
/// carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdError {
    /// A server on that address, or an export of that name, exists (-17).
    Exists(String),
    /// No such server, export or bdev (-19).
    NotFound(String),
    /// Malformed listen address or export name (-22).
    Invalid(String),
    /// The address is in use by someone else (-98).
    AddrInUse(String),
    /// Opening the bdev failed.
    Bdev(BdevError),
    /// A system call failed.
    Os {
        /// What was being done, and why it failed.
        msg: String,
        /// The errno.
        errno: i32,
    },
}

impl NbdError {
    /// The (positive) errno of the error.
    pub fn errno(&self) -> i32 {
        match self {
            NbdError::Exists(_) => libc::EEXIST,
            NbdError::NotFound(_) => libc::ENODEV,
            NbdError::Invalid(_) => libc::EINVAL,
            NbdError::AddrInUse(_) => libc::EADDRINUSE,
            NbdError::Bdev(e) => e.errno(),
            NbdError::Os { errno, .. } => *errno,
        }
    }

    fn os(what: String, e: &io::Error) -> NbdError {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        if errno == libc::EADDRINUSE {
            return NbdError::AddrInUse(format!("{what}: address already in use"));
        }
        NbdError::Os {
            msg: format!("{what}: {e}"),
            errno,
        }
    }
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Exists(m)
            | NbdError::NotFound(m)
            | NbdError::Invalid(m)
            | NbdError::AddrInUse(m) => f.write_str(m),
            NbdError::Bdev(e) => write!(f, "{e}"),
            NbdError::Os { msg, .. } => f.write_str(msg),
        }
    }
}

impl std::error::Error for NbdError {}

/// A parsed `listen` string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket path (anything containing a `/`).
    Unix(PathBuf),
    /// `IPv4:port`, `[IPv6]:port` or `localhost:port` (= 127.0.0.1).
    Tcp(SocketAddr),
}

/// Parses `listen`: a Unix socket path (it must contain a `/`, e.g.
/// `/var/tmp/nbd.sock` or `./nbd.sock`) or `HOST:PORT` where HOST is an
/// IPv4 literal, a bracketed IPv6 literal or `localhost`.
pub fn parse_listen(listen: &str) -> Result<ListenAddr, NbdError> {
    let bad = |why: &str| NbdError::Invalid(format!("invalid listen address '{listen}': {why}"));
    if listen.is_empty() {
        return Err(bad("empty"));
    }
    if listen.contains('/') {
        if listen.contains('\0') {
            return Err(bad("NUL in path"));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if listen.len() > 107 {
            return Err(bad("Unix socket path longer than 107 bytes"));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(listen)));
    }
    let Some((host, port)) = listen.rsplit_once(':') else {
        return Err(bad("expected a Unix socket path (with a '/') or HOST:PORT"));
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("port must be a number"));
    }
    let port: u16 = port.parse().map_err(|_| bad("port out of range"))?;
    let ip = if host == "localhost" {
        Ipv4Addr::LOCALHOST.into()
    } else if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 literal"))?
            .into()
    } else {
        host.parse::<Ipv4Addr>()
            .map_err(|_| bad("host must be an IPv4 literal, [IPv6] or localhost"))?
            .into()
    };
    Ok(ListenAddr::Tcp(SocketAddr::new(ip, port)))
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// One listening socket.
pub(crate) struct Server {
    /// Canonical listen string (TCP: the bound address).
    pub(crate) listen: String,
    addr: ListenAddr,
    sock: Mutex<Option<Listener>>,
    /// (dev, ino) of the socket file we created, to remove only our own.
    unix_id: Option<(u64, u64)>,
    /// Set when stopped: its connections close.
    pub(crate) closed: AtomicBool,
    pub(crate) connections: AtomicUsize,
}

impl Server {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let taken = self.sock.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(taken);
        if let (ListenAddr::Unix(path), Some(id)) = (&self.addr, self.unix_id) {
            if let Ok(md) = std::fs::symlink_metadata(path) {
                if md.file_type().is_socket() && (md.dev(), md.ino()) == id {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// One exported bdev.
pub(crate) struct Export {
    id: u64,
    pub(crate) name: String,
    pub(crate) bdev_name: String,
    pub(crate) readonly: bool,
    pub(crate) desc: Desc,
    pub(crate) geom: Geometry,
    pub(crate) connections: AtomicUsize,
    /// Set when deleted (or its bdev went away): its connections close.
    pub(crate) removed: AtomicBool,
}

#[derive(Default)]
struct State {
    servers: Vec<Arc<Server>>,
    exports: Vec<Arc<Export>>,
}

fn state() -> MutexGuard<'static, State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

static NEXT_EXPORT: AtomicU64 = AtomicU64::new(1);

/// An export as `nbd_get_exports` reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ExportSummary {
    /// The name clients ask for.
    pub export_name: String,
    /// The bdev behind it.
    pub bdev_name: String,
    /// Whether writes are refused.
    pub readonly: bool,
    /// Clients currently in the transmission phase.
    pub connections: usize,
}

/// A listener as `nbd_get_servers` reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServerSummary {
    /// The canonical listen address.
    pub listen: String,
    /// `unix` or `tcp`.
    pub transport: &'static str,
    /// Open connections accepted by it.
    pub connections: usize,
}

/// Starts listening on `listen` (see [`parse_listen`]) and registers the
/// accept poller on the calling reactor. Returns the canonical address
/// (for TCP port 0, the port actually bound).
pub fn start_server(listen: &str) -> Result<String, NbdError> {
    let addr = parse_listen(listen)?;
    let reactor = wc_reactor::try_current()
        .ok_or_else(|| NbdError::Invalid("nbd_server_start must run on a reactor".into()))?;
    {
        let st = state();
        if st
            .servers
            .iter()
            .any(|s| s.addr == addr || s.listen == listen)
        {
            return Err(NbdError::Exists(format!(
                "an NBD server already listens on {listen}"
            )));
        }
    }
    let (sock, canonical, unix_id, addr) = match addr {
        ListenAddr::Unix(path) => {
            let l = bind_unix(&path)?;
            let md = std::fs::symlink_metadata(&path)
                .map_err(|e| NbdError::os(format!("stat {}", path.display()), &e))?;
            (
                Listener::Unix(l),
                listen.to_string(),
                Some((md.dev(), md.ino())),
                ListenAddr::Unix(path),
            )
        }
        ListenAddr::Tcp(sa) => {
            let l = TcpListener::bind(sa).map_err(|e| NbdError::os(format!("bind {sa}"), &e))?;
            l.set_nonblocking(true)
                .map_err(|e| NbdError::os(format!("listen on {sa}"), &e))?;
            let bound = l
                .local_addr()
                .map_err(|e| NbdError::os(format!("listen on {sa}"), &e))?;
            let canonical = if sa.port() == 0 {
                bound.to_string()
            } else {
                listen.to_string()
            };
            (Listener::Tcp(l), canonical, None, ListenAddr::Tcp(bound))
        }
    };
    let server = Arc::new(Server {
        listen: canonical.clone(),
        addr,
        sock: Mutex::new(Some(sock)),
        unix_id,
        closed: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
    });
    {
        let mut st = state();
        // Re-check: another caller may have raced us between the checks.
        if st.servers.iter().any(|s| s.listen == canonical) {
            drop(st);
            server.close();
            return Err(NbdError::Exists(format!(
                "an NBD server already listens on {listen}"
            )));
        }
        st.servers.push(server.clone());
    }
    let handle = std::rc::Rc::new(std::cell::RefCell::new(None::<wc_reactor::PollerHandle>));
    let h2 = handle.clone();
    let poller = reactor.register_poller("nbd_accept", Some(Duration::from_millis(1)), move || {
        let accepted = accept_some(&server);
        if accepted.is_none() {
            if let Some(h) = h2.borrow().as_ref() {
                h.unregister();
            }
            return PollStatus::Idle;
        }
        PollStatus::from(accepted.unwrap_or(0) > 0)
    });
    *handle.borrow_mut() = Some(poller);
    tracing::info!("NBD server listening on {canonical}");
    Ok(canonical)
}

/// Accepts what is waiting (bounded); `None` once the server is stopped.
fn accept_some(server: &Arc<Server>) -> Option<usize> {
    let mut n = 0;
    for _ in 0..32 {
        let got = {
            let guard = server.sock.lock().unwrap_or_else(|p| p.into_inner());
            let sock = guard.as_ref()?;
            match sock {
                Listener::Unix(l) => l.accept().map(|(s, _)| NbdStream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| NbdStream::Tcp(s)),
            }
        };
        match got {
            Ok(stream) => {
                n += 1;
                crate::conn::dispatch(stream, server.clone());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                // EMFILE and the like: try again on a later run.
                tracing::warn!("NBD accept on {}: {e}", server.listen);
                break;
            }
        }
    }
    Some(n)
}

/// Binds a Unix listener at `path`, created with mode 0600: the socket's
/// inode gets its mode before `bind` creates the file, so there is no
/// window in which others could connect. A stale socket file (nobody
/// listening) is replaced; a live one is `AddrInUse`.
fn bind_unix(path: &Path) -> Result<UnixListener, NbdError> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(NbdError::AddrInUse(format!(
                    "{shown}: a server already listens there"
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .map_err(|e| NbdError::os(format!("remove stale socket {shown}"), &e))?;
            }
            Err(e) => return Err(NbdError::os(format!("probe {shown}"), &e)),
        },
        Ok(_) => {
            return Err(NbdError::AddrInUse(format!(
                "{shown} exists and is not a socket"
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(NbdError::os(format!("stat {shown}"), &e)),
    }
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid (empty) address.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= sa.sun_path.len() {
        return Err(NbdError::Invalid(format!("{shown}: path too long")));
    }
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sa.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(NbdError::os(
            format!("socket for {shown}"),
            &io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchmod on our own open socket; Linux gives the socket file
    // created by bind() this inode's mode (minus the umask).
    unsafe { libc::fchmod(owned.as_raw_fd(), 0o600) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `sa` is a valid sockaddr_un that outlives the call, and
    // `len` covers the family and the NUL-terminated path inside it.
    let rc = unsafe {
        libc::bind(
            owned.as_raw_fd(),
            (&sa as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(NbdError::os(
            format!("bind {shown}"),
            &io::Error::last_os_error(),
        ));
    }
    // Belt and braces for kernels that ignore the inode mode.
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(NbdError::os(format!("chmod {shown}"), &e));
    }
    // SAFETY: listen() on our bound socket takes no pointers.
    if unsafe { libc::listen(owned.as_raw_fd(), 128) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(NbdError::os(format!("listen on {shown}"), &e));
    }
    Ok(UnixListener::from(owned))
}

/// Stops the server listening on `listen` (the string given to start, or
/// the same address written another way). Its connections are closed.
pub fn stop_server(listen: &str) -> Result<(), NbdError> {
    let parsed = parse_listen(listen).ok();
    let server = {
        let mut st = state();
        let pos = st.servers.iter().position(|s| {
            s.listen == listen
                || match (&parsed, &s.addr) {
                    (Some(ListenAddr::Tcp(a)), ListenAddr::Tcp(b)) => a == b,
                    (Some(ListenAddr::Unix(a)), ListenAddr::Unix(b)) => a == b,
                    _ => false,
                }
        });
        match pos {
            Some(i) => st.servers.remove(i),
            None => {
                return Err(NbdError::NotFound(format!(
                    "no NBD server listens on {listen}"
                )))
            }
        }
    };
    server.close();
    tracing::info!("NBD server on {} stopped", server.listen);
    Ok(())
}

/// Exports bdev `bdev_name` as `export_name` (read-only if asked).
pub fn create_export(bdev_name: &str, export_name: &str, readonly: bool) -> Result<(), NbdError> {
    if export_name.len() > MAX_NAME_LEN || export_name.contains('\0') {
        return Err(NbdError::Invalid(format!(
            "export name must be at most {MAX_NAME_LEN} bytes without NUL"
        )));
    }
    if state().exports.iter().any(|e| e.name == export_name) {
        return Err(NbdError::Exists(format!(
            "NBD export '{export_name}' already exists"
        )));
    }
    let id = NEXT_EXPORT.fetch_add(1, Ordering::Relaxed);
    let on_event: wc_bdev::EventCallback = Arc::new(move |ev| {
        if ev == BdevEvent::Remove {
            remove_export_by_id(id);
        }
    });
    let desc = wc_bdev::open(bdev_name, !readonly, Some(on_event)).map_err(|e| match e {
        BdevError::NotFound(n) => NbdError::NotFound(format!("bdev '{n}' not found")),
        e => NbdError::Bdev(e),
    })?;
    let b = desc.bdev().clone();
    if b.block_size() > 64 * 1024 || !b.io_type_supported(IoType::Read) {
        return Err(NbdError::Invalid(format!(
            "bdev '{}' cannot be exported (block size {} > 64 KiB or no reads)",
            b.name(),
            b.block_size()
        )));
    }
    let bs = b.block_size();
    let mut max_payload = MAX_PAYLOAD;
    if b.max_io_blocks() > 0 {
        let cap = b.max_io_blocks().saturating_mul(u64::from(bs));
        max_payload = max_payload.min(u32::try_from(cap).unwrap_or(u32::MAX));
    }
    max_payload = (max_payload / bs).max(1) * bs;
    let readonly = readonly || !b.io_type_supported(IoType::Write);
    let geom = Geometry {
        size: b.size_bytes(),
        block_size: bs,
        max_payload,
        readonly,
        flush: b.io_type_supported(IoType::Flush),
        trim: b.io_type_supported(IoType::Unmap),
        write_zeroes: b.io_type_supported(IoType::WriteZeroes),
    };
    let export = Arc::new(Export {
        id,
        name: export_name.to_string(),
        bdev_name: b.name().to_string(),
        readonly,
        desc,
        geom,
        connections: AtomicUsize::new(0),
        removed: AtomicBool::new(false),
    });
    let mut st = state();
    if st.exports.iter().any(|e| e.name == export_name) {
        return Err(NbdError::Exists(format!(
            "NBD export '{export_name}' already exists"
        )));
    }
    st.exports.push(export);
    tracing::info!("NBD export '{export_name}' of bdev '{}'", b.name());
    Ok(())
}

/// Deletes an export; its connections are closed (I/O in flight completes
/// and is dropped).
pub fn delete_export(export_name: &str) -> Result<(), NbdError> {
    let e = {
        let mut st = state();
        let Some(i) = st.exports.iter().position(|e| e.name == export_name) else {
            return Err(NbdError::NotFound(format!(
                "NBD export '{export_name}' not found"
            )));
        };
        st.exports.remove(i)
    };
    e.removed.store(true, Ordering::Release);
    tracing::info!("NBD export '{export_name}' deleted");
    Ok(())
}

fn remove_export_by_id(id: u64) {
    let e = {
        let mut st = state();
        let Some(i) = st.exports.iter().position(|e| e.id == id) else {
            return;
        };
        st.exports.remove(i)
    };
    e.removed.store(true, Ordering::Release);
    tracing::info!("NBD export '{}' removed with its bdev", e.name);
}

/// The export called `name`, for the handshake.
pub(crate) fn find_export(name: &str) -> Option<Arc<Export>> {
    state().exports.iter().find(|e| e.name == name).cloned()
}

/// Export names, for `NBD_OPT_LIST`.
pub(crate) fn export_names() -> Vec<String> {
    state().exports.iter().map(|e| e.name.clone()).collect()
}

/// Every export, in creation order.
pub fn exports() -> Vec<ExportSummary> {
    state()
        .exports
        .iter()
        .map(|e| ExportSummary {
            export_name: e.name.clone(),
            bdev_name: e.bdev_name.clone(),
            readonly: e.readonly,
            connections: e.connections.load(Ordering::Relaxed),
        })
        .collect()
}

/// Every listener, in start order.
pub fn servers() -> Vec<ServerSummary> {
    state()
        .servers
        .iter()
        .map(|s| ServerSummary {
            listen: s.listen.clone(),
            transport: match s.addr {
                ListenAddr::Unix(_) => "unix",
                ListenAddr::Tcp(_) => "tcp",
            },
            connections: s.connections.load(Ordering::Relaxed),
        })
        .collect()
}

/// The `nbd` subsystem's `save_config` entries: servers, then exports.
pub fn config_entries() -> Vec<Value> {
    let st = state();
    let servers = st.servers.iter().map(|s| {
        json!({
            "method": "nbd_server_start",
            "params": {"listen": s.listen},
        })
    });
    let exports = st.exports.iter().map(|e| {
        json!({
            "method": "nbd_export_create",
            "params": {
                "bdev_name": e.bdev_name,
                "export_name": e.name,
                "readonly": e.readonly,
            },
        })
    });
    servers.chain(exports).collect()
}

/// Stops every server (removing socket files) and deletes every export;
/// what the target runs at shutdown.
pub fn shutdown() {
    let (servers, exports) = {
        let mut st = state();
        (
            std::mem::take(&mut st.servers),
            std::mem::take(&mut st.exports),
        )
    };
    for s in servers {
        s.close();
    }
    for e in exports {
        e.removed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        use ListenAddr::*;
        let ok = |s: &str| parse_listen(s).unwrap();
        assert_eq!(ok("/tmp/x.sock"), Unix("/tmp/x.sock".into()));
        assert_eq!(ok("./x.sock"), Unix("./x.sock".into()));
        assert_eq!(
            ok("127.0.0.1:10809"),
            Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(ok("localhost:0"), Tcp("127.0.0.1:0".parse().unwrap()));
        assert_eq!(ok("[::1]:10809"), Tcp("[::1]:10809".parse().unwrap()));
        assert_eq!(ok("0.0.0.0:1"), Tcp("0.0.0.0:1".parse().unwrap()));
        for bad in [
            "",
            "x.sock",
            "host:1",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:65536",
            "127.0.0.1:+1",
            "::1:10809",
            "[::1:10809",
            "[nope]:1",
            "1.2.3:4",
        ] {
            let e = parse_listen(bad).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{bad}: {e}");
        }
        let long = format!("/{}", "a".repeat(107));
        assert_eq!(parse_listen(&long).unwrap_err().errno(), libc::EINVAL);
    }
}
