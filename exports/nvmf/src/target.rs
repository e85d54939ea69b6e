//! Control plane: the transport, subsystems, listeners and what the RPCs
//! and `save_config` see. Called on the main reactor (RPC handlers) and
//! guarded by one process-wide mutex that the I/O path never takes.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;
use wc_bdev::BdevEvent;
use wc_nvme_wire::fabrics::{DISCOVERY_NQN, NQN_MAX_LEN};
use wc_reactor::PollStatus;

use crate::opts::TransportOpts;
use crate::subsystem::{lock, same_listener, ListenAddress, Namespace, Subsystem};

/// Errors of the control operations, each with the JSON-RPC code and
/// message the RPC answers with (SPDK's where it has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmfError {
    pub code: i32,
    pub message: String,
}

impl NvmfError {
    pub(crate) fn invalid(msg: impl Into<String>) -> NvmfError {
        NvmfError {
            code: wc_rpc::INVALID_PARAMS,
            message: msg.into(),
        }
    }

    pub(crate) fn internal(msg: impl Into<String>) -> NvmfError {
        NvmfError {
            code: wc_rpc::INTERNAL_ERROR,
            message: msg.into(),
        }
    }

    fn no_subsystem(nqn: &str) -> NvmfError {
        NvmfError::invalid(format!("Unable to find subsystem with NQN {nqn}"))
    }
}

impl std::fmt::Display for NvmfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for NvmfError {}

/// One listening socket, shared by every subsystem that lists its address.
pub(crate) struct Listener {
    pub addr: ListenAddress,
    sock: Mutex<Option<TcpListener>>,
    pub closed: AtomicBool,
    /// Subsystems listing this address.
    users: Mutex<usize>,
}

impl Listener {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.sock).take();
    }
}

struct State {
    transport: Option<Arc<TransportOpts>>,
    subsystems: Vec<Arc<Subsystem>>,
    listeners: Vec<Arc<Listener>>,
    accept_poller: bool,
}

fn state() -> MutexGuard<'static, State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    lock(S.get_or_init(|| {
        Mutex::new(State {
            transport: None,
            subsystems: vec![Arc::new(discovery_subsystem())],
            listeners: Vec::new(),
            accept_poller: false,
        })
    }))
}

fn discovery_subsystem() -> Subsystem {
    Subsystem::new(DISCOVERY_NQN, "", "", true, 0, (1, 0xffef))
}

static GENCTR: AtomicU64 = AtomicU64::new(1);

/// Discovery log generation: changes whenever what the log lists changes.
pub(crate) fn generation() -> u64 {
    GENCTR.load(Ordering::Acquire)
}

fn bump() {
    GENCTR.fetch_add(1, Ordering::AcqRel);
}

/// The transport options, once `nvmf_create_transport` ran.
pub(crate) fn transport() -> Option<Arc<TransportOpts>> {
    state().transport.clone()
}

pub(crate) fn find_subsystem(nqn: &str) -> Option<Arc<Subsystem>> {
    state().subsystems.iter().find(|s| s.nqn == nqn).cloned()
}

pub(crate) fn subsystems() -> Vec<Arc<Subsystem>> {
    state().subsystems.clone()
}

pub fn create_transport(params: &serde_json::Map<String, Value>) -> Result<(), NvmfError> {
    let trtype = params
        .get("trtype")
        .and_then(Value::as_str)
        .ok_or_else(|| NvmfError::invalid("Missing trtype"))?;
    if !trtype.eq_ignore_ascii_case("tcp") {
        return Err(NvmfError::invalid(format!(
            "Transport type '{trtype}' is not supported (only TCP)"
        )));
    }
    let opts = TransportOpts::from_params(params).map_err(NvmfError::invalid)?;
    let mut st = state();
    if st.transport.is_some() {
        return Err(NvmfError::internal(format!(
            "Transport type '{trtype}' already exists"
        )));
    }
    st.transport = Some(Arc::new(opts));
    Ok(())
}

pub fn get_transports(trtype: Option<&str>) -> Result<Value, NvmfError> {
    let st = state();
    let list: Vec<Value> = st.transport.iter().map(|t| t.to_json()).collect();
    if let Some(t) = trtype {
        if !t.eq_ignore_ascii_case("tcp") || list.is_empty() {
            return Err(NvmfError::invalid(format!(
                "Transport type '{t}' not found"
            )));
        }
    }
    Ok(Value::Array(list))
}

/// Checks the NQN format: `nqn.yyyy-mm.<reverse domain>[:...]` (or the
/// UUID form `nqn.2014-08.org.nvmexpress:uuid:...`), at most 223 bytes.
pub fn valid_nqn(nqn: &str) -> bool {
    let b = nqn.as_bytes();
    if b.len() < 12 || b.len() > NQN_MAX_LEN || !nqn.is_ascii() {
        return false;
    }
    nqn.starts_with("nqn.")
        && b[4..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'-'
        && b[9..11].iter().all(u8::is_ascii_digit)
        && b[11] == b'.'
        && b.len() > 12
}

/// `nvmf_create_subsystem` arguments.
pub struct SubsystemArgs {
    pub nqn: String,
    pub serial_number: Option<String>,
    pub model_number: Option<String>,
    pub allow_any_host: bool,
    pub max_namespaces: Option<u32>,
    pub min_cntlid: Option<u16>,
    pub max_cntlid: Option<u16>,
}

pub fn create_subsystem(a: SubsystemArgs) -> Result<(), NvmfError> {
    bump();
    let fail = || NvmfError::internal(format!("Unable to create subsystem {}", a.nqn));
    if !valid_nqn(&a.nqn) || a.nqn == DISCOVERY_NQN {
        return Err(fail());
    }
    let serial = a
        .serial_number
        .unwrap_or_else(|| "00000000000000000000".into());
    if serial.len() > 20 || !serial.bytes().all(|c| (0x20..0x7f).contains(&c)) {
        return Err(NvmfError::invalid(format!("Invalid SN {serial}")));
    }
    let model = a
        .model_number
        .unwrap_or_else(|| "SPDK bdev Controller".into());
    if model.len() > 40 || !model.bytes().all(|c| (0x20..0x7f).contains(&c)) {
        return Err(NvmfError::invalid(format!("Invalid MN {model}")));
    }
    let min = a.min_cntlid.unwrap_or(1);
    let max = a.max_cntlid.unwrap_or(0xffef);
    if min == 0 || max > 0xffef || min > max {
        return Err(NvmfError::invalid(format!(
            "Invalid cntlid range {min}-{max}"
        )));
    }
    let max_ns = match a.max_namespaces {
        None | Some(0) => 32,
        Some(n) => n,
    };
    let mut st = state();
    if st.subsystems.iter().any(|s| s.nqn == a.nqn) {
        return Err(fail());
    }
    st.subsystems.push(Arc::new(Subsystem::new(
        &a.nqn,
        &serial,
        &model,
        a.allow_any_host,
        max_ns,
        (min, max),
    )));
    Ok(())
}

pub fn delete_subsystem(nqn: &str) -> Result<(), NvmfError> {
    bump();
    let s = {
        let mut st = state();
        let Some(pos) = st
            .subsystems
            .iter()
            .position(|s| s.nqn == nqn && !s.discovery)
        else {
            return Err(NvmfError::no_subsystem(nqn));
        };
        st.subsystems.remove(pos)
    };
    s.deleted.store(true, Ordering::Release);
    let (listeners, ctrlrs, nss) = {
        let mut i = s.inner();
        (
            std::mem::take(&mut i.listeners),
            std::mem::take(&mut i.controllers),
            std::mem::take(&mut i.namespaces),
        )
    };
    for c in ctrlrs {
        c.destroy();
    }
    for l in listeners {
        release_listener(&l);
    }
    for ns in nss.values() {
        ns.removed.store(true, Ordering::Release);
    }
    s.ns_gen.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

fn parse_hex<const N: usize>(s: &str, what: &str) -> Result<[u8; N], NvmfError> {
    let clean: String = s.chars().filter(|c| *c != '-').collect();
    if clean.len() != N * 2 {
        return Err(NvmfError::invalid(format!("Invalid {what} {s}")));
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&clean[2 * i..2 * i + 2], 16)
            .map_err(|_| NvmfError::invalid(format!("Invalid {what} {s}")))?;
    }
    Ok(out)
}

/// `nvmf_subsystem_add_ns` namespace object.
pub struct NsArgs {
    pub bdev_name: String,
    pub nsid: Option<u32>,
    pub nguid: Option<String>,
    pub eui64: Option<String>,
    pub uuid: Option<String>,
}

/// Adds a namespace; returns its nsid.
pub fn add_ns(nqn: &str, a: NsArgs) -> Result<u32, NvmfError> {
    let s = find_subsystem(nqn).ok_or_else(|| NvmfError::no_subsystem(nqn))?;
    if s.discovery {
        return Err(NvmfError::invalid("Invalid parameters"));
    }
    let nguid = a
        .nguid
        .as_deref()
        .map(|g| parse_hex::<16>(g, "NGUID"))
        .transpose()?;
    let eui64 = a
        .eui64
        .as_deref()
        .map(|g| parse_hex::<8>(g, "EUI64"))
        .transpose()?;
    let uuid = a
        .uuid
        .as_deref()
        .map(|u| Uuid::parse_str(u).map_err(|_| NvmfError::invalid(format!("Invalid UUID {u}"))))
        .transpose()?;
    let nsid = {
        let i = s.inner();
        let nsid = match a.nsid {
            Some(0) | None => (1..=u32::MAX - 1)
                .find(|n| !i.namespaces.contains_key(n))
                .unwrap_or(0),
            Some(n) => n,
        };
        if nsid == 0 || nsid == u32::MAX || i.namespaces.contains_key(&nsid) {
            return Err(NvmfError::invalid(format!(
                "Unable to add ns: nsid {nsid} is invalid or in use"
            )));
        }
        if nsid > s.max_namespaces {
            return Err(NvmfError::invalid(format!(
                "Unable to add ns: nsid {nsid} exceeds max_namespaces {}",
                s.max_namespaces
            )));
        }
        nsid
    };
    let weak = Arc::downgrade(&s);
    let on_event: wc_bdev::EventCallback = Arc::new(move |ev| {
        if ev == BdevEvent::Remove {
            if let Some(s) = weak.upgrade() {
                if let Some(ns) = s.namespace(nsid) {
                    tracing::info!(
                        "nvmf: bdev {} of {} nsid {nsid} removed",
                        ns.bdev_name,
                        s.nqn
                    );
                }
                s.remove_namespace(nsid);
            }
        }
    });
    let desc = wc_bdev::open(&a.bdev_name, true, Some(on_event))
        .map_err(|e| NvmfError::invalid(format!("Unable to add ns: bdev {}: {e}", a.bdev_name)))?;
    let bdev = desc.bdev().clone();
    let uuid = uuid.unwrap_or_else(|| bdev.uuid());
    let ns = Arc::new(Namespace {
        nsid,
        bdev_name: a.bdev_name.clone(),
        uuid,
        nguid: nguid.unwrap_or(*uuid.as_bytes()),
        eui64,
        block_size: bdev.block_size(),
        num_blocks: bdev.num_blocks(),
        removed: AtomicBool::new(false),
        desc,
    });
    {
        let mut i = s.inner();
        if i.namespaces.contains_key(&nsid) {
            return Err(NvmfError::invalid(format!(
                "Unable to add ns: nsid {nsid} in use"
            )));
        }
        i.namespaces.insert(nsid, ns);
    }
    s.ns_added(nsid);
    Ok(nsid)
}

pub fn remove_ns(nqn: &str, nsid: u32) -> Result<(), NvmfError> {
    let s = find_subsystem(nqn).ok_or_else(|| NvmfError::no_subsystem(nqn))?;
    s.remove_namespace(nsid)
        .map(|_| ())
        .ok_or_else(|| NvmfError::invalid(format!("Invalid parameters: no namespace {nsid}")))
}

/// Normalizes an RPC listen address: TCP only, adrfam from the address
/// when not given, canonical spelling.
pub fn parse_listen_address(
    trtype: &str,
    adrfam: Option<&str>,
    traddr: &str,
    trsvcid: Option<&str>,
) -> Result<(ListenAddress, SocketAddr), NvmfError> {
    if !trtype.eq_ignore_ascii_case("tcp") {
        return Err(NvmfError::invalid(format!(
            "Invalid parameters: trtype '{trtype}' (only TCP)"
        )));
    }
    let ip: IpAddr = traddr
        .parse()
        .map_err(|_| NvmfError::invalid(format!("Invalid parameters: traddr '{traddr}'")))?;
    let fam = match adrfam.map(str::to_ascii_lowercase).as_deref() {
        None => {
            if ip.is_ipv4() {
                "IPv4"
            } else {
                "IPv6"
            }
        }
        Some("ipv4") if ip.is_ipv4() => "IPv4",
        Some("ipv6") if ip.is_ipv6() => "IPv6",
        Some(f) => {
            return Err(NvmfError::invalid(format!(
                "Invalid parameters: adrfam '{f}' for {traddr}"
            )))
        }
    };
    let svc = trsvcid
        .ok_or_else(|| NvmfError::invalid("Invalid parameters: trsvcid required for TCP"))?;
    let port: u16 = svc
        .parse()
        .map_err(|_| NvmfError::invalid(format!("Invalid parameters: trsvcid '{svc}'")))?;
    Ok((
        ListenAddress {
            trtype: "TCP".into(),
            adrfam: fam.into(),
            traddr: ip.to_string(),
            trsvcid: port.to_string(),
        },
        SocketAddr::new(ip, port),
    ))
}

pub fn add_listener(nqn: &str, addr: ListenAddress, sa: SocketAddr) -> Result<(), NvmfError> {
    bump();
    let s = find_subsystem(nqn).ok_or_else(|| NvmfError::no_subsystem(nqn))?;
    if transport().is_none() {
        return Err(NvmfError::invalid(
            "Unable to add listener: transport TCP has not been created",
        ));
    }
    if s.has_listener(&addr) {
        return Err(NvmfError::invalid(format!(
            "Invalid parameters: listener {}:{} already exists",
            addr.traddr, addr.trsvcid
        )));
    }
    acquire_listener(&addr, sa)?;
    s.inner().listeners.push(addr);
    Ok(())
}

pub fn remove_listener(nqn: &str, addr: &ListenAddress) -> Result<(), NvmfError> {
    bump();
    let s = find_subsystem(nqn).ok_or_else(|| NvmfError::no_subsystem(nqn))?;
    let removed = {
        let mut i = s.inner();
        let before = i.listeners.len();
        i.listeners.retain(|l| !same_listener(l, addr));
        before != i.listeners.len()
    };
    if !removed {
        return Err(NvmfError::invalid(format!(
            "Invalid parameters: no listener {}:{}",
            addr.traddr, addr.trsvcid
        )));
    }
    release_listener(addr);
    Ok(())
}

/// Binds (or shares) the socket of `addr`, exactly at the address asked.
fn acquire_listener(addr: &ListenAddress, sa: SocketAddr) -> Result<(), NvmfError> {
    let mut st = state();
    if let Some(l) = st.listeners.iter().find(|l| same_listener(&l.addr, addr)) {
        *lock(&l.users) += 1;
        return Ok(());
    }
    let sock = TcpListener::bind(sa).map_err(|e| {
        NvmfError::invalid(format!(
            "Unable to listen on {}:{}: {e}",
            addr.traddr, addr.trsvcid
        ))
    })?;
    sock.set_nonblocking(true)
        .map_err(|e| NvmfError::internal(format!("listener: {e}")))?;
    st.listeners.push(Arc::new(Listener {
        addr: addr.clone(),
        sock: Mutex::new(Some(sock)),
        closed: AtomicBool::new(false),
        users: Mutex::new(1),
    }));
    if !st.accept_poller {
        if let Some(r) = wc_reactor::try_current() {
            st.accept_poller = true;
            r.register_poller(
                "nvmf_tcp_accept",
                Some(Duration::from_millis(1)),
                accept_all,
            );
        }
    }
    Ok(())
}

fn release_listener(addr: &ListenAddress) {
    let mut st = state();
    let Some(pos) = st
        .listeners
        .iter()
        .position(|l| same_listener(&l.addr, addr))
    else {
        return;
    };
    let last = {
        let mut u = lock(&st.listeners[pos].users);
        *u = u.saturating_sub(1);
        *u == 0
    };
    if last {
        let l = st.listeners.remove(pos);
        l.close();
    }
}

/// The accept poller: takes new connections from every listener and hands
/// each to a reactor, round-robin.
fn accept_all() -> PollStatus {
    let listeners = state().listeners.clone();
    let mut n = 0;
    for l in listeners {
        for _ in 0..32 {
            let got = {
                let g = lock(&l.sock);
                let Some(sock) = g.as_ref() else { break };
                sock.accept()
            };
            match got {
                Ok((stream, peer)) => {
                    n += 1;
                    crate::conn::dispatch(stream, peer, l.clone());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    tracing::warn!("nvmf accept on {}:{}: {e}", l.addr.traddr, l.addr.trsvcid);
                    break;
                }
            }
        }
    }
    PollStatus::from(n > 0)
}

pub fn add_host(nqn: &str, host: &str) -> Result<(), NvmfError> {
    bump();
    let s = find_subsystem(nqn).ok_or_else(|| NvmfError::no_subsystem(nqn))?;
    if s.discovery || !valid_nqn(host) {
        return Err(NvmfError::invalid(format!(
            "Invalid parameters: host {host}"
        )));
    }
    let mut i = s.inner();
    if i.hosts.iter().any(|h| h == host) {
        return Err(NvmfError::invalid(format!(
            "Invalid parameters: host {host} already allowed"
        )));
    }
    i.hosts.push(host.to_string());
    Ok(())
}

pub fn remove_host(nqn: &str, host: &str) -> Result<(), NvmfError> {
    bump();
    let s = find_subsystem(nqn).ok_or_else(|| NvmfError::no_subsystem(nqn))?;
    let ctrlrs = {
        let mut i = s.inner();
        let before = i.hosts.len();
        i.hosts.retain(|h| h != host);
        if before == i.hosts.len() {
            return Err(NvmfError::invalid(format!(
                "Invalid parameters: host {host} not found"
            )));
        }
        i.controllers.clone()
    };
    // SPDK disconnects the host's controllers.
    for c in ctrlrs.iter().filter(|c| c.hostnqn == host) {
        c.destroy();
    }
    Ok(())
}

pub fn allow_any_host(nqn: &str, allow: bool) -> Result<(), NvmfError> {
    bump();
    let s = find_subsystem(nqn).ok_or_else(|| NvmfError::no_subsystem(nqn))?;
    if s.discovery {
        return Err(NvmfError::invalid("Invalid parameters"));
    }
    s.inner().allow_any_host = allow;
    Ok(())
}

fn subsystem_json(s: &Subsystem) -> Value {
    let i = s.inner();
    let listen: Vec<Value> = i.listeners.iter().map(ListenAddress::to_json).collect();
    let hosts: Vec<Value> = i.hosts.iter().map(|h| json!({"nqn": h})).collect();
    if s.discovery {
        return json!({
            "nqn": s.nqn,
            "subtype": "Discovery",
            "listen_addresses": listen,
            "allow_any_host": true,
            "hosts": hosts,
        });
    }
    let nss: Vec<Value> = i
        .namespaces
        .values()
        .map(|n| {
            let mut v = json!({
                "nsid": n.nsid,
                "bdev_name": n.bdev_name,
                "name": n.bdev_name,
                "nguid": hex_upper(&n.nguid),
                "uuid": n.uuid.to_string(),
            });
            if let Some(e) = n.eui64 {
                v["eui64"] = Value::String(hex_upper(&e));
            }
            v
        })
        .collect();
    json!({
        "nqn": s.nqn,
        "subtype": "NVMe",
        "listen_addresses": listen,
        "allow_any_host": i.allow_any_host,
        "hosts": hosts,
        "serial_number": s.serial,
        "model_number": s.model,
        "max_namespaces": s.max_namespaces,
        "min_cntlid": s.min_cntlid,
        "max_cntlid": s.max_cntlid,
        "passthrough": false,
        "namespaces": nss,
    })
}

fn hex_upper(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

pub fn get_subsystems(nqn: Option<&str>) -> Result<Value, NvmfError> {
    let all = subsystems();
    let list: Vec<Value> = all
        .iter()
        .filter(|s| nqn.is_none_or(|n| n == s.nqn))
        .map(|s| subsystem_json(s))
        .collect();
    if let Some(n) = nqn {
        if list.is_empty() {
            return Err(NvmfError::no_subsystem(n));
        }
    }
    Ok(Value::Array(list))
}

pub fn get_controllers(nqn: &str) -> Result<Value, NvmfError> {
    let s = find_subsystem(nqn).ok_or_else(|| NvmfError::no_subsystem(nqn))?;
    let ctrlrs = s.inner().controllers.clone();
    Ok(Value::Array(
        ctrlrs
            .iter()
            .map(|c| {
                let st = c.state();
                json!({
                    "cntlid": c.cntlid,
                    "hostnqn": c.hostnqn,
                    "hostid": c.hostid_uuid(),
                    "num_io_qpairs": st.qpairs.iter().filter(|q| q.qid != 0).count(),
                })
            })
            .collect(),
    ))
}

pub fn get_qpairs(nqn: &str) -> Result<Value, NvmfError> {
    let s = find_subsystem(nqn).ok_or_else(|| NvmfError::no_subsystem(nqn))?;
    let ctrlrs = s.inner().controllers.clone();
    let mut out = Vec::new();
    for c in ctrlrs {
        for q in c.state().qpairs.iter() {
            out.push(json!({
                "cntlid": c.cntlid,
                "qid": q.qid,
                "state": "active",
                "thread": q.thread,
                "hostnqn": c.hostnqn,
                "listen_address": q.listen.to_json(),
                "peer_address": {
                    "trtype": "TCP",
                    "adrfam": if q.peer.is_ipv4() { "IPv4" } else { "IPv6" },
                    "traddr": q.peer.ip().to_string(),
                    "trsvcid": q.peer.port().to_string(),
                },
            }));
        }
    }
    Ok(Value::Array(out))
}

/// The `nvmf` section of `save_config`: transport, subsystems with their
/// listeners, hosts and namespaces (the discovery subsystem's listeners
/// too), in an order that replays.
pub fn config_entries() -> Vec<Value> {
    let (transport, subs) = {
        let st = state();
        (st.transport.clone(), st.subsystems.clone())
    };
    let mut out = Vec::new();
    if let Some(t) = transport {
        out.push(json!({"method": "nvmf_create_transport", "params": t.to_json()}));
    }
    for s in subs {
        let i = s.inner();
        if !s.discovery {
            out.push(json!({
                "method": "nvmf_create_subsystem",
                "params": {
                    "nqn": s.nqn,
                    "serial_number": s.serial,
                    "model_number": s.model,
                    "allow_any_host": i.allow_any_host,
                    "max_namespaces": s.max_namespaces,
                    "min_cntlid": s.min_cntlid,
                    "max_cntlid": s.max_cntlid,
                },
            }));
        }
        for l in &i.listeners {
            out.push(json!({
                "method": "nvmf_subsystem_add_listener",
                "params": {"nqn": s.nqn, "listen_address": l.to_json()},
            }));
        }
        for h in &i.hosts {
            out.push(json!({
                "method": "nvmf_subsystem_add_host",
                "params": {"nqn": s.nqn, "host": h},
            }));
        }
        for n in i.namespaces.values() {
            out.push(json!({
                "method": "nvmf_subsystem_add_ns",
                "params": {
                    "nqn": s.nqn,
                    "namespace": {
                        "nsid": n.nsid,
                        "bdev_name": n.bdev_name,
                        "nguid": hex_upper(&n.nguid),
                        "uuid": n.uuid.to_string(),
                    },
                },
            }));
            if let Some(e) = n.eui64 {
                let last = out.len() - 1;
                out[last]["params"]["namespace"]["eui64"] = Value::String(hex_upper(&e));
            }
        }
    }
    out
}

/// Closes every listener and controller and forgets the configuration
/// (target shutdown; tests).
pub fn shutdown() {
    let (subs, listeners) = {
        let mut st = state();
        st.transport = None;
        let subs = std::mem::replace(&mut st.subsystems, vec![Arc::new(discovery_subsystem())]);
        (subs, std::mem::take(&mut st.listeners))
    };
    for l in listeners {
        l.close();
    }
    for s in subs {
        s.deleted.store(true, Ordering::Release);
        let (ctrlrs, nss) = {
            let mut i = s.inner();
            i.listeners.clear();
            (
                std::mem::take(&mut i.controllers),
                std::mem::take(&mut i.namespaces),
            )
        };
        for c in ctrlrs {
            c.destroy();
        }
        for ns in nss.values() {
            ns.removed.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nqn_format() {
        assert!(valid_nqn("nqn.2016-06.io.spdk:cnode1"));
        assert!(valid_nqn(
            "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3ccabcd"
        ));
        assert!(!valid_nqn("nqn.16-06.io.spdk:cnode1"));
        assert!(!valid_nqn("iqn.2016-06.io.spdk:x"));
        assert!(!valid_nqn(&format!(
            "nqn.2016-06.io.spdk:{}",
            "x".repeat(300)
        )));
    }

    #[test]
    fn listen_address_parsing() {
        let (a, sa) = parse_listen_address("tcp", None, "127.0.0.1", Some("4420")).unwrap();
        assert_eq!(a.adrfam, "IPv4");
        assert_eq!(a.trtype, "TCP");
        assert_eq!(sa.port(), 4420);
        assert!(parse_listen_address("rdma", None, "127.0.0.1", Some("1")).is_err());
        assert!(parse_listen_address("TCP", Some("ipv6"), "127.0.0.1", Some("1")).is_err());
        assert!(parse_listen_address("TCP", None, "localhost", Some("1")).is_err());
        assert!(parse_listen_address("TCP", None, "::1", None).is_err());
    }
}
