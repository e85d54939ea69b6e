//! # wc-sim: deterministic crash simulators
//!
//! Test support for the project's core promise, crash consistency. Two
//! media that "lose power" on demand, reproducibly from a `u64` seed:
//!
//! - [`SimPmem`]: byte-addressable persistent memory under the x86 ADR
//!   model. Stores are visible at once but only *pending* until a `fence`
//!   **on the same core** (the reactor index) completes; a crash keeps the
//!   durable words plus a random subset of the pending ones, tracked at
//!   8-byte granularity.
//! - [`SimDisk`]: a block device with a volatile write cache. Writes are
//!   visible at once, durable after a FLUSH (or when written with FUA); a
//!   crash keeps a random subset of the unflushed writes, optionally torn
//!   at 512-byte sector boundaries.
//!
//! Both count *persistence points* (fences, flushes, FUA writes and, unless
//! turned off, every store/write) and can "cut the power" at point K
//! ([`SimPmem::set_crash_at`], [`SimDisk::set_crash_at`]): the code under
//! test keeps running on working media, but crash images are taken as of
//! point K. The usual loop (see `tests/explore.rs`): run the workload once
//! to count its points, then for every K re-run it cut at K and check the
//! recovery invariant on the images of several seeds. [`sim_pmem_bdev`] and [`sim_disk_bdev`]
//! register them as bdevs; `from_image` "reboots" from a crash image.
//!
//! Panics in this crate are deliberate assertions on misuse by a test
//! (out-of-range stores, crash points already passed).

#![warn(missing_docs)]

mod bdev;
mod disk;
mod pmem;

pub use bdev::{
    delete, register_disk_bdev, register_pmem_bdev, sim_disk_bdev, sim_pmem_bdev, SIM_DISK_MODULE,
    SIM_PMEM_MODULE,
};
pub use disk::{SimDisk, SECTOR_SIZE};
pub use pmem::SimPmem;
pub use rand;

use rand::rngs::StdRng;
use rand::SeedableRng;

/// What kind of event a persistence point was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointKind {
    /// A pmem `write_nt`/`write_u64` (only counted when stores count).
    Store,
    /// A pmem `fence`.
    Fence,
    /// A disk write without FUA (only counted when writes count).
    Write,
    /// A disk write with FUA.
    FuaWrite,
    /// A disk FLUSH.
    Flush,
}

/// One persistence point, as reported to a point hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// 1-based running number of the point (the state "at point K" is the
    /// state right after the event numbered K; point 0 is the start).
    pub index: u64,
    /// What happened.
    pub kind: PointKind,
    /// The core (reactor index, 0 off-reactor) that did it.
    pub core: usize,
}

/// Callback run after every persistence point, outside the simulator's
/// locks. It must not store to, fence, write or flush the same simulator.
pub type PointHook = Box<dyn FnMut(Point) + Send>;

/// The core the caller runs on, as the simulators see it: the current
/// reactor's index (logical reactors of a `Harness` share one OS thread,
/// so the thread would be wrong), or 0 off-reactor.
pub fn current_core() -> usize {
    wc_reactor::try_current().map(|r| r.index()).unwrap_or(0)
}

/// A seeded generator: every random choice of a crash comes from it.
pub fn rng_from_seed(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// The seed from `WC_SIM_SEED` when set (to replay a failure), else
/// `default`.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("WC_SIM_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// Prints the seed when dropped during a panic, so a failing crash test
/// always says how to replay it: `let _g = SeedReport::new(seed);`.
#[derive(Debug)]
pub struct SeedReport {
    seed: u64,
}

impl SeedReport {
    /// Reports `seed` if the current thread panics while the guard lives.
    pub fn new(seed: u64) -> SeedReport {
        SeedReport { seed }
    }
}

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "wc-sim: failing seed = {} (replay with WC_SIM_SEED={})",
                self.seed, self.seed
            );
        }
    }
}

/// Shared bookkeeping of persistence points and the crash-at-K cut.
#[derive(Debug, Default)]
pub(crate) struct Points {
    pub(crate) count: u64,
    pub(crate) crash_at: Option<u64>,
}

impl Points {
    /// Counts one point; true when this point is the crash point.
    pub(crate) fn hit(&mut self) -> bool {
        self.count += 1;
        self.crash_at == Some(self.count)
    }
}
