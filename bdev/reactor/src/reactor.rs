//! One reactor: a message inbox, pollers, timers and local tasks, all run by
//! [`Reactor::poll_once`] on the thread that owns the reactor.

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::{Rc, Weak};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crossbeam::queue::SegQueue;
use crossbeam::utils::CachePadded;

use crate::tick::{duration_to_ticks, ticks};

/// A message: a closure run on the destination reactor.
pub type Message = Box<dyn FnOnce() + Send + 'static>;

/// What a poller reports after a run; idle reactors may sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollStatus {
    /// The poller did work.
    Busy,
    /// The poller found nothing to do.
    Idle,
}

impl From<bool> for PollStatus {
    fn from(busy: bool) -> Self {
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}

/// How a reactor behaves when it has nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleMode {
    /// Spin forever (lowest latency; one core burnt per reactor).
    Busy,
    /// Back off, then sleep until a message arrives, a timer is due, or
    /// `max_sleep` passes (so active pollers still see their work).
    Sleep {
        /// Upper bound on one sleep.
        max_sleep: Duration,
    },
}

impl IdleMode {
    /// The sleep mode with its default bound of 1 ms.
    pub fn sleep() -> Self {
        IdleMode::Sleep {
            max_sleep: Duration::from_millis(1),
        }
    }
}

/// A reactor's busy and idle time (TSC ticks), read by other threads for
/// the stats.
#[derive(Default)]
pub(crate) struct BusyIdle {
    pub(crate) busy: AtomicU64,
    pub(crate) idle: AtomicU64,
}

impl BusyIdle {
    /// Adds `d` ticks. Only the polling thread writes: a load and a store,
    /// not a locked read-modify-write per iteration.
    #[inline]
    fn charge(&self, busy: bool, d: u64) {
        let c = if busy { &self.busy } else { &self.idle };
        c.store(c.load(Ordering::Relaxed).wrapping_add(d), Ordering::Relaxed);
    }
}

/// State of a reactor that other threads may touch.
pub(crate) struct Shared {
    pub(crate) index: usize,
    pub(crate) core: u32,
    inbox: SegQueue<Message>,
    tasks: SegQueue<async_task::Runnable>,
    sleeping: CachePadded<AtomicBool>,
    /// The thread that polls the reactor now (a hosted reactor changes
    /// hands: standby thread, then its host, then standby again). Only
    /// read when the reactor sleeps, so the lock is off the I/O path.
    thread: Mutex<Option<Thread>>,
    pub(crate) stop: AtomicBool,
    /// Time spent in busy and in idle iterations, written by the polling
    /// thread once per iteration: on its own line, away from what other
    /// threads touch when they send a message.
    pub(crate) ticks: CachePadded<BusyIdle>,
    pub(crate) tid: AtomicU64,
    pub(crate) interrupt: AtomicBool,
    pub(crate) active_pollers: AtomicU64,
    pub(crate) timed_pollers: AtomicU64,
    pub(crate) runtime: OnceLock<Arc<RuntimeShared>>,
}

impl Shared {
    pub(crate) fn new(index: usize, core: u32) -> Arc<Shared> {
        Arc::new(Shared {
            index,
            core,
            inbox: SegQueue::new(),
            tasks: SegQueue::new(),
            sleeping: CachePadded::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
            stop: AtomicBool::new(false),
            ticks: CachePadded::new(BusyIdle::default()),
            tid: AtomicU64::new(0),
            interrupt: AtomicBool::new(false),
            active_pollers: AtomicU64::new(0),
            timed_pollers: AtomicU64::new(0),
            runtime: OnceLock::new(),
        })
    }
}

/// What all reactors of one runtime share: the handles of each other.
pub(crate) struct RuntimeShared {
    pub(crate) handles: Vec<ReactorHandle>,
    pub(crate) main_index: usize,
}

/// A `Send + Sync` handle to a reactor: send it messages, wake it.
#[derive(Clone)]
pub struct ReactorHandle(pub(crate) Arc<Shared>);

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reactor[{} core {}]", self.0.index, self.0.core)
    }
}

impl ReactorHandle {
    /// Position of this reactor in its runtime (0-based, dense).
    pub fn index(&self) -> usize {
        self.0.index
    }

    /// The CPU this reactor is pinned to (or nominally owns in a harness).
    pub fn core(&self) -> u32 {
        self.0.core
    }

    /// Whether this handle is the reactor polled by the calling thread.
    pub fn is_current(&self) -> bool {
        CURRENT.with(|c| {
            c.borrow()
                .as_ref()
                .is_some_and(|r| Arc::ptr_eq(&r.shared, &self.0))
        })
    }

    /// Queues `f` to run on this reactor. Lock-free; callable from any thread.
    pub fn send(&self, f: impl FnOnce() + Send + 'static) {
        self.send_boxed(Box::new(f));
    }

    /// As [`send`](Self::send), with an already boxed message.
    pub fn send_boxed(&self, msg: Message) {
        self.0.inbox.push(msg);
        self.wake();
    }

    /// Runs `f` on this reactor and resolves with its result.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> futures::channel::oneshot::Receiver<T> {
        let (tx, rx) = futures::channel::oneshot::channel();
        self.send(move || {
            let _ = tx.send(f());
        });
        rx
    }

    /// Runs `f` on this reactor and blocks the calling (non-reactor) thread
    /// until it returns. Returns `None` if the reactor stopped first.
    pub fn call_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        futures::executor::block_on(self.call(f)).ok()
    }

    /// Handles of every reactor of the same runtime, in index order.
    pub fn siblings(&self) -> Vec<ReactorHandle> {
        self.0
            .runtime
            .get()
            .map(|r| r.handles.clone())
            .unwrap_or_else(|| vec![self.clone()])
    }

    /// Busy and idle ticks spent so far.
    pub fn busy_idle_ticks(&self) -> (u64, u64) {
        (
            self.0.ticks.busy.load(Ordering::Relaxed),
            self.0.ticks.idle.load(Ordering::Relaxed),
        )
    }

    /// OS thread id of the reactor thread (0 in a harness before it runs).
    pub fn tid(&self) -> u64 {
        self.0.tid.load(Ordering::Relaxed)
    }

    /// True when the reactor runs in sleep (interrupt-like) mode.
    pub fn in_interrupt(&self) -> bool {
        self.0.interrupt.load(Ordering::Relaxed)
    }

    /// Counts of (active, timed) pollers.
    pub fn poller_counts(&self) -> (u64, u64) {
        (
            self.0.active_pollers.load(Ordering::Relaxed),
            self.0.timed_pollers.load(Ordering::Relaxed),
        )
    }

    fn wake(&self) {
        // Pairs with the fence in `Reactor::sleep`: either the sleeper sees
        // our push, or we see its `sleeping` flag and unpark it.
        fence(Ordering::SeqCst);
        if self.0.sleeping.load(Ordering::Relaxed) {
            let t = self.0.thread.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = t.as_ref() {
                t.unpark();
            }
        }
    }

    pub(crate) fn same(&self, other: &ReactorHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

type PollFn = Box<dyn FnMut() -> PollStatus>;

struct PollerEntry {
    id: u64,
    name: String,
    period_ticks: u64,
    next_run: u64,
    one_shot: bool,
    /// Finds only work this reactor queued itself (see
    /// [`Reactor::register_event_poller`]): no reason to wake up early.
    event_driven: bool,
    /// Set by [`PollerHandle::pause`]: the iteration skips the poller.
    paused: Rc<Cell<bool>>,
    f: Rc<RefCell<PollFn>>,
}

/// The reactor itself. Not `Send`: it lives on (and is polled by) one thread.
pub struct Reactor {
    shared: Arc<Shared>,
    handle: ReactorHandle,
    pollers: RefCell<Vec<PollerEntry>>,
    removed: RefCell<Vec<u64>>,
    next_poller_id: Cell<u64>,
    idle: Cell<IdleMode>,
    idle_streak: Cell<u32>,
    /// When the last iteration started (0: none yet on this thread) and
    /// whether it was busy: each iteration reads the clock once, at its
    /// start, and charges the time since the previous start to that one.
    iter_start: Cell<u64>,
    iter_busy: Cell<bool>,
    /// Registered pollers that are event-driven (among the active ones).
    event_pollers: Cell<u64>,
    self_weak: RefCell<Weak<Reactor>>,
    locals: RefCell<HashMap<TypeId, Rc<dyn Any>>>,
}

thread_local! {
    pub(crate) static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

/// The reactor running on this thread. Panics when called off a reactor:
/// that is a programming error (use [`try_current`] where it is not).
pub fn current() -> Rc<Reactor> {
    try_current().expect("wc_reactor::current() called outside a reactor")
}

/// The reactor running on this thread, if any.
pub fn try_current() -> Option<Rc<Reactor>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Makes `r` the current reactor of this thread while `f` runs.
pub(crate) fn enter<T>(r: &Rc<Reactor>, f: impl FnOnce() -> T) -> T {
    let prev = CURRENT.with(|c| c.borrow_mut().replace(r.clone()));
    struct Restore(Option<Rc<Reactor>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = prev);
        }
    }
    let _restore = Restore(prev);
    f()
}

/// A registered poller; [`unregister`](PollerHandle::unregister) removes it
/// (also from inside the poller itself). Dropping the handle keeps it running.
#[derive(Clone)]
pub struct PollerHandle {
    reactor: Weak<Reactor>,
    id: u64,
    paused: Rc<Cell<bool>>,
}

impl PollerHandle {
    /// Stops the poller; it will not run again after the current iteration.
    pub fn unregister(&self) {
        if let Some(r) = self.reactor.upgrade() {
            r.removed.borrow_mut().push(self.id);
        }
    }

    /// Skips the poller from the next iteration on until
    /// [`resume`](Self::resume) (SPDK's `spdk_poller_pause`): a poller
    /// that knows it has nothing to do (a channel with nothing in flight)
    /// costs its reactor nothing per iteration, where running it cost a
    /// call and a look at its state on every one. Call it on the poller's
    /// reactor (the handle is not `Send`), also from inside the poller.
    pub fn pause(&self) {
        self.paused.set(true);
    }

    /// Runs the poller again from the next iteration on.
    pub fn resume(&self) {
        self.paused.set(false);
    }

    /// Whether the poller is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.get()
    }
}

impl Reactor {
    pub(crate) fn new(index: usize, core: u32, idle: IdleMode) -> Rc<Reactor> {
        Reactor::with_shared(Shared::new(index, core), idle)
    }

    /// A reactor over existing shared state: its inbox, counters and
    /// runtime membership survive, its pollers and locals start empty
    /// (a hosted reactor changing hands).
    pub(crate) fn with_shared(shared: Arc<Shared>, idle: IdleMode) -> Rc<Reactor> {
        shared
            .interrupt
            .store(matches!(idle, IdleMode::Sleep { .. }), Ordering::Relaxed);
        let r = Rc::new(Reactor {
            handle: ReactorHandle(shared.clone()),
            shared,
            pollers: RefCell::new(Vec::new()),
            removed: RefCell::new(Vec::new()),
            next_poller_id: Cell::new(1),
            idle: Cell::new(idle),
            idle_streak: Cell::new(0),
            iter_start: Cell::new(0),
            iter_busy: Cell::new(false),
            event_pollers: Cell::new(0),
            self_weak: RefCell::new(Weak::new()),
            locals: RefCell::new(HashMap::new()),
        });
        *r.self_weak.borrow_mut() = Rc::downgrade(&r);
        r
    }

    pub(crate) fn bind_thread(&self) {
        *self.shared.thread.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::thread::current());
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.shared.tid.store(tid as u64, Ordering::Relaxed);
    }

    pub(crate) fn set_runtime(&self, rt: Arc<RuntimeShared>) {
        let _ = self.shared.runtime.set(rt);
    }

    /// Reactor-local storage: the one `T` of this reactor, created with
    /// `init` on first use. Per-core state (I/O pools, channel caches) lives
    /// here rather than in thread-locals so logical reactors of a
    /// [`Harness`](crate::Harness) sharing one thread stay separate.
    pub fn local<T: 'static>(&self, init: impl FnOnce() -> T) -> Rc<T> {
        let key = TypeId::of::<T>();
        if let Some(v) = self.locals.borrow().get(&key) {
            if let Ok(v) = v.clone().downcast::<T>() {
                return v;
            }
        }
        let v = Rc::new(init());
        self.locals.borrow_mut().insert(key, v.clone());
        v
    }

    /// A `Send` handle to this reactor.
    pub fn handle(&self) -> ReactorHandle {
        self.handle.clone()
    }

    /// Dense index of this reactor in its runtime.
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// CPU id of this reactor.
    pub fn core(&self) -> u32 {
        self.shared.core
    }

    /// Number of reactors in the runtime.
    pub fn count(&self) -> usize {
        self.shared
            .runtime
            .get()
            .map(|r| r.handles.len())
            .unwrap_or(1)
    }

    /// True on the runtime's main reactor (RPC and control run there).
    pub fn is_main(&self) -> bool {
        self.shared
            .runtime
            .get()
            .map(|r| r.main_index == self.shared.index)
            .unwrap_or(true)
    }

    /// Handles of all reactors of this runtime, in index order.
    pub fn siblings(&self) -> Vec<ReactorHandle> {
        self.handle.siblings()
    }

    /// The main reactor's handle.
    pub fn main_handle(&self) -> ReactorHandle {
        match self.shared.runtime.get() {
            Some(rt) => rt.handles[rt.main_index].clone(),
            None => self.handle(),
        }
    }

    /// Changes the idle behaviour at run time.
    pub fn set_idle_mode(&self, mode: IdleMode) {
        self.idle.set(mode);
        self.shared
            .interrupt
            .store(matches!(mode, IdleMode::Sleep { .. }), Ordering::Relaxed);
    }

    /// Registers a poller run every iteration (`period == None`) or at most
    /// once per `period`.
    pub fn register_poller(
        &self,
        name: &str,
        period: Option<Duration>,
        f: impl FnMut() -> PollStatus + 'static,
    ) -> PollerHandle {
        self.add_poller(name, period, false, false, Box::new(f))
    }

    /// Registers a poller run every iteration that only ever finds work
    /// queued on this reactor by its own messages, tasks or pollers (a
    /// completion queue filled by submissions made here, a list filled by
    /// a message): such work always follows a busy iteration, so the
    /// poller runs before the reactor could go to sleep, and a sleeping
    /// reactor needs no early wake-ups for it. Unlike [`register_poller`]
    /// pollers, it does not keep a sleep-mode reactor napping in 10 µs
    /// steps (an idle control reactor that once did I/O would otherwise
    /// wake some 100,000 times a second).
    ///
    /// [`register_poller`]: Self::register_poller
    pub fn register_event_poller(
        &self,
        name: &str,
        f: impl FnMut() -> PollStatus + 'static,
    ) -> PollerHandle {
        self.add_poller(name, None, false, true, Box::new(f))
    }

    /// Runs `f` once, after `delay`, on this reactor.
    pub fn schedule_timer(&self, delay: Duration, f: impl FnOnce() + 'static) -> PollerHandle {
        let mut f = Some(f);
        self.add_poller(
            "timer",
            Some(delay),
            true,
            false,
            Box::new(move || {
                if let Some(f) = f.take() {
                    f();
                }
                PollStatus::Busy
            }),
        )
    }

    fn add_poller(
        &self,
        name: &str,
        period: Option<Duration>,
        one_shot: bool,
        event_driven: bool,
        f: PollFn,
    ) -> PollerHandle {
        let id = self.next_poller_id.get();
        self.next_poller_id.set(id + 1);
        let period_ticks = period.map(duration_to_ticks).unwrap_or(0);
        let now = ticks();
        let paused = Rc::new(Cell::new(false));
        self.pollers.borrow_mut().push(PollerEntry {
            id,
            name: name.to_string(),
            period_ticks,
            next_run: if period_ticks == 0 {
                0
            } else {
                now + period_ticks
            },
            one_shot,
            event_driven,
            paused: paused.clone(),
            f: Rc::new(RefCell::new(f)),
        });
        self.update_poller_counts();
        PollerHandle {
            reactor: self.self_weak.borrow().clone(),
            id,
            paused,
        }
    }

    fn update_poller_counts(&self) {
        let pollers = self.pollers.borrow();
        let timed = pollers.iter().filter(|p| p.period_ticks > 0).count() as u64;
        self.shared.timed_pollers.store(timed, Ordering::Relaxed);
        self.shared
            .active_pollers
            .store(pollers.len() as u64 - timed, Ordering::Relaxed);
        self.event_pollers
            .set(pollers.iter().filter(|p| p.event_driven).count() as u64);
    }

    /// Names of registered pollers (for diagnostics).
    pub fn poller_names(&self) -> Vec<String> {
        self.pollers
            .borrow()
            .iter()
            .map(|p| p.name.clone())
            .collect()
    }

    /// Spawns a future on this reactor. Its wakers may be used from any
    /// thread; the future itself always runs here.
    pub fn spawn_local<F>(&self, fut: F) -> async_task::Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let shared = self.shared.clone();
        let schedule = move |runnable: async_task::Runnable| {
            shared.tasks.push(runnable);
            ReactorHandle(shared.clone()).wake();
        };
        let (runnable, task) = async_task::spawn_local(fut, schedule);
        runnable.schedule();
        task
    }

    /// One iteration: messages, ready tasks, due pollers. Returns true when
    /// any of them did work.
    pub fn poll_once(&self) -> bool {
        // One clock read per iteration (`rdtsc` costs ~10 ns on a VM): the
        // previous iteration ends where this one starts.
        let start = ticks();
        let prev = self.iter_start.replace(start);
        if prev != 0 {
            self.shared
                .ticks
                .charge(self.iter_busy.get(), start.wrapping_sub(prev));
        }
        let mut busy = false;

        // Bounded batches keep one flood from starving pollers. Empty
        // queues (the usual case on an I/O reactor) are seen by
        // `is_empty`, two loads: a `pop` on an empty SegQueue costs a
        // SeqCst fence (mfence) each. A push racing with the check is
        // served by the next iteration, as one racing with `pop` was; the
        // sleep path re-checks after its own fence (`idle_wait`).
        if !self.shared.inbox.is_empty() {
            for _ in 0..256 {
                match self.shared.inbox.pop() {
                    Some(msg) => {
                        msg();
                        busy = true;
                    }
                    None => break,
                }
            }
        }
        if !self.shared.tasks.is_empty() {
            for _ in 0..256 {
                match self.shared.tasks.pop() {
                    Some(r) => {
                        r.run();
                        busy = true;
                    }
                    None => break,
                }
            }
        }
        // The clock read at the start serves the timed pollers unless
        // messages or tasks ran meanwhile (one TSC read less per idle
        // iteration).
        let now = if busy { ticks() } else { start };
        busy |= self.run_pollers(now);
        self.iter_busy.set(busy);
        busy
    }

    fn run_pollers(&self, now: u64) -> bool {
        self.apply_removals();
        let mut busy = false;
        // Pollers may register or remove pollers; iterate over a snapshot of
        // ids and re-look each up.
        let n = self.pollers.borrow().len();
        let mut fired_one_shots = Vec::new();
        for i in 0..n {
            let (id, f, one_shot) = {
                let mut pollers = self.pollers.borrow_mut();
                let Some(p) = pollers.get_mut(i) else { break };
                if p.paused.get() {
                    continue;
                }
                if p.period_ticks > 0 {
                    if now < p.next_run {
                        continue;
                    }
                    p.next_run = now + p.period_ticks;
                }
                (p.id, p.f.clone(), p.one_shot)
            };
            if self.removed.borrow().contains(&id) {
                continue;
            }
            let status = (f.borrow_mut())();
            busy |= status == PollStatus::Busy;
            if one_shot {
                fired_one_shots.push(id);
            }
        }
        self.removed.borrow_mut().extend(fired_one_shots);
        self.apply_removals();
        busy
    }

    fn apply_removals(&self) {
        let mut removed = self.removed.borrow_mut();
        if removed.is_empty() {
            return;
        }
        self.pollers
            .borrow_mut()
            .retain(|p| !removed.contains(&p.id));
        removed.clear();
        drop(removed);
        self.update_poller_counts();
    }

    /// True when messages or tasks are waiting.
    pub fn has_pending_work(&self) -> bool {
        !self.shared.inbox.is_empty() || !self.shared.tasks.is_empty()
    }

    /// Ticks until the next timed poller is due (`None` without any).
    fn next_timer_in(&self) -> Option<u64> {
        let now = ticks();
        self.pollers
            .borrow()
            .iter()
            .filter(|p| p.period_ticks > 0)
            .map(|p| p.next_run.saturating_sub(now))
            .min()
    }

    /// Called by the run loop after an iteration that did no work.
    pub(crate) fn idle_wait(&self) {
        let IdleMode::Sleep { max_sleep } = self.idle.get() else {
            return;
        };
        // Spin briefly first: work often arrives within microseconds.
        let streak = self.idle_streak.get().saturating_add(1);
        self.idle_streak.set(streak);
        if streak < 64 {
            std::hint::spin_loop();
            return;
        }
        // Event-driven pollers count as active (for the stats) but never
        // have work a nap would find.
        let has_active =
            self.shared.active_pollers.load(Ordering::Relaxed) > self.event_pollers.get();
        let mut sleep = if has_active {
            // Active pollers may have in-flight work (I/O completions):
            // back off gradually from 10 us up to `max_sleep`.
            let shift = ((streak - 64) / 16).min(10);
            Duration::from_micros(10u64 << shift).min(max_sleep)
        } else {
            // Only messages or timers can make work: sleep long, bounded so
            // stop requests are seen even without a wake-up.
            Duration::from_millis(100)
        };
        if let Some(t) = self.next_timer_in() {
            sleep = sleep.min(crate::tick::ticks_to_duration(t));
        }
        if !sleep.is_zero() {
            self.sleep(sleep);
        }
    }

    fn sleep(&self, d: Duration) {
        self.shared.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !self.has_pending_work() && !self.shared.stop.load(Ordering::Relaxed) {
            std::thread::park_timeout(d);
            // The nap and the idle iteration before it are idle time.
            let now = ticks();
            let prev = self.iter_start.replace(now);
            if prev != 0 {
                self.shared.ticks.charge(false, now.wrapping_sub(prev));
            }
        }
        self.shared.sleeping.store(false, Ordering::Relaxed);
    }

    /// Drops the pollers and reactor-local state of this owner of the
    /// reactor (a hosted reactor changing threads); messages stay queued.
    pub(crate) fn clear_thread_state(&self) {
        for _ in 0..4 {
            let locals = std::mem::take(&mut *self.locals.borrow_mut());
            let pollers = std::mem::take(&mut *self.pollers.borrow_mut());
            if locals.is_empty() && pollers.is_empty() {
                break;
            }
            // Destructors may touch the reactor: no borrow is held here.
            drop(locals);
            drop(pollers);
        }
        self.removed.borrow_mut().clear();
        self.update_poller_counts();
    }

    pub(crate) fn reset_idle_streak(&self) {
        self.idle_streak.set(0);
    }

    pub(crate) fn should_stop(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }
}
