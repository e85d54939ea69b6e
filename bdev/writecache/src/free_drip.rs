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
//! writes). Nothing waits for these blocks while the pool has others, so
//! the commit only queues them here, and home clears a share of them each
//! iteration, then fences once for the batch and returns it to the pool
//! after a grace period. While a writer waits for a free block, everything
//! queued is freed at once.
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

/// Entries cleared per iteration at least (while any are queued): at
/// queue depth 1 a commit's frees (up to 64) are gone in half the 64
/// iterations before the next.
const STEP_MIN: usize = 2;
/// A sixteenth of what is queued is cleared per iteration: a few stores
/// per write at queue depth 1, and at high rates the queue stays about
/// sixteen iterations' worth of frees.
const STEP_SHIFT: u32 = 4;
/// Cleared blocks fenced and returned at once at most (the queue may never
/// run empty under a steady stream of overwrites).
const BATCH_MAX: usize = 256;

#[derive(Default)]
struct Lists {
    /// Superseded blocks whose entries are still to be cleared.
    queued: Vec<u32>,
    /// Cleared, not yet fenced.
    cleared: Vec<u32>,
}

/// The queue of frees home works through (only home locks it).
#[derive(Default)]
pub(crate) struct FreeDrip {
    /// Blocks queued or cleared and not yet returned (read without the lock
    /// each iteration).
    pending: AtomicU64,
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

    /// Queues `blocks` (each taken with `Meta::begin_free`) to be freed;
    /// they count as free (in grace) from now on.
    pub(crate) fn queue(&self, pool: &FreePool, blocks: &[u32]) {
        if blocks.is_empty() {
            return;
        }
        pool.reserve_grace(blocks.len() as u64);
        let mut l = self.lock();
        l.queued.extend_from_slice(blocks);
        self.pending
            .store((l.queued.len() + l.cleared.len()) as u64, Ordering::Relaxed);
    }

    /// One iteration's share (everything with `all`): clears entries, and
    /// once the queue is empty or the batch is full, fences and returns
    /// the cleared blocks to the pool after a grace period. True if it did
    /// anything.
    pub(crate) fn step(&self, media: &Media, pool: &Arc<FreePool>, all: bool) -> bool {
        if self.pending() == 0 {
            return false;
        }
        let mut l = self.lock();
        let n = l.queued.len();
        let k = if all {
            n
        } else {
            (n >> STEP_SHIFT).max(STEP_MIN).min(n)
        };
        for i in n - k..n {
            let b = l.queued[i];
            media.clear_entry(b);
            l.cleared.push(b);
        }
        l.queued.truncate(n - k);
        if l.queued.is_empty() || l.cleared.len() >= BATCH_MAX {
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
            let starving = wc.waiting_writers() > 0;
            PollStatus::from(wc.drip.step(&wc.media, &wc.pool, starving))
        });
        *handle.borrow_mut() = Some(p);
    }
}
