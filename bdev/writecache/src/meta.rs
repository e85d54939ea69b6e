//! In-RAM state of each cache block, the sector index, and the free pool.
//!
//! Block ownership rules (who may change what):
//! * a writer owns a block from allocation until it inserts it in the index;
//! * afterwards blocks are freed through [`Meta::begin_free`], a CAS that
//!   exactly one party wins, and only after an epoch grace period do they go
//!   back to the pool ([`FreePool::free_after_grace`]) so no reader that
//!   found them in the index can see them reused;
//! * `gen` increments at every allocation, so logs that remember a block
//!   (write-order logs, supersede logs, the writeback queue) can tell a stale
//!   reference from the block they meant.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam::queue::ArrayQueue;
use crossbeam::utils::CachePadded;

/// Block state bits.
pub(crate) const VALID: u32 = 1;
/// Under writeback: must not be freed by anyone but the writeback.
pub(crate) const WB: u32 = 2;

/// Per-block state.
#[derive(Default)]
pub(crate) struct BlockMeta {
    /// The vbdev LBA (in cache blocks) the block holds.
    pub(crate) lba: AtomicU64,
    /// The sequence number stamped in its entry.
    pub(crate) seq: AtomicU64,
    /// Allocation generation.
    pub(crate) gen: AtomicU32,
    /// VALID | WB.
    pub(crate) state: AtomicU32,
}

/// All blocks' state.
pub(crate) struct Meta {
    blocks: Box<[BlockMeta]>,
}

impl Meta {
    pub(crate) fn new(n: usize) -> Meta {
        Meta {
            blocks: (0..n).map(|_| BlockMeta::default()).collect(),
        }
    }

    #[inline]
    pub(crate) fn get(&self, b: u32) -> &BlockMeta {
        &self.blocks[b as usize]
    }

    /// Takes the right to free `b` (allocation `gen`): true for exactly one
    /// caller, and never while the block is under writeback.
    pub(crate) fn begin_free(&self, b: u32, gen: u32) -> bool {
        let m = self.get(b);
        if m.gen.load(Ordering::Acquire) != gen {
            return false;
        }
        m.state
            .compare_exchange(VALID, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Marks `b` as under writeback if it is still allocation `gen` and idle.
    pub(crate) fn begin_writeback(&self, b: u32, gen: u32) -> bool {
        let m = self.get(b);
        m.gen.load(Ordering::Acquire) == gen
            && m.state
                .compare_exchange(VALID, VALID | WB, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Ends writeback of `b`, leaving it VALID.
    pub(crate) fn end_writeback(&self, b: u32) {
        self.get(b).state.fetch_and(!WB, Ordering::AcqRel);
    }
}

/// FxHash-style hasher: LBAs are well spread, we need speed, not DoS
/// resistance (keys come from our own I/O path, bounded by the bdev size).
#[derive(Default)]
pub(crate) struct LbaHasher(u64);

impl Hasher for LbaHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ *b as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

type Shard = Mutex<HashMap<u64, u32, BuildHasherDefault<LbaHasher>>>;

/// The concurrent sector index: LBA → cache block, sharded by LBA so that
/// cores writing different sectors almost never meet on a lock. There is no
/// global lock; each shard's critical section is one hash-map operation.
pub(crate) struct Index {
    shards: Box<[CachePadded<Shard>]>,
    mask: u64,
}

impl Index {
    pub(crate) fn new(expected: usize) -> Index {
        let n = 256usize;
        let per = expected / n + 1;
        Index {
            shards: (0..n)
                .map(|_| {
                    CachePadded::new(Mutex::new(HashMap::with_capacity_and_hasher(
                        per,
                        Default::default(),
                    )))
                })
                .collect(),
            mask: n as u64 - 1,
        }
    }

    #[inline]
    fn shard(
        &self,
        lba: u64,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, u32, BuildHasherDefault<LbaHasher>>> {
        // Neighbouring LBAs land in different shards (sequential writers on
        // several cores spread out); a poisoned lock only means a panic
        // elsewhere, the map itself is always consistent.
        let i = (lba ^ (lba >> 8)) & self.mask;
        self.shards[i as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    #[inline]
    pub(crate) fn get(&self, lba: u64) -> Option<u32> {
        self.shard(lba).get(&lba).copied()
    }

    /// Maps `lba` to `b`, returning the block it displaced.
    #[inline]
    pub(crate) fn insert(&self, lba: u64, b: u32) -> Option<u32> {
        self.shard(lba).insert(lba, b)
    }

    /// Removes `lba` only if it still maps to `b`.
    pub(crate) fn remove_if(&self, lba: u64, b: u32) -> bool {
        let mut s = self.shard(lba);
        if s.get(&lba) == Some(&b) {
            s.remove(&lba);
            true
        } else {
            false
        }
    }

    /// Number of mapped LBAs.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}

/// Free blocks: a global lock-free queue, refilled into per-core caches in
/// batches by the writers.
pub(crate) struct FreePool {
    queue: ArrayQueue<u32>,
    /// Blocks waiting in the queue (approximate under concurrency).
    count: AtomicU64,
}

impl FreePool {
    pub(crate) fn new(n: usize) -> Arc<FreePool> {
        Arc::new(FreePool {
            queue: ArrayQueue::new(n.max(1)),
            count: AtomicU64::new(0),
        })
    }

    pub(crate) fn push(&self, b: u32) {
        // Capacity equals the block count, so a push cannot fail unless a
        // block is freed twice — which the state CAS prevents.
        if self.queue.push(b).is_err() {
            tracing::error!("writecache: free pool overflow on block {b} (double free?)");
            return;
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn pop(&self) -> Option<u32> {
        let b = self.queue.pop()?;
        self.count.fetch_sub(1, Ordering::Relaxed);
        Some(b)
    }

    pub(crate) fn len(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Returns `blocks` to the pool once every reader pinned now has
    /// unpinned (one deferred closure per batch).
    pub(crate) fn free_after_grace(self: &Arc<Self>, blocks: Vec<u32>) {
        if blocks.is_empty() {
            return;
        }
        let me = self.clone();
        let guard = crossbeam::epoch::pin();
        guard.defer(move || {
            for b in blocks {
                me.push(b);
            }
        });
        // Push the deferred work out promptly so freed blocks return soon.
        guard.flush();
    }
}
