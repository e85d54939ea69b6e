//! Per-bdev, per-channel I/O statistics. Each [`IoStats`] has exactly one
//! writer (the reactor owning the channel), so updates are plain relaxed
//! load + store, and the RPC thread sums them without stopping anyone.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::io::{IoStatus, IoType};

/// Counters of one channel (one bdev on one reactor).
#[derive(Debug, Default)]
pub struct IoStats {
    read: OpCounters,
    write: OpCounters,
    unmap: OpCounters,
    other_ops: AtomicU64,
    errors: AtomicU64,
}

#[derive(Debug)]
struct OpCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    lat: AtomicU64,
    max: AtomicU64,
    min: AtomicU64,
}

impl Default for OpCounters {
    fn default() -> Self {
        OpCounters {
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            lat: AtomicU64::new(0),
            max: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
        }
    }
}

#[inline]
fn bump(a: &AtomicU64, v: u64) {
    a.store(a.load(Relaxed).wrapping_add(v), Relaxed);
}

impl OpCounters {
    #[inline]
    fn record(&self, bytes: u64, lat: u64) {
        bump(&self.ops, 1);
        bump(&self.bytes, bytes);
        bump(&self.lat, lat);
        if lat > self.max.load(Relaxed) {
            self.max.store(lat, Relaxed);
        }
        if lat < self.min.load(Relaxed) {
            self.min.store(lat, Relaxed);
        }
    }

    fn reset(&self) {
        self.ops.store(0, Relaxed);
        self.bytes.store(0, Relaxed);
        self.lat.store(0, Relaxed);
        self.max.store(0, Relaxed);
        self.min.store(u64::MAX, Relaxed);
    }
}

impl IoStats {
    /// Records one completed I/O (called on the owning reactor only).
    #[inline]
    pub fn record(&self, t: IoType, bytes: u64, latency_ticks: u64, status: IoStatus) {
        if !status.is_success() {
            bump(&self.errors, 1);
            return;
        }
        match t {
            IoType::Read => self.read.record(bytes, latency_ticks),
            IoType::Write => self.write.record(bytes, latency_ticks),
            IoType::Unmap => self.unmap.record(bytes, latency_ticks),
            _ => bump(&self.other_ops, 1),
        }
    }

    /// Zeroes the counters (`bdev_reset_iostat`); racy by nature, as SPDK's.
    pub fn reset(&self) {
        self.read.reset();
        self.write.reset();
        self.unmap.reset();
        self.other_ops.store(0, Relaxed);
        self.errors.store(0, Relaxed);
    }

    /// Adds this channel's counters into `total`.
    pub fn add_to(&self, total: &mut IoStatSnapshot) {
        let add = |c: &OpCounters,
                   ops: &mut u64,
                   bytes: &mut u64,
                   lat: &mut u64,
                   max: &mut u64,
                   min: &mut u64| {
            *ops += c.ops.load(Relaxed);
            *bytes += c.bytes.load(Relaxed);
            *lat += c.lat.load(Relaxed);
            *max = (*max).max(c.max.load(Relaxed));
            *min = (*min).min(c.min.load(Relaxed));
        };
        add(
            &self.read,
            &mut total.num_read_ops,
            &mut total.bytes_read,
            &mut total.read_latency_ticks,
            &mut total.max_read_latency_ticks,
            &mut total.min_read_latency_ticks,
        );
        add(
            &self.write,
            &mut total.num_write_ops,
            &mut total.bytes_written,
            &mut total.write_latency_ticks,
            &mut total.max_write_latency_ticks,
            &mut total.min_write_latency_ticks,
        );
        add(
            &self.unmap,
            &mut total.num_unmap_ops,
            &mut total.bytes_unmapped,
            &mut total.unmap_latency_ticks,
            &mut total.max_unmap_latency_ticks,
            &mut total.min_unmap_latency_ticks,
        );
        total.io_errors += self.errors.load(Relaxed);
    }
}

/// Summed statistics, with SPDK's `bdev_get_iostat` field names.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IoStatSnapshot {
    /// Bytes read.
    pub bytes_read: u64,
    /// Read operations.
    pub num_read_ops: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Write operations.
    pub num_write_ops: u64,
    /// Bytes unmapped.
    pub bytes_unmapped: u64,
    /// Unmap operations.
    pub num_unmap_ops: u64,
    /// Bytes copied (always 0: no copy support).
    pub bytes_copied: u64,
    /// Copy operations (always 0).
    pub num_copy_ops: u64,
    /// Sum of read latencies, ticks.
    pub read_latency_ticks: u64,
    /// Longest read, ticks.
    pub max_read_latency_ticks: u64,
    /// Shortest read, ticks (0 when none).
    pub min_read_latency_ticks: u64,
    /// Sum of write latencies.
    pub write_latency_ticks: u64,
    /// Longest write.
    pub max_write_latency_ticks: u64,
    /// Shortest write.
    pub min_write_latency_ticks: u64,
    /// Sum of unmap latencies.
    pub unmap_latency_ticks: u64,
    /// Longest unmap.
    pub max_unmap_latency_ticks: u64,
    /// Shortest unmap.
    pub min_unmap_latency_ticks: u64,
    /// Sum of copy latencies (0).
    pub copy_latency_ticks: u64,
    /// Longest copy (0).
    pub max_copy_latency_ticks: u64,
    /// Shortest copy (0).
    pub min_copy_latency_ticks: u64,
    /// Failed I/O of any type.
    #[serde(skip)]
    pub io_errors: u64,
}

impl Default for IoStatSnapshot {
    fn default() -> Self {
        IoStatSnapshot {
            bytes_read: 0,
            num_read_ops: 0,
            bytes_written: 0,
            num_write_ops: 0,
            bytes_unmapped: 0,
            num_unmap_ops: 0,
            bytes_copied: 0,
            num_copy_ops: 0,
            read_latency_ticks: 0,
            max_read_latency_ticks: 0,
            min_read_latency_ticks: u64::MAX,
            write_latency_ticks: 0,
            max_write_latency_ticks: 0,
            min_write_latency_ticks: u64::MAX,
            unmap_latency_ticks: 0,
            max_unmap_latency_ticks: 0,
            min_unmap_latency_ticks: u64::MAX,
            copy_latency_ticks: 0,
            max_copy_latency_ticks: 0,
            min_copy_latency_ticks: 0,
            io_errors: 0,
        }
    }
}

impl IoStatSnapshot {
    /// Replaces the "no sample" sentinel of minimums by 0, as SPDK prints.
    pub fn finish(mut self) -> Self {
        for m in [
            &mut self.min_read_latency_ticks,
            &mut self.min_write_latency_ticks,
            &mut self.min_unmap_latency_ticks,
        ] {
            if *m == u64::MAX {
                *m = 0;
            }
        }
        self
    }
}
