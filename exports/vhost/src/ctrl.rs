//! Controllers: the vhost-user backend, its daemon thread and the reactor
//! poller of its queues.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde_json::{json, Value};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use wc_reactor::PollStatus;

use crate::blk::{config_space, Geometry, Mem, QueueEngine, QueueOps};

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
}

impl VhostError {
    /// Positive errno.
    pub fn errno(&self) -> i32 {
        match self {
            VhostError::Exists(_) => libc::EEXIST,
            VhostError::NotFound(_) => libc::ENODEV,
            VhostError::Invalid(_) => libc::EINVAL,
            VhostError::Io(_) => libc::EIO,
        }
    }
}

impl std::fmt::Display for VhostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VhostError::Exists(s)
            | VhostError::NotFound(s)
            | VhostError::Invalid(s)
            | VhostError::Io(s) => f.write_str(s),
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

const MAX_QUEUE_SIZE: usize = 256;

struct Shared {
    geom: Geometry,
    num_queues: usize,
    mem: Mutex<Option<GuestMemoryAtomic<Mem>>>,
    vrings: Mutex<Option<Vec<VringRwLock>>>,
    /// Bumped when a connection ends.
    session: AtomicU64,
    stop: AtomicBool,
    shutdown: Mutex<Option<ShutdownHandle>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone)]
struct Backend(Arc<Shared>);

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.0.num_queues
    }

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
        *lock(&self.0.mem) = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        // Queues are polled by a reactor; a kick only tells us the vrings.
        let mut v = lock(&self.0.vrings);
        if v.is_none() {
            *v = Some(vrings.to_vec());
        }
        Ok(())
    }
}

/// Pops up to `max` chains of `q`.
pub(crate) fn pop_chains(q: &mut Queue, mem: &Mem, max: usize) -> Vec<(u16, Vec<Descriptor>)> {
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

/// Adds a used entry to `q`; returns whether the driver wants a notification.
pub(crate) fn add_used(q: &mut Queue, mem: &Mem, head: u16, len: u32) -> bool {
    if q.add_used(mem, head, len).is_err() {
        return false;
    }
    q.needs_notification(mem).unwrap_or(true)
}

struct VringQ(VringRwLock);

impl QueueOps for VringQ {
    fn pop(&self, mem: &Mem, max: usize) -> Option<Vec<(u16, Vec<Descriptor>)>> {
        let mut st = self.0.get_mut();
        if !st.is_enabled() || !st.get_queue().ready() {
            return None;
        }
        Some(pop_chains(st.get_queue_mut(), mem, max))
    }

    fn push_used(&self, mem: &Mem, head: u16, len: u32) {
        let mut st = self.0.get_mut();
        if add_used(st.get_queue_mut(), mem, head, len) {
            let _ = st.signal_used_queue();
        }
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
    let desc = wc_bdev::open(&o.dev_name, !o.readonly, None)
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
    // Reactor: first core of the mask running one, else main/current.
    let reactor = wc_reactor::try_current().map(|r| {
        let sib = r.siblings();
        mask.as_ref()
            .and_then(|m| sib.iter().find(|h| m.contains(h.core())).cloned())
            .unwrap_or_else(|| r.main_handle())
    });
    let cpumask = match &reactor {
        Some(h) => format!(
            "0x{}",
            wc_reactor::CoreMask::from_cores([h.core()]).to_hex()
        ),
        None => o.cpumask.clone().unwrap_or_else(|| "0x1".into()),
    };
    let socket = socket_dir().join(&o.ctrlr);
    let mut listener = Listener::new(&socket, true)
        .map_err(|e| VhostError::Io(format!("socket {}: {e}", socket.display())))?;
    let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
    let num_queues = wc_reactor::try_current()
        .map(|r| r.count())
        .unwrap_or(1)
        .clamp(1, 16);
    let shared = Arc::new(Shared {
        geom: geom.clone(),
        num_queues,
        mem: Mutex::new(None),
        vrings: Mutex::new(None),
        session: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        shutdown: Mutex::new(None),
    });
    let backend = Backend(shared.clone());
    let name = format!("vhost-{}", o.ctrlr);
    // A fresh daemon per connection: the vhost-user handler keeps owner
    // state, so a restarted VM (a new SET_OWNER) needs a new one.
    let new_daemon = move || {
        VhostUserDaemon::new(
            name.clone(),
            backend.clone(),
            GuestMemoryAtomic::new(Mem::new()),
        )
        .map_err(|e| VhostError::Io(format!("vhost daemon: {e}")))
    };
    let mut daemon = Some(new_daemon()?);
    let sh = shared.clone();
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
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            *lock(&sh.shutdown) = d.shutdown_handle();
            if sh.stop.load(Ordering::Acquire) {
                d.request_shutdown();
            }
            if let Err(e) = d.wait() {
                tracing::info!("vhost connection ended: {e}");
            }
            *lock(&sh.shutdown) = None;
            *lock(&sh.vrings) = None;
            *lock(&sh.mem) = None;
            sh.session.fetch_add(1, Ordering::AcqRel);
            // Dropping the daemon stops its vring worker.
            drop(d);
        })
        .map_err(|e| VhostError::Io(format!("thread: {e}")))?;
    let desc = Arc::new(desc);
    let sh = shared.clone();
    let start = move || start_poller(sh, desc);
    match reactor {
        Some(h) => h.send(start),
        None => tracing::warn!("no reactor: vhost queues are not polled"),
    }
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

type Engines = Vec<Rc<QueueEngine<VringQ>>>;

fn start_poller(sh: Arc<Shared>, desc: Arc<wc_bdev::Desc>) {
    let r = wc_reactor::current();
    let chan = match desc.channel() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("vhost: no channel: {e}");
            return;
        }
    };
    let state: RefCell<Option<(u64, Engines)>> = RefCell::new(None);
    let me: Rc<RefCell<Option<wc_reactor::PollerHandle>>> = Rc::new(RefCell::new(None));
    let me2 = me.clone();
    let h = r.register_poller("vhost_blk", None, move || {
        let _keep = &desc;
        if sh.stop.load(Ordering::Acquire) {
            if let Some(h) = me2.borrow().as_ref() {
                h.unregister();
            }
            return PollStatus::Idle;
        }
        let session = sh.session.load(Ordering::Acquire);
        let mut st = state.borrow_mut();
        if st.as_ref().is_some_and(|(s, _)| *s != session) {
            if let Some((_, engines)) = st.take() {
                engines.iter().for_each(|e| e.reset());
            }
        }
        if st.is_none() {
            let Some(vr) = lock(&sh.vrings).clone() else {
                return PollStatus::Idle;
            };
            let engines = vr
                .into_iter()
                .map(|v| QueueEngine::new(VringQ(v), chan.clone(), sh.geom.clone()))
                .collect();
            *st = Some((session, engines));
        }
        let Some(mem) = lock(&sh.mem).as_ref().map(|m| m.memory().into_inner()) else {
            return PollStatus::Idle;
        };
        let engines = st.as_ref().map(|(_, e)| e.clone()).unwrap_or_default();
        drop(st);
        let n: usize = engines.iter().map(|e| e.poll(&mem)).sum();
        PollStatus::from(n > 0)
    });
    *me.borrow_mut() = Some(h);
}

/// Deletes a controller: closes the connection, removes the socket.
pub fn delete_controller(name: &str) -> Result<(), VhostError> {
    let c = lock(&CONTROLLERS)
        .remove(name)
        .ok_or_else(|| VhostError::NotFound(format!("controller '{name}' not found")))?;
    stop(c);
    Ok(())
}

fn stop(mut c: Controller) {
    c.shared.stop.store(true, Ordering::Release);
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
            backend_specific: json!({
                "block": {
                    "readonly": c.opts.readonly,
                    "bdev": c.opts.dev_name,
                    "transport": "vhost_user_blk",
                }
            }),
        })
        .collect()
}

/// `save_config` entries.
pub fn config_entries() -> Vec<Value> {
    lock(&CONTROLLERS)
        .values()
        .map(|c| {
            let mut p = json!({
                "ctrlr": c.opts.ctrlr,
                "dev_name": c.opts.dev_name,
                "readonly": c.opts.readonly,
                "packed_ring": false,
            });
            if let Some(m) = &c.opts.cpumask {
                p["cpumask"] = json!(m);
            }
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
