//! The concurrency hazards of design §3.4, each as an exact schedule on the
//! deterministic reactor harness (several logical reactors, one thread; the
//! test decides who polls), over a simulated pmem cache.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use wc_bdev::{BdevChannel, DmaBuf, FnCompletion, Io, IoCompletion, IoStatus};
use wc_reactor::Harness;
use wc_sim::{SimDisk, SimPmem};
use wc_writecache::CreateOpts;

const BS: u32 = 512;
static RUN: AtomicU64 = AtomicU64::new(0);

fn unique(tag: &str) -> String {
    format!("hz{tag}{}", RUN.fetch_add(1, Ordering::Relaxed))
}

fn block(lba: u64, version: u64) -> DmaBuf {
    let mut b = DmaBuf::new(BS as usize);
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(if i % 2 == 0 { lba } else { version }).to_le_bytes());
    }
    b
}

fn version_of(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[8..16].try_into().unwrap())
}

struct Rig {
    h: Harness,
    chans: Vec<Rc<BdevChannel>>,
    _descs: Vec<wc_bdev::Desc>,
    pmem: Arc<SimPmem>,
    name: String,
}

fn pmem_bytes(blocks: u64) -> usize {
    ((64 + 16 * blocks).div_ceil(BS as u64) * BS as u64 + blocks * BS as u64) as usize
}

/// An instance with `reactors` logical reactors over `origin_bdev` (or a
/// fresh SimDisk) and a SimPmem of `cache_blocks` blocks.
fn make_rig(
    reactors: usize,
    cache_blocks: u64,
    pmem: Option<Arc<SimPmem>>,
    origin_bdev: Option<String>,
    tune: impl FnOnce(&mut CreateOpts),
) -> Rig {
    let h = Harness::new(reactors);
    let origin = origin_bdev.unwrap_or_else(|| {
        let o = unique("o");
        wc_sim::register_disk_bdev(&o, Arc::new(SimDisk::new(64 * BS as usize)), BS).unwrap();
        o
    });
    let pmem = pmem.unwrap_or_else(|| Arc::new(SimPmem::new(pmem_bytes(cache_blocks))));
    let c = unique("c");
    wc_sim::register_pmem_bdev(&c, pmem.clone(), BS).unwrap();
    let name = unique("w");
    let mut opts = CreateOpts::new(&name, &origin, &c);
    opts.block_size = Some(BS);
    opts.autocommit_blocks = Some(1 << 20);
    opts.autocommit_time_ms = Some(1 << 30);
    opts.high_watermark = Some(100);
    opts.low_watermark = Some(100);
    tune(&mut opts);
    h.on(0, || wc_writecache::create(opts)).unwrap();
    let mut chans = Vec::new();
    let mut descs = Vec::new();
    for r in 0..reactors {
        let d = wc_bdev::open(&name, true, None).unwrap();
        chans.push(h.on(r, || d.channel()).unwrap());
        descs.push(d);
    }
    Rig {
        h,
        chans,
        _descs: descs,
        pmem,
        name,
    }
}

type Slot = Rc<RefCell<Option<(IoStatus, Option<DmaBuf>)>>>;

fn cb(slot: &Slot) -> Rc<dyn IoCompletion> {
    let s = slot.clone();
    Rc::new(FnCompletion(move |mut io: Io, _| {
        let b = io.take_buf();
        *s.borrow_mut() = Some((io.status(), b));
    }))
}

impl Rig {
    fn write(&self, r: usize, lba: u64, version: u64) -> Slot {
        let slot: Slot = Rc::default();
        let ch = self.chans[r].clone();
        let c = cb(&slot);
        self.h
            .on(r, move || ch.write(lba, block(lba, version), false, &c, 0));
        slot
    }

    fn flush(&self, r: usize) -> Slot {
        let slot: Slot = Rc::default();
        let ch = self.chans[r].clone();
        let c = cb(&slot);
        self.h.on(r, move || ch.flush(0, 0, &c, 0));
        slot
    }

    fn read(&self, r: usize, lba: u64) -> u64 {
        let slot: Slot = Rc::default();
        let ch = self.chans[r].clone();
        let c = cb(&slot);
        self.h
            .on(r, move || ch.read(lba, DmaBuf::new(BS as usize), &c, 0));
        assert!(
            self.h.run_until(10_000, || slot.borrow().is_some()),
            "read completes"
        );
        let (st, b) = slot.borrow_mut().take().unwrap();
        assert_eq!(st, IoStatus::Success);
        version_of(&b.unwrap())
    }

    fn wait(&self, s: &Slot) -> IoStatus {
        assert!(
            self.h.run_until(100_000, || s.borrow().is_some()),
            "operation completes"
        );
        let st = s.borrow().as_ref().unwrap().0;
        st
    }

    fn stats(&self) -> wc_writecache::Stats {
        wc_writecache::stats(&self.name).unwrap()
    }
}

/// Commit vs in-flight writes: a FLUSH submitted on reactor 0 after a write
/// completed on reactor 1 must wait for reactor 1's fence, and then the
/// write survives a power cut that loses every unfenced store.
#[test]
fn flush_waits_for_the_fence_of_every_writing_core() {
    let rig = make_rig(2, 16, None, None, |_| {});
    let w = rig.write(1, 5, 77);
    // The write completes on reactor 1 (its completion poller runs there).
    for _ in 0..4 {
        rig.h.poll(1);
    }
    assert_eq!(rig.wait(&w), IoStatus::Success);
    let before = rig.pmem.pending_words_of(1);
    assert!(before > 0, "the write's stores are not yet durable");
    let f = rig.flush(0);
    // Only reactor 0 runs: the commit cannot finish without reactor 1.
    for _ in 0..200 {
        rig.h.poll(0);
    }
    assert!(
        f.borrow().is_none(),
        "flush completed before reactor 1 fenced"
    );
    assert_eq!(
        rig.pmem.pending_words_of(1),
        before,
        "nobody fenced reactor 1's stores"
    );
    // Reactor 1 gets its turn: fence, hand over; then the flush completes.
    assert_eq!(rig.wait(&f), IoStatus::Success);
    assert_eq!(rig.pmem.pending_words_of(1), 0);
    // Power cut losing everything unfenced: the write is there.
    let img = rig.pmem.crash_all_pending_lost();
    // Watermark 100: nothing was written back, a blank origin will do.
    let reboot = make_rig(
        1,
        16,
        Some(Arc::new(SimPmem::from_image(img))),
        None,
        |_| {},
    );
    assert_eq!(reboot.read(0, 5), 77);
}

/// Read vs reuse: a block freed while a reader may still copy out of it
/// goes back to the pool only after the reader's epoch ends.
#[test]
fn freed_blocks_wait_for_readers_before_reuse() {
    let rig = make_rig(2, 8, None, None, |_| {});
    let w = rig.write(0, 1, 10);
    rig.wait(&w);
    let f = rig.flush(0);
    rig.wait(&f);
    let allocatable = |s: wc_writecache::Stats| s.free_blocks - s.free_blocks_in_grace;
    let free0 = allocatable(rig.stats());
    // A reader on another thread is mid-copy: it holds an epoch pin.
    let (pinned_tx, pinned_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let _guard = crossbeam::epoch::pin();
        pinned_tx.send(()).unwrap();
        release_rx.recv().unwrap();
    });
    pinned_rx.recv().unwrap();
    // Overwrite and commit: the superseded block is freed...
    let w = rig.write(1, 1, 11);
    rig.wait(&w);
    let f = rig.flush(0);
    rig.wait(&f);
    for _ in 0..50 {
        rig.h.run_until_idle(10);
        crossbeam::epoch::pin().flush();
    }
    // ...but is not back in the pool while the reader is pinned.
    assert_eq!(
        allocatable(rig.stats()),
        free0 - 1,
        "reusable under a pinned reader"
    );
    assert_eq!(rig.stats().free_blocks_in_grace, 1);
    release_tx.send(()).unwrap();
    reader.join().unwrap();
    let mut back = false;
    for _ in 0..200 {
        rig.h.run_until_idle(10);
        crossbeam::epoch::pin().flush();
        if allocatable(rig.stats()) == free0 {
            back = true;
            break;
        }
    }
    assert!(back, "the freed block returns after the grace period");
    assert_eq!(rig.read(0, 1), 11);
}

/// Overwrite vs writeback: while the old version is being written back the
/// sector is overwritten and committed. The old block is freed exactly once
/// (by the writeback, after the origin acknowledged it), the newer version
/// is written back only after the older one, and the origin ends newest.
#[test]
fn overwrite_during_writeback_keeps_the_newer_version_and_frees_once() {
    let h0 = Harness::new(1);
    let base = unique("b");
    h0.on(0, || {
        wc_sim::register_disk_bdev(&base, Arc::new(SimDisk::new(64 * BS as usize)), BS)
    })
    .unwrap();
    // An error bdev holds origin writes ("pending") until resumed.
    wc_bdev_error::create(&base, None).unwrap();
    let ee = format!("EE_{base}");
    drop(h0);
    let rig = make_rig(2, 8, None, Some(ee.clone()), |o| o.writeback_jobs = Some(8));
    let w = rig.write(0, 3, 1);
    rig.wait(&w);
    let f = rig.flush(0);
    rig.wait(&f);
    wc_bdev_error::inject(
        &ee,
        wc_bdev_error::InjectIoType::Write,
        wc_bdev_error::ErrorType::Pending,
        1,
    )
    .unwrap();
    let mut set = wc_writecache::SetOpts {
        name: rig.name.clone(),
        ..Default::default()
    };
    set.high_watermark = Some(0);
    set.low_watermark = Some(0);
    rig.h.on(0, || wc_writecache::set_options(&set)).unwrap();
    rig.h.run_until(1000, || {
        wc_writecache::get(&rig.name).unwrap().writeback_in_flight() == 1
    });
    assert_eq!(
        wc_writecache::get(&rig.name).unwrap().writeback_in_flight(),
        1,
        "version 1 is going out"
    );
    // Overwrite on the other reactor and commit while version 1 is held.
    let w = rig.write(1, 3, 2);
    rig.wait(&w);
    let f = rig.flush(1);
    rig.wait(&f);
    for _ in 0..50 {
        rig.h.run_until_idle(10);
    }
    assert_eq!(rig.read(0, 3), 2);
    let s = rig.stats();
    assert_eq!(
        s.writeback_blocks, 1,
        "version 2 waits for version 1's writeback: {s:?}"
    );
    // Release version 1: it is freed once, then version 2 goes out.
    rig.h.on(0, || wc_bdev_error::resume_pending(&ee)).unwrap();
    let ok = rig.h.run_until(200_000, || {
        crossbeam::epoch::pin().flush();
        let s = rig.stats();
        s.dirty == 0 && s.writeback_blocks == 0 && s.free_blocks == s.blocks
    });
    let s = rig.stats();
    assert!(ok, "everything written back and freed exactly once: {s:?}");
    assert_eq!(s.writeback_completed_blocks, 2);
    // The origin holds the newest version.
    let d = wc_bdev::open(&ee, false, None).unwrap();
    let ch = rig.h.on(0, || d.channel()).unwrap();
    let slot: Slot = Rc::default();
    let c = cb(&slot);
    rig.h.on(0, || ch.read(3, DmaBuf::new(BS as usize), &c, 0));
    rig.h.run_until(10_000, || slot.borrow().is_some());
    let got = slot.borrow_mut().take().unwrap().1.unwrap();
    assert_eq!(version_of(&got), 2, "the origin ended with the older data");
}

/// Same-sector writes from two cores: the index ends with one of them and
/// the loser's block is freed exactly once; after a power cut the recovered
/// sector holds the winner.
#[test]
fn same_sector_writes_from_two_cores_free_the_loser_once() {
    let rig = make_rig(2, 8, None, None, |_| {});
    let a = rig.write(0, 2, 100);
    let b = rig.write(1, 2, 200);
    rig.wait(&a);
    rig.wait(&b);
    let s = rig.stats();
    assert_eq!(s.write_hits_uncommitted, 1, "{s:?}");
    let winner = rig.read(0, 2);
    assert_eq!(winner, 200);
    let f = rig.flush(1);
    rig.wait(&f);
    let ok = rig.h.run_until(10_000, || {
        crossbeam::epoch::pin().flush();
        rig.stats().free_blocks == rig.stats().blocks - 1
    });
    assert!(ok, "exactly one block stays allocated: {:?}", rig.stats());
    let img = rig.pmem.crash_all_pending_lost();
    let reboot = make_rig(1, 8, Some(Arc::new(SimPmem::from_image(img))), None, |_| {});
    assert_eq!(reboot.read(0, 2), winner);
    assert_eq!(reboot.stats().dirty, 1);
}

/// Suspend quiesces (new I/O waits, nothing fails), commits, and with
/// flush-on-suspend writes everything back; resume releases the held I/O.
#[test]
fn suspend_holds_io_commits_and_resume_releases_it() {
    let rig = make_rig(2, 16, None, None, |_| {});
    let w = rig.write(0, 4, 1);
    rig.wait(&w);
    // Resume without suspend is refused, state unchanged.
    assert!(wc_writecache::resume(&rig.name).is_err());
    wc_writecache::set_flush_on_suspend(&rig.name, true).unwrap();
    let done: Rc<RefCell<Option<Result<(), String>>>> = Rc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let n = rig.name.clone();
    rig.h.on(0, || {
        wc_writecache::suspend(
            &n,
            Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()),
        )
    });
    assert!(rig.h.run_until(200_000, || {
        if let Ok(r) = rx.try_recv() {
            *done.borrow_mut() = Some(r);
        }
        done.borrow().is_some()
    }));
    assert_eq!(done.borrow().clone(), Some(Ok(())));
    assert_eq!(wc_writecache::is_suspended(&rig.name), Some(true));
    let s = rig.stats();
    assert_eq!(
        (s.dirty, s.dirty_uncommitted),
        (0, 0),
        "flush-on-suspend wrote everything back: {s:?}"
    );
    // A second suspend is refused.
    let (tx, rx) = std::sync::mpsc::channel();
    rig.h.on(0, || {
        wc_writecache::suspend(&rig.name, Box::new(move |r| tx.send(r.is_err()).unwrap()))
    });
    assert!(rx.recv().unwrap());
    // New I/O is held, not failed.
    let w = rig.write(1, 5, 2);
    for _ in 0..100 {
        rig.h.run_until_idle(10);
    }
    assert!(w.borrow().is_none(), "I/O ran while suspended");
    wc_writecache::resume(&rig.name).unwrap();
    assert_eq!(rig.wait(&w), IoStatus::Success);
    assert_eq!(rig.read(0, 5), 2);
    // Delete while suspended is refused; the instance stays.
    suspend_and_wait(&rig);
    let (tx, rx) = std::sync::mpsc::channel();
    rig.h.on(0, || {
        wc_writecache::delete(
            &rig.name,
            false,
            Box::new(move |r| tx.send(r.is_err()).unwrap()),
        )
    });
    assert!(rx.recv().unwrap(), "delete while suspended must fail");
    assert!(wc_bdev::lookup(&rig.name).is_some());
    // The safe-removal sequence: flush-on-suspend + suspend drained it all;
    // resume and delete (which drains again: flush-on-suspend is set).
    assert_eq!(rig.stats().dirty, 0);
    wc_writecache::resume(&rig.name).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    rig.h.on(0, || {
        wc_writecache::delete(
            &rig.name,
            false,
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        )
    });
    assert!(
        rig.h
            .run_until(200_000, || matches!(rx.try_recv(), Ok(true))),
        "safe removal deletes"
    );
    assert!(wc_bdev::lookup(&rig.name).is_none());
}

fn suspend_and_wait(rig: &Rig) {
    let (tx, rx) = std::sync::mpsc::channel();
    let n = rig.name.clone();
    rig.h.on(0, || {
        wc_writecache::suspend(
            &n,
            Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()),
        )
    });
    let got: RefCell<Option<Result<(), String>>> = RefCell::default();
    assert!(rig.h.run_until(200_000, || {
        if let Ok(r) = rx.try_recv() {
            *got.borrow_mut() = Some(r);
        }
        got.borrow().is_some()
    }));
    assert_eq!(got.borrow().clone(), Some(Ok(())));
}

/// A cache media error (the media can no longer persist) puts the instance
/// in its error state: writes and flushes fail with the error, the
/// superblock is not advanced, and everything cached still reads back.
#[test]
fn a_cache_media_error_enters_the_error_state_and_keeps_data() {
    let rig = make_rig(2, 16, None, None, |_| {});
    let w = rig.write(0, 6, 1);
    rig.wait(&w);
    let f = rig.flush(1);
    assert_eq!(rig.wait(&f), IoStatus::Success);
    let seq = rig.stats().seq_count;
    let w = rig.write(1, 7, 2);
    rig.wait(&w);
    rig.pmem.inject_media_error(libc::EIO);
    let f = rig.flush(0);
    assert_eq!(rig.wait(&f), IoStatus::Failed(libc::EIO));
    let s = rig.stats();
    assert_eq!((s.error, s.seq_count), (libc::EIO, seq), "{s:?}");
    let w = rig.write(0, 8, 3);
    assert_eq!(rig.wait(&w), IoStatus::Failed(libc::EIO));
    // Nothing cached was dropped.
    assert_eq!((rig.read(0, 6), rig.read(1, 7)), (1, 2));
    assert_eq!(rig.stats().dirty, 2);
}
