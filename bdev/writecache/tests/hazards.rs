//! The concurrency hazards of design §3.4, each as an exact schedule on the
//! deterministic reactor harness (several logical reactors, one thread; the
//! test decides who polls), in both modes over the shared rig (`wcrig`):
//! a simulated pmem cache, or (ssd mode) a simulated disk with a volatile
//! write cache.
//!
//! ssd mode's data writes are asynchronous, which adds hazards of their
//! own; those schedules hold a cache-bdev I/O in flight with an error bdev
//! (`pending`) between the instance and its cache (`ssd_*` tests).

mod wcrig;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use wc_bdev_error::{ErrorType, InjectIoType};
use wc_writecache::{CreateOpts, Mode};
use wcrig::{mode, with_mode, CacheDev, Layer, Rig, WAIT};

/// Options of every hazard rig: only FLUSH commits, no writeback unless a
/// test lowers the watermarks.
fn quiet(o: &mut CreateOpts) {
    o.autocommit_blocks = Some(1 << 20);
    o.autocommit_time_ms = Some(1 << 30);
    o.high_watermark = Some(100);
    o.low_watermark = Some(100);
}

fn rig(reactors: usize, cache_blocks: u64) -> Rig {
    Rig::new(reactors, cache_blocks, 64, Layer::Plain, quiet)
}

fn ssd<T>(f: impl FnOnce() -> T) -> T {
    let mut out = None;
    with_mode(Mode::Ssd, || out = Some(f()));
    out.unwrap()
}

/// The version block `lba` reads as (0: never written).
fn version(rig: &Rig, r: usize, lba: u64) -> u64 {
    match rig.read_block(r, lba).expect("read succeeds") {
        Some((l, v)) => {
            assert_eq!(l, lba, "read of {lba} returned another block's data");
            v
        }
        None => 0,
    }
}

/// Polls only reactor `r`, `n` times.
fn poll_only(rig: &Rig, r: usize, n: usize) {
    for _ in 0..n {
        rig.h.poll(r);
    }
}

/// Commit vs in-flight writes: a FLUSH submitted on reactor 0 after a write
/// completed on reactor 1 must wait for reactor 1's part of the commit (its
/// fence, its log), and then the write survives a power cut that loses
/// everything not durable.
fn flush_waits_for_every_writing_core() {
    let rig = rig(2, 16);
    let w = rig.submit_write(1, 5, 77, false);
    // The write completes on reactor 1 (its completion runs there).
    poll_only(&rig, 1, 4);
    rig.wait(&w).unwrap();
    assert!(rig.cache.not_durable() > 0, "the write is not yet durable");
    let pending_of_1 = |rig: &Rig| match &rig.cache {
        CacheDev::Pmem(p) => p.pending_words_of(1),
        CacheDev::Disk(_) => 0,
    };
    let before = pending_of_1(&rig);
    let seq = rig.stats().seq_count;
    let f = rig.submit_flush(0);
    // Only reactor 0 runs: the commit cannot finish without reactor 1.
    poll_only(&rig, 0, 200);
    assert!(
        f.borrow().is_none(),
        "flush completed without reactor 1's part"
    );
    assert_eq!(rig.stats().seq_count, seq, "committed without reactor 1");
    assert_eq!(pending_of_1(&rig), before, "nobody fenced reactor 1");
    // Reactor 1 gets its turn; then the flush completes.
    rig.wait(&f).unwrap();
    assert_eq!(rig.cache.not_durable(), 0, "{:?}", rig.stats());
    // Watermark 100: nothing was written back; the cache alone has it.
    let reboot = rig.reboot(1, quiet);
    assert_eq!(version(&reboot, 0, 5), 77);
}

/// Read vs reuse: a block freed while a reader may still copy out of it
/// goes back to the pool only after the reader's epoch ends.
fn freed_blocks_wait_for_readers_before_reuse() {
    let rig = rig(2, 8);
    rig.write(0, 1, 10);
    rig.flush(0).unwrap();
    let allocatable = |s: &wc_writecache::Stats| s.free_blocks - s.free_blocks_in_grace;
    let free0 = allocatable(&rig.stats());
    // A reader on another thread is mid-copy: it holds an epoch pin.
    let (pinned_tx, pinned_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let _guard = crossbeam::epoch::pin();
        pinned_tx.send(()).unwrap();
        release_rx.recv().unwrap();
    });
    pinned_rx.recv().unwrap();
    // Free the block: pmem mode displaces it with a committed overwrite;
    // ssd mode overwrites in place, so an UNMAP drops it.
    match mode() {
        Mode::Pmem => rig.write(1, 1, 11),
        Mode::Ssd => {
            let u = rig.submit_unmap(1, 1, 1);
            rig.wait(&u).unwrap();
        }
    }
    rig.flush(0).unwrap();
    for _ in 0..50 {
        rig.run_idle();
    }
    // ...but it is not back in the pool while the reader is pinned (pmem
    // mode: the overwrite took another block meanwhile).
    let taken = u64::from(mode() == Mode::Pmem);
    assert_eq!(
        allocatable(&rig.stats()),
        free0 - taken,
        "reusable under a pinned reader"
    );
    assert_eq!(rig.stats().free_blocks_in_grace, 1);
    release_tx.send(()).unwrap();
    reader.join().unwrap();
    assert!(
        rig.wait_stats(WAIT, |s| allocatable(s)
            == free0 + u64::from(mode() == Mode::Ssd)),
        "the freed block returns after the grace period: {:?}",
        rig.stats()
    );
    let want = match mode() {
        Mode::Pmem => 11,
        Mode::Ssd => 0,
    };
    assert_eq!(version(&rig, 0, 1), want);
}

/// Overwrite vs writeback: while the old version is being written back the
/// sector is overwritten and committed. The old block is freed exactly once
/// (by the writeback, after the origin acknowledged it), the newer version
/// is written back only after the older one, and the origin ends newest.
fn overwrite_during_writeback_keeps_the_newer_version_and_frees_once() {
    let rig = Rig::new(2, 8, 64, Layer::Error, |o| {
        quiet(o);
        o.writeback_jobs = Some(8);
    });
    rig.write(0, 3, 1);
    rig.flush(0).unwrap();
    // The error bdev holds origin writes until resumed.
    wc_bdev_error::inject(&rig.origin_name, InjectIoType::Write, ErrorType::Pending, 1).unwrap();
    rig.set_options(|o| {
        o.high_watermark = Some(0);
        o.low_watermark = Some(0);
    });
    assert!(
        rig.pump_until(WAIT, || rig.wc().writeback_in_flight() == 1),
        "version 1 is going out"
    );
    // Overwrite on the other reactor and commit while version 1 is held.
    rig.write(1, 3, 2);
    rig.flush(1).unwrap();
    rig.pump_for(Duration::from_millis(20));
    assert_eq!(version(&rig, 0, 3), 2);
    let s = rig.stats();
    assert_eq!(
        s.writeback_blocks, 1,
        "version 2 waits for version 1's writeback: {s:?}"
    );
    assert_eq!(rig.origin_block(3), None, "version 1 is still held");
    // Release version 1: it is freed once, then version 2 goes out.
    let ee = rig.origin_name.clone();
    rig.h.on(0, || wc_bdev_error::resume_pending(&ee)).unwrap();
    let ok = rig.wait_stats(WAIT, |s| {
        s.dirty == 0 && s.writeback_blocks == 0 && s.free_blocks == s.blocks
    });
    let s = rig.stats();
    assert!(ok, "everything written back and freed exactly once: {s:?}");
    assert_eq!(s.writeback_completed_blocks, 2);
    assert_eq!(rig.origin_block(3), Some((3, 2)), "the origin ended older");
}

/// Same-sector writes from two cores: the index ends with one of them and
/// the loser's block is freed exactly once; after a power cut the recovered
/// sector holds the winner.
fn same_sector_writes_from_two_cores_free_the_loser_once() {
    let rig = rig(2, 8);
    let a = rig.submit_write(0, 2, 100, false);
    let b = rig.submit_write(1, 2, 200, false);
    rig.wait(&a).unwrap();
    rig.wait(&b).unwrap();
    let s = rig.stats();
    // pmem mode: the second write finds the first one's block in the
    // index; ssd mode: both were placed before either's data landed.
    let hits = match mode() {
        Mode::Pmem => 1,
        Mode::Ssd => 0,
    };
    assert_eq!(s.write_hits_uncommitted, hits, "{s:?}");
    let winner = version(&rig, 0, 2);
    assert_eq!(winner, 200, "reactor 1 published last");
    rig.flush(1).unwrap();
    let s = rig.settle();
    assert_eq!(
        (s.dirty, s.free_blocks),
        (1, s.blocks - 1),
        "exactly one block stays allocated: {s:?}"
    );
    let reboot = rig.reboot(1, quiet);
    assert_eq!(version(&reboot, 0, 2), winner);
    assert_eq!(reboot.stats().dirty, 1);
}

/// Suspend quiesces (new I/O waits, nothing fails), commits, and with
/// flush-on-suspend writes everything back; resume releases the held I/O.
fn suspend_holds_io_commits_and_resume_releases_it() {
    let rig = rig(2, 16);
    rig.write(0, 4, 1);
    // Resume without suspend is refused, state unchanged.
    assert!(wc_writecache::resume(&rig.name).is_err());
    wc_writecache::set_flush_on_suspend(&rig.name, true).unwrap();
    assert_eq!(suspend(&rig), Ok(()));
    assert_eq!(wc_writecache::is_suspended(&rig.name), Some(true));
    let s = rig.stats();
    assert_eq!(
        (s.dirty, s.dirty_uncommitted),
        (0, 0),
        "flush-on-suspend wrote everything back: {s:?}"
    );
    assert_eq!(rig.origin_block(4), Some((4, 1)));
    // A second suspend is refused.
    assert!(suspend(&rig).is_err());
    // New I/O is held, not failed.
    let w = rig.submit_write(1, 5, 2, false);
    rig.pump_for(Duration::from_millis(20));
    assert!(w.borrow().is_none(), "I/O ran while suspended");
    wc_writecache::resume(&rig.name).unwrap();
    rig.wait(&w).unwrap();
    assert_eq!(version(&rig, 0, 5), 2);
    // Delete while suspended is refused; the instance stays.
    assert_eq!(suspend(&rig), Ok(()));
    let (tx, rx) = std::sync::mpsc::channel();
    let n = rig.name.clone();
    rig.h.on(0, move || {
        wc_writecache::delete(&n, false, Box::new(move |r| tx.send(r.is_err()).unwrap()))
    });
    assert!(rx.recv().unwrap(), "delete while suspended must fail");
    assert!(wc_bdev::lookup(&rig.name).is_some());
    // The safe-removal sequence: flush-on-suspend + suspend drained it all;
    // resume and delete (which drains again: flush-on-suspend is set).
    assert_eq!(rig.stats().dirty, 0);
    assert_eq!(rig.origin_block(5), Some((5, 2)));
    wc_writecache::resume(&rig.name).unwrap();
    let mut rig = rig;
    rig.detach(false).expect("safe removal deletes");
    assert!(wc_bdev::lookup(&rig.name).is_none());
}

/// Suspends the instance and waits for the outcome.
fn suspend(rig: &Rig) -> Result<(), String> {
    let got: Rc<RefCell<Option<Result<(), String>>>> = Rc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let n = rig.name.clone();
    rig.h.on(0, move || {
        wc_writecache::suspend(
            &n,
            Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()),
        )
    });
    assert!(rig.pump_until(WAIT, || {
        if let Ok(r) = rx.try_recv() {
            *got.borrow_mut() = Some(r);
        }
        got.borrow().is_some()
    }));
    let r = got.borrow_mut().take().unwrap();
    r
}

/// A cache error (pmem: the media can no longer persist; ssd: the cache
/// bdev fails writes) puts the instance in its error state: writes and
/// flushes fail with the error, the superblock is not advanced, and
/// everything cached still reads back.
fn a_cache_error_enters_the_error_state_and_keeps_data() {
    let mut rig = rig(2, 16);
    if mode() == Mode::Ssd {
        rig.wrap_cache_in_error();
    }
    rig.write(0, 6, 1);
    rig.flush(1).unwrap();
    let seq = rig.stats().seq_count;
    rig.write(1, 7, 2);
    rig.inject_cache_error();
    assert_eq!(rig.flush(0), Err(libc::EIO));
    let s = rig.stats();
    assert_eq!((s.error, s.seq_count), (libc::EIO, seq), "{s:?}");
    let w = rig.submit_write(0, 8, 3, false);
    assert_eq!(rig.wait(&w), Err(libc::EIO));
    // Nothing cached was dropped.
    assert_eq!((version(&rig, 0, 6), version(&rig, 1, 7)), (1, 2));
    assert_eq!(rig.stats().dirty, 2);
}

/// Autocommit with one writing core that is not home (as fio's job
/// thread): in pmem mode that core runs the whole round itself — home
/// never polls — and the writes are durable once it has; in ssd mode home
/// runs the round.
fn autocommit_with_one_writing_core_off_home() {
    let rig = Rig::writing_on(1, 2, 16, 64, Layer::Plain, |o| {
        quiet(o);
        o.autocommit_blocks = Some(4);
    });
    let before = rig.stats();
    let slots: Vec<_> = (0..4)
        .map(|lba| rig.submit_write(1, lba, 10 + lba, false))
        .collect();
    poll_only(&rig, 1, 64);
    if mode() == Mode::Pmem {
        assert!(
            slots.iter().all(|s| matches!(*s.borrow(), Some(Ok(_)))),
            "the writes completed on reactor 1 alone"
        );
        let s = rig.stats();
        assert_eq!(
            (s.seq_count, s.commits),
            (before.seq_count + 1, before.commits + 1),
            "reactor 1 committed without home: {s:?}"
        );
        assert_eq!(rig.cache.not_durable(), 0, "{s:?}");
    } else {
        for s in &slots {
            rig.wait(s).unwrap();
        }
        assert!(rig.wait_stats(WAIT, |s| s.seq_count > before.seq_count));
    }
    let reboot = rig.reboot(1, quiet);
    for lba in 0..4 {
        assert_eq!(version(&reboot, 0, lba), 10 + lba);
    }
}

/// Autocommit by count with two writing cores on busy-polling reactors
/// (the harness's): the writing core raises a flag that home's poller
/// claims — no message — and home runs the round; without it no commit
/// would ever start (no timer, no FLUSH here).
fn autocommit_with_two_writing_cores_runs_on_home() {
    let rig = Rig::new(2, 16, 64, Layer::Plain, |o| {
        quiet(o);
        o.autocommit_blocks = Some(4);
    });
    let before = rig.stats();
    // Each core's share of the count is 2 writes.
    let slots: Vec<_> = (0..4)
        .map(|lba| rig.submit_write((lba % 2) as usize, lba, 20 + lba, false))
        .collect();
    for s in &slots {
        rig.wait(s).unwrap();
    }
    assert!(
        rig.wait_stats(WAIT, |s| s.seq_count > before.seq_count
            && s.dirty_uncommitted == 0),
        "no autocommit round: {:?}",
        rig.stats()
    );
    // Core 0's share may have been due (and its round begun) before core
    // 1's writes were published: a second round covers those, and may
    // still be writing its metadata (ssd mode) when the logs are empty.
    rig.pump_for(Duration::from_millis(100));
    if mode() == Mode::Pmem {
        assert_eq!(rig.cache.not_durable(), 0);
    }
    let reboot = rig.reboot(1, quiet);
    for lba in 0..4 {
        assert_eq!(version(&reboot, 0, lba), 20 + lba);
    }
}

both_modes!(
    flush_waits_for_every_writing_core,
    autocommit_with_one_writing_core_off_home,
    autocommit_with_two_writing_cores_runs_on_home,
    freed_blocks_wait_for_readers_before_reuse,
    overwrite_during_writeback_keeps_the_newer_version_and_frees_once,
    same_sector_writes_from_two_cores_free_the_loser_once,
    suspend_holds_io_commits_and_resume_releases_it,
    a_cache_error_enters_the_error_state_and_keeps_data,
);

// ------------------------------------ pmem mode: frees after the commit

/// Crash case for the superseded frees home spreads over its iterations
/// after a commit (pmem mode): until an older version's entry is cleared
/// and fenced, a power cut leaves two committed entries of one sector,
/// and recovery keeps the newer; a freed block is reused only after its
/// clear is durable, so a power cut after the reuse never pairs the old
/// entry with the new data.
#[test]
fn pmem_superseded_frees_after_the_commit_survive_power_cuts() {
    with_mode(Mode::Pmem, || {
        const OLD: u64 = 20;
        // Room for the frees to wait (the pool holds four times as many).
        const CACHE: u64 = 320;
        let rig = Rig::new(1, CACHE, CACHE, Layer::Plain, quiet);
        for lba in 0..OLD {
            rig.write(0, lba, 1);
        }
        rig.flush(0).unwrap();
        for lba in 0..OLD {
            rig.write(0, lba, 2);
        }
        rig.flush(0).unwrap();
        let valid = |rig: &Rig| rig.media_entries().iter().flatten().count() as u64;
        // Committed, and the older versions not all cleared yet: the frees
        // are still on their way (this test exercises the deferral).
        assert!(valid(&rig) > OLD, "{} entries", valid(&rig));
        // Power cuts now and a few iterations into the frees: the newer
        // version of every sector wins.
        for polls in [0, 1, 3] {
            poll_only(&rig, 0, polls);
            let reboot = rig.reboot(1, quiet);
            for lba in 0..OLD {
                assert_eq!(version(&reboot, 0, lba), 2, "lba {lba} after {polls} polls");
            }
        }
        // Once idle every older entry is cleared and durable, and the
        // blocks are free.
        rig.run_idle();
        assert_eq!(valid(&rig), OLD);
        assert_eq!(rig.cache.not_durable(), 0);
        assert!(
            rig.wait_stats(WAIT, |s| s.free_blocks == CACHE - OLD
                && s.free_blocks_in_grace == 0),
            "{:?}",
            rig.stats()
        );
        // Reuse every free block (the freed ones among them), commit, cut
        // the power: each sector reads as its last version.
        for lba in OLD..CACHE {
            rig.write(0, lba, 3);
        }
        assert_eq!(rig.stats().free_blocks, 0);
        rig.flush(0).unwrap();
        let reboot = rig.reboot(1, quiet);
        for lba in 0..CACHE {
            let want = if lba < OLD { 2 } else { 3 };
            assert_eq!(version(&reboot, 0, lba), want, "lba {lba}");
        }
    });
}

/// Crash case: the writeback of a newer version clears its entry; the
/// older version's entry, still waiting for its clear after the commit,
/// must be durably cleared first, or a power cut in between brings the
/// older version back from the cache over the origin's newer one.
#[test]
fn pmem_a_written_back_successor_never_revives_its_superseded_version() {
    with_mode(Mode::Pmem, || {
        const OLD: u64 = 40;
        let rig = rig(1, 320);
        for version in 1..=2 {
            for lba in 0..OLD {
                rig.write(0, lba, version);
            }
            rig.flush(0).unwrap();
        }
        // The older versions' frees are under way; write everything back.
        rig.set_options(|o| {
            o.high_watermark = Some(0);
            o.low_watermark = Some(0);
        });
        let mut cuts = 0;
        loop {
            let reboot = rig.reboot(1, quiet);
            for lba in 0..OLD {
                assert_eq!(version(&reboot, 0, lba), 2, "lba {lba} after {cuts} rounds");
            }
            let s = rig.stats();
            if s.dirty == 0 && s.free_blocks_in_grace == 0 {
                break;
            }
            assert!(cuts < 1000, "writeback did not finish: {s:?}");
            if !rig.round() {
                std::thread::sleep(Duration::from_micros(100));
            }
            cuts += 1;
        }
    });
}

/// Entries a power cut now would leave valid, of LBAs below `lbas`.
fn durable_entries_below(rig: &Rig, lbas: u64) -> u64 {
    let entries = rig.durable_entries();
    entries.iter().flatten().filter(|&&l| l < lbas).count() as u64
}

/// The frees left to home's iterations are bounded (pmem mode): a commit
/// that finds the previous one's still queued frees both at once, and a
/// commit superseding more blocks than a drip spreads frees them at once,
/// so the pool is never short of more than one commit's older versions.
/// (Unbounded, they fell behind fast writes until writers waited for
/// blocks, and waiting writers wrote back - dropped from the cache -
/// everything committed.)
#[test]
fn pmem_at_most_one_commits_frees_wait_for_home() {
    with_mode(Mode::Pmem, || {
        // One write of the whole range per version, then a commit. The
        // pool holds four times as many blocks as a commit frees.
        const N: u64 = 200;
        let rig = Rig::new(1, 3 * N + 4 * N + 128, N, Layer::Plain, quiet);
        let write_all = |v| {
            let w = rig.submit_write_run(0, 0, N, v);
            assert_eq!(rig.wait(&w), Ok(None));
            rig.flush(0).unwrap();
        };
        write_all(1);
        write_all(2);
        assert!(
            durable_entries_below(&rig, N) > N,
            "the second commit's frees are spread"
        );
        // The third commit comes before home is through them.
        write_all(3);
        assert_eq!(
            durable_entries_below(&rig, N),
            N,
            "the third commit freed the second's and its own"
        );
        // A larger commit: freed at once.
        const LARGE: u64 = 300;
        let rig = Rig::new(1, 2 * LARGE + 16, LARGE, Layer::Plain, quiet);
        for v in 1..=2 {
            for lba in 0..LARGE {
                rig.write(0, lba, v);
            }
            rig.flush(0).unwrap();
        }
        assert_eq!(durable_entries_below(&rig, LARGE), LARGE);
    });
}

/// Crash case (pmem mode): a free on another reactor first finishes the
/// frees home is spreading, some of whose entries home has cleared with
/// stores only home's fence makes durable. That reactor must make them
/// durable itself before the blocks go back to the pool, or once reused a
/// power cut could pair an old entry with new data (or revive the older
/// version when the newer one's entry is cleared next).
#[test]
fn pmem_frees_finished_on_another_reactor_are_durable_first() {
    with_mode(Mode::Pmem, || {
        // Enough frees that home is still at them after the flush (it
        // clears 16 an iteration); the pool holds four times as many.
        const OLD: u64 = 200;
        let rig = Rig::new(2, 2 * OLD + 4 * OLD + 256, 256, Layer::Plain, quiet);
        for v in 1..=2 {
            for lba in 0..OLD {
                rig.write(0, lba, v);
            }
            rig.flush(0).unwrap();
        }
        poll_only(&rig, 0, 2);
        let visible = rig.media_entries().iter().flatten().count() as u64;
        let durable = durable_entries_below(&rig, OLD);
        assert!(
            OLD < visible && visible < durable,
            "home cleared some older entries, not durably yet ({visible} visible, {durable} durable)"
        );
        // Reactor 1 alone: an overwrite of its own uncommitted block frees
        // the older one, which first finishes home's frees.
        let a = rig.submit_write(1, 250, 1, false);
        let b = rig.submit_write(1, 250, 2, false);
        poll_only(&rig, 1, 4);
        assert!(a.borrow().is_some() && b.borrow().is_some(), "written");
        assert_eq!(
            durable_entries_below(&rig, OLD),
            OLD,
            "every superseded entry durably cleared"
        );
        rig.run_idle();
        let reboot = rig.reboot(1, quiet);
        for lba in 0..OLD {
            assert_eq!(version(&reboot, 0, lba), 2, "lba {lba}");
        }
    });
}

// ------------------------------------------------- ssd mode: async data I/O

/// A read of a block whose in-place overwrite is in flight returns the
/// whole old version (the new data is not on the device yet); once the
/// overwrite completed, the new one. Both for a committed and an
/// uncommitted block.
#[test]
fn ssd_read_while_an_overwrite_of_the_block_is_in_flight() {
    ssd(|| {
        let mut rig = rig(2, 16);
        rig.wrap_cache_in_error();
        rig.write(0, 2, 1);
        rig.flush(0).unwrap();
        rig.write(0, 3, 1);
        for lba in [2, 3] {
            rig.hold_cache(InjectIoType::Write, 1);
            let w = rig.submit_write(1, lba, 2, false);
            rig.pump_for(Duration::from_millis(5));
            assert!(w.borrow().is_none(), "the overwrite is held");
            assert_eq!(version(&rig, 0, lba), 1, "lba {lba}: old version");
            assert_eq!(version(&rig, 1, lba), 1, "lba {lba}: old version");
            rig.release_cache();
            rig.wait(&w).unwrap();
            assert_eq!(version(&rig, 0, lba), 2, "lba {lba}: new version");
        }
        let s = rig.stats();
        assert_eq!(
            (
                s.writes_allocate,
                s.write_hits_committed,
                s.write_hits_uncommitted
            ),
            (2, 1, 1),
            "both overwrites went in place: {s:?}"
        );
    })
}

/// Writeback vs an in-place overwrite, both orders: (a) the overwrite is in
/// flight when writeback wants the block: the block waits for it and then
/// goes out with the new data; (b) writeback is reading the block when the
/// overwrite comes: the overwrite takes a new block (never the one being
/// read), and the origin ends with the newer version.
#[test]
fn ssd_writeback_and_an_in_place_overwrite_of_the_same_block() {
    ssd(|| {
        let mut rig = rig(2, 16);
        rig.wrap_cache_in_error();
        // (a)
        rig.write(0, 4, 1);
        rig.flush(0).unwrap();
        rig.hold_cache(InjectIoType::Write, 1);
        let w = rig.submit_write(1, 4, 2, false);
        rig.set_options(|o| {
            o.high_watermark = Some(0);
            o.low_watermark = Some(0);
        });
        rig.pump_for(Duration::from_millis(20));
        assert!(w.borrow().is_none(), "the overwrite is held");
        assert_eq!(
            (rig.wc().writeback_in_flight(), rig.origin_block(4)),
            (0, None),
            "writeback waits for the in-place overwrite"
        );
        rig.release_cache();
        rig.wait(&w).unwrap();
        assert!(
            rig.wait_stats(WAIT, |s| s.dirty == 0),
            "written back: {:?}",
            rig.stats()
        );
        assert_eq!(rig.origin_block(4), Some((4, 2)), "(a) the new data");
        // (b)
        rig.set_options(|o| {
            o.high_watermark = Some(100);
            o.low_watermark = Some(100);
        });
        rig.write(0, 5, 1);
        rig.flush(0).unwrap();
        rig.hold_cache(InjectIoType::Read, 1);
        rig.set_options(|o| {
            o.high_watermark = Some(0);
            o.low_watermark = Some(0);
        });
        assert!(
            rig.pump_until(WAIT, || rig.wc().writeback_in_flight() == 1),
            "writeback is reading the block"
        );
        let before = rig.stats();
        rig.write(1, 5, 2);
        let s = rig.stats();
        assert_eq!(
            s.writes_allocate - before.writes_allocate,
            1,
            "the overwrite took a new block: {s:?}"
        );
        assert_eq!(version(&rig, 0, 5), 2);
        rig.release_cache();
        rig.flush(1).unwrap();
        assert!(
            rig.wait_stats(WAIT, |s| s.dirty == 0 && s.writeback_blocks == 0),
            "written back: {:?}",
            rig.stats()
        );
        assert_eq!(rig.origin_block(5), Some((5, 2)), "(b) the newer version");
        let s = rig.settle();
        assert_eq!(s.free_blocks, s.blocks, "every block freed once: {s:?}");
    })
}

/// Free/reuse vs a read in flight: a read of a cached block is held at the
/// cache bdev while the block is dropped (UNMAP), freed and reallocated to
/// another sector. The read then sees a new generation and reads again:
/// it never returns the other sector's data.
#[test]
fn ssd_a_block_reused_under_a_read_in_flight_is_read_again() {
    ssd(|| {
        let mut rig = rig(2, 8);
        rig.wrap_cache_in_error();
        rig.write(0, 1, 1);
        rig.flush(0).unwrap();
        let slot_of = |rig: &Rig, lba: u64| {
            rig.media_entries()
                .iter()
                .position(|e| *e == Some(lba))
                .unwrap_or_else(|| panic!("lba {lba} has an entry"))
        };
        let b = slot_of(&rig, 1);
        rig.hold_cache(InjectIoType::Read, 1);
        let r = rig.submit_read(1, 1, 1);
        rig.pump_for(Duration::from_millis(5));
        assert!(r.borrow().is_none(), "the read is held");
        let u = rig.submit_unmap(0, 1, 1);
        rig.wait(&u).unwrap();
        assert!(
            rig.wait_stats(WAIT, |s| s.free_blocks == s.blocks
                && s.free_blocks_in_grace == 0),
            "the block is back in the pool: {:?}",
            rig.stats()
        );
        // Lowest free first: the next allocation reuses it.
        rig.write(0, 9, 5);
        rig.flush(0).unwrap();
        assert_eq!(slot_of(&rig, 9), b, "block reused for lba 9");
        rig.release_cache();
        let got = rig.wait(&r).expect("read succeeds");
        let got = wcrig::decode(&got.expect("read data"));
        assert!(
            got.is_none() || got == Some((1, 1)),
            "read of lba 1 returned {got:?}"
        );
    })
}

/// Two writes of one sector racing with a commit: (a) both in flight
/// across a commit; (b) one lands before a commit, the other after it.
/// The last one to land wins, the other block is freed exactly once, and
/// after a power cut the sector holds the winner.
#[test]
fn ssd_two_writes_of_one_sector_racing_with_a_commit() {
    ssd(|| {
        for case in ['a', 'b'] {
            let mut rig = rig(2, 8);
            rig.wrap_cache_in_error();
            let (x, y) = match case {
                'a' => {
                    rig.hold_cache(InjectIoType::Write, 2);
                    let x = rig.submit_write(0, 2, 100, false);
                    let y = rig.submit_write(1, 2, 200, false);
                    rig.flush(0).unwrap();
                    (x, y)
                }
                _ => {
                    rig.hold_cache(InjectIoType::Write, 1);
                    let x = rig.submit_write(0, 2, 100, false);
                    let y = rig.submit_write(1, 2, 200, false);
                    rig.wait(&y).unwrap();
                    rig.flush(1).unwrap();
                    assert_eq!(rig.stats().dirty, 1, "200 committed");
                    (x, y)
                }
            };
            assert!(x.borrow().is_none(), "({case}) 100 is held");
            // Reactor 1's held write (if any) lands first, then reactor 0's.
            rig.release_cache();
            if case == 'a' {
                for _ in 0..10_000 {
                    if y.borrow().is_some() {
                        break;
                    }
                    rig.h.poll(1);
                }
                assert!(y.borrow().is_some(), "reactor 1's write landed");
                assert!(x.borrow().is_none(), "reactor 0 not polled yet");
            }
            rig.wait(&x).unwrap();
            assert_eq!(version(&rig, 1, 2), 100, "({case}) the last to land wins");
            rig.flush(0).unwrap();
            let s = rig.settle();
            assert_eq!(
                (s.dirty, s.free_blocks),
                (1, s.blocks - 1),
                "({case}) one block stays: {s:?}"
            );
            let reboot = rig.reboot(1, quiet);
            assert_eq!(version(&reboot, 0, 2), 100, "({case}) after a power cut");
            assert_eq!(reboot.stats().dirty, 1);
        }
    })
}

/// Regression (crash-harness seed 11913901639990295867): a block displaced
/// while an in-place overwrite held it stays allocated until the next
/// commit, in the same commit round as its successor. Writeback took the
/// successor first, then the displaced block, and wrote the older data
/// over the newer on the origin: a later read (a miss) returned it.
#[test]
fn ssd_a_displaced_version_is_never_written_back_over_its_successor() {
    ssd(|| {
        let mut rig = rig(2, 16);
        rig.wrap_cache_in_error();
        // Version 1 on reactor 1 (its log), uncommitted.
        rig.write(1, 3, 1);
        // Version 2 goes in place over it, held at the cache.
        rig.hold_cache(InjectIoType::Write, 1);
        let w2 = rig.submit_write(1, 3, 2, false);
        // Version 3 on reactor 0: the block is busy, a new one is taken
        // and displaces version 1's (same commit round, held: not freed).
        rig.write(0, 3, 3);
        // The commit hands reactor 0's log (version 3) to the writeback
        // queue before reactor 1's (the displaced block).
        rig.flush(0).unwrap();
        assert!(w2.borrow().is_none(), "version 2 is held");
        rig.release_cache();
        rig.wait(&w2).unwrap();
        assert_eq!(version(&rig, 0, 3), 3, "version 3 is current");
        rig.set_options(|o| {
            o.high_watermark = Some(0);
            o.low_watermark = Some(0);
        });
        assert!(
            rig.wait_stats(WAIT, |s| s.dirty == 0 && s.writeback_blocks == 0),
            "written back: {:?}",
            rig.stats()
        );
        rig.pump_for(Duration::from_millis(20));
        assert_eq!(rig.origin_block(3), Some((3, 3)), "the origin went back");
        assert_eq!(version(&rig, 1, 3), 3);
        // The displaced block is freed by the next commit.
        rig.write(0, 10, 1);
        rig.flush(0).unwrap();
        let s = rig.settle();
        assert_eq!(s.free_blocks + s.dirty, s.blocks, "{s:?}");
    })
}
