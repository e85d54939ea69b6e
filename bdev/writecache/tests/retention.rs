//! Retention under repeated overwrites: a cache with room for a range
//! keeps every LBA of it cached however often the range is rewritten with
//! multi-block writes spanning many commits (each commit superseding most
//! of the blocks the one before it wrote), and the block accounting stays
//! exact (free + dirty == blocks, every LBA reads its newest version).
//!
//! A commit's superseded versions must come back to the free pool about as
//! fast as the writes take new blocks: held back (in pmem mode they were
//! once cleared a few per reactor iteration after the commit), the pool
//! runs dry, a writer waits for a block, and waiting writers start the
//! writeback of everything committed regardless of the watermarks — which
//! drops written-back LBAs from the cache (lost hits, not lost data).

mod wcrig;

use wc_writecache::{CreateOpts, Mode};
use wcrig::{with_mode, Layer, Rig, Slot, WAIT};

/// LBAs rewritten (cache blocks of [`wcrig::BS`] bytes).
const LBAS: u64 = 512;
/// Write sizes, in blocks, used in turn (a 128 KiB write of 4 KiB blocks
/// is 32): no two consecutive passes split the range alike.
const SIZES: [u64; 5] = [24, 8, 40, 16, 32];
/// Writes submitted at once before the rig polls (the queue depth).
const DEPTH: usize = 4;
/// Times the whole range is rewritten.
const PASSES: u64 = 24;
/// Blocks per commit (the pmem default, set for ssd mode too).
const AUTOCOMMIT: u64 = 64;
/// Cache blocks beyond the range: room for the blocks of two bursts of
/// writes (the largest writes) and the versions they supersede, which a
/// commit frees.
const SLACK: u64 = 4 * DEPTH as u64 * 40;

/// Options of these rigs: commits every [`AUTOCOMMIT`] blocks only (no
/// timer), writeback as `high`/`low` say.
fn tune(high: u32, low: u32) -> impl FnOnce(&mut CreateOpts) {
    move |o| {
        o.autocommit_blocks = Some(AUTOCOMMIT);
        o.autocommit_time_ms = Some(1 << 30);
        o.high_watermark = Some(high);
        o.low_watermark = Some(low);
    }
}

/// Rewrites `[0, LBAS)` [`PASSES`] times (pass `v` writes version `v`),
/// in bursts of [`DEPTH`] writes spread over the rig's reactors, each
/// pass starting at another LBA (wrapping at the end of the range).
fn rewrite_range(rig: &Rig) {
    let reactors = rig.h.len();
    let mut k = 0;
    for v in 1..=PASSES {
        let shift = (v * 37) % LBAS;
        let mut done = 0;
        while done < LBAS {
            let mut burst: Vec<(u64, u64, Slot)> = Vec::with_capacity(DEPTH);
            while burst.len() < DEPTH && done < LBAS {
                let lba = (shift + done) % LBAS;
                let n = SIZES[k % SIZES.len()].min(LBAS - done).min(LBAS - lba);
                burst.push((lba, n, rig.submit_write_run(k % reactors, lba, n, v)));
                k += 1;
                done += n;
            }
            for (lba, n, s) in &burst {
                assert_eq!(rig.wait(s), Ok(None), "pass {v}: write {lba}+{n}");
            }
        }
    }
}

/// Polls until every freed block is back and no writeback is in flight;
/// returns the stats then, checking the accounting is exact.
fn settled(rig: &Rig) -> wc_writecache::Stats {
    let at_rest = |s: &wc_writecache::Stats| {
        s.free_blocks + s.dirty == s.blocks
            && s.free_blocks_in_grace == 0
            && s.writeback_blocks == 0
    };
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let ok = rig.wait_stats(WAIT, at_rest);
        let s = rig.stats();
        assert!(ok, "blocks leaked or freed twice: {s:?}");
        assert_eq!(s.error, 0, "{s:?}");
        // Nothing in flight can also be the gap between two writeback
        // batches (a share retired on one reactor, home not yet kicked):
        // at rest only if the writeback stays still a while longer.
        rig.pump_for(std::time::Duration::from_millis(30));
        let later = rig.stats();
        if at_rest(&later) && later.writeback_ios == s.writeback_ios {
            return later;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writeback never came to rest: {later:?}"
        );
    }
}

/// Every LBA reads its newest version (pass [`PASSES`]); returns how many
/// reads hit.
fn read_back(rig: &Rig) -> u64 {
    let hits = rig.stats().read_hits;
    for lba in 0..LBAS {
        let r = (lba % rig.h.len() as u64) as usize;
        assert_eq!(rig.read_block(r, lba), Ok(Some((lba, PASSES))), "lba {lba}");
    }
    rig.stats().read_hits - hits
}

/// Drains the cache: afterwards the origin holds every LBA's newest
/// version and every cache block is free.
fn drain_to_origin(rig: &Rig) {
    assert_eq!(rig.flush_rpc(), Ok(()));
    let s = settled(rig);
    assert_eq!((s.dirty, s.free_blocks), (0, s.blocks), "{s:?}");
    for lba in 0..LBAS {
        assert_eq!(
            rig.origin_block(lba),
            Some((lba, PASSES)),
            "origin lba {lba}"
        );
    }
}

/// Writeback off (watermarks at 100%): the cache holds the range and
/// room for what two bursts of writes take, so no writer ever waits, no
/// block is written back, and every LBA is still cached afterwards.
fn repeated_overwrites_keep_every_lba_cached() {
    for reactors in [1, 2] {
        let rig = Rig::new(reactors, LBAS + SLACK, LBAS, Layer::Plain, tune(100, 100));
        rewrite_range(&rig);
        let s = settled(&rig);
        assert_eq!(
            (s.writes_blocked_on_freelist, s.writeback_completed_blocks),
            (0, 0),
            "{reactors} reactors: a writer waited for a block, and the writeback \
             it started dropped cached LBAs: {s:?}"
        );
        assert_eq!(
            s.dirty, LBAS,
            "{reactors} reactors: LBAs lost from the cache: {s:?}"
        );
        assert_eq!(s.write_blocks, LBAS * PASSES, "{s:?}");
        assert_eq!(
            read_back(&rig),
            LBAS,
            "{reactors} reactors: every read hits"
        );
        drain_to_origin(&rig);
    }
}

/// Writeback on (low watermarks): the same rewrites while blocks go out;
/// reads return the newest version whether cached or written back, every
/// cached LBA is a hit, and the accounting is exact throughout.
fn repeated_overwrites_under_writeback_stay_exact() {
    for reactors in [1, 2] {
        let rig = Rig::new(reactors, LBAS + SLACK, LBAS, Layer::Plain, tune(30, 20));
        rewrite_range(&rig);
        let s = settled(&rig);
        assert!(s.writeback_completed_blocks > 0, "the writeback ran: {s:?}");
        assert_eq!(s.write_blocks, LBAS * PASSES, "{s:?}");
        let dirty = s.dirty;
        assert_eq!(
            read_back(&rig),
            dirty,
            "{reactors} reactors: cached LBAs hit"
        );
        drain_to_origin(&rig);
    }
}

/// Every case in both modes, on one test thread: a grace period ends once
/// every thread pinned in the process has moved on, and the pins of tests
/// running beside these would decide when freed blocks come back — and
/// whether a writer finds the pool empty.
#[test]
fn repeated_overwrites_in_both_modes() {
    for mode in [Mode::Pmem, Mode::Ssd] {
        with_mode(mode, || {
            repeated_overwrites_keep_every_lba_cached();
            repeated_overwrites_under_writeback_stay_exact();
        });
    }
}
