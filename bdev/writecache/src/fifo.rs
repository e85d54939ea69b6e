//! The writeback queue: committed blocks, oldest commit first, 4 bytes per
//! block (home reactor only).
//!
//! A block is in the queue at most once (a bitset says which are), so the
//! queue never outgrows the cache however often blocks are freed and
//! reused. Entries are not removed when their block is freed or rewritten:
//! the writeback checks each block it pops (valid, committed, idle) and a
//! block re-committed while still queued keeps its older place, which only
//! makes it go out a little earlier. Commit times are kept per commit
//! batch, not per block, for `max_age_ms`.

use std::collections::VecDeque;

pub(crate) struct WbQueue {
    ring: VecDeque<u32>,
    queued: Box<[u64]>,
    /// (position, commit time in ms) of the first block of each commit
    /// batch still in the queue, oldest first.
    marks: VecDeque<(u64, u32)>,
    /// Position of the front block (positions only grow, except when a
    /// popped block is put back in front).
    head: u64,
}

/// Where positions start, so putting blocks back in front never wraps.
const FIRST_POSITION: u64 = 1 << 62;

impl WbQueue {
    /// A queue for a cache of `n` blocks.
    pub(crate) fn new(n: usize) -> WbQueue {
        WbQueue {
            ring: VecDeque::with_capacity(n),
            queued: vec![0; n.div_ceil(64)].into_boxed_slice(),
            marks: VecDeque::new(),
            head: FIRST_POSITION,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ring.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Whether block `b` is queued.
    pub(crate) fn contains(&self, b: u32) -> bool {
        self.queued[b as usize / 64] & (1 << (b % 64)) != 0
    }

    fn mark(&mut self, b: u32, on: bool) {
        let (w, bit) = (b as usize / 64, 1u64 << (b % 64));
        if on {
            self.queued[w] |= bit;
        } else {
            self.queued[w] &= !bit;
        }
    }

    /// Appends `b`, committed at `now_ms`, unless it is queued already.
    pub(crate) fn push_back(&mut self, b: u32, now_ms: u32) -> bool {
        if self.contains(b) {
            return false;
        }
        self.mark(b, true);
        let pos = self.head + self.ring.len() as u64;
        if self.marks.back().is_none_or(|&(_, t)| t != now_ms) {
            self.marks.push_back((pos, now_ms));
        }
        self.ring.push_back(b);
        true
    }

    /// Takes the oldest block.
    pub(crate) fn pop_front(&mut self) -> Option<u32> {
        let b = self.ring.pop_front()?;
        self.mark(b, false);
        self.head += 1;
        if self.ring.is_empty() {
            self.marks.clear();
        } else {
            while self.marks.len() >= 2 && self.marks[1].0 <= self.head {
                self.marks.pop_front();
            }
        }
        Some(b)
    }

    /// Puts a popped block back in front (it keeps the front's age).
    pub(crate) fn push_front(&mut self, b: u32) {
        if self.contains(b) {
            return;
        }
        self.mark(b, true);
        self.head -= 1;
        if self.marks.is_empty() {
            // Its commit time went with its batch's mark: count it as the
            // oldest possible, so it goes out first.
            self.marks.push_back((self.head, 0));
        }
        self.ring.push_front(b);
    }

    /// Commit time of the front block (ms since the instance started).
    pub(crate) fn front_at_ms(&self) -> Option<u32> {
        if self.ring.is_empty() {
            return None;
        }
        self.marks.front().map(|&(_, t)| t)
    }

    /// Bytes of RAM the queue holds.
    pub(crate) fn ram_bytes(&self) -> usize {
        self.ring.capacity() * 4 + self.queued.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_block_is_queued_at_most_once() {
        let mut q = WbQueue::new(4);
        assert!(q.push_back(1, 10));
        assert!(q.push_back(2, 10));
        assert!(!q.push_back(1, 11), "already queued");
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop_front(), Some(1));
        assert!(!q.contains(1));
        assert!(q.push_back(1, 12), "queued again once popped");
        assert_eq!(
            (q.pop_front(), q.pop_front(), q.pop_front()),
            (Some(2), Some(1), None)
        );
        assert!(q.is_empty());
    }

    #[test]
    fn never_outgrows_the_cache() {
        // Blocks freed and reused many times over never pile up.
        let n = 64;
        let mut q = WbQueue::new(n);
        for round in 0..1000u32 {
            for b in 0..n as u32 {
                q.push_back((b * 7 + round) % n as u32, round);
            }
            assert!(q.len() <= n);
            if round % 3 == 0 {
                q.pop_front();
            }
        }
        assert_eq!(q.ring.capacity(), n, "no reallocation");
    }

    #[test]
    fn front_age_follows_commit_batches() {
        let mut q = WbQueue::new(8);
        assert_eq!(q.front_at_ms(), None);
        q.push_back(0, 5);
        q.push_back(1, 5);
        q.push_back(2, 9);
        q.push_back(3, 20);
        assert_eq!(q.front_at_ms(), Some(5));
        q.pop_front();
        assert_eq!(q.front_at_ms(), Some(5));
        q.pop_front();
        assert_eq!(q.front_at_ms(), Some(9));
        // Put back in front: at least as old as the front was.
        let b = q.pop_front().unwrap();
        assert_eq!(q.front_at_ms(), Some(20));
        q.push_front(b);
        assert!(q.front_at_ms().unwrap() <= 20);
        assert_eq!(q.pop_front(), Some(2));
        assert_eq!(q.front_at_ms(), Some(20));
        q.pop_front();
        assert_eq!(q.front_at_ms(), None);
        // A block put back into an empty queue counts as oldest.
        q.push_front(6);
        assert_eq!(q.front_at_ms(), Some(0));
        q.push_back(7, 30);
        assert_eq!(q.pop_front(), Some(6));
        assert_eq!(q.front_at_ms(), Some(30));
    }

    #[test]
    fn ram_is_about_four_bytes_per_block() {
        let q = WbQueue::new(1 << 20);
        let per = q.ram_bytes() as f64 / (1 << 20) as f64;
        assert!((4.0..4.2).contains(&per), "{per}");
    }
}
