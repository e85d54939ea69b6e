//! Per-core counters (single writer each), summed on demand into the
//! status dm-writecache reports plus our own additions.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Counters of one core.
#[derive(Default)]
pub(crate) struct CoreStats {
    pub(crate) read_blocks: AtomicU64,
    pub(crate) read_hits: AtomicU64,
    pub(crate) write_blocks: AtomicU64,
    pub(crate) write_hits_uncommitted: AtomicU64,
    pub(crate) write_hits_committed: AtomicU64,
    pub(crate) writes_around: AtomicU64,
    pub(crate) writes_allocate: AtomicU64,
    pub(crate) writes_blocked_on_freelist: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) discards: AtomicU64,
    /// Blocks written since the last commit (reset by the commit).
    pub(crate) uncommitted: AtomicU64,
    /// Free blocks held in this core's allocation cache.
    pub(crate) free_cached: AtomicU64,
    /// Writes waiting on this core for a free block.
    pub(crate) waiting: AtomicU64,
    /// Blocks those writes still need (pmem mode; ssd mode counts its
    /// waiting writes in `waiting` alone and leaves this 0).
    pub(crate) waiting_blocks: AtomicU64,
    /// I/O accepted on this core and not completed yet (suspend drains it).
    pub(crate) inflight: AtomicU64,
    /// Completed read latencies: bucket i counts [2^i, 2^(i+1)) ns.
    pub(crate) read_lat: LatencyHistogram,
    /// Completed write latencies (FUA writes include their commit).
    pub(crate) write_lat: LatencyHistogram,
}

/// A log2 latency histogram with a single writer (the owning core).
pub(crate) struct LatencyHistogram([AtomicU64; 40]);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl LatencyHistogram {
    #[inline]
    pub(crate) fn record(&self, ns: u64) {
        let b = (63 - ns.max(1).leading_zeros() as usize).min(39);
        inc(&self.0[b], 1);
    }

    fn clear(&self) {
        for a in &self.0 {
            a.store(0, Relaxed);
        }
    }

    fn add_to(&self, total: &mut [u64; 40]) {
        for (t, a) in total.iter_mut().zip(&self.0) {
            *t += a.load(Relaxed);
        }
    }
}

/// Latency percentiles in microseconds (upper bounds of log2 buckets).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencyPercentiles {
    /// Completed operations counted.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
}

impl LatencyPercentiles {
    fn from_buckets(b: &[u64; 40]) -> Self {
        let count: u64 = b.iter().sum();
        let pct = |p: f64| {
            if count == 0 {
                return 0.0;
            }
            let want = ((p / 100.0) * count as f64).ceil().max(1.0) as u64;
            let mut acc = 0;
            for (i, n) in b.iter().enumerate() {
                acc += n;
                if acc >= want {
                    return (1u64 << (i + 1)) as f64 / 1000.0;
                }
            }
            0.0
        };
        LatencyPercentiles {
            count,
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            p999: pct(99.9),
        }
    }
}

/// Nanoseconds per tick in 32.32 fixed point, computed once.
static NS_PER_TICK_Q32: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    ((1_000_000_000u128 << 32) / wc_reactor::tick::tick_rate().max(1) as u128).min(u64::MAX as u128)
        as u64
});

/// A tick delta in nanoseconds: a multiply and a shift (every I/O records
/// its latency; the exact conversion divides 128-bit numbers).
#[inline]
pub(crate) fn ticks_to_ns(delta: u64) -> u64 {
    ((delta as u128 * *NS_PER_TICK_Q32 as u128) >> 32).min(u64::MAX as u128) as u64
}

#[inline]
pub(crate) fn inc(a: &AtomicU64, n: u64) {
    // Single writer per core: no read-modify-write needed.
    a.store(a.load(Relaxed).wrapping_add(n), Relaxed);
}

/// What `bdev_writecache_get_stats` returns, dm-writecache's status fields
/// first, in its order.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    /// 0, or the errno of the error state.
    pub error: i32,
    /// Cache blocks.
    pub blocks: u64,
    /// Free cache blocks.
    pub free_blocks: u64,
    /// Blocks being written back now.
    pub writeback_blocks: u64,
    /// Of the free blocks, those still in their epoch grace period (not
    /// allocatable until every reader that may see them has moved on).
    pub free_blocks_in_grace: u64,
    /// RAM the instance keeps for its blocks (state, index, free pool,
    /// writeback queue), in bytes.
    pub metadata_ram_bytes: u64,
    /// Blocks read.
    pub read_blocks: u64,
    /// Blocks read from the cache.
    pub read_hits: u64,
    /// Blocks written.
    pub write_blocks: u64,
    /// Writes to a block already cached and not yet committed.
    pub write_hits_uncommitted: u64,
    /// Writes to a block already cached and committed.
    pub write_hits_committed: u64,
    /// Writes that bypassed the cache.
    pub writes_around: u64,
    /// Writes that allocated a cache block.
    pub writes_allocate: u64,
    /// Writes that waited for a free block.
    pub writes_blocked_on_freelist: u64,
    /// FLUSH requests (and FUA writes).
    pub flushes: u64,
    /// UNMAP requests.
    pub discards: u64,
    /// Blocks written but not committed.
    pub dirty_uncommitted: u64,
    /// Blocks cached and not yet written back (committed or not).
    pub dirty: u64,
    /// Commits that advanced the superblock sequence.
    pub commits: u64,
    /// Superblock sequence count.
    pub seq_count: u64,
    /// Origin write I/Os issued by writeback.
    pub writeback_ios: u64,
    /// Bytes written back to the origin.
    pub writeback_bytes: u64,
    /// Blocks written back.
    pub writeback_completed_blocks: u64,
    /// Writeback I/Os retried after an origin error.
    pub writeback_retries: u64,
    /// Read latency percentiles (µs, log2 bucket bounds).
    pub read_latency_us: LatencyPercentiles,
    /// Write latency percentiles (µs, log2 bucket bounds).
    pub write_latency_us: LatencyPercentiles,
}

impl Stats {
    /// Fills the latency percentiles from every core's histograms.
    pub(crate) fn add_latencies<'a>(&mut self, cores: impl Iterator<Item = &'a CoreStats>) {
        let (mut r, mut w) = ([0u64; 40], [0u64; 40]);
        for c in cores {
            c.read_lat.add_to(&mut r);
            c.write_lat.add_to(&mut w);
        }
        self.read_latency_us = LatencyPercentiles::from_buckets(&r);
        self.write_latency_us = LatencyPercentiles::from_buckets(&w);
    }

    pub(crate) fn add_core(&mut self, c: &CoreStats) {
        self.read_blocks += c.read_blocks.load(Relaxed);
        self.read_hits += c.read_hits.load(Relaxed);
        self.write_blocks += c.write_blocks.load(Relaxed);
        self.write_hits_uncommitted += c.write_hits_uncommitted.load(Relaxed);
        self.write_hits_committed += c.write_hits_committed.load(Relaxed);
        self.writes_around += c.writes_around.load(Relaxed);
        self.writes_allocate += c.writes_allocate.load(Relaxed);
        self.writes_blocked_on_freelist += c.writes_blocked_on_freelist.load(Relaxed);
        self.flushes += c.flushes.load(Relaxed);
        self.discards += c.discards.load(Relaxed);
        self.dirty_uncommitted += c.uncommitted.load(Relaxed);
        self.free_blocks += c.free_cached.load(Relaxed);
    }
}

impl CoreStats {
    pub(crate) fn clear(&self) {
        for a in [
            &self.read_blocks,
            &self.read_hits,
            &self.write_blocks,
            &self.write_hits_uncommitted,
            &self.write_hits_committed,
            &self.writes_around,
            &self.writes_allocate,
            &self.writes_blocked_on_freelist,
            &self.flushes,
            &self.discards,
        ] {
            a.store(0, Relaxed);
        }
        self.read_lat.clear();
        self.write_lat.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_to_ns_matches_the_exact_conversion() {
        let rate = wc_reactor::tick::tick_rate();
        for delta in [0, 1, 7, 1000, rate / 1000, rate, 3600 * rate] {
            let exact = wc_reactor::tick::ticks_to_duration(delta).as_nanos() as u64;
            let fast = ticks_to_ns(delta);
            // 32 fraction bits: off by at most 1 ns per 4 s measured.
            assert!(
                exact.abs_diff(fast) <= 1 + exact / (1 << 30),
                "{delta}: {exact} vs {fast}"
            );
        }
    }
}
