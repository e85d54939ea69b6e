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
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Allocation generation (high 32 bits) and VALID | WB (low 32 bits),
    /// in one word so that checking the generation and changing the state
    /// is a single compare-and-swap (no reuse can slip in between).
    gs: AtomicU64,
}

impl BlockMeta {
    #[inline]
    fn pack(gen: u32, state: u32) -> u64 {
        (gen as u64) << 32 | state as u64
    }

    /// Allocation generation.
    #[inline]
    pub(crate) fn gen(&self) -> u32 {
        (self.gs.load(Ordering::Acquire) >> 32) as u32
    }

    /// VALID | WB bits.
    #[inline]
    pub(crate) fn state(&self) -> u32 {
        self.gs.load(Ordering::Acquire) as u32
    }

    /// Sets generation and state together (the owner of the block only).
    #[inline]
    pub(crate) fn set(&self, gen: u32, state: u32) {
        self.gs.store(Self::pack(gen, state), Ordering::Release);
    }
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
        self.get(b)
            .gs
            .compare_exchange(
                BlockMeta::pack(gen, VALID),
                BlockMeta::pack(gen, 0),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Marks `b` as under writeback if it is still allocation `gen` and idle.
    pub(crate) fn begin_writeback(&self, b: u32, gen: u32) -> bool {
        self.get(b)
            .gs
            .compare_exchange(
                BlockMeta::pack(gen, VALID),
                BlockMeta::pack(gen, VALID | WB),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Ends writeback of `b`, leaving it VALID.
    pub(crate) fn end_writeback(&self, b: u32) {
        self.get(b).gs.fetch_and(!(WB as u64), Ordering::AcqRel);
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
    /// Freed blocks waiting for their grace period (counted as free for
    /// the watermarks: nobody can allocate them, but they are not in use).
    grace: AtomicU64,
}

impl FreePool {
    pub(crate) fn new(n: usize) -> Arc<FreePool> {
        Arc::new(FreePool {
            queue: ArrayQueue::new(n.max(1)),
            grace: AtomicU64::new(0),
        })
    }

    pub(crate) fn push(&self, b: u32) {
        // Capacity equals the block count, so a push cannot fail unless a
        // block is freed twice — which the state CAS prevents.
        if self.queue.push(b).is_err() {
            tracing::error!("writecache: free pool overflow on block {b} (double free?)");
        }
    }

    pub(crate) fn pop(&self) -> Option<u32> {
        self.queue.pop()
    }

    /// Blocks freed but still in their grace period.
    pub(crate) fn in_grace(&self) -> u64 {
        self.grace.load(Ordering::Relaxed)
    }

    pub(crate) fn len(&self) -> u64 {
        // The queue's own count: a separate counter updated after the push
        // or pop could be observed mid-way and wrap below zero.
        self.queue.len() as u64
    }

    /// Returns `blocks` to the pool once every reader pinned now has
    /// unpinned (one deferred closure per batch).
    pub(crate) fn free_after_grace(self: &Arc<Self>, blocks: Vec<u32>) {
        if blocks.is_empty() {
            return;
        }
        let me = self.clone();
        let n = blocks.len() as u64;
        self.grace.fetch_add(n, Ordering::Relaxed);
        let guard = crossbeam::epoch::pin();
        guard.defer(move || {
            for b in blocks {
                me.push(b);
            }
            me.grace.fetch_sub(n, Ordering::Relaxed);
        });
        // Push the deferred work out promptly so freed blocks return soon.
        guard.flush();
    }
}

#[cfg(test)]
mod tests {
    //! Model tests: `Index` against a `HashMap`, the `Meta` free/writeback
    //! protocol against a small state machine, `FreePool` against a bounded
    //! queue. Seeded and deterministic.

    use super::*;
    use std::collections::VecDeque;

    /// xorshift64: tiny, seeded, reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// LBAs that exercise the sharding: dense small ones, pairs that share a
    /// shard ((lba ^ lba >> 8) & 255 is 0 for 0, 257, 514...), and huge ones.
    fn pick_lba(rng: &mut Rng) -> u64 {
        match rng.below(4) {
            0 | 1 => rng.below(64),
            2 => rng.below(8) * 257,
            _ => u64::MAX - rng.below(4),
        }
    }

    #[test]
    fn index_matches_hashmap_model() {
        for seed in [1u64, 0xDEAD_BEEF, 0x1234_5678_9ABC_DEF1] {
            let mut rng = Rng(seed);
            let index = Index::new(16);
            let mut model: HashMap<u64, u32> = HashMap::new();
            for op in 0..20_000 {
                let lba = pick_lba(&mut rng);
                match rng.below(10) {
                    0..=3 => {
                        let b = rng.below(32) as u32;
                        assert_eq!(
                            index.insert(lba, b),
                            model.insert(lba, b),
                            "seed {seed} op {op}: insert({lba}, {b})"
                        );
                    }
                    4..=5 => {
                        // Half the time the current block, else any block.
                        let b = match model.get(&lba) {
                            Some(&b) if rng.below(2) == 0 => b,
                            _ => rng.below(32) as u32,
                        };
                        let want = model.get(&lba) == Some(&b);
                        if want {
                            model.remove(&lba);
                        }
                        assert_eq!(
                            index.remove_if(lba, b),
                            want,
                            "seed {seed} op {op}: remove_if({lba}, {b})"
                        );
                    }
                    _ => assert_eq!(
                        index.get(lba),
                        model.get(&lba).copied(),
                        "seed {seed} op {op}: get({lba})"
                    ),
                }
                if op % 64 == 0 {
                    assert_eq!(index.len(), model.len(), "seed {seed} op {op}: len");
                }
            }
            for (&lba, &b) in &model {
                assert_eq!(index.get(lba), Some(b));
            }
            assert_eq!(index.len(), model.len());
        }
    }

    #[test]
    fn index_remove_if_only_removes_the_named_block() {
        let index = Index::new(0);
        assert_eq!(index.len(), 0);
        assert_eq!(index.insert(0, 1), None);
        assert_eq!(index.insert(257, 2), None); // same shard as 0
        assert_eq!(index.insert(0, 3), Some(1));
        assert!(!index.remove_if(0, 1), "stale block must not unmap");
        assert_eq!(index.get(0), Some(3));
        assert!(index.remove_if(0, 3));
        assert!(!index.remove_if(0, 3), "exactly once");
        assert_eq!((index.get(0), index.get(257)), (None, Some(2)));
        assert_eq!(index.len(), 1);
    }

    /// One block of the state-machine model.
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    struct Model {
        gen: u32,
        valid: bool,
        wb: bool,
    }

    /// What the write path does to a block it takes from the free pool.
    fn allocate(meta: &Meta, b: u32) -> u32 {
        let m = meta.get(b);
        let gen = m.gen().wrapping_add(1);
        m.set(gen, VALID);
        gen
    }

    fn observe(meta: &Meta, b: u32) -> Model {
        let m = meta.get(b);
        let s = m.state();
        assert_eq!(s & !(VALID | WB), 0, "unknown state bits {s:#x}");
        Model {
            gen: m.gen(),
            valid: s & VALID != 0,
            wb: s & WB != 0,
        }
    }

    #[test]
    fn meta_free_and_writeback_match_state_machine() {
        const N: u32 = 8;
        let mut rng = Rng(0x05EE_D0FA_CE00);
        let meta = Meta::new(N as usize);
        let mut model = vec![Model::default(); N as usize];
        let mut frees = vec![0u32; N as usize];
        let mut allocs = vec![0u32; N as usize];
        for op in 0..50_000 {
            let b = rng.below(N as u64) as u32;
            let mb = &mut model[b as usize];
            // Mostly the current generation, sometimes a stale or future one.
            let gen = match rng.below(4) {
                0 => mb.gen.wrapping_sub(1 + rng.below(3) as u32),
                1 => mb.gen.wrapping_add(1),
                _ => mb.gen,
            };
            match rng.below(5) {
                // Only free blocks are allocated (they come from the pool).
                0 if !mb.valid && !mb.wb => {
                    mb.gen = mb.gen.wrapping_add(1);
                    mb.valid = true;
                    allocs[b as usize] += 1;
                    assert_eq!(allocate(&meta, b), mb.gen);
                }
                1 => {
                    let want = mb.gen == gen && mb.valid && !mb.wb;
                    if want {
                        mb.valid = false;
                        frees[b as usize] += 1;
                    }
                    assert_eq!(
                        meta.begin_free(b, gen),
                        want,
                        "op {op}: begin_free({b}, {gen}) on {mb:?}"
                    );
                }
                2 => {
                    let want = mb.gen == gen && mb.valid && !mb.wb;
                    if want {
                        mb.wb = true;
                    }
                    assert_eq!(
                        meta.begin_writeback(b, gen),
                        want,
                        "op {op}: begin_writeback({b}, {gen}) on {mb:?}"
                    );
                }
                // Only the writeback ends a writeback it started.
                3 if mb.wb => {
                    mb.wb = false;
                    meta.end_writeback(b);
                }
                _ => {}
            }
            assert_eq!(observe(&meta, b), model[b as usize], "op {op}: block {b}");
        }
        for b in 0..N as usize {
            // Each allocation was freed at most once (the last one may be live).
            let live = u32::from(model[b].valid);
            assert_eq!(frees[b] + live, allocs[b], "block {b}");
            assert!(allocs[b] > 100, "block {b}: the walk reached it");
        }
    }

    #[test]
    fn meta_protocol_scenarios() {
        let meta = Meta::new(2);
        // A fresh block is neither valid nor freeable.
        assert!(!meta.begin_free(0, 0));
        assert!(!meta.begin_writeback(0, 0));
        let g = allocate(&meta, 0);
        assert_eq!(g, 1);
        // Generation mismatch refuses both.
        assert!(!meta.begin_free(0, g + 1));
        assert!(!meta.begin_free(0, g - 1));
        assert!(!meta.begin_writeback(0, g + 1));
        // Under writeback: no free, no second writeback.
        assert!(meta.begin_writeback(0, g));
        assert!(!meta.begin_writeback(0, g));
        assert!(!meta.begin_free(0, g));
        assert_eq!(
            observe(&meta, 0),
            Model {
                gen: g,
                valid: true,
                wb: true
            }
        );
        meta.end_writeback(0);
        assert_eq!(
            observe(&meta, 0),
            Model {
                gen: g,
                valid: true,
                wb: false
            }
        );
        // Exactly once.
        assert!(meta.begin_free(0, g));
        assert!(!meta.begin_free(0, g));
        assert!(!meta.begin_writeback(0, g));
        // A log entry of the old allocation cannot touch the new one.
        let g2 = allocate(&meta, 0);
        assert_eq!(g2, g + 1);
        assert!(!meta.begin_free(0, g));
        assert!(!meta.begin_writeback(0, g));
        assert!(meta.begin_free(0, g2));
        // Blocks are independent.
        let h = allocate(&meta, 1);
        assert!(meta.begin_writeback(1, h));
        assert_eq!(
            observe(&meta, 0),
            Model {
                gen: g2,
                valid: false,
                wb: false
            }
        );
        // Generations wrap without sticking.
        meta.get(1).set(u32::MAX, 0);
        let w = allocate(&meta, 1);
        assert_eq!(w, 0);
        assert!(!meta.begin_free(1, u32::MAX));
        assert!(meta.begin_free(1, 0));
    }

    #[test]
    fn begin_free_races_have_exactly_one_winner() {
        const THREADS: usize = 4;
        const ROUNDS: u32 = 2_000;
        let meta = Meta::new(1);
        let wins = AtomicU64::new(0);
        // Round r: the main thread allocates (generation r + 1), everyone
        // passes `start`, the racers race, everyone passes `end`, the main
        // thread checks.
        let start = std::sync::Barrier::new(THREADS + 1);
        let end = std::sync::Barrier::new(THREADS + 1);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (meta, wins, start, end) = (&meta, &wins, &start, &end);
                s.spawn(move || {
                    for r in 0..ROUNDS {
                        start.wait();
                        let g = r + 1;
                        // Half the racers free, half start a writeback, which
                        // (like `retire`) ends it and then frees.
                        if t % 2 == 0 {
                            if meta.begin_free(0, g) {
                                wins.fetch_add(1, Ordering::Relaxed);
                            }
                        } else if meta.begin_writeback(0, g) {
                            meta.end_writeback(0);
                            if meta.begin_free(0, g) {
                                wins.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        end.wait();
                    }
                });
            }
            for r in 0..ROUNDS {
                wins.store(0, Ordering::Relaxed);
                assert_eq!(allocate(&meta, 0), r + 1);
                start.wait();
                end.wait();
                assert_eq!(wins.load(Ordering::Relaxed), 1, "round {r}: one free");
                assert!(!observe(&meta, 0).valid);
            }
        });
    }

    #[test]
    fn free_pool_matches_bounded_queue_model() {
        const CAP: usize = 16;
        let pool = FreePool::new(CAP);
        let mut model: VecDeque<u32> = VecDeque::new();
        let mut rng = Rng(0xF00D);
        for op in 0..20_000 {
            if rng.below(2) == 0 {
                let b = rng.below(1000) as u32;
                pool.push(b);
                // A push beyond capacity (a double free) is dropped and not
                // counted.
                if model.len() < CAP {
                    model.push_back(b);
                }
            } else {
                assert_eq!(pool.pop(), model.pop_front(), "op {op}: pop");
            }
            assert_eq!(pool.len(), model.len() as u64, "op {op}: len");
        }
    }

    #[test]
    fn free_pool_edges() {
        // Zero blocks still makes a usable (capacity 1) pool.
        let p = FreePool::new(0);
        assert_eq!((p.len(), p.pop()), (0, None));
        p.push(7);
        p.push(8); // overflow: dropped
        assert_eq!(p.len(), 1);
        assert_eq!((p.pop(), p.pop(), p.len()), (Some(7), None, 0));

        let p = FreePool::new(4);
        for b in 0..4 {
            p.push(b);
        }
        p.push(99);
        assert_eq!(p.len(), 4);
        let got: Vec<u32> = std::iter::from_fn(|| p.pop()).collect();
        assert_eq!(got, vec![0, 1, 2, 3], "FIFO, overflow dropped");
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn free_after_grace_returns_every_block_once() {
        let p = FreePool::new(8);
        p.free_after_grace(Vec::new());
        assert_eq!(p.len(), 0);
        p.free_after_grace(vec![3, 1, 4]);
        p.free_after_grace(vec![5]);
        // The blocks come back once the epoch advances past this point.
        let t0 = std::time::Instant::now();
        while p.len() < 4 && t0.elapsed() < std::time::Duration::from_secs(2) {
            crossbeam::epoch::pin().flush();
        }
        assert_eq!(p.len(), 4);
        let mut got: Vec<u32> = std::iter::from_fn(|| p.pop()).collect();
        got.sort_unstable();
        assert_eq!(got, vec![1, 3, 4, 5]);
    }

    #[test]
    fn free_after_grace_waits_for_pinned_readers() {
        let p = FreePool::new(4);
        let reader = crossbeam::epoch::pin();
        p.free_after_grace(vec![2]);
        for _ in 0..64 {
            crossbeam::epoch::pin().flush();
        }
        assert_eq!(p.len(), 0, "reused while a reader that saw it is pinned");
        drop(reader);
        let t0 = std::time::Instant::now();
        while p.len() < 1 && t0.elapsed() < std::time::Duration::from_secs(2) {
            crossbeam::epoch::pin().flush();
        }
        assert_eq!(p.pop(), Some(2));
    }

    /// `push` adds to `count` after the block is in the queue and `pop`
    /// subtracts after taking it, so a pop that overtakes a push's
    /// increment drives `count` below zero: `len()` wraps to u64::MAX.
    /// `stats().free_blocks` then reports 2^64 - 1 and
    /// `Writecache::used_blocks` computes `pool.len() + cached`, which
    /// overflows (a panic with overflow checks, a wrong watermark decision
    /// without). Pushes (grace-period frees, channel teardown,
    /// `return_cached_blocks`) and pops (`alloc`) run on different reactor
    /// threads, so this happens in a real runtime. Fails within
    /// microseconds here; passes in 1 s once fixed (e.g. `len()` from
    /// `queue.len()`, or count up before the queue push).
    #[test]
    fn free_pool_len_never_exceeds_capacity_under_concurrency() {
        use std::sync::atomic::AtomicBool;
        let pool = FreePool::new(4);
        let token = AtomicBool::new(true); // the pusher may push one block
        let stop = AtomicBool::new(false);
        let t0 = std::time::Instant::now();
        let mut worst = 0;
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    if token.swap(false, Ordering::AcqRel) {
                        pool.push(1);
                    }
                }
            });
            while t0.elapsed() < std::time::Duration::from_secs(1) {
                if pool.pop().is_some() {
                    worst = worst.max(pool.len());
                    token.store(true, Ordering::Release);
                    if worst > 4 {
                        break;
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(worst <= 4, "a 4-block pool reported {worst} free blocks");
    }
}
