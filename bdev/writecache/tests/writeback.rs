//! Writeback behaviour (design §3.6) on the deterministic logical-reactor
//! harness over a simulated pmem cache and a simulated origin disk: a full
//! cache, watermarks, ordering of overwrites under writeback (with a delay
//! bdev keeping origin writes in flight), cleaner mode, max_age, UNMAP and
//! WRITE_ZEROES.

mod wcrig;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use wcrig::{Layer, Rig, Slot};

fn pct(rig: &Rig) -> u64 {
    let s = rig.stats();
    (s.blocks - s.free_blocks) * 100 / s.blocks
}

fn a_full_cache_blocks_writers_until_writeback_frees_blocks() {
    // Two reactors: per-core free caches must not strand blocks.
    let rig = Rig::new(2, 8, 512, Layer::Plain, |o| {
        o.writeback_jobs = Some(2);
    });
    let n = rig.stats().blocks;
    let distinct = n * 6;
    let mut latest: HashMap<u64, u64> = HashMap::new();
    // Phase 1: many more distinct LBAs than cache blocks, all in flight.
    let pending: Vec<(u64, Slot)> = (0..distinct)
        .map(|lba| {
            latest.insert(lba, 1);
            (lba, rig.submit_write((lba % 2) as usize, lba, 1, false))
        })
        .collect();
    for (lba, s) in &pending {
        assert_eq!(rig.wait(s), Ok(None), "write lba {lba}");
    }
    let s = rig.stats();
    assert!(s.writes_blocked_on_freelist > 0, "{s:?}");
    assert_eq!(s.error, 0);
    // Phase 2: overwrites of some of them (each after its previous write
    // completed), again more than the cache holds, plus FUA writes.
    let pending: Vec<(u64, Slot)> = (0..distinct)
        .step_by(3)
        .map(|lba| {
            latest.insert(lba, 2);
            (
                lba,
                rig.submit_write((lba % 2) as usize, lba, 2, lba % 5 == 0),
            )
        })
        .collect();
    for (lba, s) in &pending {
        assert_eq!(rig.wait(s), Ok(None), "overwrite lba {lba}");
    }
    // Every LBA reads its latest version (from the cache or the origin).
    for (&lba, &v) in &latest {
        assert_eq!(
            rig.read_block((lba % 2) as usize, lba),
            Ok(Some((lba, v))),
            "lba {lba}"
        );
    }
    assert_eq!(rig.flush_rpc(), Ok(()));
    let s = rig.settle();
    assert_eq!(s.error, 0, "{s:?}");
    assert_eq!(s.dirty, 0, "{s:?}");
    assert_eq!(
        s.free_blocks, s.blocks,
        "no block leaked or freed twice: {s:?}"
    );
    assert_eq!(s.write_blocks, distinct + distinct.div_ceil(3), "{s:?}");
    for (&lba, &v) in &latest {
        assert_eq!(rig.origin_block(lba), Some((lba, v)), "origin lba {lba}");
    }
}

/// Writes `lbas` (version 1) and commits them.
fn fill(rig: &Rig, lbas: std::ops::Range<u64>) {
    for lba in lbas {
        rig.write(0, lba, 1);
    }
    rig.flush(0).expect("FLUSH");
}

/// Polls until no writeback is in flight and nothing changed for `quiet`.
fn until_writeback_quiet(rig: &Rig, quiet: Duration) {
    let t0 = Instant::now();
    let mut last = (u64::MAX, u64::MAX);
    let mut since = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        rig.round();
        let s = rig.stats();
        let now = (s.writeback_completed_blocks, s.writeback_blocks);
        if now != last {
            last = now;
            since = Instant::now();
        } else if s.writeback_blocks == 0 && since.elapsed() >= quiet {
            return;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    panic!(
        "writeback never went quiet: {:?}; disk writes {}; origin io stats {:?}",
        rig.stats(),
        rig.disk.write_count(),
        wc_bdev::lookup(&rig.origin_name).map(|b| b.io_stats())
    );
}

fn writeback_starts_at_the_high_watermark_and_ends_below_the_low_one() {
    let (hi, lo) = (50u64, 25u64);
    let rig = Rig::new(1, 40, 512, Layer::Plain, |o| {
        o.high_watermark = Some(hi as u32);
        o.low_watermark = Some(lo as u32);
        o.writeback_jobs = Some(2);
    });
    let n = rig.stats().blocks;
    // Just below the high watermark: nothing is written back.
    let below = (n * hi).div_ceil(100) - 1;
    fill(&rig, 0..below);
    assert!(pct(&rig) < hi);
    rig.pump_for(Duration::from_millis(150));
    let s = rig.stats();
    assert_eq!(s.dirty, below, "{s:?}");
    assert_eq!(
        s.writeback_ios, 0,
        "no writeback below the high watermark: {s:?}"
    );
    assert_eq!(rig.disk.write_count(), 0, "origin untouched");

    // Reaching it starts the writeback.
    fill(&rig, below..below + 2);
    assert!((below + 2) * 100 / n >= hi);
    assert!(
        rig.wait_stats(Duration::from_secs(2), |s| s.writeback_ios > 0),
        "no writeback at {}% used: {:?}",
        (below + 2) * 100 / n,
        rig.stats()
    );
    until_writeback_quiet(&rig, Duration::from_millis(100));
    let s = rig.settle();
    assert!(
        pct(&rig) < lo,
        "writeback stopped at {}% used: {s:?}",
        pct(&rig)
    );
    // Oldest first: no block of the second commit reached the origin
    // while a block of the first one is still only cached.
    let on_origin =
        |r: std::ops::Range<u64>| r.filter(|&l| rig.origin_block(l).is_some()).count() as u64;
    let (first, second) = (on_origin(0..below), on_origin(below..below + 2));
    assert!(
        second == 0 || first == below,
        "not oldest first: {first}/{below} of the first commit and {second}/2 of the second written back"
    );
    let k = first + second;
    eprintln!(
        "DEBUG watermark jobs=2: n {n} dirty {} used% {}",
        s.dirty,
        pct(&rig)
    );
    assert_eq!(k, s.writeback_completed_blocks, "{s:?}");
    assert_eq!(s.dirty, below + 2 - k);
    assert_eq!(s.free_blocks + s.dirty, s.blocks, "{s:?}");
}

/// dm-writecache stops writing back as soon as used blocks (counting
/// blocks under writeback as free) fall below `low_watermark`: the cache
/// keeps about `low_watermark`% of its blocks. Here blocks under writeback
/// and blocks waiting for their grace period still count as used, so the
/// writeback keeps taking batches and drains far below the low watermark.
fn writeback_stops_just_below_the_low_watermark() {
    let (hi, lo) = (50u64, 25u64);
    let rig = Rig::new(1, 40, 512, Layer::Plain, |o| {
        o.high_watermark = Some(hi as u32);
        o.low_watermark = Some(lo as u32);
    });
    let n = rig.stats().blocks;
    let total = (n * hi).div_ceil(100) + 2;
    fill(&rig, 0..total);
    assert!(
        rig.wait_stats(Duration::from_secs(2), |s| s.writeback_ios > 0),
        "{:?}",
        rig.stats()
    );
    until_writeback_quiet(&rig, Duration::from_millis(100));
    let s = rig.settle();
    // Stop at the first point below the low watermark (a block of slack).
    let keep = (n * lo / 100).saturating_sub(2);
    assert!(
        s.dirty >= keep,
        "writeback drained to {} dirty blocks of {n} (low watermark {lo}% = {} blocks): {s:?}",
        s.dirty,
        n * lo / 100
    );
    assert!(pct(&rig) < lo, "{s:?}");
}

fn overwrites_under_writeback_never_leave_older_data_on_the_origin() {
    // Origin writes stay in flight for 2 ms each.
    let rig = Rig::new(2, 16, 256, Layer::Delay(2000), |o| {
        o.high_watermark = Some(0);
        o.low_watermark = Some(0);
        o.writeback_jobs = Some(4);
    });
    let hot = [5u64, 6, 9];
    let mut latest: HashMap<u64, u64> = HashMap::new();
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let check_origin_monotonic = |seen: &mut HashMap<u64, u64>| {
        for &lba in &hot {
            if let Some((l, v)) = rig.origin_block(lba) {
                assert_eq!(l, lba);
                let prev = seen.entry(lba).or_insert(0);
                assert!(
                    v >= *prev,
                    "origin lba {lba} went back from v{prev} to v{v}"
                );
                *prev = v;
            }
        }
    };
    for v in 1..=40u64 {
        for (i, &lba) in hot.iter().enumerate() {
            let r = (v as usize + i) % 2;
            rig.write(r, lba, v);
            latest.insert(lba, v);
        }
        // Commit from alternating reactors; every other round a FUA write.
        if v % 2 == 0 {
            rig.flush((v % 3) as usize % 2).expect("FLUSH");
        } else {
            let s = rig.submit_write(1, 20, v, true);
            assert_eq!(rig.wait(&s), Ok(None));
            latest.insert(20, v);
        }
        // Let some writeback happen (in flight for a while).
        let until = Instant::now() + Duration::from_micros(500 * (v % 7));
        while Instant::now() < until {
            rig.round();
            check_origin_monotonic(&mut seen);
        }
        for (&lba, &want) in &latest {
            assert_eq!(
                rig.read_block(0, lba),
                Ok(Some((lba, want))),
                "read lba {lba} at round {v}"
            );
        }
    }
    let s = rig.stats();
    assert!(s.writeback_completed_blocks > 0, "writeback ran: {s:?}");
    assert!(
        s.write_hits_committed > 0,
        "overwrites of committed blocks happened: {s:?}"
    );
    let flush = rig.start_flush_rpc();
    assert!(rig.pump_until(wcrig::WAIT, || {
        check_origin_monotonic(&mut seen);
        flush.lock().unwrap().is_some()
    }));
    assert_eq!(flush.lock().unwrap().take().unwrap(), Ok(()));
    let s = rig.settle();
    assert_eq!(s.error, 0, "{s:?}");
    assert_eq!(s.dirty, 0, "{s:?}");
    assert_eq!(
        s.free_blocks, s.blocks,
        "every superseded block freed exactly once: {s:?}"
    );
    for (&lba, &v) in &latest {
        assert_eq!(rig.origin_block(lba), Some((lba, v)), "origin lba {lba}");
    }
}

fn cleaner_mode_writes_around_and_drains_everything() {
    let rig = Rig::new(1, 32, 256, Layer::Plain, |_| {});
    fill(&rig, 0..10);
    assert_eq!(rig.stats().dirty, 10);
    rig.set_options(|o| o.cleaner = Some(true));
    // New data for uncached LBAs goes straight to the origin.
    for lba in 100..110 {
        rig.write(0, lba, 1);
        assert_eq!(rig.origin_block(lba), Some((lba, 1)), "written around");
    }
    // Cached LBAs: the overwrite keeps the versions ordered, whether it
    // lands in the cache (still cached) or goes around (already drained).
    rig.write(0, 3, 2);
    rig.flush(0).expect("FLUSH");
    let s = rig.stats();
    assert!(s.writes_around >= 10, "{s:?}");
    assert!(
        rig.wait_stats(Duration::from_secs(3), |s| s.dirty == 0
            && s.writeback_blocks == 0),
        "cleaner did not drain: {:?}",
        rig.stats()
    );
    let s = rig.settle();
    assert_eq!(s.free_blocks, s.blocks, "{s:?}");
    assert_eq!(s.error, 0);
    for lba in (0..10).chain(100..110) {
        let v = if lba == 3 { 2 } else { 1 };
        assert_eq!(rig.origin_block(lba), Some((lba, v)), "origin lba {lba}");
        assert_eq!(rig.read_block(0, lba), Ok(Some((lba, v))));
    }
    // Still cleaning: nothing new gets cached.
    rig.write(0, 50, 1);
    let s = rig.stats();
    assert_eq!(s.dirty, 0, "{s:?}");
    assert_eq!(rig.origin_block(50), Some((50, 1)));
}

fn blocks_older_than_max_age_are_written_back_below_the_watermark() {
    let rig = Rig::new(1, 64, 256, Layer::Plain, |o| {
        o.max_age_ms = Some(300);
    });
    fill(&rig, 0..4);
    let t0 = Instant::now();
    assert!(pct(&rig) < 50);
    rig.pump_for(Duration::from_millis(100));
    assert_eq!(rig.stats().dirty, 4, "too early: {:?}", rig.stats());
    assert!(
        rig.wait_stats(Duration::from_secs(3), |s| s.dirty == 0),
        "old blocks not written back: {:?}",
        rig.stats()
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "written back after {took:?}, before max_age"
    );
    for lba in 0..4 {
        assert_eq!(rig.origin_block(lba), Some((lba, 1)));
    }
    let s = rig.settle();
    assert_eq!(s.free_blocks, s.blocks, "{s:?}");
}

/// max_age writes back the blocks *older* than max_age (dm-writecache
/// stops at the first young entry); younger blocks stay cached while the
/// cache is below the high watermark.
fn max_age_does_not_write_back_young_blocks() {
    let max_age = Duration::from_millis(800);
    let rig = Rig::new(1, 64, 256, Layer::Plain, |o| {
        o.max_age_ms = Some(max_age.as_millis() as u64);
    });
    fill(&rig, 0..2);
    rig.pump_for(Duration::from_millis(400));
    assert_eq!(rig.stats().dirty, 2);
    fill(&rig, 10..12);
    let t_young = Instant::now();
    assert!(
        rig.wait_stats(Duration::from_secs(3), |s| s.writeback_ios > 0),
        "{:?}",
        rig.stats()
    );
    until_writeback_quiet(&rig, Duration::from_millis(20));
    let age = t_young.elapsed();
    if age >= max_age - Duration::from_millis(100) {
        eprintln!("inconclusive: the young blocks were {age:?} old by then");
        return;
    }
    assert_eq!(rig.origin_block(0), Some((0, 1)), "old block written back");
    assert_eq!(rig.origin_block(1), Some((1, 1)), "old block written back");
    assert_eq!(
        (rig.origin_block(10), rig.origin_block(11)),
        (None, None),
        "blocks {age:?} old (max_age {max_age:?}) were written back: {:?}",
        rig.stats()
    );
    assert_eq!(rig.stats().dirty, 2);
}

fn unmap_drops_cached_blocks_and_write_zeroes_reads_back_zeroes() {
    let rig = Rig::new(1, 32, 256, Layer::Plain, |_| {});
    fill(&rig, 0..8);
    // An uncommitted block too.
    rig.write(0, 10, 1);
    assert_eq!(rig.stats().dirty, 9);

    let u = rig.submit_unmap(0, 2, 3);
    assert_eq!(rig.wait(&u), Ok(None));
    let u = rig.submit_unmap(0, 10, 1);
    assert_eq!(rig.wait(&u), Ok(None));
    let s = rig.stats();
    assert_eq!(s.dirty, 5, "UNMAP dropped 4 cached blocks: {s:?}");
    assert_eq!(s.discards, 2);
    for lba in (2..5).chain([10]) {
        assert_eq!(rig.read_block(0, lba), Ok(None), "unmapped lba {lba}");
    }

    // WRITE_ZEROES over a cached block, an uncached one, and a range.
    for (lba, n) in [(6u64, 1u64), (20, 1), (0, 2)] {
        let z = rig.submit_write_zeroes(0, lba, n);
        assert_eq!(rig.wait(&z), Ok(None), "write_zeroes {lba}+{n}");
        for l in lba..lba + n {
            assert_eq!(rig.read_block(0, l), Ok(None), "zeroed lba {l}");
        }
    }
    rig.flush(0).expect("FLUSH");
    assert_eq!(rig.flush_rpc(), Ok(()));
    let s = rig.settle();
    assert_eq!(s.dirty, 0, "{s:?}");
    assert_eq!(s.free_blocks, s.blocks, "{s:?}");
    for lba in [0u64, 1, 2, 3, 4, 6, 10, 20] {
        assert_eq!(rig.origin_block(lba), None, "origin lba {lba}");
        assert_eq!(rig.read_block(0, lba), Ok(None));
    }
    for lba in [5u64, 7] {
        assert_eq!(rig.origin_block(lba), Some((lba, 1)), "origin lba {lba}");
    }
}

fn a_single_write_larger_than_the_cache_completes() {
    let rig = Rig::new(1, 8, 512, Layer::Plain, |_| {});
    let n = rig.stats().blocks;
    let len = 3 * n + 1;
    let mut buf = wc_bdev::DmaBuf::new((len * wcrig::BS as u64) as usize);
    for i in 0..len {
        let at = (i * wcrig::BS as u64) as usize;
        buf[at..at + wcrig::BS as usize].copy_from_slice(&wcrig::content(100 + i, 1));
    }
    let w = rig.submit_write_buf(0, 100, buf, true);
    assert_eq!(rig.wait(&w), Ok(None), "{:?}", rig.stats());
    let s = rig.stats();
    assert!(s.writes_blocked_on_freelist > 0, "{s:?}");
    // Every block counted once, however often the write waited.
    assert_eq!(s.write_blocks, len, "{s:?}");
    let r = rig.submit_read(0, 100, len);
    let data = rig.wait(&r).unwrap().unwrap();
    for i in 0..len {
        let at = (i * wcrig::BS as u64) as usize;
        assert_eq!(
            wcrig::decode(&data[at..at + wcrig::BS as usize]),
            Some((100 + i, 1)),
            "block {i}"
        );
    }
    assert_eq!(rig.flush_rpc(), Ok(()));
    let s = rig.settle();
    assert_eq!(s.free_blocks, s.blocks, "{s:?}");
    for i in 0..len {
        assert_eq!(rig.origin_block(100 + i), Some((100 + i, 1)));
    }
}

/// Two cores overwrite the same sectors concurrently (no write waits for
/// the other) while the writeback runs: whichever version wins, the cache
/// and, after a flush, the origin agree on it, and every superseded block
/// is freed exactly once.
fn concurrent_overwrites_from_two_cores_under_writeback_stay_consistent() {
    let rig = Rig::new(2, 16, 256, Layer::Delay(500), |o| {
        o.high_watermark = Some(10);
        o.low_watermark = Some(0);
        o.autocommit_blocks = Some(4);
        o.autocommit_time_ms = Some(2);
    });
    let hot = [1u64, 2, 3];
    let mut v = 0u64;
    for round in 0..60u64 {
        let mut slots = Vec::new();
        for &lba in &hot {
            for r in 0..2 {
                v += 1;
                slots.push(rig.submit_write(r, lba, v, round % 11 == 0));
            }
        }
        // Interleave the reactors unevenly.
        for i in 0..(round % 5) {
            rig.h.poll((i % 2) as usize);
        }
        for s in &slots {
            assert_eq!(rig.wait(s), Ok(None));
        }
        if round % 7 == 0 {
            rig.flush((round % 2) as usize).unwrap();
        }
    }
    let cached: Vec<_> = hot.iter().map(|&l| rig.read_block(0, l).unwrap()).collect();
    for (&l, c) in hot.iter().zip(&cached) {
        assert_eq!(
            rig.read_block(1, l).unwrap(),
            *c,
            "both cores agree on lba {l}"
        );
    }
    assert_eq!(rig.flush_rpc(), Ok(()));
    let s = rig.settle();
    assert_eq!(s.error, 0, "{s:?}");
    assert_eq!(s.dirty, 0, "{s:?}");
    assert_eq!(
        s.free_blocks, s.blocks,
        "no block leaked or freed twice: {s:?}"
    );
    for (&l, c) in hot.iter().zip(&cached) {
        assert_eq!(rig.origin_block(l), *c, "origin lba {l}");
    }
}

/// In cleaner mode a write of an uncached LBA goes around the cache — but
/// not while an older version of it is still being written back (after an
/// UNMAP removed it from the index): going around would race that
/// writeback and let the older version land after the newer one.
fn cleaner_write_around_is_ordered_after_writeback_of_the_same_lba() {
    use wc_bdev_error::{ErrorType, InjectIoType};
    let rig = Rig::new(1, 32, 256, Layer::Error, |_| {});
    const X: u64 = 9;
    rig.write(0, X, 1);
    rig.flush(0).unwrap();
    // Hold the writeback of X (v1) at the origin.
    wc_bdev_error::inject(&rig.origin_name, InjectIoType::Write, ErrorType::Pending, 1).unwrap();
    rig.set_options(|o| o.cleaner = Some(true));
    assert!(rig.wait_stats(Duration::from_secs(2), |s| s.writeback_blocks == 1));
    let u = rig.submit_unmap(0, X, 1);
    assert_eq!(rig.wait(&u), Ok(None));
    // A new version completes (cached, since X's older version is still
    // going out: going around would race it).
    rig.write(0, X, 2);
    assert_eq!(rig.read_block(0, X), Ok(Some((X, 2))));
    // The older writeback lands now.
    wc_bdev_error::resume_pending(&rig.origin_name).unwrap();
    assert!(rig.wait_stats(Duration::from_secs(2), |s| s.writeback_blocks == 0));
    rig.run_idle();
    assert_eq!(
        rig.read_block(0, X),
        Ok(Some((X, 2))),
        "a completed write was overwritten by an older writeback"
    );
    // Once drained, the origin ends with the newer version.
    assert_eq!(rig.flush_rpc(), Ok(()));
    assert_eq!(rig.origin_block(X), Some((X, 2)));
}

/// Same as the full-cache test, with a long autocommit period: blocked
/// writers ask for a commit themselves, so they must not depend on the
/// autocommit timer to make progress.
fn blocked_writers_do_not_wait_for_the_autocommit_timer() {
    let rig = Rig::new(2, 8, 512, Layer::Plain, |o| {
        o.writeback_jobs = Some(2);
        o.autocommit_time_ms = Some(60_000);
    });
    let n = rig.stats().blocks;
    let pending: Vec<(u64, Slot)> = (0..n * 6)
        .map(|lba| (lba, rig.submit_write((lba % 2) as usize, lba, 1, false)))
        .collect();
    let t0 = Instant::now();
    for (lba, s) in &pending {
        let done = rig.pump_until(Duration::from_secs(5), || s.borrow().is_some());
        assert!(
            done,
            "write lba {lba} still blocked after {:?}: {:?}",
            t0.elapsed(),
            rig.stats()
        );
        assert_eq!(s.borrow_mut().take().unwrap(), Ok(None));
    }
}

/// A write that requests an autocommit (autocommit_blocks reached) while a
/// commit is running, after its core already handed its log to that
/// commit: the request must lead to another commit. Exact schedule on two
/// logical reactors (home = 0).
fn an_autocommit_requested_during_a_commit_is_not_lost() {
    let rig = Rig::new(2, 64, 256, Layer::Plain, |o| {
        o.autocommit_blocks = Some(1);
        o.autocommit_time_ms = Some(60_000);
    });
    // A on core 1 asks home for a commit.
    let a = rig.submit_write(1, 1, 1, false);
    // Home starts it: the sequence advances, home fences and hands over
    // its log; core 1 has not run its part yet.
    rig.h.poll(0);
    // B on core 1, stamped with the new sequence: not part of the running
    // commit, so it asks for the next one.
    let b = rig.submit_write(1, 2, 1, false);
    assert_eq!(rig.wait(&a), Ok(None));
    assert_eq!(rig.wait(&b), Ok(None));
    rig.run_idle();
    // More writes, each reaching autocommit_blocks.
    for lba in 3..6 {
        rig.write(1, lba, 1);
    }
    assert!(
        rig.wait_stats(Duration::from_millis(500), |s| s.dirty_uncommitted == 0),
        "writes stay uncommitted with autocommit_blocks 1: {:?}",
        rig.stats()
    );
}

/// Writeback is spread over the reactors with a channel: home writes its
/// share of a batch from its own origin channel and sends each other
/// reactor its share, which that reactor writes from its own origin
/// channel (ssd mode: read through its own channel of the cache bdev) —
/// so polling home alone writes back only part of the batch.
fn writeback_is_spread_over_the_reactors_with_a_channel() {
    {
        let rig = Rig::new(2, 64, 256, Layer::Plain, |o| {
            o.max_age_ms = Some(20);
        });
        // Channels on both reactors; LBAs far apart: one run per block.
        let lbas: Vec<u64> = (0..8).map(|i| i * 10).collect();
        for &lba in &lbas {
            rig.write((lba / 10 % 2) as usize, lba, 1);
        }
        rig.flush(0).expect("FLUSH");
        std::thread::sleep(Duration::from_millis(40));
        // Home's poller finds the blocks past max_age and sends them out.
        for _ in 0..2000 {
            rig.h.poll(0);
            crossbeam::epoch::pin().flush();
        }
        let on_origin = |rig: &Rig| {
            lbas.iter()
                .filter(|&&l| rig.origin_block(l).is_some())
                .count()
        };
        let by_home = on_origin(&rig);
        assert!(
            by_home > 0 && by_home < lbas.len(),
            "home alone wrote back {by_home} of {} blocks: {:?}",
            lbas.len(),
            rig.stats()
        );
        assert!(
            rig.wait_stats(Duration::from_secs(3), |s| s.dirty == 0),
            "{:?}",
            rig.stats()
        );
        for &lba in &lbas {
            assert_eq!(rig.origin_block(lba), Some((lba, 1)), "lba {lba}");
        }
        let s = rig.settle();
        assert_eq!(s.free_blocks, s.blocks, "{s:?}");
    }
}

/// Coalescing beyond the batch (as dm-writecache): writing back the oldest
/// block takes its committed, idle neighbours along in one origin write,
/// even when they are younger.
#[test]
fn writeback_takes_committed_neighbours_into_one_origin_write() {
    wcrig::with_mode(wc_writecache::Mode::Pmem, || {
        let rig = Rig::new(1, 64, 256, Layer::Plain, |o| {
            o.max_age_ms = Some(600);
        });
        fill(&rig, 5..6);
        rig.pump_for(Duration::from_millis(300));
        // Younger neighbours on both sides (and one past a gap).
        fill(&rig, 3..5);
        fill(&rig, 6..8);
        fill(&rig, 9..10);
        assert!(
            rig.wait_stats(Duration::from_secs(3), |s| s.writeback_completed_blocks > 0),
            "{:?}",
            rig.stats()
        );
        until_writeback_quiet(&rig, Duration::from_millis(20));
        let s = rig.stats();
        assert_eq!(s.writeback_ios, 1, "{s:?}");
        assert_eq!(s.writeback_completed_blocks, 5, "{s:?}");
        for lba in 3..8 {
            assert_eq!(rig.origin_block(lba), Some((lba, 1)), "lba {lba}");
        }
        assert_eq!(
            rig.origin_block(9),
            None,
            "past the gap: young, stays cached"
        );
    });
}

both_modes!(
    writeback_is_spread_over_the_reactors_with_a_channel,
    a_full_cache_blocks_writers_until_writeback_frees_blocks,
    writeback_starts_at_the_high_watermark_and_ends_below_the_low_one,
    writeback_stops_just_below_the_low_watermark,
    overwrites_under_writeback_never_leave_older_data_on_the_origin,
    cleaner_mode_writes_around_and_drains_everything,
    blocks_older_than_max_age_are_written_back_below_the_watermark,
    max_age_does_not_write_back_young_blocks,
    unmap_drops_cached_blocks_and_write_zeroes_reads_back_zeroes,
    a_single_write_larger_than_the_cache_completes,
    concurrent_overwrites_from_two_cores_under_writeback_stay_consistent,
    cleaner_write_around_is_ordered_after_writeback_of_the_same_lba,
    blocked_writers_do_not_wait_for_the_autocommit_timer,
    an_autocommit_requested_during_a_commit_is_not_lost,
);

/// pmem mode: writers waiting for free blocks in a cache full of committed
/// blocks they overwrite write back what they need, not the whole cache:
/// the blocks they supersede come back with the next commit (dm's
/// writeback on an empty free list likewise stops once the free list and
/// the writeback reach the low watermark). Writing back everything
/// committed, as before, sent every cached LBA to the origin.
#[test]
fn waiting_overwriters_write_back_what_they_need_not_the_whole_cache() {
    wcrig::with_mode(wc_writecache::Mode::Pmem, || {
        let rig = Rig::new(1, 256, 1024, Layer::Plain, |o| {
            o.high_watermark = Some(100);
            o.low_watermark = Some(100);
        });
        let n = rig.stats().blocks;
        let cached = n - 4;
        fill(&rig, 0..cached);
        assert_eq!(rig.stats().writeback_completed_blocks, 0);
        // Four times as many overwrites in flight as there are free blocks.
        let hot = 16;
        let pending: Vec<(u64, Slot)> = (0..hot)
            .map(|lba| (lba, rig.submit_write(0, lba, 2, false)))
            .collect();
        for (lba, s) in &pending {
            assert_eq!(rig.wait(s), Ok(None), "overwrite lba {lba}");
        }
        let s = rig.stats();
        assert!(s.writes_blocked_on_freelist > 0, "{s:?}");
        for lba in 0..cached {
            let v = if lba < hot { 2 } else { 1 };
            assert_eq!(rig.read_block(0, lba), Ok(Some((lba, v))), "lba {lba}");
        }
        until_writeback_quiet(&rig, Duration::from_millis(20));
        let s = rig.stats();
        assert!(
            s.writeback_completed_blocks <= 2 * hot,
            "{} of {cached} cached blocks written back for {hot} waiting overwrites: {s:?}",
            s.writeback_completed_blocks
        );
        assert_eq!(s.error, 0, "{s:?}");
    });
}
