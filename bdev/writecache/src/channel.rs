//! The per-core I/O path: writes allocate, copy with persistent stores and
//! publish in the index without any global lock; reads copy hits out of the
//! mapping under an epoch pin and send misses to the origin.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use smallvec::SmallVec;
use wc_bdev::{BdevChannel, Io, IoChannel, IoCompletion, IoStatus, IoType, IoVec};
use wc_reactor::PollStatus;

use crate::cache::{LogEntry, Writecache};
use crate::meta::VALID;
use crate::stats::inc;

mod ssd;

/// Reactor-local registry of each instance's per-core state, so commit
/// messages can find it.
#[derive(Default)]
struct Locals(RefCell<HashMap<u64, Weak<Local>>>);

/// This reactor's state of instance `id`, if it has a channel here.
pub(crate) fn local_of(id: u64) -> Option<Rc<Local>> {
    let r = wc_reactor::try_current()?;
    let l = r.local(Locals::default);
    let v = l.0.borrow().get(&id).and_then(|w| w.upgrade());
    v
}

/// Blocks of a write published in the index at once at most (a 128 KiB
/// I/O of 4 KiB blocks: one index group).
const RUN_MAX: usize = 32;
/// Largest batch a core takes from the pool at once.
const REFILL_MAX: usize = 64;
/// Displaced blocks a core frees at once at most.
const FREE_BATCH: usize = 64;
/// Block index stored in `driver_ctx[0]`: how far a write got.
const PROGRESS: usize = 0;
/// `driver_ctx[1]` set once a write was counted as blocked.
const BLOCKED: usize = 1;

static ZEROES: [u8; 4096] = [0; 4096];

/// How often a core with waiting writes pushes deferred frees along.
static FLUSH_PERIOD_TICKS: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    wc_reactor::tick::duration_to_ticks(std::time::Duration::from_micros(10))
});

/// How stale the last-write-around stamp may get (the writeback pause it
/// drives is counted in milliseconds).
pub(crate) static AROUND_STAMP_TICKS: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    wc_reactor::tick::duration_to_ticks(std::time::Duration::from_micros(50))
});

/// A run of missed blocks: first block index, count, and its segments.
type MissRun = (u64, u64, SmallVec<[IoVec; 4]>);

struct Parent {
    io: Option<Io>,
    remaining: u32,
    errno: i32,
    /// ssd mode: the next block of a write waiting for free blocks.
    next: u64,
    /// ssd mode: a FUA write, committed once its data writes are done.
    fua: bool,
    /// ssd mode: counted as blocked on the freelist already.
    blocked: bool,
}

/// One core's view of an instance.
pub(crate) struct Local {
    wc: Arc<Writecache>,
    core: usize,
    /// Reactors in the runtime (fixed for its life).
    cores: u64,
    origin: Rc<BdevChannel>,
    free: RefCell<Vec<u32>>,
    write_log: RefCell<Vec<LogEntry>>,
    superseded: RefCell<Vec<LogEntry>>,
    /// Displaced uncommitted blocks, freed (entries cleared, one fence) in
    /// a batch; always before this core acknowledges a commit.
    to_free: RefCell<Vec<u32>>,
    waiting: RefCell<VecDeque<Io>>,
    parents: RefCell<Vec<Option<Parent>>>,
    free_parents: RefCell<Vec<usize>>,
    child_cb: Rc<dyn IoCompletion>,
    poller: RefCell<Option<wc_reactor::PollerHandle>>,
    /// I/O submitted while suspended, resubmitted on resume.
    held: RefCell<VecDeque<Io>>,
    /// ssd mode: this core's channel of the cache bdev.
    cache: Option<Rc<BdevChannel>>,
    /// ssd mode: cache-bdev I/O in flight, by slot.
    runs: RefCell<Vec<Option<ssd::Run>>>,
    free_runs: RefCell<Vec<usize>>,
    /// ssd mode: one-block writes in flight without a parent (see
    /// `ssd_write_one`), by slot.
    one_writes: RefCell<slab::Slab<Io>>,
    ssd_cb: Rc<dyn IoCompletion>,
    /// ssd mode: writes (parent keys) waiting for free blocks.
    ssd_waiting: RefCell<VecDeque<usize>>,
    /// Reads and one-block writes accepted since the poller last ran:
    /// their index slots are being fetched; the poller looks them up and
    /// serves them as a batch (see [`Local::run_batch`]).
    batch: RefCell<Vec<Io>>,
    /// The batch the poller is working on (kept to reuse its allocation).
    batch_spare: RefCell<Vec<Io>>,
    /// pmem mode: a batch's one-block writes with their data copied, not
    /// yet published (see [`Local::serve_pmem_batch`]); kept for reuse.
    staged: RefCell<Vec<(Io, u64, LogEntry)>>,
    /// pmem mode: such a batch's other writes, served after the staged
    /// ones are published; kept for reuse.
    unstaged: RefCell<Vec<Io>>,
    /// Batchable I/Os accepted since the poller last ran.
    batch_seen: Cell<u32>,
    /// Whether reads and one-block writes came several per reactor
    /// iteration the last time any came (then they are batched; one at a
    /// time, as at queue depth 1, they run at once).
    batching: Cell<bool>,
    /// When waiting writes last pushed deferred frees along (ticks).
    last_flush: Cell<u64>,
    /// Set while a cache-bdev completion runs (ssd mode): the parent it
    /// finishes completes at once ([`Io::complete_now`]) instead of taking
    /// another trip through the completion queue. Taken by that
    /// completion, so nothing finished inside the submitter's callback
    /// (which may submit again) completes inline.
    complete_now: Cell<bool>,
    /// This core's counters: `wc.stats[slot]`, where `slot` is this core's
    /// index reduced once (`core_stats` divides). A pointer, read several
    /// times per I/O, instead of an index into `wc.stats` each time.
    stats: std::ptr::NonNull<crate::stats::CoreStats>,
    /// ssd mode: the dirty map of the RAM metadata this core marks.
    meta_map: usize,
}

struct ChildDone(Weak<Local>);

impl IoCompletion for ChildDone {
    fn io_done(&self, io: Io, ctx: u64) {
        // (ssd mode's cache-bdev children complete through ssd::RunDone.)
        let status = io.status();
        drop(io);
        if let Some(l) = self.0.upgrade() {
            l.child_done(ctx as usize, status.errno());
        }
    }
}

/// The vbdev channel handed to the bdev layer.
pub(crate) struct WcChannel(Rc<Local>);

impl Drop for WcChannel {
    fn drop(&mut self) {
        if let Some(p) = self.0.poller.borrow_mut().take() {
            p.unregister();
        }
        let l = &self.0;
        // Reads and writes still queued: served now, while the cache is
        // mapped (and before the write log is handed over below).
        l.run_batch();
        l.free_displaced();
        // Blocks written here and not yet committed: make their entries
        // durable now and hand the logs to home, or no commit would cover
        // them and they would never be queued for writeback.
        let written = std::mem::take(&mut *l.write_log.borrow_mut());
        l.wc.media.flush_entries(&written);
        l.wc.media.pmem.fence();
        let superseded = std::mem::take(&mut *l.superseded.borrow_mut());
        l.stats().uncommitted.store(0, Ordering::Release);
        l.wc.adopt_logs(written, superseded);
        // Give cached free blocks back so they are not lost with the core.
        let mut free = self.0.free.borrow_mut();
        self.0.wc.pool.push_all(&free);
        free.clear();
        drop(free);
        self.0.stats().free_cached.store(0, Ordering::Relaxed);
        self.0.wc.remove_lane(self.0.core);
    }
}

pub(crate) fn create_channel(wc: &Arc<Writecache>) -> Result<WcChannel, wc_bdev::BdevError> {
    let r = wc_reactor::current();
    let origin = wc.origin_desc.channel()?;
    let cache = match wc.ssd {
        Some(_) => Some(wc.cache_desc.channel()?),
        None => None,
    };
    let local = Rc::new_cyclic(|weak: &Weak<Local>| Local {
        wc: wc.clone(),
        core: r.index(),
        cores: r.count().max(1) as u64,
        origin,
        free: RefCell::new(Vec::with_capacity(REFILL_MAX)),
        write_log: RefCell::new(Vec::new()),
        superseded: RefCell::new(Vec::new()),
        to_free: RefCell::new(Vec::with_capacity(FREE_BATCH)),

        waiting: RefCell::new(VecDeque::new()),
        parents: RefCell::new(Vec::new()),
        free_parents: RefCell::new(Vec::new()),
        child_cb: Rc::new(ChildDone(weak.clone())),
        poller: RefCell::new(None),
        held: RefCell::new(VecDeque::new()),
        cache,
        runs: RefCell::new(Vec::new()),
        free_runs: RefCell::new(Vec::new()),
        one_writes: RefCell::new(slab::Slab::new()),
        ssd_cb: Rc::new(ssd::RunDone(weak.clone())),
        ssd_waiting: RefCell::new(VecDeque::new()),
        batch: RefCell::new(Vec::with_capacity(64)),
        batch_spare: RefCell::new(Vec::with_capacity(64)),
        staged: RefCell::new(Vec::with_capacity(64)),
        unstaged: RefCell::new(Vec::with_capacity(64)),
        batch_seen: Cell::new(0),
        batching: Cell::new(false),
        last_flush: Cell::new(0),
        complete_now: Cell::new(false),
        stats: std::ptr::NonNull::from(&*wc.stats[r.index() % wc.stats.len().max(1)]),
        meta_map: wc.ssd.as_ref().map_or(0, |s| s.meta.map_of(r.index())),
    });
    r.local(Locals::default)
        .0
        .borrow_mut()
        .insert(wc.id, Rc::downgrade(&local));
    let weak = Rc::downgrade(&local);
    let p = r.register_poller("writecache_waiters", None, move || match weak.upgrade() {
        Some(l) => {
            let r = l.run_batch();
            let a = l.release_held();
            let b = l.retry_waiting();
            l.free_displaced();
            PollStatus::from(r || a == PollStatus::Busy || b == PollStatus::Busy)
        }
        None => PollStatus::Idle,
    });
    *local.poller.borrow_mut() = Some(p);
    wc.add_lane(r.handle());
    Ok(WcChannel(local))
}

impl Local {
    /// This reactor's channel of the origin (writeback shares go out on it).
    pub(crate) fn origin_channel(&self) -> Rc<BdevChannel> {
        self.origin.clone()
    }

    /// ssd mode: this reactor's channel of the cache bdev (writeback
    /// shares read their blocks through it).
    pub(crate) fn cache_channel(&self) -> Option<Rc<BdevChannel>> {
        self.cache.clone()
    }
}

impl IoChannel for WcChannel {
    fn submit(&self, io: Io) {
        let l = &self.0;
        if l.wc.closing.load(Ordering::Acquire) {
            return io.complete(IoStatus::Failed(libc::ENODEV));
        }
        if l.wc.suspended.load(Ordering::Acquire) {
            // Quiesced: hold the I/O (do not fail it) until resume.
            l.held.borrow_mut().push_back(io);
            return;
        }
        l.dispatch(io);
    }
}

impl Local {
    /// Runs one I/O through the cache (counted in flight until done).
    fn dispatch(self: &Rc<Self>, io: Io) {
        let l = self;
        if l.cache.is_some() {
            return l.ssd_dispatch(io);
        }
        match io.io_type() {
            IoType::Read => l.queue(io),
            IoType::Write => {
                if l.wc.error() != 0 {
                    return io.complete(IoStatus::Failed(libc::EIO));
                }
                if io.num_blocks() == 1 {
                    l.queue(io)
                } else {
                    l.write(io)
                }
            }
            IoType::WriteZeroes => {
                if l.wc.error() != 0 {
                    return io.complete(IoStatus::Failed(libc::EIO));
                }
                l.write(io)
            }
            IoType::Flush => l.flush(io),
            IoType::Unmap => l.unmap(io),
            IoType::Reset => io.complete(IoStatus::Success),
        }
    }
}

impl Local {
    fn stats(&self) -> &crate::stats::CoreStats {
        // SAFETY: `self.stats` points into `self.wc.stats`, a boxed slice
        // that is never replaced nor resized and lives as long as the
        // `Writecache`, which `self.wc` keeps alive; only shared access.
        unsafe { self.stats.as_ref() }
    }

    /// Completes a read or write, recording its latency.
    fn finish(&self, io: Io, status: IoStatus) {
        if status.is_success() {
            let ns = crate::stats::ticks_to_ns(
                wc_reactor::tick::ticks().saturating_sub(io.submit_ticks()),
            );
            match io.io_type() {
                IoType::Read => self.stats().read_lat.record(ns),
                IoType::Write | IoType::WriteZeroes => self.stats().write_lat.record(ns),
                _ => {}
            }
        }
        if self.complete_now.replace(false) {
            io.complete_now(status);
        } else {
            io.complete(status);
        }
    }

    // ---------------------------------------------------------------- parents

    fn new_parent(&self, io: Io, remaining: u32) -> usize {
        inc(&self.stats().inflight, 1);
        let p = Parent {
            io: Some(io),
            remaining,
            errno: 0,
            next: 0,
            fua: false,
            blocked: false,
        };
        match self.free_parents.borrow_mut().pop() {
            Some(k) => {
                self.parents.borrow_mut()[k] = Some(p);
                k
            }
            None => {
                let mut v = self.parents.borrow_mut();
                v.push(Some(p));
                v.len() - 1
            }
        }
    }

    fn child_done(self: &Rc<Self>, key: usize, errno: i32) {
        let done = {
            let mut v = self.parents.borrow_mut();
            let Some(Some(p)) = v.get_mut(key) else {
                return;
            };
            if errno != 0 && p.errno == 0 {
                p.errno = errno;
            }
            p.remaining -= 1;
            if p.remaining == 0 && p.fua && p.errno == 0 {
                // ssd mode: a FUA write's data is on the cache device;
                // it completes once a commit covers it.
                p.fua = false;
                p.remaining = 1;
                drop(v);
                inc(&self.stats().flushes, 1);
                let w = self.waiter_for(key);
                self.wc.request_commit(Some(w));
                return;
            }
            if p.remaining == 0 {
                v[key].take()
            } else {
                None
            }
        };
        if let Some(mut p) = done {
            self.free_parents.borrow_mut().push(key);
            let st = self.stats();
            st.inflight.store(
                st.inflight.load(Ordering::Relaxed).saturating_sub(1),
                Ordering::Relaxed,
            );
            if let Some(io) = p.io.take() {
                let status = if p.errno == 0 {
                    IoStatus::Success
                } else {
                    IoStatus::Failed(p.errno)
                };
                self.finish(io, status);
            }
        }
    }

    /// Completes parent `key` from a home message.
    fn parent_result(self: &Rc<Self>, key: usize, res: Result<(), i32>) {
        self.child_done(key, res.err().unwrap_or(0));
    }

    /// A waiter that completes parent `key` back on this core.
    fn waiter_for(self: &Rc<Self>, key: usize) -> crate::cache::Waiter {
        let me = wc_reactor::current().handle();
        let id = self.wc.id;
        Box::new(move |res| {
            me.send(move || {
                if let Some(l) = local_of(id) {
                    l.parent_result(key, res);
                }
            })
        })
    }

    // ------------------------------------------------------------------ read

    /// Accepts a read or a one-block write: starts fetching the index
    /// slot of its first block and leaves the rest to the poller, which
    /// runs in this reactor iteration (while they come one per iteration,
    /// it serves them at once). A read hit is an index probe (two dependent
    /// cache misses: the slot, then the block's state) and a copy out of
    /// the mapping (a TLB miss and the data); a write's index insert makes
    /// the same probe (the slot, then the state of the block it displaces,
    /// last touched when that block was written). Done one I/O at a time
    /// these wait for memory one after the other; done for the batch a
    /// reactor iteration brings they overlap.
    fn queue(self: &Rc<Self>, io: Io) {
        self.batch_seen.set(self.batch_seen.get() + 1);
        if !self.batching.get() && self.batch.borrow().is_empty() {
            // One per iteration: a batch would only add one.
            return self.serve(io);
        }
        self.wc.index.prefetch_slot(io.offset_blocks());
        inc(&self.stats().inflight, 1);
        self.batch.borrow_mut().push(io);
    }

    /// Serves a queued read or one-block write.
    fn serve(self: &Rc<Self>, io: Io) {
        if io.io_type() == IoType::Read {
            return self.read(io);
        }
        if self.wc.error() != 0 {
            return io.complete(IoStatus::Failed(libc::EIO));
        }
        if self.cache.is_some() {
            return self.ssd_write(io);
        }
        self.write(io)
    }

    /// Serves the queued reads and writes: first fetches every candidate
    /// block's state (and a read's data; their slots have arrived
    /// meanwhile), then serves each. True if there were any.
    pub(crate) fn run_batch(self: &Rc<Self>) -> bool {
        // An iteration that brought none leaves the mode as it was: a
        // submitter outside the reactor (fio's engine) submits between
        // polls, and its completions arrive one poll after the batch ran;
        // taking that empty poll for "one at a time" served every other
        // round unbatched.
        let seen = self.batch_seen.replace(0);
        if seen > 0 {
            self.batching.set(seen > 1);
        }
        if self.batch.borrow().is_empty() {
            return false;
        }
        let mut batch = std::mem::replace(
            &mut *self.batch.borrow_mut(),
            std::mem::take(&mut *self.batch_spare.borrow_mut()),
        );
        let wc = &self.wc;
        let bs = wc.block_size as usize;
        // One epoch pin for the batch: each I/O's own pin nests in it (a
        // counter, not a fenced store per I/O).
        let guard = crossbeam::epoch::pin();
        if batch.len() > 1 {
            for io in &batch {
                let lbas = io.offset_blocks()..io.offset_blocks() + io.num_blocks();
                if io.io_type() != IoType::Read {
                    // The displaced block's state, read by the insert.
                    for lba in lbas {
                        wc.index
                            .prefetch_candidates(lba, &guard, |b| wc.meta.prefetch_block(b));
                    }
                } else if io.num_blocks() <= PREFETCH_BLOCKS {
                    // Small reads only: a large one streams on its own.
                    for lba in lbas {
                        wc.index.prefetch_candidates(lba, &guard, |b| {
                            crate::meta::prefetch(wc.meta.get(b) as *const _ as *const u8);
                            prefetch_block(wc.media.data_ptr(b), bs);
                        });
                    }
                }
            }
        }
        let st = self.stats();
        st.inflight.store(
            st.inflight
                .load(Ordering::Relaxed)
                .saturating_sub(batch.len() as u64),
            Ordering::Relaxed,
        );
        if self.cache.is_none() && batch.len() > 1 {
            self.serve_pmem_batch(&mut batch);
        } else {
            for io in batch.drain(..) {
                self.serve(io);
            }
        }
        drop(guard);
        *self.batch_spare.borrow_mut() = batch;
        true
    }

    /// pmem mode: serves a batch's reads and its one-block writes' copies
    /// first, then publishes the writes, then serves the other writes. A
    /// write's data goes out with non-temporal stores, and the index
    /// insert that publishes it takes a lock — a locked instruction, which
    /// waits until those stores reach memory (a third of a random-write
    /// cell's time, one wait per write). Copied together the writes wait
    /// once, and the reads after them run while the stores drain.
    ///
    /// A commit's visit to this core (which drains its log) arrives as a
    /// message or from a poller, never inside this one, so every staged
    /// write is logged before a round can look for it, as a write served
    /// alone is. The other writes (a write that found no free block waits,
    /// and stops the staging) are served after the staged ones, in order.
    fn serve_pmem_batch(self: &Rc<Self>, batch: &mut Vec<Io>) {
        let wc = &self.wc;
        let mut staged = std::mem::take(&mut *self.staged.borrow_mut());
        let mut later = std::mem::take(&mut *self.unstaged.borrow_mut());
        let mut staging = wc.error() == 0 && !wc.tunables.cleaner.load(Ordering::Relaxed);
        for mut io in batch.drain(..) {
            if io.io_type() == IoType::Read {
                self.read(io);
                continue;
            }
            if !staging
                || io.io_type() != IoType::Write
                || io.num_blocks() != 1
                || io.driver_ctx()[PROGRESS] != 0
            {
                later.push(io);
                continue;
            }
            let Some(b) = self.alloc() else {
                staging = false;
                later.push(io);
                continue;
            };
            let log = self.write_block(&io, 0, b, false);
            let lba = io.offset_blocks();
            staged.push((io, lba, log));
        }
        // Publication, as `write`'s for one block: index, log, then the
        // displaced. The first insert waits for the copies to land.
        for &(_, lba, log) in staged.iter() {
            let old = wc.index.insert(&wc.meta, lba, log.block);
            self.write_log.borrow_mut().push(log);
            if let Some(old) = old {
                self.displace(old, log.seq);
            }
        }
        for (mut io, _, _) in staged.drain(..) {
            io.driver_ctx()[PROGRESS] = 1;
            self.written(io, 1);
        }
        for io in later.drain(..) {
            self.serve(io);
        }
        *self.staged.borrow_mut() = staged;
        *self.unstaged.borrow_mut() = later;
    }

    fn read(&self, io: Io) {
        let n = io.num_blocks();
        let first = io.offset_blocks();
        let bs = self.wc.block_size as usize;
        let mut misses: SmallVec<[(u64, u64); 4]> = SmallVec::new();
        let mut io = io;
        {
            // Blocks found in the index cannot be reused until we unpin.
            let guard = crossbeam::epoch::pin();
            let media = &self.wc.media;
            for i in 0..n {
                // The candidate's data is fetched while the index compares
                // its LBA: both wait for memory at once, not one by one.
                let prefetch = |b| prefetch_block(media.data_ptr(b), bs);
                match self
                    .wc
                    .index
                    .lookup(&self.wc.meta, first + i, &guard, prefetch)
                {
                    Some(b) => {
                        let src = self.wc.media.data_ptr(b);
                        // SAFETY: src points at one cache block (bs bytes)
                        // of the mapping; the pin keeps it from being reused.
                        let data = unsafe { std::slice::from_raw_parts(src, bs) };
                        copy_into_io(&mut io, i as usize * bs, data);
                    }
                    None => match misses.last_mut() {
                        Some((s, len)) if *s + *len == i => *len += 1,
                        _ => misses.push((i, 1)),
                    },
                }
            }
        }
        let st = self.stats();
        inc(&st.read_blocks, n);
        let missed: u64 = misses.iter().map(|m| m.1).sum();
        inc(&st.read_hits, n - missed);
        if misses.is_empty() {
            return self.finish(io, IoStatus::Success);
        }
        let ratio = self.wc.origin_ratio;
        let runs: SmallVec<[MissRun; 4]> = misses
            .iter()
            .map(|&(i, len)| {
                (
                    i,
                    len,
                    slice_iovs(io.iovs(), i as usize * bs, len as usize * bs),
                )
            })
            .collect();
        let key = self.new_parent(io, runs.len() as u32);
        for (i, len, iovs) in runs {
            // SAFETY: the segments are sub-ranges of the parent I/O's
            // buffers, which stay valid until the parent completes, and
            // that only happens after every child (this one too) is done.
            unsafe {
                self.origin.readv(
                    (first + i) * ratio,
                    len * ratio,
                    &iovs,
                    &self.child_cb,
                    key as u64,
                );
            }
        }
    }

    // ----------------------------------------------------------------- write

    fn write(self: &Rc<Self>, mut io: Io) {
        let wc = &self.wc;
        let n = io.num_blocks();
        let first = io.offset_blocks();
        let zeroes = io.io_type() == IoType::WriteZeroes;

        // Cleaner mode: new data goes around the cache, straight to the
        // origin (hits still go to the cache to keep versions ordered).
        if wc.tunables.cleaner.load(Ordering::Relaxed) && io.driver_ctx()[PROGRESS] == 0 {
            // Around only when no version of these LBAs is cached or still
            // on its way to the origin (which would land after ours).
            let cached = (0..n).any(|i| wc.index.get(&wc.meta, first + i).is_some())
                || wc.writeback_busy_on(first, n);
            if !cached {
                return self.write_around(io);
            }
        }

        let start = io.driver_ctx()[PROGRESS];
        if n == 1 && start == 0 {
            // The common 4 KiB write: no run to batch, one index insert.
            let Some(b) = self.alloc() else {
                return self.wait_for_blocks(io, 0);
            };
            // The insert's slot line arrives while the block is copied.
            wc.index.prefetch_slot(first);
            let log = self.write_block(&io, 0, b, zeroes);
            // As `publish`, for one block: index, log, then the displaced.
            let old = wc.index.insert(&wc.meta, first, b);
            self.write_log.borrow_mut().push(log);
            if let Some(old) = old {
                self.displace(old, log.seq);
            }
            io.driver_ctx()[PROGRESS] = 1;
            return self.written(io, 1);
        }
        self.prefetch_displaced(first + start, n - start);
        let mut i = start;
        // Blocks written and not yet in the index: published a run at a
        // time (one shard lock per group of neighbouring LBAs).
        let mut run: SmallVec<[(u64, u32); RUN_MAX]> = SmallVec::new();
        let mut logs: SmallVec<[LogEntry; RUN_MAX]> = SmallVec::new();
        while i < n {
            let Some(b) = self.alloc() else {
                // What is written so far is published and counted (the
                // resumed write counts from block `i` on): the write
                // resumes at block `i`.
                self.publish(&run, &logs);
                let st = self.stats();
                inc(&st.write_blocks, i - start);
                inc(&st.writes_allocate, i - start);
                return self.wait_for_blocks(io, i);
            };
            let log = self.write_block(&io, i, b, zeroes);
            run.push((first + i, b));
            logs.push(log);
            i += 1;
            if run.len() == RUN_MAX {
                self.publish(&run, &logs);
                run.clear();
                logs.clear();
            }
        }
        self.publish(&run, &logs);
        io.driver_ctx()[PROGRESS] = n;
        self.written(io, n - start)
    }

    /// Starts loading the state of each block the LBAs `first..first + n`
    /// map to now (at most [`PUBLISH_PREFETCH_BLOCKS`] of them): publishing
    /// compares each LBA with its slot's block, and in a cache written at
    /// random that block's line was last touched long ago — one miss per
    /// block, in a row, after the copies. Issued before the copies, the
    /// misses overlap them.
    fn prefetch_displaced(&self, first: u64, n: u64) {
        let wc = &self.wc;
        let guard = crossbeam::epoch::pin();
        for lba in first..first + n.min(PUBLISH_PREFETCH_BLOCKS) {
            wc.index
                .prefetch_candidates(lba, &guard, |b| wc.meta.prefetch_block(b));
        }
    }

    /// Parks a write that found no free block at its block `i` (the blocks
    /// before it are published); it resumes there once blocks come back.
    fn wait_for_blocks(&self, mut io: Io, i: u64) {
        io.driver_ctx()[PROGRESS] = i;
        if io.driver_ctx()[BLOCKED] == 0 {
            io.driver_ctx()[BLOCKED] = 1;
            inc(&self.stats().writes_blocked_on_freelist, 1);
        }
        self.add_waiting_blocks(io.num_blocks() - i, 0);
        self.waiting.borrow_mut().push_back(io);
        self.stats()
            .waiting
            .store(self.waiting.borrow().len() as u64, Ordering::Relaxed);
        self.make_room();
    }

    /// Adds `more` to, and takes `less` from, the blocks this core's
    /// waiting writes still need (the home's writeback reads the sum).
    fn add_waiting_blocks(&self, more: u64, less: u64) {
        let c = &self.stats().waiting_blocks;
        // This core is the only writer: a plain store, no locked add.
        c.store(
            (c.load(Ordering::Relaxed) + more).saturating_sub(less),
            Ordering::Relaxed,
        );
    }

    /// Writes block `i` of `io` (zeroes for a write-zeroes) into cache
    /// block `b`: data, entry stamp and in-memory state, ready to publish.
    #[inline]
    fn write_block(&self, io: &Io, i: u64, b: u32, zeroes: bool) -> LogEntry {
        let wc = &self.wc;
        let bs = wc.block_size as usize;
        let lba = io.offset_blocks() + i;
        let m = wc.meta.get(b);
        // A new allocation: bump the generation (state stays 0 until
        // the block is published).
        let gen = crate::meta::BlockMeta::next_gen(m.gen());
        m.set(gen, 0);
        // The stamp: a commit that bumps the sequence after this load
        // runs its fence on this core only after this write is done.
        let seq = wc.seq.load(Ordering::Acquire);
        let off = wc.media.data_offset(b);
        if zeroes {
            let mut done = 0;
            while done < bs {
                let len = (bs - done).min(ZEROES.len());
                wc.media.pmem.write_nt(off + done, &ZEROES[..len]);
                done += len;
            }
        } else {
            let start = i as usize * bs;
            let pmem = &wc.media.pmem;
            for_each_piece(io, start, bs, |at, piece| pmem.write_nt(off + at, piece));
        }
        wc.media.write_entry(b, wc.sector_of(lba), seq);

        m.lba.store(lba, Ordering::Relaxed);
        m.set_seq(seq);
        m.set(gen, VALID);
        LogEntry { block: b, gen, seq }
    }

    /// The end of a write whose `blocks` new blocks are all published:
    /// counters, deferred frees, autocommit, completion (a FUA write
    /// after a commit).
    fn written(self: &Rc<Self>, io: Io, blocks: u64) {
        let wc = &self.wc;
        let st = self.stats();
        st.uncommitted
            .store(self.write_log.borrow().len() as u64, Ordering::Release);
        inc(&st.write_blocks, blocks);
        inc(&st.writes_allocate, blocks);
        if self.to_free.borrow().len() >= FREE_BATCH {
            self.free_displaced();
        }
        self.maybe_autocommit();
        if io.fua() {
            inc(&self.stats().flushes, 1);
            let key = self.new_parent(io, 1);
            let w = self.waiter_for(key);
            wc.request_commit(Some(w));
        } else {
            self.finish(io, IoStatus::Success);
        }
    }

    /// Inserts written blocks (`run[k]` written as `logs[k]`) in the index,
    /// logs them for the next commit, and handles the blocks they displace.
    fn publish(&self, run: &[(u64, u32)], logs: &[LogEntry]) {
        if run.is_empty() {
            return;
        }
        let mut displaced: SmallVec<[(usize, u32); RUN_MAX]> = SmallVec::new();
        self.wc
            .index
            .insert_run(&self.wc.meta, run, |k, old| displaced.push((k, old)));
        self.write_log.borrow_mut().extend_from_slice(logs);
        for (k, old) in displaced {
            self.displace(old, logs[k].seq);
        }
    }

    /// A write waits for free blocks: other cores hand back their cached
    /// blocks, then a commit lets the writeback free what is written.
    pub(crate) fn make_room(&self) {
        let id = self.wc.id;
        for h in wc_reactor::current().siblings() {
            h.send(move || {
                if let Some(l) = local_of(id) {
                    l.return_cached_blocks();
                }
            });
        }
        self.wc.request_commit(None);
    }

    /// Frees the displaced uncommitted blocks collected so far: entries
    /// cleared, one fence, back to the pool after a grace period.
    pub(crate) fn free_displaced(&self) {
        // Looked at before taking: taking an empty list would drop its
        // allocation, and the next displaced block allocate a new one
        // (once per overwrite at queue depth 1).
        if self.to_free.borrow().is_empty() {
            return;
        }
        let blocks = std::mem::take(&mut *self.to_free.borrow_mut());
        self.wc.free_blocks(&blocks);
        let mut blocks = blocks;
        blocks.clear();
        let mut t = self.to_free.borrow_mut();
        if t.is_empty() {
            *t = blocks;
        }
    }

    /// Handles the older block `old` an index insert displaced.
    fn displace(&self, old: u32, my_seq: u64) {
        let wc = &self.wc;
        let m = wc.meta.get(old);
        let oseq = m.seq();
        let ogen = m.gen();
        let st = self.stats();
        if crate::meta::seq_at_or_after(oseq, crate::meta::seq32(my_seq)) {
            // Not committed, and will not be before our version is: drop
            // it now. (Its commit needs this core's fence, which cannot
            // happen while we run.)
            inc(&st.write_hits_uncommitted, 1);
            if wc.meta.begin_free(old, ogen) {
                // Cleared before this core acknowledges the next commit
                // (which would otherwise make two entries of one sector
                // with one sequence number durable).
                self.to_free.borrow_mut().push(old);
            }
        } else {
            // Committed (or being committed): keep it until ours is.
            inc(&st.write_hits_committed, 1);
            self.superseded.borrow_mut().push(LogEntry {
                block: old,
                gen: ogen,
                seq: my_seq,
            });
        }
    }

    fn alloc(&self) -> Option<u32> {
        let mut free = self.free.borrow_mut();
        if free.is_empty() {
            // Small caches must not end up parked in one core's batch.
            let cores = self.cores;
            let refill = (self.wc.media.geo.n_blocks() / (8 * cores)).clamp(1, REFILL_MAX as u64);
            self.wc.pool.pop_batch(refill as usize, &mut free);
        }
        let b = free.pop();
        if let Some(&next) = free.last() {
            // The next write takes `next`: start loading the state and
            // entry lines it writes now. They were last written where the
            // block was freed, often not here (home, or a retiring lane):
            // found by that write, they cost it a miss each. Asked for
            // owned: the write stores to both (A/B medians of 7 on the
            // Intel host against read prefetches: ssd mode +3 to +8%,
            // pmem mode 0.98-1.01).
            self.wc.meta.prefetch_block_for_write(next);
            self.wc.media.prefetch_entry_for_write(next);
        }
        self.stats()
            .free_cached
            .store(free.len() as u64, Ordering::Relaxed);
        b
    }

    fn maybe_autocommit(&self) {
        let wc = &self.wc;
        // Split among the cores that write, so the whole instance commits
        // every `autocommit_blocks` however many reactors the runtime has.
        let cores = wc.channel_cores.load(Ordering::Relaxed).max(1);
        let blocks = wc.tunables.autocommit_blocks.load(Ordering::Relaxed);
        let logged = self.write_log.borrow().len() as u64;
        // A plain load first: while a commit is pending every write gets
        // here, and a swap on each would bounce the line between cores.
        if autocommit_due(logged, blocks, cores)
            && !wc.commit_requested.load(Ordering::Relaxed)
            && !wc.commit_requested.swap(true, Ordering::AcqRel)
        {
            wc.request_autocommit();
        }
    }

    fn write_around(self: &Rc<Self>, io: Io) {
        let wc = &self.wc;
        inc(&self.stats().writes_around, io.num_blocks());
        inc(&self.stats().write_blocks, io.num_blocks());
        // A store only when the stamp has aged: every core writing the
        // shared line on every write around would bounce it between them.
        let now = wc_reactor::tick::ticks().max(1);
        if now.wrapping_sub(wc.last_write_around.load(Ordering::Relaxed)) >= *AROUND_STAMP_TICKS {
            wc.last_write_around.store(now, Ordering::Relaxed);
        }
        let ratio = wc.origin_ratio;
        let (lba, n) = (io.offset_blocks(), io.num_blocks());
        let zeroes = io.io_type() == IoType::WriteZeroes;
        let iovs: SmallVec<[IoVec; 4]> = io.iovs().iter().copied().collect();
        let key = self.new_parent(io, 1);
        if zeroes {
            self.origin
                .write_zeroes(lba * ratio, n * ratio, &self.child_cb, key as u64);
        } else {
            // SAFETY: the parent's buffers stay valid until it completes,
            // which waits for this child.
            unsafe {
                self.origin.writev(
                    lba * ratio,
                    n * ratio,
                    &iovs,
                    true,
                    &self.child_cb,
                    key as u64,
                )
            };
        }
    }

    /// Gives this core's cached free blocks back to the pool (another core
    /// is starving) — unless this core has writers waiting itself.
    fn return_cached_blocks(&self) {
        if !self.waiting.borrow().is_empty() || !self.ssd_waiting.borrow().is_empty() {
            return;
        }
        let mut free = self.free.borrow_mut();
        self.wc.pool.push_all(&free);
        free.clear();
        drop(free);
        self.stats().free_cached.store(0, Ordering::Relaxed);
    }

    /// Resubmits I/O held while the instance was suspended.
    fn release_held(self: &Rc<Self>) -> PollStatus {
        if self.held.borrow().is_empty() {
            return PollStatus::Idle;
        }
        // Deleted while suspended: held I/O fails (it must still complete).
        if self.wc.closing.load(Ordering::Acquire) {
            let held: Vec<Io> = self.held.borrow_mut().drain(..).collect();
            for io in held {
                io.complete(IoStatus::Failed(libc::ENODEV));
            }
            return PollStatus::Busy;
        }
        if self.wc.suspended.load(Ordering::Acquire) {
            return PollStatus::Idle;
        }
        let held: Vec<Io> = self.held.borrow_mut().drain(..).collect();
        for io in held {
            self.dispatch(io);
        }
        PollStatus::Busy
    }

    /// Why writes waiting for free blocks must fail now, if they must: in
    /// the error state writeback has stopped, so no block will come back
    /// (nothing cached is dropped); a deleted instance takes no I/O.
    pub(super) fn waiting_fails_with(&self) -> Option<i32> {
        if self.wc.error() != 0 {
            Some(libc::EIO)
        } else if self.wc.closing.load(Ordering::Acquire) {
            Some(libc::ENODEV)
        } else {
            None
        }
    }

    /// Lets deferred frees run so blocks come back to the pool — every few
    /// microseconds, not every iteration: a flush moves this thread's bag
    /// of deferred frees (2 KiB) to the global queue and tries to advance
    /// the epoch, which cost a reactor spinning on waiting writes a sixth
    /// of its time in the steady state (pmem mode), a tenth (ssd mode).
    fn flush_deferred_frees(&self) {
        let now = wc_reactor::tick::ticks();
        if now.wrapping_sub(self.last_flush.get()) >= *FLUSH_PERIOD_TICKS {
            self.last_flush.set(now);
            crossbeam::epoch::pin().flush();
        }
    }

    fn retry_waiting(self: &Rc<Self>) -> PollStatus {
        if self.cache.is_some() {
            return self.ssd_retry_waiting();
        }
        if self.waiting.borrow().is_empty() {
            return PollStatus::Idle;
        }
        if let Some(errno) = self.waiting_fails_with() {
            let waiting: Vec<Io> = self.waiting.borrow_mut().drain(..).collect();
            self.stats().waiting.store(0, Ordering::Relaxed);
            self.stats().waiting_blocks.store(0, Ordering::Relaxed);
            for io in waiting {
                io.complete(IoStatus::Failed(errno));
            }
            return PollStatus::Busy;
        }
        self.flush_deferred_frees();
        if self.free.borrow().is_empty() && self.wc.pool.len() == 0 {
            // Still starved: blocks written meanwhile must be committed
            // before writeback can free them (one request at a time).
            let wc = &self.wc;
            let dirty: u64 = wc
                .stats
                .iter()
                .map(|c| c.uncommitted.load(Ordering::Relaxed))
                .sum();
            if dirty > 0 && !wc.commit_requested.swap(true, Ordering::AcqRel) {
                wc.request_commit(None);
            }
            return PollStatus::Idle;
        }
        let mut progressed = false;
        while let Some(io) = {
            let ready = !self.free.borrow().is_empty() || self.wc.pool.len() > 0;
            if ready {
                self.waiting.borrow_mut().pop_front()
            } else {
                None
            }
        } {
            progressed = true;
            self.stats()
                .waiting
                .store(self.waiting.borrow().len() as u64, Ordering::Relaxed);
            let mut io = io;
            let done = io.driver_ctx()[PROGRESS];
            self.add_waiting_blocks(0, io.num_blocks().saturating_sub(done));
            self.write(io);
            if !self.waiting.borrow().is_empty()
                && self.free.borrow().is_empty()
                && self.wc.pool.len() == 0
            {
                break;
            }
        }
        PollStatus::from(progressed)
    }

    // ----------------------------------------------------------------- flush

    fn flush(self: &Rc<Self>, io: Io) {
        inc(&self.stats().flushes, 1);
        if self.wc.error() != 0 {
            return io.complete(IoStatus::Failed(libc::EIO));
        }
        let key = self.new_parent(io, 1);
        let w = self.waiter_for(key);
        self.wc.request_commit(Some(w));
    }

    // ----------------------------------------------------------------- unmap

    fn unmap(self: &Rc<Self>, io: Io) {
        inc(&self.stats().discards, 1);
        let (lba, n) = (io.offset_blocks(), io.num_blocks());
        let key = self.new_parent(io, 1);
        let me = wc_reactor::current().handle();
        let wc = self.wc.clone();
        let id = wc.id;
        // Invalidation runs on home, where every other free decision is
        // made; the origin unmap then goes out from this core.
        wc.home.clone().send(move || {
            wc.invalidate_range(lba, n);
            me.send(move || {
                if let Some(l) = local_of(id) {
                    if l.origin.bdev().io_type_supported(IoType::Unmap) {
                        let r = l.wc.origin_ratio;
                        l.origin.unmap(lba * r, n * r, &l.child_cb, key as u64);
                    } else {
                        l.child_done(key, 0);
                    }
                }
            });
        });
    }

    /// Hands over (and forgets) log entries stamped below `limit` (the
    /// superblock sequence the running commit establishes), appending
    /// them to `written` and `superseded` (the round's, reused round after
    /// round: no allocation here that another core would free).
    pub(crate) fn drain_logs_into(
        &self,
        limit: u64,
        written: &mut Vec<LogEntry>,
        superseded: &mut Vec<LogEntry>,
    ) {
        let mut w = self.write_log.borrow_mut();
        move_below(&mut w, limit, written);
        self.stats()
            .uncommitted
            .store(w.len() as u64, Ordering::Release);
        move_below(&mut self.superseded.borrow_mut(), limit, superseded);
    }
}

impl Writecache {
    /// Drops cached blocks of `[lba, lba+n)` (on home). Blocks under
    /// writeback are left to the writeback, which frees them when done.
    pub(crate) fn invalidate_range(&self, lba: u64, n: u64) {
        let mut to_free = Vec::new();
        let mut consider = |l: u64, b: u32| {
            if self.index.remove_if(&self.meta, l, b) {
                let gen = self.meta.get(b).gen();
                if self.meta.begin_free(b, gen) {
                    to_free.push(b);
                } else {
                    self.forget_held_entry(b, gen);
                }
            }
        };
        if n <= self.media.geo.n_blocks() {
            for l in lba..lba.saturating_add(n) {
                if let Some(b) = self.index.get(&self.meta, l) {
                    consider(l, b);
                }
            }
        } else {
            // A range larger than the cache: scan the blocks instead.
            for b in 0..self.media.geo.n_blocks() as u32 {
                let m = self.meta.get(b);
                if m.state() & VALID != 0 {
                    let l = m.lba.load(Ordering::Acquire);
                    if l >= lba && l - lba < n {
                        consider(l, b);
                    }
                }
            }
        }
        self.free_blocks(&to_free);
    }
}

/// Moves the entries stamped below `limit` out of `log` (order kept) to
/// the end of `out`. `log` keeps its capacity: the writes after a commit
/// do not grow it again from nothing (each growth copies the whole log
/// inside some write, a latency spike).
fn move_below(log: &mut Vec<LogEntry>, limit: u64, out: &mut Vec<LogEntry>) {
    log.retain(|e| {
        if e.seq < limit {
            out.push(*e);
            false
        } else {
            true
        }
    });
}

/// Calls `f(offset_in_block, piece)` for the parts of the I/O's segments
/// that cover bytes `[start, start+len)` of the I/O.
fn for_each_piece(io: &Io, start: usize, len: usize, mut f: impl FnMut(usize, &[u8])) {
    let end = start + len;
    io.for_each_segment(|seg_off, seg| {
        let seg_off = seg_off as usize;
        let seg_end = seg_off + seg.len();
        if seg_end <= start || seg_off >= end {
            return;
        }
        let a = start.max(seg_off);
        let b = end.min(seg_end);
        f(a - start, &seg[a - seg_off..b - seg_off]);
    });
}

/// Lines of a block prefetched ahead of its copy: enough to cover the
/// copy's start until the hardware prefetcher follows the stream, few
/// enough not to queue behind the line fill buffers.
const PREFETCH_LINES: usize = 8;

/// Largest part of a write (in blocks) whose displaced blocks' states are
/// prefetched before its copies (a 256 KiB write of 4 KiB blocks).
const PUBLISH_PREFETCH_BLOCKS: u64 = 64;

/// Largest read (in blocks) whose blocks the batch prefetches.
const PREFETCH_BLOCKS: u64 = 8;

/// Starts loading the first lines of the `len`-byte block at `p` into the
/// cache (a hint: no fault, no effect on results).
#[inline]
fn prefetch_block(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for k in 0..PREFETCH_LINES.min(len / 64) {
        // SAFETY: prefetch never faults and reads nothing observable; the
        // address is inside the block (k * 64 < len).
        unsafe {
            std::arch::x86_64::_mm_prefetch(
                p.add(k * 64) as *const i8,
                std::arch::x86_64::_MM_HINT_T0,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Copies `data` into the I/O's segments at byte offset `at`.
fn copy_into_io(io: &mut Io, at: usize, data: &[u8]) {
    let end = at + data.len();
    io.for_each_segment_mut(|seg_off, seg| {
        let seg_off = seg_off as usize;
        let seg_end = seg_off + seg.len();
        if seg_end <= at || seg_off >= end {
            return;
        }
        let a = at.max(seg_off);
        let b = end.min(seg_end);
        seg[a - seg_off..b - seg_off].copy_from_slice(&data[a - at..b - at]);
    });
}

/// The segments covering bytes `[start, start+len)` of `iovs`.
/// Whether a core that logged `logged` blocks since the last commit asks
/// for one: at `max(blocks / cores, 1)`, its share of `autocommit_blocks`
/// (computed without a division: this runs on every write).
fn autocommit_due(logged: u64, blocks: u64, cores: u64) -> bool {
    logged >= 1 && (blocks as u128) < (logged as u128 + 1) * cores as u128
}

fn slice_iovs(iovs: &[IoVec], start: usize, len: usize) -> SmallVec<[IoVec; 4]> {
    let end = start + len;
    let mut out = SmallVec::new();
    let mut off = 0usize;
    for v in iovs {
        let (s, e) = (off, off + v.len);
        off = e;
        if e <= start || s >= end {
            continue;
        }
        let a = start.max(s);
        let b = end.min(e);
        // SAFETY: a - s < v.len, so the pointer stays inside the segment.
        let base = unsafe { v.base.add(a - s) };
        out.push(IoVec { base, len: b - a });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autocommit_due_matches_the_per_core_share() {
        for cores in 1..=9u64 {
            for blocks in 1..=70u64 {
                for logged in 0..=80u64 {
                    assert_eq!(
                        autocommit_due(logged, blocks, cores),
                        logged >= (blocks / cores).max(1),
                        "logged {logged} blocks {blocks} cores {cores}"
                    );
                }
            }
        }
        assert!(autocommit_due(1, u64::MAX, u64::MAX), "no overflow");
        assert!(!autocommit_due(0, 1, 1));
    }

    #[test]
    fn move_below_keeps_order_and_capacity() {
        let e = |seq| LogEntry {
            block: seq as u32,
            gen: 0,
            seq,
        };
        let mut log: Vec<LogEntry> = [5, 1, 7, 2, 9, 3].into_iter().map(e).collect();
        log.reserve(100);
        let cap = log.capacity();
        let mut done = vec![e(0)];
        move_below(&mut log, 5, &mut done);
        let seqs = |v: &[LogEntry]| v.iter().map(|x| x.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&done), vec![0, 1, 2, 3]);
        assert_eq!(seqs(&log), vec![5, 7, 9]);
        assert_eq!(log.capacity(), cap);
        move_below(&mut log, 0, &mut done);
        assert_eq!(done.len(), 4);
        assert_eq!(log.len(), 3);
    }

    #[test]
    fn slicing_segments() {
        let mut buf = vec![0u8; 100];
        let base = buf.as_mut_ptr();
        // SAFETY: offsets inside `buf`.
        let iovs = unsafe {
            [
                IoVec { base, len: 30 },
                IoVec {
                    base: base.add(30),
                    len: 70,
                },
            ]
        };
        let s = slice_iovs(&iovs, 20, 40);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].len, s[1].len), (10, 30));
        assert_eq!(s[0].base as usize - base as usize, 20);
        assert_eq!(s[1].base as usize - base as usize, 30);
        assert!(slice_iovs(&iovs, 100, 0).is_empty());
    }
}
