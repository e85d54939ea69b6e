//! `delay`: a latency-injection vbdev, as SPDK's `bdev_delay`.
//!
//! [`create`] stacks a vbdev on a base bdev (opened and claimed, same
//! geometry) and forwards every I/O to it. Each READ or WRITE that the base
//! completes is then held for its latency before it completes upward: 99%
//! of them get the average latency, 1% (drawn per I/O) the p99 latency.
//! Other types complete as soon as the base does.
//!
//! As in SPDK, the latency runs from the base's completion, is read from
//! the bdev at that moment ([`update_latency`] affects I/O still at the
//! base, not I/O already held), and each channel keeps one FIFO per latency
//! class drained by a poller: after a latency drop, newer I/O wait behind
//! older ones (SPDK's "dam"). Creating on a missing base succeeds; the vbdev
//! appears when the base is registered. Without a `uuid` the vbdev's UUID
//! is derived from the base's (SHA-1, SPDK's namespace), so it is stable.

#![warn(missing_docs)]

use slab::Slab;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;
use wc_bdev::{
    passthru::BaseLink, Bdev, BdevChannel, BdevError, BdevOps, Io, IoChannel, IoCompletion,
    IoStatus, IoType,
};
use wc_reactor::tick::{duration_to_ticks, ticks};
use wc_reactor::{PollStatus, PollerHandle, ReactorHandle};

/// Module name (also the claim holder on the base).
pub const MODULE: &str = "delay";

/// SPDK's namespace for UUIDs derived from the base bdev's UUID.
pub const UUID_NAMESPACE: Uuid = Uuid::from_u128(0x4009b574_6430_4f1b_bc40_ace811091027);

/// Message when a p99 latency is below its average.
pub const P99_BELOW_AVG_MSG: &str =
    "Unable to create a delay bdev where p99 latency is less than average latency.";

/// Message for an unknown `latency_type` (SPDK's text).
pub const BAD_LATENCY_TYPE_MSG: &str = "Please specify a valid latency type.";

/// The poller keeps the reactor awake (reports busy) when a held I/O is due
/// within this window, so a sleeping reactor does not overshoot deadlines
/// by a whole sleep.
pub const SPIN_WINDOW: Duration = Duration::from_micros(50);

/// Parameters of `bdev_delay_create` (SPDK's names; latencies in µs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelayOpts {
    /// Name of the delay bdev.
    pub name: String,
    /// The base bdev.
    pub base_bdev_name: String,
    /// Average READ latency.
    pub avg_read_latency: u64,
    /// READ latency of 1% of the reads.
    pub p99_read_latency: u64,
    /// Average WRITE latency.
    pub avg_write_latency: u64,
    /// WRITE latency of 1% of the writes.
    pub p99_write_latency: u64,
    /// UUID; derived from the base's when absent.
    #[serde(default)]
    pub uuid: Option<Uuid>,
}

impl DelayOpts {
    /// Options with the four latencies in µs (read avg/p99, write avg/p99).
    pub fn new(name: &str, base: &str, read: (u64, u64), write: (u64, u64)) -> Self {
        DelayOpts {
            name: name.to_string(),
            base_bdev_name: base.to_string(),
            avg_read_latency: read.0,
            p99_read_latency: read.1,
            avg_write_latency: write.0,
            p99_write_latency: write.1,
            uuid: None,
        }
    }
}

/// Parameters of `bdev_delay_delete`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteParams {
    /// The delay bdev.
    pub name: String,
}

/// Parameters of `bdev_delay_update_latency` (SPDK's names).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateLatencyParams {
    /// The delay bdev.
    pub delay_bdev_name: String,
    /// `avg_read`, `p99_read`, `avg_write` or `p99_write` (checked by
    /// [`update_latency_with`], with SPDK's message).
    pub latency_type: String,
    /// New latency in µs.
    pub latency_us: u64,
}

/// Which latency [`update_latency`] changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyType {
    /// Average READ latency.
    AvgRead,
    /// p99 READ latency.
    P99Read,
    /// Average WRITE latency.
    AvgWrite,
    /// p99 WRITE latency.
    P99Write,
}

impl LatencyType {
    /// Parses SPDK's names.
    pub fn parse(s: &str) -> Option<LatencyType> {
        Some(match s {
            "avg_read" => LatencyType::AvgRead,
            "p99_read" => LatencyType::P99Read,
            "avg_write" => LatencyType::AvgWrite,
            "p99_write" => LatencyType::P99Write,
            _ => return None,
        })
    }

    fn index(self) -> usize {
        match self {
            LatencyType::AvgRead => 0,
            LatencyType::P99Read => 1,
            LatencyType::AvgWrite => 2,
            LatencyType::P99Write => 3,
        }
    }
}

fn us_to_ticks(us: u64) -> u64 {
    duration_to_ticks(Duration::from_micros(us))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by every reactor for one delay vbdev.
struct Shared {
    id: u64,
    name: String,
    base: BaseLink,
    uuid: Uuid,
    /// Latencies in µs and in ticks, indexed by `LatencyType::index`.
    latency_us: [AtomicU64; 4],
    latency_ticks: [AtomicU64; 4],
    /// Reactors of the live channels.
    reactors: wc_bdev::channels::ChannelReactors,
}

impl Shared {
    fn set_latency(&self, t: LatencyType, us: u64) {
        self.latency_us[t.index()].store(us, Ordering::Relaxed);
        self.latency_ticks[t.index()].store(us_to_ticks(us), Ordering::Relaxed);
    }

    fn params(&self) -> Value {
        let us = |t: LatencyType| self.latency_us[t.index()].load(Ordering::Relaxed);
        json!({
            "name": self.name,
            "base_bdev_name": self.base.name(),
            "uuid": self.uuid.to_string(),
            "avg_read_latency": us(LatencyType::AvgRead),
            "p99_read_latency": us(LatencyType::P99Read),
            "avg_write_latency": us(LatencyType::AvgWrite),
            "p99_write_latency": us(LatencyType::P99Write),
        })
    }

    fn for_each_channel_reactor(&self, f: impl Fn(&ReactorHandle)) {
        self.reactors.for_each(f);
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Remembered creations (SPDK's `g_bdev_associations`).
fn associations() -> MutexGuard<'static, Vec<DelayOpts>> {
    static A: OnceLock<Mutex<Vec<DelayOpts>>> = OnceLock::new();
    lock(A.get_or_init(|| Mutex::new(Vec::new())))
}

/// Live delay vbdevs.
fn nodes() -> MutexGuard<'static, Vec<Arc<Shared>>> {
    static N: OnceLock<Mutex<Vec<Arc<Shared>>>> = OnceLock::new();
    lock(N.get_or_init(|| Mutex::new(Vec::new())))
}

fn install_examine_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        wc_bdev::add_examine_hook(
            MODULE,
            Arc::new(|bdev: &Arc<Bdev>| {
                let pending: Vec<DelayOpts> = associations()
                    .iter()
                    .filter(|a| a.base_bdev_name == bdev.name())
                    .cloned()
                    .collect();
                for a in pending {
                    // A failure leaves the vbdev absent, as in SPDK.
                    let _ = construct(&a);
                }
            }),
        );
    });
}

/// `bdev_delay_create`. Returns the new bdev, or `None` when the base does
/// not exist yet (the vbdev is created when it appears).
pub fn create(opts: DelayOpts) -> Result<Option<Arc<Bdev>>, BdevError> {
    if opts.name.is_empty() || opts.base_bdev_name.is_empty() {
        return Err(BdevError::Invalid(
            "name and base_bdev_name must not be empty".into(),
        ));
    }
    if opts.p99_read_latency < opts.avg_read_latency
        || opts.p99_write_latency < opts.avg_write_latency
    {
        return Err(BdevError::Invalid(P99_BELOW_AVG_MSG.into()));
    }
    install_examine_hook();
    {
        let mut a = associations();
        if a.iter().any(|x| x.name == opts.name) {
            return Err(BdevError::Exists(opts.name));
        }
        a.push(opts.clone());
    }
    match construct(&opts) {
        Ok(b) => Ok(Some(b)),
        Err(BdevError::NotFound(_)) if wc_bdev::lookup(&opts.base_bdev_name).is_none() => Ok(None),
        Err(e) => {
            associations().retain(|a| a.name != opts.name);
            Err(e)
        }
    }
}

fn construct(opts: &DelayOpts) -> Result<Arc<Bdev>, BdevError> {
    let (link, base) = BaseLink::open(&opts.base_bdev_name, MODULE, &opts.name)?;
    let uuid = opts
        .uuid
        .unwrap_or_else(|| Uuid::new_v5(&UUID_NAMESPACE, base.uuid().as_bytes()));
    let shared = Arc::new(Shared {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        name: opts.name.clone(),
        base: link,
        uuid,
        latency_us: Default::default(),
        latency_ticks: Default::default(),
        reactors: Default::default(),
    });
    shared.set_latency(LatencyType::AvgRead, opts.avg_read_latency);
    shared.set_latency(LatencyType::P99Read, opts.p99_read_latency);
    shared.set_latency(LatencyType::AvgWrite, opts.avg_write_latency);
    shared.set_latency(LatencyType::P99Write, opts.p99_write_latency);
    let mut cfg = BaseLink::vbdev_config(&base, opts.name.clone());
    cfg.uuid = Some(uuid);
    let ops = Arc::new(DelayBdev {
        shared: shared.clone(),
        base,
    });
    nodes().push(shared.clone());
    match wc_bdev::register(cfg, ops) {
        Ok(b) => Ok(b),
        Err(e) => {
            nodes().retain(|n| !Arc::ptr_eq(n, &shared));
            shared.base.release();
            Err(e)
        }
    }
}

/// `bdev_delay_delete`: unregisters the vbdev (releasing and closing its
/// base) and forgets its creation.
pub fn delete(name: &str) -> Result<(), BdevError> {
    let b = wc_bdev::lookup(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    if b.module_name() != MODULE {
        return Err(BdevError::NotFound(name.to_string()));
    }
    wc_bdev::unregister(b.name())?;
    associations().retain(|a| a.name != b.name());
    Ok(())
}

/// `bdev_delay_update_latency`: changes one latency of a live delay bdev
/// (by exact name, as SPDK).
pub fn update_latency(name: &str, t: LatencyType, us: u64) -> Result<(), BdevError> {
    let n = nodes()
        .iter()
        .find(|n| n.name == name)
        .cloned()
        .ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    n.set_latency(t, us);
    Ok(())
}

/// [`update_latency`] from RPC parameters (unknown `latency_type`:
/// `Invalid` with SPDK's message).
pub fn update_latency_with(p: &UpdateLatencyParams) -> Result<(), BdevError> {
    let t = LatencyType::parse(&p.latency_type)
        .ok_or_else(|| BdevError::Invalid(BAD_LATENCY_TYPE_MSG.into()))?;
    update_latency(&p.delay_bdev_name, t, p.latency_us)
}

/// The current latencies of a delay bdev in µs: (avg read, p99 read, avg
/// write, p99 write).
pub fn latencies(name: &str) -> Result<(u64, u64, u64, u64), BdevError> {
    let n = nodes()
        .iter()
        .find(|n| n.name == name)
        .cloned()
        .ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    let us = |i: usize| n.latency_us[i].load(Ordering::Relaxed);
    Ok((us(0), us(1), us(2), us(3)))
}

struct DelayBdev {
    shared: Arc<Shared>,
    base: Arc<Bdev>,
}

impl BdevOps for DelayBdev {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        "delay"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        self.base.io_type_supported(t)
    }

    fn create_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        let base = self.shared.base.channel()?;
        let r = wc_reactor::current();
        let st = Rc::new_cyclic(|me| ChanState {
            shared: self.shared.clone(),
            chan_id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            base,
            me: me.clone(),
            slab: RefCell::new(Slab::new()),
            queues: Default::default(),
            rng: Cell::new(seed_for(me.as_ptr() as usize)),
            resets: RefCell::new(Vec::new()),
            next_token: Cell::new(0),
            spin_ticks: duration_to_ticks(SPIN_WINDOW),
            poller: std::cell::OnceCell::new(),
        });
        wc_bdev::channels::register_local(self.shared.id, &st);
        self.shared.reactors.add(st.chan_id);
        let weak = Rc::downgrade(&st);
        let poller = r.register_poller("bdev_delay_io", None, move || match weak.upgrade() {
            Some(st) => st.finish_due(),
            None => PollStatus::Idle,
        });
        let _ = st.poller.set(poller.clone());
        Ok(Box::new(DelayChannel { st, poller }))
    }

    fn driver_info(&self) -> Value {
        json!({ "delay": self.shared.params() })
    }

    fn config_entry(&self, _bdev: &Bdev) -> Option<Value> {
        Some(json!({"method": "bdev_delay_create", "params": self.shared.params()}))
    }

    fn write_cache(&self) -> bool {
        self.base.ops().write_cache()
    }

    fn destruct(&self) {
        let s = &self.shared;
        nodes().retain(|n| !Arc::ptr_eq(n, s));
        // Held I/O would otherwise never complete: cut their delay short.
        let id = s.id;
        s.for_each_channel_reactor(|h| h.send(move || release_all(id, None)));
        s.base.release();
    }
}

fn seed_for(salt: usize) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (salt as u64).rotate_left(32) ^ ticks()) | 1
}

/// The delay channels living on the current reactor.
fn local_channels(id: u64) -> Vec<Rc<ChanState>> {
    wc_bdev::channels::local(id)
}

/// Completes every held I/O of bdev `id` on this reactor: with `status`
/// (RESET: aborted), or with its own status (`None`: teardown).
fn release_all(id: u64, status: Option<IoStatus>) {
    for ch in local_channels(id) {
        for q in &ch.queues {
            let held: Vec<Held> = q.borrow_mut().drain(..).collect();
            for h in held {
                h.io.complete(status.unwrap_or(h.status));
            }
        }
    }
}

/// A parent I/O at the base, with the latency class it drew.
struct Inflight {
    io: Io,
    class: Option<LatencyType>,
}

/// A completed I/O waiting for its latency to pass.
struct Held {
    due: u64,
    status: IoStatus,
    io: Io,
}

/// One reactor's state of one delay vbdev.
struct ChanState {
    shared: Arc<Shared>,
    chan_id: u64,
    base: Rc<BdevChannel>,
    me: Weak<ChanState>,
    /// I/O in flight to the base, keyed by the child's ctx.
    slab: RefCell<Slab<Inflight>>,
    /// One FIFO per latency class (`LatencyType::index`): within a class
    /// due times grow with completion order (until a latency change).
    queues: [RefCell<VecDeque<Held>>; 4],
    rng: Cell<u64>,
    /// RESETs waiting for every channel to drop its held I/O.
    resets: RefCell<Vec<(u64, Io)>>,
    next_token: Cell<u64>,
    spin_ticks: u64,
    /// This channel's poller: paused while nothing is held.
    poller: std::cell::OnceCell<PollerHandle>,
}

/// The channel the framework holds; unregisters the poller on drop.
struct DelayChannel {
    st: Rc<ChanState>,
    poller: PollerHandle,
}

impl Drop for DelayChannel {
    fn drop(&mut self) {
        self.poller.unregister();
    }
}

impl IoChannel for DelayChannel {
    fn submit(&self, io: Io) {
        self.st.submit(io);
    }
}

impl ChanState {
    /// True for 1 draw in 100 (xorshift64*; SPDK uses `rand_r() % 100`).
    fn draw_p99(&self) -> bool {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) % 100 == 0
    }

    fn submit(&self, io: Io) {
        let class = match io.io_type() {
            IoType::Read => Some(if self.draw_p99() {
                LatencyType::P99Read
            } else {
                LatencyType::AvgRead
            }),
            IoType::Write => Some(if self.draw_p99() {
                LatencyType::P99Write
            } else {
                LatencyType::AvgWrite
            }),
            IoType::Reset => return self.reset(io),
            _ => None,
        };
        self.forward(io, class);
    }

    fn forward(&self, io: Io, class: Option<LatencyType>) {
        let Some(me) = self.me.upgrade() else {
            return io.complete(IoStatus::Failed(libc::ENODEV));
        };
        let cb: Rc<dyn IoCompletion> = me;
        let slot = self.slab.borrow_mut().insert(Inflight { io, class });
        let slab = self.slab.borrow();
        let parent = &slab[slot].io;
        // SAFETY: the parent stays in the slab, then in a delay queue, until
        // after this child completes (completions are deferred, so the
        // borrow of the slab ends before the child's callback runs).
        unsafe { self.base.submit_like(parent, &cb, slot as u64) };
    }

    /// RESET: every channel aborts its held I/O, then the reset goes to the
    /// base from this reactor.
    fn reset(&self, io: Io) {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        self.resets.borrow_mut().push((token, io));
        let id = self.shared.id;
        self.shared.reactors.for_each_then(
            move || release_all(id, Some(IoStatus::Aborted)),
            move || {
                for ch in local_channels(id) {
                    let io = {
                        let mut rs = ch.resets.borrow_mut();
                        rs.iter()
                            .position(|(t, _)| *t == token)
                            .map(|i| rs.swap_remove(i).1)
                    };
                    if let Some(io) = io {
                        ch.forward(io, None);
                    }
                }
            },
        );
    }

    /// The poller: completes held I/O whose time has come.
    fn finish_due(&self) -> PollStatus {
        // Nothing held (a stacked bdev's origin between writebacks, say):
        // the poller pauses until a completion is held again, so the
        // reactor's iterations skip it (with no clock read: `rdtsc` cost
        // the idle poll most of its time on a VM).
        if self.queues.iter().all(|q| q.borrow().is_empty()) {
            if let Some(p) = self.poller.get() {
                p.pause();
            }
            return PollStatus::Idle;
        }
        let now = ticks();
        let mut done = 0;
        let mut soon = false;
        for q in &self.queues {
            loop {
                let h = {
                    let mut q = q.borrow_mut();
                    match q.front() {
                        Some(h) if h.due <= now => q.pop_front(),
                        Some(h) => {
                            soon |= h.due - now <= self.spin_ticks;
                            None
                        }
                        None => None,
                    }
                };
                let Some(h) = h else { break };
                h.io.complete(h.status);
                done += 1;
            }
        }
        PollStatus::from(done > 0 || soon)
    }
}

impl Drop for ChanState {
    fn drop(&mut self) {
        self.shared.reactors.remove(self.chan_id);
    }
}

impl IoCompletion for ChanState {
    fn io_done(&self, child: Io, ctx: u64) {
        let status = child.status();
        drop(child);
        let Some(p) = self.slab.borrow_mut().try_remove(ctx as usize) else {
            return;
        };
        match p.class {
            Some(c) => {
                let lat = self.shared.latency_ticks[c.index()].load(Ordering::Relaxed);
                if let Some(poller) = self.poller.get() {
                    poller.resume();
                }
                self.queues[c.index()].borrow_mut().push_back(Held {
                    due: ticks().saturating_add(lat),
                    status,
                    io: p.io,
                });
            }
            None => p.io.complete(status),
        }
    }
}

/// JSON-RPC methods of the module.
pub mod rpc {
    use serde_json::{json, Value};
    use wc_bdev::rpc::handle;
    use wc_bdev::BdevError;
    use wc_rpc::{decode, RegisterError, Registry, RpcError, StateMask};

    use super::{DelayOpts, DeleteParams, UpdateLatencyParams};

    /// SPDK's reply when `bdev_delay_update_latency` names no delay bdev.
    pub const NO_SUCH_DELAY_BDEV_MSG: &str = "The requested bdev does not exist.";

    /// Registers `bdev_delay_create` (answers the name, even when creation
    /// waits for the base), `bdev_delay_delete` and
    /// `bdev_delay_update_latency` (answer `true`).
    pub fn register(reg: &Registry) -> Result<(), RegisterError> {
        reg.register_fn("bdev_delay_create", StateMask::RUNTIME, |p, r| {
            handle(p, r, |o: DelayOpts| {
                let name = o.name.clone();
                super::create(o).map(|_| json!(name))
            })
        })?;
        reg.register_fn("bdev_delay_delete", StateMask::RUNTIME, |p, r| {
            handle(p, r, |d: DeleteParams| {
                super::delete(&d.name).map(|_| Value::Bool(true))
            })
        })?;
        reg.register_fn("bdev_delay_update_latency", StateMask::RUNTIME, |p, r| {
            let u: UpdateLatencyParams = match decode(p) {
                Ok(u) => u,
                Err(e) => return r.err(e),
            };
            // SPDK answers both failures with -32602 and its own texts.
            r.respond(match super::update_latency_with(&u) {
                Ok(()) => Ok(Value::Bool(true)),
                Err(BdevError::NotFound(_)) => {
                    Err(RpcError::invalid_params(NO_SUCH_DELAY_BDEV_MSG))
                }
                Err(e) => Err(RpcError::invalid_params(e.to_string())),
            })
        })
    }
}
