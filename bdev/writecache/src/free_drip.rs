//! Frees of superseded blocks, spread over the home reactor's iterations
//! (pmem mode).
//!
//! A commit makes the newer versions of overwritten blocks durable, and the
//! older versions it supersedes (most of a random-overwrite workload's
//! blocks) become free. Freeing one clears its entry (a store to a random
//! metadata line) and, for the batch, a fence, before the block may be
//! reused. Done inside the commit, that was about 1.1 µs (57 blocks per
//! commit of 64 writes into a 1 GiB range; the whole commit took ~2.7 µs)
//! spent in front of the write waiting on the reactor — the slowest 1.5%
//! of writes at queue depth 1 (one commit per `autocommit_blocks` = 64
//! writes). So the commit only queues them here, and home clears a share
//! of them each iteration, then fences once and returns them to the pool
//! after a grace period.
//!
//! Blocks queued here are not in the pool: held back long, the pool runs
//! dry, a writer waits, and waiting writers write back everything
//! committed (dropping it from the cache) whatever the watermarks say.
//! The first version of this (reverted) cleared a sixteenth of an
//! unbounded queue per iteration, which fell that far behind 128 KiB writes
//! at queue depth 32 (13,800 blocks queued, writers waiting, 34k-53k
//! blocks written back in a second of them). So the frees wait here only
//! while they can never be what a writer waits for
//! ([`FreeDrip::may_spread`]): one commit's at most, at most [`SPREAD_MAX`]
//! blocks, only while the pool holds [`POOL_FACTOR`] times as many (the
//! writers take theirs until the next commit from the rest), never while a
//! writer waits. A commit that finds the previous one's frees still here
//! frees them and its own at once, as before (at queue depth 1 they are
//! long done by then; at high rates spreading saves nothing), and home
//! frees everything at once when the pool falls below twice what is
//! queued.
//!
//! Crash consistency (design §3.3) is unchanged: until its clear is
//! durable the older entry stays a committed entry of the same sector with
//! a lower sequence number, which recovery frees, and the block goes back
//! to the pool only after the fence that makes the clear durable.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use wc_reactor::PollStatus;

use crate::cache::Writecache;
use crate::media::Media;
use crate::meta::FreePool;

/// Entries cleared per iteration (while any are queued): at queue depth 1
/// a commit's frees (up to 64) are gone in 4 of the 64 iterations before
/// the next. Not fewer: a clear is a partial-line non-temporal store, and
/// the first locked instruction after it waits until it reaches memory —
/// once per iteration that clears, however few it clears: with two per
/// iteration 4% of the reactor's samples were in this poller at queue
/// depth 1 (perf profile, random writes over 1 GiB), with sixteen 1%.
const STEP: usize = 16;
/// A commit freeing more blocks than this frees them at once: only many
/// writes in flight supersede that many, and there the commit's cost is
/// shared by all of them (a commit at queue depth 1 frees up to 64).
const SPREAD_MAX: usize = 256;
/// Frees wait here only while the pool holds this many times as many
/// blocks.
const POOL_FACTOR: u64 = 4;

#[derive(Default)]
struct Lists {
    /// Superseded blocks whose entries are still to be cleared.
    queued: Vec<u32>,
    /// Cleared by reactor `cleared_on`, not yet fenced.
    cleared: Vec<u32>,
    cleared_on: usize,
}

/// The frees one commit left to home's iterations.
#[derive(Default)]
pub(crate) struct FreeDrip {
    /// Blocks queued or cleared and not yet returned (read without the lock
    /// each iteration).
    pending: AtomicU64,
    /// Home steps through it; any reactor that frees a block first frees
    /// all of it (see [`FreeDrip::finish`]).
    lists: Mutex<Lists>,
}

impl FreeDrip {
    fn lock(&self) -> MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks queued and not yet back in the pool.
    pub(crate) fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Whether a commit's `n` frees may wait for home's iterations: the
    /// last commit's are done, these are few enough, and the pool holds
    /// plenty without them.
    pub(crate) fn may_spread(&self, pool: &FreePool, n: usize) -> bool {
        self.pending() == 0 && n <= SPREAD_MAX && pool.len() >= POOL_FACTOR * n as u64
    }

    /// Queues one commit's superseded `blocks` (each taken with
    /// `Meta::begin_free`; [`FreeDrip::may_spread`] said yes) to be freed
    /// over home's next iterations; they count as free (in grace) from now
    /// on.
    pub(crate) fn queue(&self, media: &Media, pool: &Arc<FreePool>, blocks: &[u32]) {
        if blocks.is_empty() {
            return;
        }
        debug_assert!(blocks.len() <= SPREAD_MAX);
        self.finish(media, pool);
        pool.reserve_grace(blocks.len() as u64);
        let mut l = self.lock();
        l.queued.extend_from_slice(blocks);
        self.pending
            .store((l.queued.len() + l.cleared.len()) as u64, Ordering::Relaxed);
    }

    /// Frees everything queued now (on any reactor): before another free
    /// clears an entry (a written-back or unmapped newer version must not
    /// lose its entry before the older one's clear is durable, or a crash
    /// revives the older), before the next commit's frees, while a writer
    /// waits, on delete.
    pub(crate) fn finish(&self, media: &Media, pool: &Arc<FreePool>) {
        if self.pending() != 0 {
            self.step(media, pool, true);
        }
    }

    /// One iteration's share (everything with `all`): clears entries, and
    /// once the queue is empty fences and returns the cleared blocks to
    /// the pool after a grace period. True if it did anything.
    fn step(&self, media: &Media, pool: &Arc<FreePool>, all: bool) -> bool {
        let mut l = self.lock();
        let n = l.queued.len();
        if n == 0 && l.cleared.is_empty() {
            return false;
        }
        let here = wc_reactor::try_current().map_or(0, |r| r.index());
        if !l.cleared.is_empty() && l.cleared_on != here {
            // Cleared by home's stores, which only home's fence makes
            // durable: clear them again here (the same all-ones entry),
            // so this reactor's fence below covers them.
            for &b in &l.cleared {
                media.clear_entry(b);
            }
        }
        l.cleared_on = here;
        let k = if all { n } else { STEP.min(n) };
        for i in n - k..n {
            let b = l.queued[i];
            media.clear_entry(b);
            l.cleared.push(b);
        }
        l.queued.truncate(n - k);
        if l.queued.is_empty() {
            // The clears must be durable before a block carries other
            // data, or a crash could pair the old entry with new contents.
            media.pmem.fence();
            let blocks = std::mem::take(&mut l.cleared);
            pool.reserved_free_after_grace(blocks);
        }
        self.pending
            .store((l.queued.len() + l.cleared.len()) as u64, Ordering::Relaxed);
        true
    }
}

impl Writecache {
    /// Registers the home poller that works through [`FreeDrip`] (pmem
    /// mode; every iteration, a load while nothing is queued).
    pub(crate) fn start_free_drip(self: &Arc<Self>) {
        if self.ssd.is_some() {
            return;
        }
        let me = Arc::downgrade(self);
        // Its own handle on the queue: an idle iteration is one load, not
        // an upgrade of `me` (two atomic read-modify-writes).
        let drip = self.drip.clone();
        let handle = Rc::new(RefCell::new(None::<wc_reactor::PollerHandle>));
        let h2 = handle.clone();
        let p = wc_reactor::current().register_poller("writecache_free_drip", None, move || {
            if drip.pending() == 0 && Arc::strong_count(&drip) > 1 {
                return PollStatus::Idle;
            }
            let Some(wc) = me.upgrade() else {
                if let Some(h) = h2.borrow().as_ref() {
                    h.unregister();
                }
                return PollStatus::Idle;
            };
            // Everything at once if a writer waits or might soon.
            let short = wc.waiting_writers() > 0 || wc.pool.len() < 2 * wc.drip.pending();
            PollStatus::from(wc.drip.step(&wc.media, &wc.pool, short))
        });
        *handle.borrow_mut() = Some(p);
    }
}
