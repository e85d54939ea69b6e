//! Origin faults (design §3.6, §3.8), injected with the error vbdev
//! (`EE_<disk>`) between the writecache and a simulated origin disk, on the
//! deterministic logical-reactor harness:
//! * persistent origin write failures during writeback: retries with
//!   backoff, then the error state (writes/FLUSH fail with EIO, status
//!   reports it, reads still served, no cached data dropped);
//! * transient failures (fewer than the retry budget): writeback succeeds;
//! * after the error state: delete without flush, clear the fault,
//!   re-create over the same media: recovery writes everything back.
//!
//! Cache media errors are out of scope here: the cache is reached only
//! through `PersistentMemory` loads/stores (`write_nt`/`fence` return
//! nothing), so there is no way to inject a cache media error.

mod wcrig;

use std::time::{Duration, Instant};

use wc_bdev::IoType;
use wc_bdev_error::{ErrorType, InjectIoType};
use wcrig::{Layer, Rig};

const EIO: i32 = libc::EIO;

/// Retry budget of the writeback (cache.rs: up to 5 retries, backoff
/// 10, 20, 40, 80, 160 ms).
const RETRIES: u32 = 5;

fn inject_writes(rig: &Rig, num: u32) {
    wc_bdev_error::inject(
        &rig.origin_name,
        InjectIoType::Write,
        ErrorType::Failure,
        num,
    )
    .unwrap();
}

/// Writes `lbas` (version `v`) and commits them.
fn write_and_commit(rig: &Rig, lbas: &[u64], v: u64) {
    for &lba in lbas {
        rig.write(0, lba, v);
    }
    rig.flush(0).expect("FLUSH");
}

fn persistent_origin_write_failure_enters_error_state_and_keeps_data() {
    let rig = Rig::new(1, 64, 256, Layer::Error, |_| {});
    // One contiguous run plus isolated blocks (several origin writes).
    let mut lbas: Vec<u64> = (0..16).collect();
    lbas.extend([100, 102, 104]);
    write_and_commit(&rig, &lbas, 1);
    let before = rig.stats();
    assert_eq!(before.dirty, lbas.len() as u64, "{before:?}");
    assert_eq!(before.error, 0);

    inject_writes(&rig, 1_000_000);
    let t0 = Instant::now();
    let flush = rig.start_flush_rpc();
    assert!(
        rig.wait_stats(Duration::from_secs(5), |s| s.error != 0),
        "no error state after persistent origin failures: {:?}",
        rig.stats()
    );
    let took = t0.elapsed();
    // The flush RPC reports the failure.
    assert_eq!(rig.wait_ctl(&flush), Err(EIO), "flush RPC outcome");
    rig.run_idle();

    let s = rig.stats();
    assert_eq!(s.error, EIO, "{s:?}");
    assert!(
        s.writeback_retries >= RETRIES as u64,
        "retried before giving up: {s:?}"
    );
    // Backoff: 10+20+40+80+160 ms before the last attempt.
    assert!(
        took >= Duration::from_millis(250),
        "gave up after {took:?}, before the backoff ran"
    );
    assert_eq!(s.dirty, before.dirty, "no cached block dropped: {s:?}");
    assert_eq!(s.writeback_blocks, 0, "nothing left in flight: {s:?}");
    assert_eq!(s.writeback_completed_blocks, 0, "{s:?}");

    // bdev_get_bdevs reports the error.
    let info = rig.info_json();
    let err = &info["driver_specific"]["writecache"]["error"];
    assert_eq!(err.as_i64(), Some(EIO as i64), "driver_specific: {info}");

    // Writes, FUA writes, WRITE_ZEROES and FLUSH fail with EIO.
    let w = rig.submit_write(0, 200, 1, false);
    assert_eq!(rig.wait(&w), Err(EIO), "write in the error state");
    let w = rig.submit_write(0, 3, 9, true);
    assert_eq!(rig.wait(&w), Err(EIO), "FUA write in the error state");
    let w = rig.submit_write_zeroes(0, 4, 1);
    assert_eq!(rig.wait(&w), Err(EIO), "write_zeroes in the error state");
    assert_eq!(rig.flush(0), Err(EIO), "FLUSH in the error state");
    // The flush RPC fails at once now.
    assert_eq!(rig.flush_rpc(), Err(EIO));

    // Reads still return the cached data of every written block (and the
    // origin never got any of it: the error bdev failed every write).
    for &lba in &lbas {
        assert_eq!(rig.read_block(0, lba), Ok(Some((lba, 1))), "lba {lba}");
        assert_eq!(rig.origin_block(lba), None, "origin lba {lba}");
    }
    // A read spanning hits and a miss is still reassembled.
    let r = rig.submit_read(0, 15, 2);
    let data = rig.wait(&r).unwrap().unwrap();
    assert_eq!(wcrig::decode(&data[..512]), Some((15, 1)));
    assert_eq!(wcrig::decode(&data[512..]), None);
    let s = rig.stats();
    assert_eq!(s.dirty, before.dirty, "{s:?}");
    assert_eq!(s.error, EIO);
    wc_bdev_error::clear(&rig.origin_name).unwrap();
}

fn transient_origin_write_failures_are_retried_and_writeback_succeeds() {
    let rig = Rig::new(1, 64, 256, Layer::Error, |_| {});
    let lbas: Vec<u64> = (0..8).collect();
    write_and_commit(&rig, &lbas, 1);
    // Fewer failures than the retry budget.
    let fails = RETRIES - 1;
    inject_writes(&rig, fails);
    rig.set_options(|o| {
        o.high_watermark = Some(0);
        o.low_watermark = Some(0);
    });
    assert!(
        rig.wait_stats(Duration::from_secs(2), |s| s.writeback_retries >= 1),
        "{:?}",
        rig.stats()
    );
    // While the run is being retried, overwrite one of its blocks and
    // commit: the newer version must reach the origin after the older one.
    rig.write(0, 3, 2);
    rig.flush(0).expect("FLUSH during retries");
    let during = rig.stats();
    assert!(
        rig.wait_stats(Duration::from_secs(5), |s| s.dirty == 0
            && s.writeback_blocks == 0),
        "writeback did not finish: {:?}",
        rig.stats()
    );
    let s = rig.settle();
    assert_eq!(
        s.error, 0,
        "transient errors must not enter the error state: {s:?}"
    );
    assert_eq!(s.writeback_retries, fails as u64, "{s:?}");
    assert_eq!(
        wc_bdev_error::remaining(&rig.origin_name, IoType::Write).unwrap(),
        0
    );
    assert_eq!(
        s.free_blocks, s.blocks,
        "every block freed exactly once: {s:?}"
    );
    for &lba in &lbas {
        let v = if lba == 3 { 2 } else { 1 };
        assert_eq!(
            rig.origin_block(lba),
            Some((lba, v)),
            "origin lba {lba} (stats while retrying: {during:?})"
        );
        assert_eq!(rig.read_block(0, lba), Ok(Some((lba, v))));
    }
    // Still fully usable.
    rig.write(0, 50, 1);
    rig.flush(0).unwrap();
    assert_eq!(rig.flush_rpc(), Ok(()));
    assert_eq!(rig.origin_block(50), Some((50, 1)));
}

fn after_the_error_state_a_recreated_cache_writes_everything_back() {
    let mut rig = Rig::new(1, 64, 256, Layer::Error, |_| {});
    let lbas: Vec<u64> = (0..12).chain([40, 41, 90]).collect();
    write_and_commit(&rig, &lbas, 1);
    // Committed overwrites: the recovered cache must keep the newest.
    write_and_commit(&rig, &[0, 1, 2, 90], 2);
    let latest = |lba: u64| if [0, 1, 2, 90].contains(&lba) { 2 } else { 1 };
    let dirty = rig.stats().dirty;
    assert_eq!(dirty, lbas.len() as u64);

    inject_writes(&rig, 1_000_000);
    rig.set_options(|o| {
        o.high_watermark = Some(0);
        o.low_watermark = Some(0);
    });
    assert!(
        rig.wait_stats(Duration::from_secs(5), |s| s.error != 0),
        "{:?}",
        rig.stats()
    );
    rig.run_idle();
    assert_eq!(rig.stats().dirty, dirty);

    // Delete without flush (the commit reports the error state, the
    // instance goes away regardless), clear the fault, re-create.
    let del = rig.detach(false);
    assert!(
        wc_writecache::get(&rig.name).is_none() && wc_bdev::lookup(&rig.name).is_none(),
        "instance deleted (delete returned {del:?})"
    );
    wc_bdev_error::clear(&rig.origin_name).unwrap();
    for &lba in &lbas {
        assert_eq!(rig.origin_block(lba), None, "origin untouched: lba {lba}");
    }
    rig.attach().expect("re-created over the same devices");
    let wc = rig.wc();
    assert!(!wc.formatted_on_create(), "the cache was recovered");
    let s = rig.stats();
    assert_eq!(s.error, 0, "{s:?}");
    assert_eq!(s.dirty, dirty, "every committed block recovered: {s:?}");
    for &lba in &lbas {
        assert_eq!(rig.read_block(0, lba), Ok(Some((lba, latest(lba)))));
    }
    assert_eq!(rig.flush_rpc(), Ok(()));
    let s = rig.settle();
    assert_eq!(s.dirty, 0, "{s:?}");
    assert_eq!(s.free_blocks, s.blocks, "{s:?}");
    for &lba in &lbas {
        assert_eq!(
            rig.origin_block(lba),
            Some((lba, latest(lba))),
            "origin lba {lba} after recovery + writeback"
        );
    }
}

/// Writers blocked on a full cache when the instance enters the error
/// state must complete (with EIO), not wait forever: only writeback could
/// give them blocks, and the error state stops it.
fn writes_blocked_on_a_full_cache_fail_when_the_error_state_is_entered() {
    let rig = Rig::new(1, 8, 256, Layer::Error, |_| {});
    let n = rig.stats().blocks;
    for lba in 0..n {
        rig.write(0, lba, 1);
    }
    inject_writes(&rig, 1_000_000);
    // These find no free block: they wait, a commit makes the cache
    // eligible for writeback, which fails until the error state.
    let waiting: Vec<_> = (n..n + 4)
        .map(|lba| rig.submit_write(0, lba, 1, false))
        .collect();
    assert!(
        rig.wait_stats(Duration::from_secs(5), |s| s.error != 0),
        "{:?}",
        rig.stats()
    );
    assert!(rig.stats().writes_blocked_on_freelist > 0);
    for (i, w) in waiting.iter().enumerate() {
        let done = rig.pump_until(Duration::from_secs(3), || w.borrow().is_some());
        assert!(
            done,
            "blocked write {i} never completed after the error state: {:?}",
            rig.stats()
        );
        assert_eq!(w.borrow_mut().take().unwrap(), Err(EIO));
    }
    wc_bdev_error::clear(&rig.origin_name).unwrap();
}

/// With `fua: false` the writeback writes and then FLUSHes the origin. A
/// transient FLUSH failure is an origin error like a write failure and
/// should be retried with backoff (design §3.8) instead of entering the
/// error state at once.
fn a_transient_origin_flush_failure_in_nofua_writeback_is_retried() {
    let rig = Rig::new(1, 64, 256, Layer::Error, |o| o.fua = Some(false));
    let lbas: Vec<u64> = (0..4).collect();
    write_and_commit(&rig, &lbas, 1);
    wc_bdev_error::inject(&rig.origin_name, InjectIoType::Flush, ErrorType::Failure, 1).unwrap();
    let res = rig.flush_rpc();
    let s = rig.stats();
    assert_eq!(
        s.error, 0,
        "one flush failure entered the error state: {s:?}"
    );
    assert_eq!(res, Ok(()));
    assert_eq!(s.dirty, 0, "{s:?}");
    for &lba in &lbas {
        assert_eq!(rig.origin_block(lba), Some((lba, 1)));
    }
}

/// nofua writeback FLUSHes the origin once per group of completed runs,
/// as dm's endio thread does, not once per run: while one FLUSH is held at
/// the origin, the runs that completed after it was sent wait (none is
/// freed: the held FLUSH does not cover them) for the next one, which is
/// sent only when the first completes.
fn nofua_writeback_flushes_the_origin_once_per_group_of_runs() {
    let rig = Rig::new(1, 64, 256, Layer::Error, |o| o.fua = Some(false));
    // Eight separate origin writes (no two LBAs adjacent).
    let lbas: Vec<u64> = (0..8).map(|i| i * 10).collect();
    write_and_commit(&rig, &lbas, 1);
    const HELD: u32 = 100;
    wc_bdev_error::inject(
        &rig.origin_name,
        InjectIoType::Flush,
        ErrorType::Pending,
        HELD,
    )
    .unwrap();
    let sent = || HELD - wc_bdev_error::remaining(&rig.origin_name, IoType::Flush).unwrap();
    let drain = rig.start_flush_rpc();
    assert!(
        rig.pump_until(Duration::from_secs(5), || lbas
            .iter()
            .all(|&l| rig.origin_block(l) == Some((l, 1)))),
        "the runs were not all written to the origin"
    );
    rig.pump_for(Duration::from_millis(50));
    let s = rig.stats();
    assert_eq!(sent(), 1, "FLUSHes sent while the first is held: {s:?}");
    assert_eq!(
        s.dirty,
        lbas.len() as u64,
        "retired before a FLUSH covered them: {s:?}"
    );
    // Released (and disarmed): the next FLUSH covers the rest.
    wc_bdev_error::resume_pending(&rig.origin_name).unwrap();
    assert_eq!(rig.wait_ctl(&drain), Ok(()));
    assert_eq!(rig.stats().dirty, 0);
    wc_bdev_error::clear(&rig.origin_name).unwrap();
}

/// A writeback I/O still in flight to the origin (here held by a
/// `pending` injection) when the instance is deleted without flush must
/// not outlive the delete: were `delete` to complete first, the late
/// completion would retire the block on the deleted instance and clear its
/// metadata entry on the cache media — which a re-created instance over
/// the same cache owns by then, possibly reused for another committed
/// write (lost at the next recovery). Either the delete waits for the
/// writeback (checked), or the re-created cache must survive it (checked).
fn a_writeback_in_flight_at_delete_cannot_corrupt_a_recreated_cache() {
    let mut rig = Rig::new(1, 16, 256, Layer::Error, |o| {
        o.autocommit_blocks = Some(1 << 20);
        o.autocommit_time_ms = Some(100_000);
    });
    const X: u64 = 7;
    const Y: u64 = 30;
    write_and_commit(&rig, &[X], 1);
    let bx = rig
        .media_entries()
        .iter()
        .position(|e| *e == Some(X))
        .expect("entry of X");
    // The writeback of X is held at the origin.
    wc_bdev_error::inject(&rig.origin_name, InjectIoType::Write, ErrorType::Pending, 1).unwrap();
    rig.set_options(|o| {
        o.high_watermark = Some(0);
        o.low_watermark = Some(0);
    });
    assert!(rig.wait_stats(Duration::from_secs(2), |s| s.writeback_blocks == 1));
    let del = rig.start_detach(false);
    let deleted_early =
        rig.pump_until(Duration::from_millis(100), || del.lock().unwrap().is_some());
    let mut resumed = false;
    if !deleted_early {
        // The delete waits for the writeback: let it land.
        wc_bdev_error::resume_pending(&rig.origin_name).unwrap();
        resumed = true;
        let _ = rig.wait_ctl(&del);
        assert_eq!(rig.origin_block(X), Some((X, 1)));
    }
    rig.run_idle();
    assert!(wc_writecache::get(&rig.name).is_none());

    // Re-attach.
    rig.attach().expect("re-created");
    let ssd = wcrig::mode() == wc_writecache::Mode::Ssd;
    if !resumed {
        assert_eq!(rig.stats().dirty, 1, "X recovered in block {bx}");
        if ssd {
            // ssd mode overwrites in place: free X's block with an UNMAP.
            let u = rig.submit_unmap(0, X, 1);
            rig.wait(&u).unwrap();
            rig.settle();
        } else {
            // Supersede X (its block is freed) ...
            rig.write(0, X, 2);
            rig.flush(0).unwrap();
        }
    }
    // ... then cycle uncommitted overwrites of Y through the free pool
    // until Y's newest version sits in block bx, and commit it. (ssd mode:
    // the lowest free block goes out first, entries reach the device with
    // the commit, and a committed block is overwritten in place, so a Y
    // that missed bx is unmapped — its block freed — before the next try.)
    let mut v = 0;
    while rig.media_entries()[bx] != Some(Y) {
        v += 1;
        assert!(v < 200, "block {bx} never reused");
        if ssd && v > 1 {
            let u = rig.submit_unmap(0, Y, 1);
            rig.wait(&u).unwrap();
            rig.flush(0).unwrap();
            rig.settle();
        }
        rig.write(0, Y, v);
        if ssd {
            rig.flush(0).unwrap();
        }
    }
    rig.flush(0).unwrap();
    assert_eq!(rig.read_block(0, Y), Ok(Some((Y, v))));

    if !resumed {
        // The old instance's writeback completes only now.
        wc_bdev_error::resume_pending(&rig.origin_name).unwrap();
        rig.pump_for(Duration::from_millis(50));
        rig.run_idle();
    }

    // Y was FLUSHed: it must survive a detach + recovery.
    let _ = rig.detach(false);
    rig.attach().expect("re-created");
    assert_eq!(
        rig.read_block(0, Y),
        Ok(Some((Y, v))),
        "a FLUSHed write of lba {Y} (in block {bx}) was lost; media entries {:?}",
        rig.media_entries()
    );
    let want_x = if resumed { 1 } else { 2 };
    let got_x = rig.read_block(0, X);
    if ssd && !resumed {
        // Unmapped, then the old instance's writeback of version 1 landed.
        assert!(matches!(got_x, Ok(None) | Ok(Some((X, 1)))), "{got_x:?}");
    } else {
        assert_eq!(got_x, Ok(Some((X, want_x))));
    }
}

/// Two reactors: every writeback share's first origin write fails, on
/// home and on reactor 1 alike; each is retried from the reactor that
/// wrote it (ssd mode: read again through that reactor's own channel of
/// the cache bdev), a drain running meanwhile succeeds, and every block
/// reaches the origin.
fn writeback_shares_are_retried_on_the_reactor_that_wrote_them() {
    let rig = Rig::new(2, 64, 256, Layer::Error, |_| {});
    // LBAs far apart (one run each), written on both reactors.
    let lbas: Vec<u64> = (0..8).map(|i| i * 10).collect();
    for &lba in &lbas {
        rig.write((lba / 10 % 2) as usize, lba, 1);
    }
    rig.flush(0).expect("FLUSH");
    // Every run's first origin write fails: each waits for a retry on the
    // reactor that wrote it.
    inject_writes(&rig, lbas.len() as u32);
    let drain = rig.start_flush_rpc();
    assert!(
        rig.wait_stats(Duration::from_secs(2), |s| s.writeback_retries
            >= lbas.len() as u64),
        "{:?}",
        rig.stats()
    );
    assert_eq!(rig.wait_ctl(&drain), Ok(()), "{:?}", rig.stats());
    let s = rig.settle();
    assert_eq!(s.error, 0, "{s:?}");
    assert_eq!((s.dirty, s.free_blocks), (0, s.blocks), "{s:?}");
    for &lba in &lbas {
        assert_eq!(rig.origin_block(lba), Some((lba, 1)), "origin lba {lba}");
    }
}

both_modes!(
    writeback_shares_are_retried_on_the_reactor_that_wrote_them,
    persistent_origin_write_failure_enters_error_state_and_keeps_data,
    transient_origin_write_failures_are_retried_and_writeback_succeeds,
    after_the_error_state_a_recreated_cache_writes_everything_back,
    writes_blocked_on_a_full_cache_fail_when_the_error_state_is_entered,
    a_transient_origin_flush_failure_in_nofua_writeback_is_retried,
    nofua_writeback_flushes_the_origin_once_per_group_of_runs,
    a_writeback_in_flight_at_delete_cannot_corrupt_a_recreated_cache,
);
