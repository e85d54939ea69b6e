//! The data model: subsystems with their hosts, listeners and namespaces,
//! and the controllers hosts create in them by Connect. Shared between the
//! main reactor (RPCs) and the reactors serving queue pairs; the I/O path
//! reads namespaces through a per-queue-pair cache refreshed only when the
//! subsystem's namespace generation changes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::{json, Value};
use uuid::Uuid;
use wc_bdev::Desc;
use wc_nvme_wire::command::{async_event, AsyncEvent};
use wc_nvme_wire::fabrics::DISCOVERY_NQN;
use wc_nvme_wire::log::ErrorLogEntry;
use wc_reactor::ReactorHandle;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A transport address as the RPCs spell it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListenAddress {
    /// "TCP".
    pub trtype: String,
    /// "IPv4" or "IPv6".
    pub adrfam: String,
    pub traddr: String,
    pub trsvcid: String,
}

impl ListenAddress {
    pub fn to_json(&self) -> Value {
        json!({
            "trtype": self.trtype,
            "adrfam": self.adrfam,
            "traddr": self.traddr,
            "trsvcid": self.trsvcid,
        })
    }
}

/// A namespace: a bdev opened for the subsystem.
pub struct Namespace {
    pub nsid: u32,
    pub bdev_name: String,
    pub desc: Desc,
    pub uuid: Uuid,
    pub nguid: [u8; 16],
    pub eui64: Option<[u8; 8]>,
    pub block_size: u32,
    pub num_blocks: u64,
    pub removed: AtomicBool,
}

/// A subsystem (an NVMe one, or the discovery subsystem).
pub struct Subsystem {
    pub nqn: String,
    pub discovery: bool,
    pub serial: String,
    pub model: String,
    pub max_namespaces: u32,
    pub min_cntlid: u16,
    pub max_cntlid: u16,
    pub(crate) inner: Mutex<SubsysInner>,
    /// Bumped on every namespace change (queue pairs refresh their cache).
    pub(crate) ns_gen: AtomicU64,
    pub(crate) deleted: AtomicBool,
}

pub(crate) struct SubsysInner {
    pub allow_any_host: bool,
    pub hosts: Vec<String>,
    pub listeners: Vec<ListenAddress>,
    pub namespaces: BTreeMap<u32, Arc<Namespace>>,
    pub controllers: Vec<Arc<Controller>>,
    pub next_cntlid: u16,
}

impl Subsystem {
    pub(crate) fn new(
        nqn: &str,
        serial: &str,
        model: &str,
        allow_any_host: bool,
        max_namespaces: u32,
        cntlid_range: (u16, u16),
    ) -> Subsystem {
        Subsystem {
            nqn: nqn.to_string(),
            discovery: nqn == DISCOVERY_NQN,
            serial: serial.to_string(),
            model: model.to_string(),
            max_namespaces,
            min_cntlid: cntlid_range.0,
            max_cntlid: cntlid_range.1,
            inner: Mutex::new(SubsysInner {
                allow_any_host,
                hosts: Vec::new(),
                listeners: Vec::new(),
                namespaces: BTreeMap::new(),
                controllers: Vec::new(),
                next_cntlid: cntlid_range.0,
            }),
            ns_gen: AtomicU64::new(1),
            deleted: AtomicBool::new(false),
        }
    }

    pub(crate) fn inner(&self) -> MutexGuard<'_, SubsysInner> {
        lock(&self.inner)
    }

    /// May `hostnqn` connect?
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        let i = self.inner();
        i.allow_any_host || i.hosts.iter().any(|h| h == hostnqn)
    }

    pub fn has_listener(&self, a: &ListenAddress) -> bool {
        self.inner().listeners.iter().any(|l| same_listener(l, a))
    }

    /// The namespace `nsid`, if attached.
    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.inner().namespaces.get(&nsid).cloned()
    }

    pub fn nsids(&self) -> Vec<u32> {
        self.inner().namespaces.keys().copied().collect()
    }

    /// Highest nsid a controller may see (Identify NN).
    pub fn max_nsid(&self) -> u32 {
        let i = self.inner();
        let top = i.namespaces.keys().next_back().copied().unwrap_or(0);
        top.max(self.max_namespaces)
    }

    /// Allocates a controller id, or `None` when all are in use.
    pub(crate) fn alloc_cntlid(&self, inner: &mut SubsysInner) -> Option<u16> {
        let span = (self.max_cntlid - self.min_cntlid) as u32 + 1;
        for _ in 0..span {
            let id = inner.next_cntlid;
            inner.next_cntlid = if id >= self.max_cntlid {
                self.min_cntlid
            } else {
                id + 1
            };
            if !inner.controllers.iter().any(|c| c.cntlid == id) {
                return Some(id);
            }
        }
        None
    }

    /// Removes a namespace (RPC or hot-remove) and tells every controller.
    pub(crate) fn remove_namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        let (ns, ctrlrs) = {
            let mut i = self.inner();
            let ns = i.namespaces.remove(&nsid)?;
            (ns, i.controllers.clone())
        };
        ns.removed.store(true, Ordering::Release);
        self.ns_gen.fetch_add(1, Ordering::AcqRel);
        for c in ctrlrs {
            c.ns_changed(nsid);
        }
        Some(ns)
    }

    pub(crate) fn ns_added(&self, nsid: u32) {
        self.ns_gen.fetch_add(1, Ordering::AcqRel);
        let ctrlrs = self.inner().controllers.clone();
        for c in ctrlrs {
            c.ns_changed(nsid);
        }
    }
}

/// Listener addresses compare by transport, family, address and port
/// (case-insensitive transport and family).
pub fn same_listener(a: &ListenAddress, b: &ListenAddress) -> bool {
    a.trtype.eq_ignore_ascii_case(&b.trtype) && a.traddr == b.traddr && a.trsvcid == b.trsvcid
}

/// One queue pair as `nvmf_subsystem_get_qpairs` lists it.
#[derive(Debug, Clone)]
pub(crate) struct QpairInfo {
    pub conn_id: u64,
    pub qid: u16,
    pub thread: String,
    pub listen: ListenAddress,
    pub peer: std::net::SocketAddr,
}

/// Controller registers and feature values.
pub(crate) struct CtrlrState {
    pub cc: u32,
    pub csts: u32,
    /// Async event configuration (Set Features 0x0b).
    pub aec: u32,
    /// I/O queues granted by Set Features Number of Queues.
    pub num_io_queues: u32,
    pub vwc_enabled: bool,
    /// Namespaces changed since the host last read the log (0x04).
    pub changed_ns: Vec<u32>,
    /// A namespace notice was sent and not yet cleared by reading the log.
    pub ns_notice_masked: bool,
    /// Events waiting for an Asynchronous Event Request.
    pub pending_events: VecDeque<u32>,
    pub error_log: VecDeque<ErrorLogEntry>,
    pub error_count: u64,
    /// Queue ids in use (index = qid).
    pub qids: Vec<bool>,
    pub qpairs: Vec<QpairInfo>,
}

/// A controller: made by an admin queue Connect, found by I/O queue
/// Connects through its cntlid, torn down when the admin queue goes or the
/// keep-alive timer expires.
pub struct Controller {
    pub cntlid: u16,
    pub subsys: Arc<Subsystem>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// The reactor and connection of the admin queue (AENs go there).
    pub(crate) admin: (ReactorHandle, u64),
    pub(crate) state: Mutex<CtrlrState>,
    pub(crate) dead: AtomicBool,
    /// Keep-alive timeout in ms (0: off).
    pub(crate) kato_ms: AtomicU32,
    pub(crate) last_keep_alive: Mutex<Instant>,
    pub(crate) max_io_qpairs: u32,
    pub(crate) stats: CtrlrStats,
}

#[derive(Default)]
pub(crate) struct CtrlrStats {
    pub read_cmds: AtomicU64,
    pub write_cmds: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub media_errors: AtomicU64,
}

/// Error log entries kept per controller (ELPE + 1).
pub(crate) const ERROR_LOG_ENTRIES: usize = 128;

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cntlid: u16,
        subsys: Arc<Subsystem>,
        hostnqn: &str,
        hostid: [u8; 16],
        admin: (ReactorHandle, u64),
        kato_ms: u32,
        max_io_qpairs: u32,
    ) -> Controller {
        Controller {
            cntlid,
            subsys,
            hostnqn: hostnqn.to_string(),
            hostid,
            admin,
            state: Mutex::new(CtrlrState {
                cc: 0,
                csts: 0,
                aec: 0,
                num_io_queues: max_io_qpairs,
                vwc_enabled: true,
                changed_ns: Vec::new(),
                ns_notice_masked: false,
                pending_events: VecDeque::new(),
                error_log: VecDeque::new(),
                error_count: 0,
                qids: vec![false; max_io_qpairs as usize + 1],
                qpairs: Vec::new(),
            }),
            dead: AtomicBool::new(false),
            kato_ms: AtomicU32::new(kato_ms),
            last_keep_alive: Mutex::new(Instant::now()),
            max_io_qpairs,
            stats: CtrlrStats::default(),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, CtrlrState> {
        lock(&self.state)
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub(crate) fn touch_keep_alive(&self) {
        *lock(&self.last_keep_alive) = Instant::now();
    }

    /// True when the keep-alive timer ran out.
    pub(crate) fn keep_alive_expired(&self) -> bool {
        let kato = self.kato_ms.load(Ordering::Relaxed);
        if kato == 0 {
            return false;
        }
        // Hosts send Keep Alive at half the timeout or so; allow the whole
        // timeout plus a little slack for a busy reactor.
        lock(&self.last_keep_alive).elapsed().as_millis() as u64 > kato as u64 + 500
    }

    /// Tears the controller down: its queue pairs close on their next sweep.
    pub(crate) fn destroy(self: &Arc<Self>) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut i = self.subsys.inner();
        i.controllers.retain(|c| !Arc::ptr_eq(c, self));
    }

    /// Records a changed namespace and raises a namespace attribute notice
    /// (once until the host reads the changed namespace list).
    pub(crate) fn ns_changed(&self, nsid: u32) {
        let raise = {
            let mut s = self.state();
            if !s.changed_ns.contains(&nsid) {
                s.changed_ns.push(nsid);
            }
            let enabled = s.aec & wc_nvme_wire::command::feature::AEC_NS_ATTRIBUTE_NOTICES != 0;
            if enabled && !s.ns_notice_masked {
                s.ns_notice_masked = true;
                s.pending_events.push_back(
                    AsyncEvent {
                        event_type: async_event::TYPE_NOTICE,
                        info: async_event::NOTICE_NS_ATTRIBUTE_CHANGED,
                        log_page: wc_nvme_wire::log::lid::CHANGED_NS_LIST,
                    }
                    .to_dw0(),
                );
                true
            } else {
                false
            }
        };
        if raise {
            let conn = self.admin.1;
            self.admin.0.send(move || crate::conn::deliver_events(conn));
        }
    }

    pub(crate) fn log_error(&self, mut e: ErrorLogEntry) {
        let mut s = self.state();
        s.error_count += 1;
        e.error_count = s.error_count;
        s.error_log.push_front(e);
        s.error_log.truncate(ERROR_LOG_ENTRIES);
    }

    pub(crate) fn hostid_uuid(&self) -> String {
        Uuid::from_bytes(self.hostid).to_string()
    }
}
