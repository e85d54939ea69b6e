//! The shared part of a writecache instance: media, block state, index,
//! free pool, sequence numbers, the commit coordinator and the writeback.
//!
//! The coordinator and the writeback run on the instance's *home* reactor
//! (where it was created); writers and readers run on any reactor and talk
//! to home by messages. (One exception: the only core with a channel runs
//! its own autocommit rounds, see `Writecache::request_autocommit`.)
//! Everything home-only sits behind mutexes that home takes; other
//! reactors take the writeback's only to finish a writeback run they
//! issued (pmem mode: home picks the blocks and each reactor with a
//! channel writes a share of them from its own origin channel).

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam::utils::CachePadded;
use wc_bdev::{BdevChannel, Desc, Io, IoCompletion, IoVec};
use wc_reactor::tick::{duration_to_ticks, ticks};
use wc_reactor::ReactorHandle;

use crate::fifo::WbQueue;
use crate::free_drip::FreeDrip;
use crate::media::Media;
use crate::meta::{seq32, seq_at_or_after, FreePool, Index, Meta, SEQ_REBASE_PERIOD, VALID};
use crate::options::{Mode, Tunables, UNLIMITED};
use crate::stats::{CoreStats, Stats};

/// Maximum reactors an instance tracks per-core state for.
pub(crate) const MAX_CORES: usize = 256;

/// A block remembered by a log: which block, which allocation, which seq.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogEntry {
    pub(crate) block: u32,
    pub(crate) gen: u32,
    pub(crate) seq: u64,
}

/// Somebody waiting for a commit or a drain (runs on home; usually sends a
/// message back to the waiter's reactor).
pub(crate) type Waiter = Box<dyn FnOnce(Result<(), i32>) + Send>;

pub(crate) struct Coordinator {
    in_progress: bool,
    /// A commit was requested (without a waiter) while one was running.
    again: bool,
    /// Waiters for the next commit.
    next: Vec<Waiter>,
    /// Committed blocks, oldest first: the writeback order.
    pub(crate) fifo: WbQueue,
    /// Superseded blocks waiting for their successor's commit.
    superseded: Vec<LogEntry>,
    /// Logs of channels that closed before a commit covered them (their
    /// entries already durable): committed by the next round.
    orphans: (Vec<LogEntry>, Vec<LogEntry>),
    pub(crate) commits: u64,
}

impl Coordinator {
    pub(crate) fn new(blocks: usize) -> Coordinator {
        Coordinator {
            in_progress: false,
            again: false,
            next: Vec::new(),
            fifo: WbQueue::new(blocks),
            superseded: Vec::new(),
            orphans: Default::default(),
            commits: 0,
        }
    }
}

#[derive(Default)]
pub(crate) struct Writeback {
    /// LBAs with an origin write in flight (never two for one LBA).
    lbas: HashSet<u64>,
    /// Blocks in flight.
    pub(crate) in_flight: u64,
    /// Writeback everything (flush RPC, flush-on-suspend, cleaner).
    drain_waiters: Vec<Waiter>,
    /// Writeback started by the high watermark (runs down to the low one).
    wm_active: bool,
    pub(crate) ios: u64,
    pub(crate) bytes: u64,
    pub(crate) blocks: u64,
    pub(crate) retries: u64,
    /// Origin channel of the home reactor.
    origin: Option<Rc<BdevChannel>>,
    /// Blocks written back and dropped from the index, freed together at
    /// the end of the reactor iteration (one fence and one grace period
    /// for every run that completed in it).
    retired: Vec<u32>,
    /// Runs completed since the retire poller last sent a new batch.
    completed: bool,
    /// Reactors with a channel of this instance (pmem mode: each writes a
    /// share of every writeback batch from its own origin channel).
    lanes: Vec<ReactorHandle>,
    /// The lane the next batch's first share goes to (so batches of one
    /// run take turns).
    next_lane: usize,
    /// A run completed on another reactor sent home a kick that has not
    /// run yet (one message however many complete meanwhile).
    kick_pending: bool,
}

// SAFETY: `origin` is an Rc created and used only on the home reactor; the
// Mutex around Writeback is only ever locked on home (see module docs).
unsafe impl Send for Writeback {}

/// A writecache instance.
pub struct Writecache {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) mode: Mode,
    pub(crate) media: Media,
    pub(crate) block_size: u32,
    /// vbdev blocks (= origin size / block size).
    pub(crate) num_blocks: u64,
    /// Origin blocks per cache block.
    pub(crate) origin_ratio: u64,
    pub(crate) meta: Meta,
    pub(crate) index: Index,
    pub(crate) pool: Arc<FreePool>,
    /// Sequence number new writes are stamped with. Every write reads it,
    /// every commit writes it: on a line of its own, so a commit costs
    /// the other cores one miss on it, not on the read-only fields every
    /// I/O looks at (flags, tunables, the media and index handles).
    pub(crate) seq: CachePadded<AtomicU64>,
    /// The superblock's sequence count (entries below it are committed);
    /// written per commit, so apart from the read-mostly fields too.
    pub(crate) sb_seq: CachePadded<AtomicU64>,
    pub(crate) stats: Box<[CachePadded<CoreStats>]>,
    pub(crate) tunables: Tunables,
    pub(crate) error: AtomicI32,
    pub(crate) home: ReactorHandle,
    /// Home locks these every reactor iteration (the retire poller): on
    /// lines of their own, so the other cores' reads of the fields every
    /// I/O looks at (sequence, flags, tunables) do not miss each time.
    pub(crate) coord: CachePadded<Mutex<Coordinator>>,
    pub(crate) wb: CachePadded<Mutex<Writeback>>,
    /// pmem mode: superseded blocks a commit freed, their entries cleared
    /// a share per home iteration (see [`crate::free_drip`]).
    pub(crate) drip: Arc<CachePadded<FreeDrip>>,
    /// Set (after the lock is released) when a writeback run left work for
    /// the retire poller (`Writeback::retired`, `completed`): the poller
    /// runs every home iteration and takes the lock only when it is set.
    /// Shared with that poller, which checks it without upgrading its
    /// reference to the instance.
    pub(crate) retire_pending: Arc<CachePadded<AtomicBool>>,
    /// The log entries the running commit round collects from the cores
    /// (written, superseded). One round runs at a time; its end gives the
    /// vectors back emptied, so rounds reuse them: a core's visit
    /// allocates nothing that the core ending the round would free (a
    /// cross-thread free per round, and the allocator's fresh pages).
    pub(crate) round_logs: CachePadded<Mutex<(Vec<LogEntry>, Vec<LogEntry>)>>,
    /// Set by the core that asks for a commit, cleared by home when it
    /// starts one (per commit): on a line of its own, as `seq`.
    pub(crate) commit_requested: CachePadded<AtomicBool>,
    /// An autocommit for home to run, asked without a message (see
    /// [`Self::request_autocommit`]): home's retire poller claims it. Its
    /// own line; shared with that poller, which looks at it every
    /// iteration without a reference to the instance.
    pub(crate) home_asked: Arc<CachePadded<AtomicBool>>,
    /// Reactors with a channel of this instance (`lanes.len()`, readable
    /// without the lock): autocommit splits its block count among them,
    /// not among every reactor of the runtime (fio's control reactor, or
    /// a target's idle cores, never write).
    pub(crate) channel_cores: AtomicU64,
    /// When a write last went around the cache (ticks; cleaner mode):
    /// written by every core, at most every [`AROUND_STAMP_TICKS`], on a
    /// line of its own.
    pub(crate) last_write_around: CachePadded<AtomicU64>,
    pub(crate) flush_on_suspend: AtomicBool,
    /// Set by delete: new I/O fails with ENODEV.
    pub(crate) closing: AtomicBool,
    /// Set by suspend: new I/O is held (queued per core), not failed.
    pub(crate) suspended: AtomicBool,
    /// Tick count when the instance started.
    pub(crate) started_ticks: u64,
    /// True when create formatted the cache (false: recovered).
    pub(crate) formatted: bool,
    pub(crate) origin_desc: Desc,
    pub(crate) cache_desc: Desc,
    /// ssd mode: the cache bdev's I/O and the metadata writer (None in
    /// pmem mode).
    pub(crate) ssd: Option<Arc<crate::ssd::Ssd>>,
}

/// True when logs of closed channels wait for the next round.
fn has_orphans(c: &Coordinator) -> bool {
    !c.orphans.0.is_empty() || !c.orphans.1.is_empty()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Writecache {
    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// 512-byte sector of a vbdev LBA.
    #[inline]
    pub(crate) fn sector_of(&self, lba: u64) -> u64 {
        lba * (self.block_size as u64 / 512)
    }

    /// Milliseconds since the instance started (wraps after 49 days; ages
    /// compare within that).
    pub(crate) fn now_ms(&self) -> u32 {
        (crate::ticks_to_ms(ticks().saturating_sub(self.started_ticks))) as u32
    }

    /// Cache blocks in use (allocated or waiting for a grace period).
    pub(crate) fn used_blocks(&self) -> u64 {
        let n = self.media.geo.n_blocks();
        let cached: u64 = self
            .stats
            .iter()
            .map(|c| c.free_cached.load(Ordering::Relaxed))
            .sum();
        n.saturating_sub(self.pool.len() + cached)
    }

    /// The error state (0 = fine).
    pub fn error(&self) -> i32 {
        self.error.load(Ordering::Acquire)
    }

    pub(crate) fn set_error(&self, errno: i32) {
        if self
            .error
            .compare_exchange(0, errno, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::error!("writecache {}: entering error state ({errno})", self.name);
        }
    }

    pub(crate) fn core_stats(&self, core: usize) -> &CoreStats {
        &self.stats[core % self.stats.len()]
    }

    /// Frees blocks whose entries this core has just cleared: one fence for
    /// all, then back to the pool after a grace period.
    pub(crate) fn free_blocks(&self, blocks: &[u32]) {
        if blocks.is_empty() {
            return;
        }
        if self.ssd.is_none() {
            // Older versions of these blocks' sectors may still await their
            // clear: durably first, or a crash once these entries are gone
            // (written back, unmapped) would bring the older ones back.
            self.drip.finish(&self.media, &self.pool);
        }
        for &b in blocks {
            self.media.clear_entry(b);
        }
        // The clear must be durable before the block can carry other data,
        // or a crash could pair the old entry with new contents.
        if let Some(ssd) = &self.ssd {
            // ssd mode: durable once a metadata sync wrote it (on home).
            let n = blocks.len() as u64;
            self.pool.reserve_grace(n);
            let blocks = blocks.to_vec();
            let pool = self.pool.clone();
            let ssd = ssd.clone();
            self.home.send(move || {
                ssd.clone().sync(
                    None,
                    Box::new(move |res| match res {
                        Ok(()) => pool.reserved_free_after_grace(blocks),
                        // The error state: nothing is reused any more.
                        Err(_) => pool.unreserve_grace(n),
                    }),
                )
            });
            return;
        }
        self.media.pmem.fence();
        self.pool.free_after_grace(blocks.to_vec());
    }

    /// ssd mode: block `b` (allocation `gen`) left the index while an
    /// in-place overwrite held it (so it could not be freed; the writer
    /// frees it when done, after a commit). An uncommitted entry of it —
    /// same sector, maybe the same sequence as the next version's — must
    /// not be committed alongside that: clear it now. (Called before the
    /// caller's core acknowledges a commit, or on home, before the next.)
    pub(crate) fn forget_held_entry(&self, b: u32, gen: u32) {
        let m = self.meta.get(b);
        if self.ssd.is_some()
            && m.gen_state() == (gen, VALID | crate::meta::WB)
            && seq_at_or_after(m.seq(), seq32(self.sb_seq.load(Ordering::Acquire)))
        {
            self.media.clear_entry(b);
        }
    }

    /// A block taken out of the index while an in-place overwrite held it
    /// (ssd mode): it is freed after the next commit, which covers its
    /// successor if it has one.
    pub(crate) fn free_after_next_commit(self: &Arc<Self>, block: u32, gen: u32) {
        let me = self.clone();
        self.home.send(move || {
            let seq = me.seq.load(Ordering::Acquire);
            lock(&me.coord)
                .superseded
                .push(LogEntry { block, gen, seq });
        });
    }

    /// Sums the statistics.
    pub fn stats(&self) -> Stats {
        // Written back and about to be freed: as good as in grace.
        let retired = lock(&self.wb).retired.len() as u64;
        let mut s = Stats {
            error: self.error(),
            blocks: self.media.geo.n_blocks(),
            // Blocks in their grace period are free for every purpose but
            // allocation in the next microseconds; count them as free.
            free_blocks: self.pool.len() + self.pool.in_grace() + retired,
            free_blocks_in_grace: self.pool.in_grace() + retired,
            seq_count: self.sb_seq.load(Ordering::Acquire),
            ..Stats::default()
        };
        for c in self.stats.iter() {
            s.add_core(c);
        }
        s.add_latencies(self.stats.iter().map(|c| &**c));
        {
            let wb = lock(&self.wb);
            s.writeback_blocks = wb.in_flight;
            s.writeback_ios = wb.ios;
            s.writeback_bytes = wb.bytes;
            s.writeback_completed_blocks = wb.blocks;
            s.writeback_retries = wb.retries;
        }
        {
            let c = lock(&self.coord);
            s.commits = c.commits;
            s.metadata_ram_bytes = (self.meta.ram_bytes()
                + self.index.ram_bytes()
                + self.pool.ram_bytes()
                + c.fifo.ram_bytes()
                + self.ssd.as_ref().map_or(0, |x| x.meta.ram_bytes()))
                as u64;
        }
        s.dirty = self.index.len() as u64;
        s
    }

    // ------------------------------------------------------------------
    // Commit

    /// Takes over the logs of a channel that is going away (its entries
    /// and data are durable already) and commits them.
    pub(crate) fn adopt_logs(self: &Arc<Self>, written: Vec<LogEntry>, superseded: Vec<LogEntry>) {
        if written.is_empty() && superseded.is_empty() {
            return;
        }
        let me = self.clone();
        self.home.send(move || {
            // After delete let go of the devices nothing may touch them
            // (a new instance may own the cache); delete's own commit ran
            // after new I/O was refused, so there is nothing left to cover.
            if me.closing.load(Ordering::Acquire) && lock(&me.wb).origin.is_none() {
                tracing::warn!(
                    "writecache {}: {} blocks written after the final commit are not committed",
                    me.name,
                    written.len()
                );
                return;
            }
            {
                let mut c = lock(&me.coord);
                c.orphans.0.extend(written);
                c.orphans.1.extend(superseded);
            }
            me.request_commit(None);
        });
    }

    /// Asks home for a commit; `waiter` runs (on home) once every write
    /// completed before this call is durable.
    pub(crate) fn request_commit(self: &Arc<Self>, waiter: Option<Waiter>) {
        let me = self.clone();
        self.home.send(move || me.commit_asked(waiter));
    }

    /// On home: starts a round for what asked, or has the running one
    /// followed by another.
    fn commit_asked(self: &Arc<Self>, waiter: Option<Waiter>) {
        let mut c = lock(&self.coord);
        if let Some(w) = waiter {
            c.next.push(w);
        }
        if c.in_progress {
            // Remember it: the running round may not cover writes that
            // asked for this one.
            c.again = true;
            return;
        }
        c.in_progress = true;
        let waiters = std::mem::take(&mut c.next);
        drop(c);
        self.start_commit(waiters);
    }

    /// Asks for a commit from a writing core (autocommit by count). In
    /// pmem mode, when this core is the only one with a channel of the
    /// instance, the whole round runs here (see [`Self::commit_here`]):
    /// under fio the only writer is a hosted reactor while home sleeps on
    /// another thread, and a round on home cost a wake-up, two messages
    /// and the commit state's lines crossing cores every 64 writes.
    /// Otherwise (several writers, ssd mode, a round running) home runs it.
    ///
    /// A home that polls without sleeping sees `home_asked` in its next
    /// iteration (the retire poller claims it and runs
    /// [`Self::commit_asked`]): no message crosses cores. A home that may
    /// sleep gets a message, which wakes it.
    pub(crate) fn request_autocommit(self: &Arc<Self>) {
        let Some(here) = wc_reactor::try_current() else {
            return self.request_commit(None);
        };
        // Several writing cores: `commit_here` would refuse (a stale count
        // only costs a home round, always correct). ssd mode: home's.
        if self.ssd.is_some() || self.channel_cores.load(Ordering::Relaxed) > 1 {
            if self.home.in_interrupt() {
                self.request_commit(None);
            } else {
                self.home_asked.store(true, Ordering::Release);
            }
            return;
        }
        // Not in the middle of the write that asked: its borrows of the
        // core's logs are live there.
        let me = self.clone();
        here.handle().send(move || {
            if !me.commit_here() {
                me.request_commit(None);
            }
        });
    }

    /// One commit round, run entirely on the calling core, if it may: pmem
    /// mode, no round running or asked for with a waiter (waiters run on
    /// home), no adopted logs, and this core the only one with a channel
    /// (so the only one whose stores and logs a round must collect).
    /// Returns false, having done nothing, when it may not.
    fn commit_here(self: &Arc<Self>) -> bool {
        if self.ssd.is_some() || self.closing.load(Ordering::Acquire) {
            return false;
        }
        let Some(here) = wc_reactor::try_current().map(|r| r.index()) else {
            return false;
        };
        let (s, bump) = {
            let mut c = lock(&self.coord);
            if c.in_progress || !c.next.is_empty() || has_orphans(&c) {
                return false;
            }
            // Same lock order as `kick_writeback` (coord, then wb). The
            // bump happens under the lock `add_lane` takes, so a channel
            // that opens on another core afterwards stamps `s + 1` or
            // above: nothing of it is due in this round.
            let wb = lock(&self.wb);
            if !matches!(wb.lanes.as_slice(), [only] if only.index() == here) {
                return false;
            }
            c.in_progress = true;
            self.bump_seq(false)
        };
        let limit = self.round_limit(s, bump);
        self.fence_core(limit);
        let (written, superseded) = std::mem::take(&mut *lock(&self.round_logs));
        self.finish_commit(s, bump, written, superseded, Vec::new());
        true
    }

    /// Starts a round: clears the request flag and advances the stamp
    /// sequence when there is something to commit (so empty commits leave
    /// the superblock alone, as dm-writecache). Returns (the sequence
    /// before, whether it advanced).
    fn bump_seq(&self, orphans: bool) -> (u64, bool) {
        self.commit_requested.store(false, Ordering::Release);
        let dirty: u64 = self
            .stats
            .iter()
            .map(|c| c.uncommitted.load(Ordering::Acquire))
            .sum();
        let s = self.seq.load(Ordering::Acquire);
        let bump = dirty > 0 || orphans;
        if bump {
            self.seq.store(s + 1, Ordering::Release);
        }
        (s, bump)
    }

    /// Entries below this are committed once the round that started at
    /// sequence `s` ends.
    fn round_limit(&self, s: u64, bump: bool) -> u64 {
        if bump {
            s + 1
        } else {
            self.sb_seq.load(Ordering::Acquire)
        }
    }

    /// A round's visit to one core: write back the entries it stamped
    /// (cached stores), fence so they and its data are durable, then hand
    /// over the logs of everything below `limit` to the round's
    /// (`round_logs`).
    fn fence_core(&self, limit: u64) {
        if let Some(local) = crate::channel::local_of(self.id) {
            local.free_displaced();
            let mut logs = lock(&self.round_logs);
            let (written, superseded) = &mut *logs;
            let from = written.len();
            local.drain_logs_into(limit, written, superseded);
            self.media.flush_entries(&written[from..]);
        }
        self.media.pmem.fence();
    }

    /// Gives a round's log vectors back, emptied, for the next round.
    fn recycle_round_logs(&self, mut written: Vec<LogEntry>, mut superseded: Vec<LogEntry>) {
        written.clear();
        superseded.clear();
        let mut logs = lock(&self.round_logs);
        // A round that started meanwhile (asked for during this one) may
        // have filled them already: then these are simply dropped.
        if logs.0.capacity() == 0 {
            logs.0 = written;
        }
        if logs.1.capacity() == 0 {
            logs.1 = superseded;
        }
    }

    /// One commit round (on home): bump the stamp sequence, have every core
    /// fence and hand over its logs, then persist the superblock.
    fn start_commit(self: &Arc<Self>, waiters: Vec<Waiter>) {
        let orphans = has_orphans(&lock(&self.coord));
        let (s, bump) = self.bump_seq(orphans);
        let me = self.clone();
        let limit = self.round_limit(s, bump);
        // Only the cores with a channel hold logs or unfenced stores (one
        // that closed its channel fenced and handed its logs over): a
        // control reactor or a standby hosted reactor asleep is not woken
        // each round (under fio, two wake-ups per commit). Taken after the
        // bump under the lock `add_lane` takes, so a channel that opens
        // later stamps `s + 1` or above.
        let mut lanes = lock(&self.wb).lanes.clone();
        let visit = move || me.fence_core(limit);
        // This core's visit runs here and now, not via a message to
        // itself: a round runs from a message or a poller (never inside a
        // write, whose borrows of the core's logs would be live).
        if let Some(i) = lanes.iter().position(|l| l.is_current()) {
            lanes.swap_remove(i);
            visit();
        }
        wc_reactor::for_each_of(lanes, visit, {
            let me = self.clone();
            move || {
                let (w, sup) = std::mem::take(&mut *lock(&me.round_logs));
                me.finish_commit(s, bump, w, sup, waiters)
            }
        });
    }

    fn finish_commit(
        self: &Arc<Self>,
        s: u64,
        bump: bool,
        mut written: Vec<LogEntry>,
        mut superseded: Vec<LogEntry>,
        waiters: Vec<Waiter>,
    ) {
        {
            // Adopted logs: what this round covers goes with the rest.
            let limit = self.round_limit(s, bump);
            let mut c = lock(&self.coord);
            let (w, sup) = std::mem::take(&mut c.orphans);
            let (now, later): (Vec<LogEntry>, Vec<LogEntry>) =
                w.into_iter().partition(|e| e.seq < limit);
            written.extend(now);
            c.orphans.0 = later;
            let (now, later): (Vec<LogEntry>, Vec<LogEntry>) =
                sup.into_iter().partition(|e| e.seq < limit);
            superseded.extend(now);
            c.orphans.1 = later;
        }
        // A cache media error: durability cannot be promised any more. Stop
        // committing (the superblock stays as it is) and enter the error
        // state; nothing cached is dropped.
        if let Some(e) = self.media.pmem.media_error() {
            self.set_error(e);
        }
        if let Some(ssd) = &self.ssd {
            // ssd mode: entries to the device, flush, then the superblock;
            // with no new entries only a flush (for in-place overwrites).
            let me = self.clone();
            let then: Waiter = Box::new(move |res| {
                if let Err(e) = res {
                    me.set_error(e);
                } else if bump {
                    me.sb_seq.store(s + 1, Ordering::Release);
                    if (s + 1) % SEQ_REBASE_PERIOD == 0 {
                        me.meta.rebase_seqs(s + 1);
                    }
                }
                me.commit_done(bump, written, superseded, waiters);
            });
            if self.error() != 0 {
                return then(Err(self.error()));
            }
            if bump {
                ssd.overwrote.store(false, Ordering::Release);
                ssd.clone().sync(Some(s + 1), then);
            } else if ssd.overwrote.swap(false, Ordering::AcqRel) {
                ssd.clone().sync(None, then);
            } else {
                then(Ok(()));
            }
            return;
        }
        if bump && self.error() == 0 {
            self.media.write_sb_seq(s + 1);
            self.media.pmem.fence();
            self.sb_seq.store(s + 1, Ordering::Release);
            if (s + 1) % SEQ_REBASE_PERIOD == 0 {
                self.meta.rebase_seqs(s + 1);
            }
        }
        self.commit_done(bump, written, superseded, waiters);
    }

    /// The end of a commit round, once the superblock is durable: queue
    /// the committed blocks for writeback, free superseded versions, wake
    /// the waiters, start the next round if one was asked for.
    fn commit_done(
        self: &Arc<Self>,
        bump: bool,
        mut written: Vec<LogEntry>,
        superseded: Vec<LogEntry>,
        waiters: Vec<Waiter>,
    ) {
        let now = self.now_ms();
        written.sort_unstable_by_key(|e| e.seq);
        let mut c = lock(&self.coord);
        if bump {
            c.commits += 1;
        }
        for e in &written {
            // Stale entries (freed since) are dropped when popped.
            c.fifo.push_back(e.block, now);
        }
        c.superseded.extend_from_slice(&superseded);
        // Before the next round can start (`in_progress` below).
        self.recycle_round_logs(written, superseded);
        // Free superseded versions whose successor is now committed.
        let committed_below = self.sb_seq.load(Ordering::Acquire);
        // In place (the list keeps its capacity), one allocation for what
        // is freed: this runs once per commit, every 64 writes.
        let mut to_free = Vec::with_capacity(c.superseded.len());
        c.superseded.retain(|e| {
            if e.seq >= committed_below {
                return true;
            }
            // Under writeback: the writeback frees it when done.
            if self.meta.begin_free(e.block, e.gen) {
                to_free.push(e.block);
            }
            false
        });
        let more = !c.next.is_empty() || std::mem::take(&mut c.again);
        let next = if more {
            std::mem::take(&mut c.next)
        } else {
            Vec::new()
        };
        c.in_progress = more;
        drop(c);
        if self.ssd.is_none()
            && self.on_home()
            && self.waiting_writers() == 0
            && self.drip.may_spread(&self.pool, to_free.len())
        {
            // Not in front of the write waiting on this reactor: home
            // clears them over its next iterations (see `free_drip` for
            // when, and why never many). Only a round home runs: a
            // writing core's own round (`commit_here`) leaves home asleep,
            // and its frees would wait for the next round.
            self.drip.queue(&self.media, &self.pool, &to_free);
        } else {
            self.free_blocks(&to_free);
        }
        let result = match self.error() {
            0 => Ok(()),
            e => Err(e),
        };
        for w in waiters {
            w(result);
        }
        if self.on_home() {
            if more {
                self.start_commit(next);
            }
            self.kick_writeback();
            return;
        }
        // A round run by a writing core (`commit_here`): what was asked
        // for meanwhile (maybe with waiters) and the writeback are home's.
        if more {
            let me = self.clone();
            self.home.send(move || me.start_commit(next));
        }
        let want = {
            let c = lock(&self.coord);
            let wb = lock(&self.wb);
            self.wants_writeback(&c, &wb) != WbReason::None || !wb.drain_waiters.is_empty()
        };
        if want {
            self.kick_home();
        }
    }

    /// True on the instance's home reactor.
    fn on_home(&self) -> bool {
        wc_reactor::try_current().is_some_and(|r| r.index() == self.home.index())
    }

    /// From another core: has home run the writeback (one message however
    /// many ask before it runs; home may be asleep).
    fn kick_home(self: &Arc<Self>) {
        if std::mem::replace(&mut lock(&self.wb).kick_pending, true) {
            return;
        }
        let me = self.clone();
        self.home.send(move || {
            lock(&me.wb).kick_pending = false;
            me.kick_writeback();
        });
    }

    // ------------------------------------------------------------------
    // Writeback

    /// Registers the home pollers: autocommit timer and writeback.
    pub(crate) fn start_home_pollers(self: &Arc<Self>, origin: Rc<BdevChannel>) {
        lock(&self.wb).origin = Some(origin);
        let me = Arc::downgrade(self);
        let r = wc_reactor::current();
        let mut last_commit = ticks();
        let handle = Rc::new(std::cell::RefCell::new(None::<wc_reactor::PollerHandle>));
        let h2 = handle.clone();
        let p = r.register_poller(
            "writecache_home",
            Some(Duration::from_millis(1)),
            move || {
                let Some(wc) = me.upgrade() else {
                    if let Some(h) = h2.borrow().as_ref() {
                        h.unregister();
                    }
                    return wc_reactor::PollStatus::Idle;
                };
                let period = duration_to_ticks(Duration::from_millis(
                    wc.tunables.autocommit_time_ms.load(Ordering::Relaxed),
                ));
                let now = ticks();
                if now.saturating_sub(last_commit) >= period {
                    last_commit = now;
                    let dirty: u64 = wc
                        .stats
                        .iter()
                        .map(|c| c.uncommitted.load(Ordering::Relaxed))
                        .sum();
                    if dirty > 0 {
                        wc.request_commit(None);
                    }
                }
                wc.kick_writeback();
                wc_reactor::PollStatus::Idle
            },
        );
        *handle.borrow_mut() = Some(p);
        // Every iteration: free what the writeback retired in it. (Runs
        // retired on home, or completed elsewhere and kicked home by a
        // message: only ever after a busy iteration, so an idle home sleeps
        // until a message or its timer instead of napping in 10 us steps.)
        let me = Arc::downgrade(self);
        let handle = Rc::new(std::cell::RefCell::new(None::<wc_reactor::PollerHandle>));
        let h2 = handle.clone();
        let pending = self.retire_pending.clone();
        let asked = self.home_asked.clone();
        let p = r.register_event_poller("writecache_retire", move || {
            // Nothing retired and no commit asked for since the last run
            // (nearly every iteration of a reactor busy with I/O): three
            // plain loads, no lock, no reference count, no locked
            // instruction. A run that retires after the swap sets it again.
            let gone = me.strong_count() == 0;
            let commit = asked.load(Ordering::Relaxed) && asked.swap(false, Ordering::AcqRel);
            let retire = pending.load(Ordering::Relaxed) && pending.swap(false, Ordering::AcqRel);
            if !gone && !commit && !retire {
                return wc_reactor::PollStatus::Idle;
            }
            let Some(wc) = me.upgrade() else {
                if let Some(h) = h2.borrow().as_ref() {
                    h.unregister();
                }
                return wc_reactor::PollStatus::Idle;
            };
            if commit {
                wc.commit_asked(None);
            }
            if !retire {
                return wc_reactor::PollStatus::Busy;
            }
            let retired = wc.free_retired();
            let completed = std::mem::take(&mut lock(&wc.wb).completed);
            if completed {
                // Room in the writeback window: send the next batch.
                wc.kick_writeback();
            }
            wc_reactor::PollStatus::from(retired || completed)
        });
        *handle.borrow_mut() = Some(p);
    }

    /// Frees the blocks the writeback retired since the last call.
    pub(crate) fn free_retired(&self) -> bool {
        let blocks = std::mem::take(&mut lock(&self.wb).retired);
        if blocks.is_empty() {
            return false;
        }
        self.free_blocks(&blocks);
        true
    }

    /// Blocks the writers waiting for a free block still need (pmem mode).
    fn waiting_blocks(&self) -> u64 {
        self.stats
            .iter()
            .map(|c| c.waiting_blocks.load(Ordering::Relaxed))
            .sum()
    }

    /// Writers waiting for a free block, over all cores.
    pub(crate) fn waiting_writers(&self) -> u64 {
        self.stats
            .iter()
            .map(|c| c.waiting.load(Ordering::Relaxed))
            .sum()
    }

    /// Why (and how much) to write back now.
    fn wants_writeback(&self, c: &Coordinator, wb: &Writeback) -> WbReason {
        if c.fifo.is_empty() || self.error() != 0 {
            return WbReason::None;
        }
        // Being deleted without a drain: start nothing new.
        if self.closing.load(Ordering::Acquire) && wb.drain_waiters.is_empty() {
            return WbReason::None;
        }
        if !wb.drain_waiters.is_empty() || self.tunables.cleaner.load(Ordering::Relaxed) {
            return WbReason::All;
        }
        // Waiting writers override pause_writeback, and the watermarks
        // when those ask for less, for what they still need beyond the
        // blocks already on their way back (under writeback, retired,
        // dripping back, in their grace period) — as dm, whose writeback on
        // an empty free list goes on only while the free list and the
        // writeback together stay below the low watermark. Writing back
        // everything committed instead (what this did) emptied a cache of
        // overwritten blocks whose frees were a commit away: 128 KiB
        // overwrites at QD 128 on two reactors wrote back ~800 MB/s. ssd
        // mode does not count its waiting writes' blocks: all, as before.
        let needed = if self.waiting_writers() > 0 {
            let need = self.waiting_blocks();
            if need == 0 {
                return WbReason::All;
            }
            let underway =
                wb.in_flight + wb.retired.len() as u64 + self.pool.in_grace() + self.drip.pending();
            Some(need.saturating_sub(underway)).filter(|&k| k > 0)
        } else {
            None
        };
        let pause = self.tunables.pause_writeback_ms.load(Ordering::Relaxed);
        let last_around = self.last_write_around.load(Ordering::Relaxed);
        if needed.is_none()
            && pause > 0
            && last_around != 0
            && ticks().saturating_sub(last_around) < duration_to_ticks(Duration::from_millis(pause))
        {
            return WbReason::None;
        }
        // As dm-writecache: blocks under writeback, retired or in their
        // grace period count as free for the watermarks.
        let n = self.media.geo.n_blocks().max(1);
        let used = self
            .used_blocks()
            .saturating_sub(wb.in_flight + wb.retired.len() as u64 + self.pool.in_grace());
        let hi = self.tunables.high_watermark.load(Ordering::Relaxed) as u64;
        let lo = self.tunables.low_watermark.load(Ordering::Relaxed) as u64;
        let started = wb.wm_active || used * 100 >= hi * n;
        if started && used * 100 >= lo * n {
            // Enough to get strictly below the low watermark.
            let target = (lo * n).div_ceil(100);
            let k = used + 1 - target.min(used + 1);
            return WbReason::Blocks(k.max(needed.unwrap_or(0)));
        }
        if let Some(k) = needed {
            return WbReason::Needed(k);
        }
        let max_age = self.tunables.max_age_ms.load(Ordering::Relaxed);
        if max_age > 0 {
            // Nothing can be older than max_age before max_age has passed.
            if let Some(cutoff) = self
                .now_ms()
                .checked_sub(max_age.min(u32::MAX as u64) as u32)
            {
                if c.fifo.front_at_ms().is_some_and(|t| t <= cutoff) {
                    return WbReason::OlderThan(cutoff);
                }
            }
        }
        WbReason::None
    }

    /// Starts writeback I/O while conditions hold (on home).
    pub(crate) fn kick_writeback(self: &Arc<Self>) {
        loop {
            let mut c = lock(&self.coord);
            let mut wb = lock(&self.wb);
            let want = self.wants_writeback(&c, &wb);
            wb.wm_active = matches!(want, WbReason::Blocks(_));
            if want == WbReason::None {
                let done = c.fifo.is_empty() && wb.in_flight == 0 && !wb.drain_waiters.is_empty();
                let waiters = if done {
                    std::mem::take(&mut wb.drain_waiters)
                } else {
                    Vec::new()
                };
                drop(wb);
                drop(c);
                if done {
                    // Drained: the freed blocks count as free from now on.
                    self.free_retired();
                }
                let res = match self.error() {
                    0 => Ok(()),
                    e => Err(e),
                };
                for w in waiters {
                    w(res);
                }
                return;
            }
            let jobs = self.tunables.writeback_jobs.load(Ordering::Relaxed);
            let limit = if jobs == UNLIMITED {
                4096
            } else {
                jobs.min(1 << 20)
            };
            if wb.in_flight >= limit {
                return;
            }
            // Take a batch of the oldest committed blocks.
            let mut room = (limit - wb.in_flight).min(1024);
            if let WbReason::Blocks(k) | WbReason::Needed(k) = want {
                room = room.min(k.max(1));
            }
            let mut batch: Vec<(u64, u32)> = Vec::new();
            let mut deferred = Vec::new();
            let committed_below = seq32(self.sb_seq.load(Ordering::Acquire));
            while (batch.len() as u64) < room {
                if let WbReason::OlderThan(cutoff) = want {
                    if c.fifo.front_at_ms().is_some_and(|t| t > cutoff) {
                        break; // younger than max_age: stays for now
                    }
                }
                let Some(b) = c.fifo.pop_front() else {
                    break;
                };
                let m = self.meta.get(b);
                let (gen, state) = m.gen_state();
                let lba = m.lba.load(Ordering::Acquire);
                // ssd mode: an in-place overwrite holds it: it goes out
                // once that completes. (Even while an older block of its
                // LBA is going out: the overwrite stamps no new entry, so
                // no commit would queue it again.) A block of ssd mode is
                // never queued while under writeback itself (no
                // neighbours join a batch there).
                if self.ssd.is_some()
                    && state == VALID | crate::meta::WB
                    && !seq_at_or_after(m.seq(), committed_below)
                {
                    deferred.push(b);
                    continue;
                }
                // Freed, being reallocated, or already going out: nothing
                // to do. Rewritten but not committed yet: its own commit
                // queues it again (it is not queued now).
                if state != VALID || seq_at_or_after(m.seq(), committed_below) {
                    continue;
                }
                // ssd mode: a version that left the index (displaced while
                // an in-place overwrite held it, so in the same commit as
                // its successor, in either order) is freed by a commit and
                // must never reach the origin: its successor may be written
                // back already.
                if self.ssd.is_some() && self.index.get(&self.meta, lba) != Some(b) {
                    continue;
                }
                if wb.lbas.contains(&lba) {
                    // An older version of this LBA is still going out: the
                    // newer one must reach the origin after it.
                    deferred.push(b);
                    continue;
                }
                if !self.meta.begin_writeback(b, gen) {
                    // ssd mode: an in-place overwrite took it meanwhile; it
                    // goes out once that completes. It may have completed
                    // already (WB clear again): an in-place overwrite
                    // stamps no new entry, so no commit queues the block
                    // again — dropped here, its new data would never reach
                    // the origin. Still this allocation: back in the queue.
                    if self.ssd.is_some() {
                        let (g, s) = m.gen_state();
                        if g == gen && s & VALID != 0 {
                            deferred.push(b);
                        }
                    }
                    continue;
                }
                wb.lbas.insert(lba);
                batch.push((lba, b));
                if self.ssd.is_none() {
                    self.take_neighbours(&mut wb, &mut batch, lba, room, committed_below);
                }
            }
            for d in deferred.into_iter().rev() {
                c.fifo.push_front(d);
            }
            if batch.is_empty() {
                return;
            }
            wb.in_flight += batch.len() as u64;
            let origin = wb.origin.clone();
            drop(wb);
            drop(c);
            let Some(origin) = origin else { return };
            batch.sort_unstable();
            self.dispatch_batch(&origin, batch);
        }
    }

    /// Coalescing (as dm-writecache): the committed, idle blocks of the
    /// LBAs next to `lba` (either side, up to a run) join the batch, so a
    /// random workload's writeback needs fewer, larger origin writes. They
    /// stay in the queue; popped later, they are under writeback or freed
    /// and skipped (a block reused meanwhile goes out a little early).
    fn take_neighbours(
        &self,
        wb: &mut Writeback,
        batch: &mut Vec<(u64, u32)>,
        lba: u64,
        room: u64,
        committed_below: u32,
    ) {
        const SIDE: u64 = 31;
        let guard = crossbeam::epoch::pin();
        for forward in [true, false] {
            for d in 1..=SIDE {
                if batch.len() as u64 >= room {
                    return;
                }
                let next = if forward {
                    lba + d
                } else {
                    match lba.checked_sub(d) {
                        Some(l) => l,
                        None => break,
                    }
                };
                if next >= self.num_blocks || wb.lbas.contains(&next) {
                    break;
                }
                let Some(b) = self.index.lookup(&self.meta, next, &guard, |_| {}) else {
                    break;
                };
                let m = self.meta.get(b);
                let (gen, state) = m.gen_state();
                if state != VALID
                    || seq_at_or_after(m.seq(), committed_below)
                    || m.lba.load(Ordering::Acquire) != next
                    || !self.meta.begin_writeback(b, gen)
                {
                    break;
                }
                wb.lbas.insert(next);
                batch.push((next, b));
            }
        }
    }

    /// Sends a sorted batch out in shares of consecutive LBAs, one per
    /// reactor with a channel, each written from that reactor's own origin
    /// channel (ssd mode: and read from its own cache-bdev channel), so
    /// writeback is not bound by one reactor's I/O rate.
    fn dispatch_batch(self: &Arc<Self>, home_origin: &Rc<BdevChannel>, batch: Vec<(u64, u32)>) {
        let (lanes, first) = {
            let mut wb = lock(&self.wb);
            if wb.lanes.len() <= 1 {
                drop(wb);
                return self.issue_runs(home_origin, batch);
            }
            let first = wb.next_lane % wb.lanes.len();
            wb.next_lane = wb.next_lane.wrapping_add(1);
            (wb.lanes.clone(), first)
        };
        let share = batch.len().div_ceil(lanes.len());
        let home = self.home.index();
        let mut rest = &batch[..];
        let mut k = first;
        while !rest.is_empty() {
            // A share ends at a gap between LBAs, so no run is split.
            let mut end = share.min(rest.len());
            while end < rest.len() && rest[end].0 == rest[end - 1].0 + 1 {
                end += 1;
            }
            let (mine, more) = rest.split_at(end);
            rest = more;
            let lane = &lanes[k % lanes.len()];
            k += 1;
            if lane.index() == home {
                self.issue_runs(home_origin, mine.to_vec());
            } else {
                let me = self.clone();
                let mine = mine.to_vec();
                lane.send(move || me.issue_share(mine));
            }
        }
    }

    /// On a lane: writes a share of a batch from this reactor's origin
    /// channel (or, its channel gone meanwhile, from home's).
    fn issue_share(self: &Arc<Self>, share: Vec<(u64, u32)>) {
        // Released by delete meanwhile: home puts the blocks back.
        let live = lock(&self.wb).origin.is_some();
        if let Some(origin) = crate::channel::local_of(self.id)
            .filter(|_| live)
            .map(|l| l.origin_channel())
        {
            return self.issue_runs(&origin, share);
        }
        let me = self.clone();
        self.home.send(move || {
            let origin = lock(&me.wb).origin.clone();
            match origin {
                Some(o) => me.issue_runs(&o, share),
                // Released (deleted): the blocks stay cached and queued.
                None => me.abandon_run(&share),
            }
        });
    }

    /// A reactor with a channel of this instance takes a share of the
    /// writeback from now on.
    pub(crate) fn add_lane(&self, lane: ReactorHandle) {
        let mut wb = lock(&self.wb);
        wb.lanes.push(lane);
        self.channel_cores
            .store(wb.lanes.len() as u64, Ordering::Relaxed);
    }

    /// The channel on reactor `index` is going away.
    pub(crate) fn remove_lane(&self, index: usize) {
        let mut wb = lock(&self.wb);
        if let Some(i) = wb.lanes.iter().position(|l| l.index() == index) {
            wb.lanes.swap_remove(i);
        }
        self.channel_cores
            .store(wb.lanes.len() as u64, Ordering::Relaxed);
    }

    /// The origin channel a run is retried or flushed on, if the instance
    /// still writes back (not released by delete).
    fn live_origin(&self, run: &WbRun) -> Option<Rc<BdevChannel>> {
        lock(&self.wb).origin.as_ref().map(|_| run.origin.clone())
    }

    /// Writes a sorted batch as runs of contiguous LBAs (one origin write
    /// per run, its segments pointing straight into the cache mapping).
    fn issue_runs(self: &Arc<Self>, origin: &Rc<BdevChannel>, batch: Vec<(u64, u32)>) {
        const MAX_RUN: usize = 64;
        let mut i = 0;
        while i < batch.len() {
            let mut j = i + 1;
            while j < batch.len() && j - i < MAX_RUN && batch[j].0 == batch[j - 1].0 + 1 {
                j += 1;
            }
            let run: Vec<(u64, u32)> = batch[i..j].to_vec();
            self.issue_run(
                origin,
                Rc::new(WbRun {
                    wc: self.clone(),
                    run,
                    origin: origin.clone(),
                    attempt: std::cell::Cell::new(0),
                    bufs: Default::default(),
                }),
            );
            i = j;
        }
    }

    fn issue_run(self: &Arc<Self>, origin: &Rc<BdevChannel>, run: Rc<WbRun>) {
        if let Some(ssd) = &self.ssd {
            return self.ssd_issue_run(ssd, origin, run);
        }
        let bs = self.block_size as usize;
        let iovs: smallvec::SmallVec<[IoVec; 16]> = run
            .run
            .iter()
            .map(|&(_, b)| IoVec {
                base: self.media.data_ptr(b) as *mut u8,
                len: bs,
            })
            .collect();
        let lba = run.run[0].0;
        let n = run.run.len() as u64;
        let fua = self.tunables.fua.load(Ordering::Relaxed);
        {
            let mut wb = lock(&self.wb);
            wb.ios += 1;
        }
        let cb: Rc<dyn IoCompletion> = run;
        // Each segment is one cache block's data in the mapping, mapped while
        // we hold the cache bdev open; the blocks are marked WB, so nobody
        // frees or rewrites them until this write completes.
        // SAFETY: valid, stable, read-only memory for the write's duration.
        unsafe {
            origin.writev(
                lba * self.origin_ratio,
                n * self.origin_ratio,
                &iovs,
                fua,
                &cb,
                0,
            );
        }
    }

    fn run_done(self: &Arc<Self>, run: &WbRun, ok: bool) {
        if !ok {
            let attempt = run.attempt.get() + 1;
            run.attempt.set(attempt);
            lock(&self.wb).retries += 1;
            let budget = self.tunables.writeback_retry_ms.load(Ordering::Relaxed);
            let retry = crate::options::writeback_retry_delay(attempt, budget);
            if let (Some(delay), 0) = (retry, self.error()) {
                // Transient origin errors: retry with a capped exponential
                // backoff within the writeback_retry_ms budget.
                let me = self.clone();
                let run = Rc::new(WbRun {
                    wc: self.clone(),
                    run: run.run.clone(),
                    origin: run.origin.clone(),
                    attempt: std::cell::Cell::new(attempt),
                    bufs: Default::default(),
                });
                tracing::warn!(
                    "writecache {}: writeback error, retry {attempt} in {delay:?}",
                    self.name
                );
                wc_reactor::current().schedule_timer(delay, move || {
                    let origin = me.live_origin(&run);
                    if let Some(o) = origin {
                        me.issue_run(&o, run);
                    }
                });
                return;
            }
            // Give up: error state; the blocks stay cached and committed.
            self.set_error(libc::EIO);
            self.abandon_run(&run.run);
            return;
        }
        let fua = self.tunables.fua.load(Ordering::Relaxed);
        if !fua {
            // nofua: the data is durable on the origin only after a flush.
            if let Some(o) = self.live_origin(run) {
                crate::origin_flush::retire_after_flush(
                    &o,
                    crate::origin_flush::FlushedRun {
                        wc: self.clone(),
                        run: run.run.clone(),
                        attempt: run.attempt.get(),
                    },
                );
                return;
            }
        }
        self.retire(&run.run, true, run.attempt.get(), &run.origin);
    }

    /// Puts a run that will not be written back (error state) back in
    /// front of the queue, its blocks still cached and committed, and fails
    /// the drain waiters.
    fn abandon_run(&self, run: &[(u64, u32)]) {
        let mut c = lock(&self.coord);
        let mut wb = lock(&self.wb);
        for &(lba, b) in run {
            self.meta.end_writeback(b);
            wb.lbas.remove(&lba);
            c.fifo.push_front(b);
        }
        wb.in_flight -= run.len() as u64;
        let waiters = std::mem::take(&mut wb.drain_waiters);
        drop(wb);
        drop(c);
        for w in waiters {
            w(Err(libc::EIO));
        }
    }

    /// ssd mode: reads the run's blocks from the cache bdev (through this
    /// reactor's channel of it) into pooled buffers (one read per stretch
    /// of adjacent cache blocks), then writes them to the origin in one I/O.
    fn ssd_issue_run(
        self: &Arc<Self>,
        ssd: &Arc<crate::ssd::Ssd>,
        origin: &Rc<BdevChannel>,
        run: Rc<WbRun>,
    ) {
        let cache = if self.on_home() {
            ssd.channel()
        } else {
            crate::channel::local_of(self.id).and_then(|l| l.cache_channel())
        };
        let Some(cache) = cache else {
            return self.abandon_run(&run.run);
        };
        {
            let mut bufs = run.bufs.borrow_mut();
            while bufs.len() < run.run.len() {
                bufs.push(ssd.take_buf());
            }
        }
        let iovs: Rc<smallvec::SmallVec<[IoVec; 16]>> = Rc::new(
            run.bufs
                .borrow_mut()
                .iter_mut()
                .map(|b| IoVec {
                    base: b.as_mut_ptr(),
                    len: b.len(),
                })
                .collect(),
        );
        // Stretches of adjacent cache blocks: (first index, count).
        let mut stretches: smallvec::SmallVec<[(usize, usize); 8]> = smallvec::SmallVec::new();
        for (i, &(_, b)) in run.run.iter().enumerate() {
            match stretches.last_mut() {
                Some((s, n)) if run.run[*s + *n - 1].1 + 1 == b => *n += 1,
                _ => stretches.push((i, 1)),
            }
        }
        lock(&self.wb).ios += 1;
        let left = Rc::new(std::cell::Cell::new(stretches.len()));
        let failed = Rc::new(std::cell::Cell::new(0i32));
        let me = self.clone();
        let origin = origin.clone();
        let run2 = run.clone();
        let iovs2 = iovs.clone();
        let cb: Rc<dyn IoCompletion> = Rc::new(wc_bdev::FnCompletion(move |io: Io, _| {
            if !io.status().is_success() && failed.get() == 0 {
                failed.set(io.status().errno().max(1));
            }
            drop(io);
            left.set(left.get() - 1);
            if left.get() > 0 {
                return;
            }
            if failed.get() != 0 {
                // A cache read error: the error state; nothing is dropped.
                tracing::error!(
                    "writecache {}: reading cache blocks for writeback failed (errno {})",
                    me.name,
                    failed.get()
                );
                me.set_error(libc::EIO);
                return me.abandon_run(&run2.run);
            }
            let lba = run2.run[0].0;
            let n = run2.run.len() as u64;
            let fua = me.tunables.fua.load(Ordering::Relaxed);
            let done: Rc<dyn IoCompletion> = run2.clone();
            // SAFETY: the segments are the run's own buffers, which it
            // keeps (unchanged) until it is dropped after this write.
            unsafe {
                origin.writev(
                    lba * me.origin_ratio,
                    n * me.origin_ratio,
                    &iovs2,
                    fua,
                    &done,
                    0,
                );
            }
        }));
        let bs = self.block_size as usize;
        for (i, n) in stretches {
            let b = run.run[i].1;
            // SAFETY: the segments are the run's own buffers (block-sized,
            // owned by `run`, which the completion keeps alive); nothing
            // else touches them until the origin write is done.
            unsafe {
                cache.readv(
                    ssd.block_lba(b),
                    n as u64 * ssd.ratio,
                    &iovs[i..i + n],
                    &cb,
                    0,
                );
            }
            debug_assert!(iovs[i].len == bs);
        }
    }

    /// The origin holds these blocks durably: drop them from the cache.
    pub(crate) fn retire(
        self: &Arc<Self>,
        run: &[(u64, u32)],
        ok: bool,
        attempt: u32,
        origin: &Rc<BdevChannel>,
    ) {
        if !ok {
            // The origin flush after a nofua write failed: retry the whole
            // run (write + flush) under the same retry budget.
            let r = WbRun {
                wc: self.clone(),
                run: run.to_vec(),
                origin: origin.clone(),
                attempt: std::cell::Cell::new(attempt),
                bufs: Default::default(),
            };
            self.run_done(&r, false);
            return;
        }
        let bs = self.block_size as u64;
        let mut to_free = Vec::with_capacity(run.len());
        for &(lba, b) in run {
            // Still current: reads now go to the origin. Superseded: its
            // successor is in the index; either way this copy is redundant.
            self.index.remove_if(&self.meta, lba, b);
            self.meta.end_writeback(b);
            let gen = self.meta.get(b).gen();
            if self.meta.begin_free(b, gen) {
                to_free.push(b);
            }
        }
        let on_home = self.on_home();
        {
            let mut wb = lock(&self.wb);
            if on_home {
                wb.retired.extend_from_slice(&to_free);
            }
            for &(lba, _) in run {
                wb.lbas.remove(&lba);
            }
            wb.in_flight -= run.len() as u64;
            wb.blocks += run.len() as u64;
            wb.bytes += run.len() as u64 * bs;
            // The next batch goes out from the retire poller, once for all
            // the runs that complete in this reactor iteration.
            wb.completed = true;
        }
        // After the lock: the poller that sees it set finds the above.
        self.retire_pending.store(true, Ordering::Release);
        if !on_home {
            // A lane frees its blocks at once (its writers waiting for
            // them run next on this reactor) and wakes home, which may be
            // asleep, for the next batch.
            self.free_blocks(&to_free);
            self.kick_home();
        }
    }

    /// Commits, then writes back everything; `waiter` runs when the cache
    /// holds no dirty block that was there when the drain started.
    pub(crate) fn drain(self: &Arc<Self>, waiter: Waiter) {
        let me = self.clone();
        self.request_commit(Some(Box::new(move |res| {
            if let Err(e) = res {
                return waiter(Err(e));
            }
            lock(&me.wb).drain_waiters.push(waiter);
            me.kick_writeback();
        })));
    }

    /// Blocks in flight to the origin (for tests).
    pub fn writeback_in_flight(&self) -> u64 {
        lock(&self.wb).in_flight
    }

    /// True when a writeback of an LBA in `[lba, lba+n)` is in flight.
    /// (Cleaner-mode writers on any core ask; the lock is otherwise only
    /// taken on home, and this only reads the LBA set.)
    pub(crate) fn writeback_busy_on(&self, lba: u64, n: u64) -> bool {
        let wb = lock(&self.wb);
        if wb.lbas.is_empty() {
            return false;
        }
        if n as usize <= wb.lbas.len() {
            (lba..lba.saturating_add(n)).any(|l| wb.lbas.contains(&l))
        } else {
            wb.lbas.iter().any(|l| *l >= lba && *l - lba < n)
        }
    }

    /// Calls `done` (on home) once no writeback I/O is in flight.
    pub(crate) fn when_writeback_idle(self: &Arc<Self>, done: Waiter) {
        let me = self.clone();
        let mut done = Some(done);
        let handle = Rc::new(std::cell::RefCell::new(None::<wc_reactor::PollerHandle>));
        let h2 = handle.clone();
        let p = wc_reactor::current().register_poller(
            "writecache_wb_idle",
            Some(Duration::from_micros(200)),
            move || {
                if lock(&me.wb).in_flight > 0 || me.ssd.as_ref().is_some_and(|s| !s.idle()) {
                    return wc_reactor::PollStatus::Idle;
                }
                me.free_retired();
                if let Some(h) = h2.borrow().as_ref() {
                    h.unregister();
                }
                if let Some(d) = done.take() {
                    d(Ok(()));
                }
                wc_reactor::PollStatus::Busy
            },
        );
        *handle.borrow_mut() = Some(p);
    }

    /// Drops the home pollers' origin channel (on delete).
    pub(crate) fn release_home(&self) {
        // A clean delete leaves no superseded entry behind.
        self.drip.finish(&self.media, &self.pool);
        lock(&self.wb).origin = None;
        if let Some(ssd) = &self.ssd {
            ssd.release();
        }
    }

    /// Size of the vbdev in blocks.
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Whether this instance formatted a blank cache when created.
    pub fn formatted_on_create(&self) -> bool {
        self.formatted
    }
}

/// What the writeback should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WbReason {
    /// Nothing.
    None,
    /// Everything committed (drain, cleaner; starving writers in ssd mode).
    All,
    /// This many blocks (to get below the low watermark).
    Blocks(u64),
    /// This many blocks, which writers waiting for free blocks need
    /// beyond those already on their way back.
    Needed(u64),
    /// Blocks committed at or before this time, ms since start (max_age).
    OlderThan(u32),
}

/// A writeback run in flight.
struct WbRun {
    wc: Arc<Writecache>,
    run: Vec<(u64, u32)>,
    /// The origin channel of the reactor that issued it (where it
    /// completes, is retried and flushed).
    origin: Rc<BdevChannel>,
    attempt: std::cell::Cell<u32>,
    /// ssd mode: the buffers the run was read into (back to the pool when
    /// the run is dropped).
    bufs: std::cell::RefCell<Vec<wc_bdev::DmaBuf>>,
}

impl Drop for WbRun {
    fn drop(&mut self) {
        if let Some(ssd) = &self.wc.ssd {
            ssd.put_bufs(self.bufs.get_mut().drain(..));
        }
    }
}

impl IoCompletion for WbRun {
    fn io_done(&self, io: Io, _ctx: u64) {
        let ok = io.status().is_success();
        drop(io);
        self.wc.run_done(self, ok);
    }
}
