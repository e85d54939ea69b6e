//! Controllers: the vhost-user backend, its daemon thread and the reactor
//! poller of its queues.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use wc_reactor::{PollStatus, ReactorHandle};

use crate::blk::{config_space, Chains, Geometry, Mem, QueueEngine, QueueOps};
use crate::vring::{SizedVring, MAX_QUEUE_SIZE};

/// Errors of the controller RPCs.
#[derive(Debug)]
pub enum VhostError {
    /// Already exists.
    Exists(String),
    /// No such controller or bdev.
    NotFound(String),
    /// Bad parameter.
    Invalid(String),
    /// OS error.
    Io(String),
    /// In use (a VM is connected).
    Busy(String),
}

impl VhostError {
    /// Positive errno.
    pub fn errno(&self) -> i32 {
        match self {
            VhostError::Exists(_) => libc::EEXIST,
            VhostError::NotFound(_) => libc::ENODEV,
            VhostError::Invalid(_) => libc::EINVAL,
            VhostError::Io(_) => libc::EIO,
            VhostError::Busy(_) => libc::EBUSY,
        }
    }
}

impl std::fmt::Display for VhostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VhostError::Exists(s)
            | VhostError::NotFound(s)
            | VhostError::Invalid(s)
            | VhostError::Io(s)
            | VhostError::Busy(s) => f.write_str(s),
        }
    }
}

/// Parameters of `vhost_create_blk_controller`.
#[derive(Debug, Clone, Default)]
pub struct CreateOpts {
    /// Controller (socket) name.
    pub ctrlr: String,
    /// Bdev.
    pub dev_name: String,
    /// Reactor mask (hex), as SPDK.
    pub cpumask: Option<String>,
    /// Read-only device.
    pub readonly: bool,
    /// Packed ring requested (not supported: refused).
    pub packed_ring: bool,
}

/// What `vhost_get_controllers` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ControllerSummary {
    /// Name.
    pub ctrlr: String,
    /// Cpumask (hex).
    pub cpumask: String,
    /// Coalescing delay (always 0).
    pub delay_base_us: u32,
    /// IOPS threshold (always 0).
    pub iops_threshold: u32,
    /// Socket path.
    pub socket: String,
    /// The connected VM, if any (`[{vid, id, name, started}]`, as SPDK).
    pub sessions: Value,
    /// Type-specific info.
    pub backend_specific: Value,
}

static SOCKET_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Sets the directory of vhost sockets (`-S`); default: current directory.
pub fn set_socket_dir(dir: impl Into<PathBuf>) {
    *SOCKET_DIR.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.into());
}

/// The directory of vhost sockets.
pub fn socket_dir() -> PathBuf {
    SOCKET_DIR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Queues offered to the driver (`GET_QUEUE_NUM`); QEMU's `num-queues`
/// picks how many it uses.
pub(crate) const MAX_QUEUES: usize = 16;
/// How long `GET_VRING_BASE` (the frontend stopping a ring) waits for the
/// ring's requests in flight.
const STOP_DRAIN: Duration = Duration::from_secs(5);

/// A queue as the reactors see it.
pub(crate) type DynQueue = Arc<dyn QueueOps + Send + Sync>;

/// Per-queue state shared by the vhost-user thread and the queue's reactor,
/// kept for the controller's life.
#[derive(Default)]
pub(crate) struct QueueCtl {
    /// Bumped when the frontend stops the ring: completions of requests
    /// popped before are dropped instead of reaching the restarted ring.
    epoch: AtomicU64,
    /// Chains popped and not yet completed (or dropped).
    inflight: AtomicUsize,
    /// Set by a kick, taken by the poller.
    kicked: AtomicBool,
}

/// What the vhost-user thread and the reactors serving a controller share.
pub(crate) struct Shared {
    pub(crate) geom: Geometry,
    num_queues: usize,
    /// Reactors polling the queues: queue `i` on `reactors[i % len]`.
    reactors: Vec<ReactorHandle>,
    qctl: Vec<Arc<QueueCtl>>,
    /// The open bdev; `None` once it was removed (or the controller
    /// deleted).
    desc: Mutex<Option<wc_bdev::Desc>>,
    /// The bdev was removed: nothing more is submitted, requests fail.
    removed: AtomicBool,
    /// Guest memory of the current connection; `mem_gen` bumps on change.
    mem: Mutex<Option<GuestMemoryAtomic<Mem>>>,
    mem_gen: AtomicU64,
    /// Queues of the current connection (known after its first kick).
    queues: Mutex<Option<Vec<DynQueue>>>,
    has_queues: AtomicBool,
    /// Bumped when a connection ends.
    session: AtomicU64,
    pub(crate) stop: AtomicBool,
    shutdown: Mutex<Option<ShutdownHandle>>,
}

impl Shared {
    pub(crate) fn new(
        geom: Geometry,
        num_queues: usize,
        reactors: Vec<ReactorHandle>,
        desc: wc_bdev::Desc,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            geom,
            num_queues,
            reactors,
            qctl: (0..num_queues).map(|_| Arc::default()).collect(),
            desc: Mutex::new(Some(desc)),
            removed: AtomicBool::new(false),
            mem: Mutex::new(None),
            mem_gen: AtomicU64::new(0),
            queues: Mutex::new(None),
            has_queues: AtomicBool::new(false),
            session: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            shutdown: Mutex::new(None),
        })
    }

    /// Installs the guest memory of the connection.
    pub(crate) fn set_memory(&self, mem: GuestMemoryAtomic<Mem>) {
        *lock(&self.mem) = Some(mem);
        self.mem_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Installs the queues of the connection (first call wins).
    pub(crate) fn set_queues(&self, queues: Vec<DynQueue>) {
        let mut q = lock(&self.queues);
        if q.is_none() {
            *q = Some(queues);
            self.has_queues.store(true, Ordering::Release);
        }
    }

    /// The connection ended: its queues and memory are forgotten, and the
    /// completions of its requests dropped.
    fn end_session(&self) {
        self.has_queues.store(false, Ordering::Release);
        *lock(&self.queues) = None;
        *lock(&self.mem) = None;
        self.mem_gen.fetch_add(1, Ordering::AcqRel);
        for c in &self.qctl {
            c.epoch.fetch_add(1, Ordering::AcqRel);
        }
        self.session.fetch_add(1, Ordering::AcqRel);
    }

    /// The bdev is going away (hot-remove, or its delete RPC): the pollers
    /// drop their channels and fail new requests with
    /// `VIRTIO_BLK_S_IOERR`; the descriptor is closed now so the removal
    /// is not held up. The controller stays until deleted.
    pub(crate) fn bdev_removed(&self) {
        if self.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        let desc = lock(&self.desc).take();
        if let Some(d) = &desc {
            tracing::warn!(
                "vhost: bdev '{}' removed: its controller fails requests from now on",
                d.bdev().name()
            );
        }
        drop(desc);
        for h in &self.reactors {
            h.send(|| {});
        }
    }

    /// `vhost_get_controllers`' sessions: the connected VM, if any.
    fn sessions(&self, ctrlr: &str) -> Value {
        if lock(&self.shutdown).is_none() {
            return json!([]);
        }
        let n = self.session.load(Ordering::Acquire);
        json!([{
            "vid": n,
            "id": n,
            "name": format!("{ctrlr}s{n}"),
            "started": self.has_queues.load(Ordering::Acquire),
        }])
    }

    /// True once the bdev was removed.
    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Kick on queue `i`: the poller looks at it, and a sleeping reactor
    /// wakes up.
    fn kicked(&self, i: usize) {
        if let Some(c) = self.qctl.get(i) {
            c.kicked.store(true, Ordering::Release);
        }
        if !self.reactors.is_empty() {
            let h = &self.reactors[i % self.reactors.len()];
            if h.in_interrupt() {
                h.send(|| {});
            }
        }
    }

    /// The frontend stops ring `i` (`GET_VRING_BASE`): waits (bounded) for
    /// its requests in flight, then moves its epoch on under the ring's
    /// lock so nothing popped before lands in the restarted ring.
    fn stop_ring(&self, i: usize) {
        let Some(ctl) = self.qctl.get(i) else {
            return;
        };
        let deadline = Instant::now() + STOP_DRAIN;
        while ctl.inflight.load(Ordering::Acquire) > 0
            && Instant::now() < deadline
            && !self.stop.load(Ordering::Acquire)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let q = lock(&self.queues).as_ref().and_then(|v| v.get(i).cloned());
        match q {
            Some(q) => q.with_lock(&mut || {
                ctl.epoch.fetch_add(1, Ordering::AcqRel);
            }),
            None => {
                ctl.epoch.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The backend of one connection: `.1` is the session it serves, so a
/// late kick of an ended connection cannot install its queues into the
/// next one.
#[derive(Clone)]
struct Backend(Arc<Shared>, u64);

impl Backend {
    fn current(&self) -> bool {
        self.0.session.load(Ordering::Acquire) == self.1
    }
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = SizedVring;

    fn num_queues(&self) -> usize {
        self.0.num_queues
    }

    /// Every ring size virtio allows: nothing here is sized by it (a
    /// queue's in-flight table grows with what the driver submits).
    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.0.geom.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the vring worker never exits and dropping the
        // daemon hangs; the handler's Drop notifies it.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = config_space(&self.0.geom, self.0.num_queues as u16);
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        let mut v = c[start..end].to_vec();
        v.resize(size as usize, 0);
        v
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> std::io::Result<()> {
        if self.current() {
            self.0.set_memory(mem);
        }
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        self.0.stop_ring(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[SizedVring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        // Queues are polled by reactors; a kick tells us the vrings (the
        // first time) and wakes the queue's reactor if it sleeps.
        if !self.current() {
            return Ok(());
        }
        if !self.0.has_queues.load(Ordering::Acquire) {
            let queues = vrings
                .iter()
                .zip(&self.0.qctl)
                .map(|(v, c)| {
                    Arc::new(VringQ {
                        vring: v.clone(),
                        ctl: c.clone(),
                    }) as DynQueue
                })
                .collect();
            self.0.set_queues(queues);
        }
        self.0.kicked(usize::from(device_event));
        Ok(())
    }
}

/// Pops up to `max` chains of `q`.
pub(crate) fn pop_chains(q: &mut Queue, mem: &Mem, max: usize) -> Chains {
    let mut out = Vec::new();
    while out.len() < max {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        // Bounded by the chain's own TTL (queue or indirect table size);
        // oversized chains are rejected by the parser.
        let descs: Vec<Descriptor> = chain.collect();
        out.push((head, descs));
    }
    out
}

/// Adds a used entry to `q`; false when it could not be written.
pub(crate) fn add_used(q: &mut Queue, mem: &Mem, head: u16, len: u32) -> bool {
    q.add_used(mem, head, len).is_ok()
}

/// Whether the driver wants an interrupt for the used entries added since
/// the last call: with EVENT_IDX by its `used_event`, else unless it set
/// `VRING_AVAIL_F_NO_INTERRUPT` (virtio-queue leaves that flag to us).
pub(crate) fn needs_interrupt(q: &mut Queue, mem: &Mem) -> bool {
    if q.event_idx_enabled() {
        return q.needs_notification(mem).unwrap_or(true);
    }
    // Order the used ring writes before reading the driver's flags.
    std::sync::atomic::fence(Ordering::SeqCst);
    match mem.load::<u16>(GuestAddress(q.avail_ring()), Ordering::Acquire) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
        Err(_) => true,
    }
}

/// Enables or disables kicks from the driver; on enabling, true when
/// chains are already available.
pub(crate) fn set_notification(q: &mut Queue, mem: &Mem, enable: bool) -> bool {
    if enable {
        q.enable_notification(mem).unwrap_or(true)
    } else {
        let _ = q.disable_notification(mem);
        false
    }
}

/// A vring of the vhost-user backend.
struct VringQ {
    vring: SizedVring,
    ctl: Arc<QueueCtl>,
}

impl QueueOps for VringQ {
    fn pop(&self, mem: &Mem, max: usize) -> Option<(u64, Chains)> {
        let mut st = self.vring.get_mut();
        if !st.is_enabled() || !st.get_queue().ready() {
            return None;
        }
        let chains = pop_chains(st.get_queue_mut(), mem, max);
        // Counted under the ring's lock: a concurrent GET_VRING_BASE sees
        // them in flight.
        self.ctl.inflight.fetch_add(chains.len(), Ordering::AcqRel);
        Some((self.ctl.epoch.load(Ordering::Acquire), chains))
    }

    fn push_used(&self, mem: &Mem, head: u16, len: u32, epoch: u64) -> bool {
        let mut st = self.vring.get_mut();
        let added = epoch == self.ctl.epoch.load(Ordering::Acquire)
            && add_used(st.get_queue_mut(), mem, head, len);
        drop(st);
        self.ctl.inflight.fetch_sub(1, Ordering::AcqRel);
        added
    }

    fn signal(&self, mem: &Mem) -> bool {
        let mut st = self.vring.get_mut();
        if !st.get_queue().ready() || !needs_interrupt(st.get_queue_mut(), mem) {
            return false;
        }
        st.signal_used_queue().is_ok()
    }

    fn set_notification(&self, mem: &Mem, enable: bool) -> bool {
        let mut st = self.vring.get_mut();
        if !st.get_queue().ready() {
            return false;
        }
        set_notification(st.get_queue_mut(), mem, enable)
    }

    fn discard(&self) {
        self.ctl.inflight.fetch_sub(1, Ordering::AcqRel);
    }

    fn take_kick(&self) -> bool {
        self.ctl.kicked.swap(false, Ordering::AcqRel)
    }

    fn with_lock(&self, f: &mut dyn FnMut()) {
        let _st = self.vring.get_mut();
        f();
    }
}

struct Controller {
    opts: CreateOpts,
    cpumask: String,
    socket: PathBuf,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

static CONTROLLERS: Mutex<BTreeMap<String, Controller>> = Mutex::new(BTreeMap::new());

/// The reactors that poll a controller's queues: those of the runtime whose
/// core is in `mask` (all of them without a mask), in index order.
pub(crate) fn serving_reactors(
    mask: Option<&wc_reactor::CoreMask>,
) -> Result<Vec<ReactorHandle>, VhostError> {
    let Some(r) = wc_reactor::try_current() else {
        return Ok(Vec::new());
    };
    let all = r.siblings();
    let Some(m) = mask else {
        return Ok(all);
    };
    let picked: Vec<ReactorHandle> = all
        .iter()
        .filter(|h| m.contains(h.core()))
        .cloned()
        .collect();
    if picked.is_empty() {
        let cores = wc_reactor::CoreMask::from_cores(all.iter().map(|h| h.core()));
        return Err(VhostError::Invalid(format!(
            "cpumask 0x{} selects no reactor (reactors run on 0x{})",
            m.to_hex(),
            cores.to_hex()
        )));
    }
    Ok(picked)
}

/// Creates a controller; returns its name.
pub fn create_controller(o: CreateOpts) -> Result<String, VhostError> {
    if o.ctrlr.is_empty() || o.ctrlr.contains('/') || o.ctrlr.len() > 64 {
        return Err(VhostError::Invalid(format!(
            "invalid controller name '{}'",
            o.ctrlr
        )));
    }
    if o.packed_ring {
        return Err(VhostError::Invalid("packed ring is not supported".into()));
    }
    if lock(&CONTROLLERS).contains_key(&o.ctrlr) {
        return Err(VhostError::Exists(format!(
            "controller '{}' exists",
            o.ctrlr
        )));
    }
    let mask = match &o.cpumask {
        Some(m) => Some(
            wc_reactor::CoreMask::parse(m)
                .map_err(|e| VhostError::Invalid(format!("cpumask '{m}': {e}")))?,
        ),
        None => None,
    };
    let reactors = serving_reactors(mask.as_ref())?;
    // The removal event reaches the controller through a weak link (the
    // bdev's openers must not keep it alive).
    let slot: Arc<OnceLock<Weak<Shared>>> = Arc::new(OnceLock::new());
    let slot2 = slot.clone();
    let on_event: wc_bdev::EventCallback = Arc::new(move |ev| {
        if ev == wc_bdev::BdevEvent::Remove {
            if let Some(sh) = slot2.get().and_then(Weak::upgrade) {
                sh.bdev_removed();
            }
        }
    });
    let desc = wc_bdev::open(&o.dev_name, !o.readonly, Some(on_event))
        .map_err(|e| VhostError::NotFound(format!("bdev '{}': {e}", o.dev_name)))?;
    let b = desc.bdev().clone();
    let mut id = b.name().as_bytes().to_vec();
    id.truncate(crate::blk::ID_BYTES);
    let geom = Geometry {
        block_size: b.block_size(),
        num_blocks: b.num_blocks(),
        readonly: o.readonly,
        id,
    };
    let cpumask = if reactors.is_empty() {
        o.cpumask.clone().unwrap_or_else(|| "0x1".into())
    } else {
        format!(
            "0x{}",
            wc_reactor::CoreMask::from_cores(reactors.iter().map(|h| h.core())).to_hex()
        )
    };
    let socket = socket_dir().join(&o.ctrlr);
    let mut listener = Listener::new(&socket, true)
        .map_err(|e| VhostError::Io(format!("socket {}: {e}", socket.display())))?;
    let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
    let shared = Shared::new(geom, MAX_QUEUES, reactors, desc);
    let _ = slot.set(Arc::downgrade(&shared));
    let sh = shared.clone();
    let name = format!("vhost-{}", o.ctrlr);
    // A fresh daemon per connection: the vhost-user handler keeps owner
    // state, so a restarted VM (a new SET_OWNER) needs a new one.
    let new_daemon = move || {
        let backend = Backend(sh.clone(), sh.session.load(Ordering::Acquire));
        VhostUserDaemon::new(name.clone(), backend, GuestMemoryAtomic::new(Mem::new()))
            .map_err(|e| VhostError::Io(format!("vhost daemon: {e}")))
    };
    let mut daemon = Some(new_daemon()?);
    let sh = shared.clone();
    let ctrlr_name = o.ctrlr.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vhost-{}", o.ctrlr))
        .spawn(move || loop {
            if sh.stop.load(Ordering::Acquire) {
                break;
            }
            let mut d = match daemon.take().map(Ok).unwrap_or_else(&new_daemon) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("{e}");
                    break;
                }
            };
            if let Err(e) = d.start(&mut listener) {
                tracing::warn!("vhost accept: {e}");
                if sh.stop.load(Ordering::Acquire) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            *lock(&sh.shutdown) = d.shutdown_handle();
            if sh.stop.load(Ordering::Acquire) {
                d.request_shutdown();
            }
            if let Err(e) = d.wait() {
                tracing::info!("vhost {}: connection closed: {e}", ctrlr_name);
            }
            *lock(&sh.shutdown) = None;
            // Dropping the daemon stops (joins) its vring worker first.
            drop(d);
            sh.end_session();
        })
        .map_err(|e| VhostError::Io(format!("thread: {e}")))?;
    if shared.reactors.is_empty() {
        tracing::warn!("no reactor: vhost queues are not polled");
    }
    start_pollers(&shared);
    let name = o.ctrlr.clone();
    lock(&CONTROLLERS).insert(
        name.clone(),
        Controller {
            opts: o,
            cpumask,
            socket,
            shared,
            thread: Some(thread),
        },
    );
    Ok(name)
}

/// Starts the queue pollers: one on each reactor of the controller, the
/// `k`-th serving queues `k`, `k + n`, `k + 2n`... with its own bdev
/// channel.
pub(crate) fn start_pollers(sh: &Arc<Shared>) {
    let n = sh.reactors.len();
    for (k, h) in sh.reactors.iter().enumerate() {
        let sh = sh.clone();
        h.send(move || run_poller(sh, k, n));
    }
}

/// What one reactor's poller holds for the current connection.
struct PollState {
    session: u64,
    /// The engines dropped their channels (the bdev was removed).
    detached: bool,
    mem_gen: u64,
    mem: Option<Arc<Mem>>,
    engines: Vec<Rc<QueueEngine<DynQueue>>>,
}

fn run_poller(sh: Arc<Shared>, k: usize, n: usize) {
    let r = wc_reactor::current();
    let mut st: Option<PollState> = None;
    let me: Rc<RefCell<Option<wc_reactor::PollerHandle>>> = Rc::new(RefCell::new(None));
    let me2 = me.clone();
    let h = r.register_poller("vhost_blk", None, move || {
        if sh.stop.load(Ordering::Acquire) {
            if let Some(s) = st.take() {
                s.engines.iter().for_each(|e| e.reset());
            }
            if let Some(h) = me2.borrow().as_ref() {
                h.unregister();
            }
            return PollStatus::Idle;
        }
        let session = sh.session.load(Ordering::Acquire);
        if st.as_ref().is_some_and(|s| s.session != session) {
            if let Some(s) = st.take() {
                s.engines.iter().for_each(|e| e.reset());
            }
        }
        if st.is_none() {
            if !sh.has_queues.load(Ordering::Acquire) {
                return PollStatus::Idle;
            }
            let Some(queues) = lock(&sh.queues).clone() else {
                return PollStatus::Idle;
            };
            // This reactor's own channel (Desc::channel is per reactor);
            // none once the bdev is gone.
            let chan = lock(&sh.desc).as_ref().and_then(|d| match d.channel() {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!("vhost: no channel: {e}");
                    None
                }
            });
            let engines = queues
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % n == k)
                .map(|(_, q)| QueueEngine::new(q, chan.clone(), sh.geom.clone()))
                .collect();
            st = Some(PollState {
                session,
                detached: chan.is_none(),
                mem_gen: u64::MAX,
                mem: None,
                engines,
            });
        }
        let Some(s) = st.as_mut() else {
            return PollStatus::Idle;
        };
        if !s.detached && sh.is_removed() {
            s.detached = true;
            s.engines.iter().for_each(|e| e.detach());
        }
        let gen = sh.mem_gen.load(Ordering::Acquire);
        if s.mem_gen != gen {
            s.mem = lock(&sh.mem).as_ref().map(|m| m.memory().into_inner());
            s.mem_gen = gen;
        }
        let Some(mem) = &s.mem else {
            return PollStatus::Idle;
        };
        let taken: usize = s.engines.iter().map(|e| e.poll(mem)).sum();
        PollStatus::from(taken > 0)
    });
    *me.borrow_mut() = Some(h);
}

/// Deletes a controller: closes the connection, removes the socket.
pub fn delete_controller(name: &str) -> Result<(), VhostError> {
    let mut all = lock(&CONTROLLERS);
    let c = all
        .get(name)
        .ok_or_else(|| VhostError::NotFound(format!("controller '{name}' not found")))?;
    // As SPDK: a controller with a connected VM stays (pulling the disk
    // from under a running guest is what `bdev_*_delete` is for).
    if lock(&c.shared.shutdown).is_some() {
        return Err(VhostError::Busy(format!(
            "controller '{name}' has a connected VM: shut the VM down or detach the disk first"
        )));
    }
    let c = all.remove(name).expect("looked up above");
    drop(all);
    stop(c);
    Ok(())
}

fn stop(mut c: Controller) {
    c.shared.stop.store(true, Ordering::Release);
    // The bdev is free as soon as the controller is gone; requests still
    // in flight hold their channel until they complete.
    drop(lock(&c.shared.desc).take());
    if let Some(h) = lock(&c.shared.shutdown).clone() {
        h.shutdown();
    } else {
        // Wake the accept of the daemon thread.
        let _ = std::os::unix::net::UnixStream::connect(&c.socket);
    }
    if let Some(t) = c.thread.take() {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(&c.socket);
}

/// Summaries, SPDK's `vhost_get_controllers` shape.
pub fn controllers() -> Vec<ControllerSummary> {
    lock(&CONTROLLERS)
        .values()
        .map(|c| ControllerSummary {
            ctrlr: c.opts.ctrlr.clone(),
            cpumask: c.cpumask.clone(),
            delay_base_us: 0,
            iops_threshold: 0,
            socket: c.socket.display().to_string(),
            sessions: c.shared.sessions(&c.opts.ctrlr),
            backend_specific: json!({
                "block": {
                    "readonly": c.opts.readonly,
                    // As SPDK: null once the bdev was removed.
                    "bdev": (!c.shared.is_removed()).then(|| c.opts.dev_name.clone()),
                    "transport": "vhost_user_blk",
                }
            }),
        })
        .collect()
}

/// `save_config` entries (as SPDK, none for a controller whose bdev was
/// removed).
pub fn config_entries() -> Vec<Value> {
    lock(&CONTROLLERS)
        .values()
        .filter(|c| !c.shared.is_removed())
        .map(|c| {
            // As SPDK: the controller's cpumask (hex, no 0x), no packed_ring.
            let p = json!({
                "ctrlr": c.opts.ctrlr,
                "dev_name": c.opts.dev_name,
                "cpumask": c.cpumask.trim_start_matches("0x"),
                "readonly": c.opts.readonly,
                "transport": "vhost_user_blk",
            });
            json!({"method": "vhost_create_blk_controller", "params": p})
        })
        .collect()
}

/// Deletes every controller.
pub fn shutdown() {
    let all: Vec<Controller> = std::mem::take(&mut *lock(&CONTROLLERS))
        .into_values()
        .collect();
    for c in all {
        stop(c);
    }
}
