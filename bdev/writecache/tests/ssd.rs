//! ssd mode (design §3.1, issue 13) on the shared rig, with the cache on a
//! simulated disk with a volatile write cache:
//! * the data path: writes, in-place overwrites, reads of every hit/miss
//!   pattern of up to 8 blocks per request, WRITE_ZEROES, UNMAP;
//! * §3.11: the kernel's counts for its reference plan, in both modes;
//! * the on-media protocol: commits write only dirty metadata regions,
//!   flush, then the superblock; a commit with no new entries only
//!   flushes; restart (delete + re-attach) and power loss keep what was
//!   committed; free blocks go out lowest first;
//! * refusals (cache block size larger than asked) and cache-bdev errors
//!   (the error state, nothing cached dropped).

mod wcrig;

use std::sync::Arc;

use wc_bdev_error::{ErrorType, InjectIoType};
use wc_sim::SimDisk;
use wc_writecache::Mode;
use wcrig::{content, decode, with_mode, CacheDev, Layer, Rig, BS};

fn ssd<T>(f: impl FnOnce() -> T) -> T {
    let mut out = None;
    with_mode(Mode::Ssd, || out = Some(f()));
    out.unwrap()
}

fn cache_disk(rig: &Rig) -> Arc<SimDisk> {
    match &rig.cache {
        CacheDev::Disk(d) => d.clone(),
        CacheDev::Pmem(_) => panic!("not an ssd-mode rig"),
    }
}

/// A rig whose autocommits never fire: only FLUSH (and FUA) commit.
fn quiet(o: &mut wc_writecache::CreateOpts) {
    o.autocommit_blocks = Some(1 << 30);
    o.autocommit_time_ms = Some(1 << 30);
}

#[test]
fn writes_read_back_and_survive_a_restart() {
    ssd(|| {
        let mut rig = Rig::new(2, 64, 256, Layer::Plain, quiet);
        for lba in 0..20 {
            rig.write((lba % 2) as usize, lba, 1);
        }
        for lba in 0..20 {
            assert_eq!(rig.read_block(1, lba), Ok(Some((lba, 1))));
        }
        assert_eq!(rig.read_block(0, 30), Ok(None), "a miss reads the origin");
        rig.flush(0).unwrap();
        let s = rig.stats();
        assert_eq!(
            (s.seq_count, s.dirty, s.writes_allocate),
            (1, 20, 20),
            "{s:?}"
        );
        // Nothing reached the origin; delete commits, re-attach recovers.
        assert_eq!(rig.origin_block(3), None);
        rig.detach(false).unwrap();
        rig.attach().unwrap();
        let s = rig.stats();
        assert_eq!((s.dirty, s.free_blocks + s.dirty), (20, s.blocks), "{s:?}");
        for lba in 0..20 {
            assert_eq!(rig.read_block(0, lba), Ok(Some((lba, 1))), "lba {lba}");
        }
        // Flush writes everything back.
        rig.flush_rpc().unwrap();
        for lba in 0..20 {
            assert_eq!(rig.origin_block(lba), Some((lba, 1)), "origin lba {lba}");
        }
        let s = rig.settle();
        assert_eq!((s.dirty, s.free_blocks), (0, s.blocks), "{s:?}");
    })
}

#[test]
fn overwrites_of_cached_blocks_go_in_place() {
    ssd(|| {
        let rig = Rig::new(1, 64, 256, Layer::Plain, quiet);
        rig.write(0, 5, 1);
        rig.write(0, 5, 2); // uncommitted hit: in place
        rig.flush(0).unwrap();
        rig.write(0, 5, 3); // committed hit: in place
        let s = rig.stats();
        assert_eq!(
            (
                s.write_blocks,
                s.writes_allocate,
                s.write_hits_uncommitted,
                s.write_hits_committed,
                s.dirty
            ),
            (3, 1, 1, 1, 1),
            "{s:?}"
        );
        assert_eq!(rig.read_block(0, 5), Ok(Some((5, 3))));
        // The overwrite is flushed by the next commit, which writes no
        // superblock (no new entries).
        let disk = cache_disk(&rig);
        let flushes = disk.flush_count();
        rig.flush(0).unwrap();
        assert_eq!(disk.flush_count(), flushes + 1, "one device flush");
        assert_eq!(rig.stats().seq_count, 1, "no new sequence");
        // A commit with nothing new does not even flush.
        rig.flush(0).unwrap();
        assert_eq!(disk.flush_count(), flushes + 1);
        let img = disk.crash_all_unflushed_lost();
        assert_eq!(
            u64::from_le_bytes(img[24..32].try_into().unwrap()),
            1,
            "superblock seq_count on the device"
        );
    })
}

#[test]
fn free_blocks_go_out_lowest_first() {
    ssd(|| {
        let rig = Rig::new(1, 32, 256, Layer::Plain, quiet);
        for lba in 0..8 {
            rig.write(0, 100 + lba, 1);
        }
        rig.flush(0).unwrap();
        // Unmap a few (their blocks are freed), then write new LBAs: they
        // land in the lowest free blocks, in order.
        // The freed blocks are allocatable only once their cleared entries
        // are synced and their grace period is over: wait for that, or the
        // new writes would race it and take later blocks.
        let u = rig.submit_unmap(0, 101, 3);
        rig.wait(&u).unwrap();
        let s = rig.settle();
        assert_eq!(
            (s.dirty, s.free_blocks_in_grace, s.free_blocks),
            (5, 0, s.blocks - 5),
            "{s:?}"
        );
        for lba in 0..4 {
            rig.write(0, 200 + lba, 1);
        }
        rig.flush(0).unwrap();
        let e = rig.media_entries();
        let held: Vec<Option<u64>> = e[..9].to_vec();
        assert_eq!(
            held,
            vec![
                Some(100),
                Some(200),
                Some(201),
                Some(202),
                Some(104),
                Some(105),
                Some(106),
                Some(107),
                Some(203)
            ],
            "entries by block"
        );
    })
}

/// One-block writes that come several per reactor iteration are queued
/// (their index slots prefetched) and placed together by the channel's
/// poller: placed only then, in the order they came, each read back and
/// counted as if it had run at once.
#[test]
fn writes_coming_together_are_placed_together_in_order() {
    ssd(|| {
        let rig = Rig::new(1, 64, 256, Layer::Plain, quiet);
        // Several writes in one iteration: placed at once, and the next
        // iteration's writes are batched.
        let first: Vec<_> = (0..16).map(|l| rig.submit_write(0, l, 1, false)).collect();
        assert_eq!(rig.stats().writes_allocate, 16, "placed at submission");
        rig.h.poll(0);
        let second: Vec<_> = (16..32)
            .map(|l| rig.submit_write(0, l, 1, false))
            .chain((0..4).map(|l| rig.submit_write(0, l, 2, false)))
            // Two versions of one block in one batch: the later wins.
            .chain([3, 4].map(|v| rig.submit_write(0, 40, v, false)))
            .collect();
        let s = rig.stats();
        assert_eq!(
            (s.write_blocks, s.writes_allocate),
            (16, 16),
            "the batch waits for the poller: {s:?}"
        );
        for w in first.iter().chain(&second) {
            rig.wait(w).unwrap();
        }
        // (The second version of block 40 found the first still in
        // flight, unpublished: a block of its own, as without a batch.)
        let s = rig.stats();
        assert_eq!(
            (
                s.writes_allocate,
                s.write_hits_uncommitted + s.write_hits_committed
            ),
            (34, 4),
            "{s:?}"
        );
        for l in 0..32 {
            let v = if l < 4 { 2 } else { 1 };
            assert_eq!(rig.read_block(0, l), Ok(Some((l, v))), "lba {l}");
        }
        assert_eq!(rig.read_block(0, 40), Ok(Some((40, 4))));
        let s = rig.settle();
        assert_eq!((s.dirty, s.free_blocks + s.dirty), (33, s.blocks), "{s:?}");
    })
}

/// Batching outlives an iteration that brought no I/O: a submitter
/// outside the reactor (fio's engine: submit, then poll for completions)
/// sees its completions one poll after the batch ran, so an empty poll
/// comes between every two rounds. Taken for "one at a time", it served
/// every other round unbatched.
fn batching_survives_an_empty_poll() {
    let rig = Rig::new(1, 64, 256, Layer::Plain, quiet);
    let round = |base: u64| -> Vec<_> {
        (base..base + 8)
            .map(|l| rig.submit_write(0, l, 1, false))
            .collect()
    };
    let first = round(0);
    rig.h.poll(0); // the batch of 8: batching on
    for _ in 0..3 {
        rig.h.poll(0); // nothing new came
    }
    let second = round(8);
    let s = rig.stats();
    assert_eq!(
        (s.write_blocks, s.writes_allocate),
        (8, 8),
        "the second round waits for the poller as a batch: {s:?}"
    );
    for w in first.iter().chain(&second) {
        rig.wait(w).unwrap();
    }
    for l in 0..16 {
        assert_eq!(rig.read_block(0, l), Ok(Some((l, 1))), "lba {l}");
    }
}

#[test]
fn batching_survives_an_empty_poll_pmem() {
    batching_survives_an_empty_poll();
}

#[test]
fn batching_survives_an_empty_poll_ssd() {
    ssd(batching_survives_an_empty_poll);
}

/// Every hit/miss pattern of 1..=8 blocks, at a few alignments, over
/// blocks cached at different places in the cache: each request must
/// reassemble exactly.
#[test]
fn reads_mixing_hits_and_misses_are_reassembled_exactly() {
    ssd(|| {
        let rig = Rig::new(1, 256, 1024, Layer::Plain, quiet);
        let mut base = 0u64;
        let mut checked = 0;
        for len in 1..=8u64 {
            for pattern in 0u32..(1 << len) {
                // Cached blocks hold version 2; the origin holds version 1
                // of every block (written through a clean flush first).
                for i in 0..len {
                    rig.disk.write_at(
                        ((base + i) * BS as u64) as usize,
                        &content(base + i, 1),
                        true,
                    );
                }
                // Hits are written in reverse so that their cache blocks
                // are not in LBA order.
                for i in (0..len).rev() {
                    if pattern & (1 << i) != 0 {
                        rig.write(0, base + i, 2);
                    }
                }
                let r = rig.submit_read(0, base, len);
                let data = rig.wait(&r).unwrap().unwrap();
                for i in 0..len {
                    let want = if pattern & (1 << i) != 0 { 2 } else { 1 };
                    let blk = &data[(i * BS as u64) as usize..((i + 1) * BS as u64) as usize];
                    assert_eq!(
                        decode(blk),
                        Some((base + i, want)),
                        "len {len} pattern {pattern:#b} block {i}"
                    );
                }
                checked += 1;
                base += len + (pattern as u64 % 3);
                if base + 16 > 1024 {
                    // Start over with an empty cache.
                    rig.flush_rpc().unwrap();
                    let u = rig.submit_unmap(0, 0, 1024);
                    rig.wait(&u).unwrap();
                    rig.settle();
                    base = 0;
                }
            }
        }
        assert_eq!(checked, 510);
        let s = rig.stats();
        assert!(s.read_hits > 0 && s.read_hits < s.read_blocks, "{s:?}");
    })
}

#[test]
fn write_zeroes_and_unmap() {
    ssd(|| {
        let rig = Rig::new(1, 32, 256, Layer::Plain, quiet);
        for lba in 0..4 {
            rig.write(0, lba, 1);
        }
        let z = rig.submit_write_zeroes(0, 1, 2);
        rig.wait(&z).unwrap();
        assert_eq!(rig.read_block(0, 0), Ok(Some((0, 1))));
        assert_eq!(rig.read_block(0, 1), Ok(None), "zeroes");
        assert_eq!(rig.read_block(0, 2), Ok(None), "zeroes");
        assert_eq!(rig.read_block(0, 3), Ok(Some((3, 1))));
        let u = rig.submit_unmap(0, 3, 1);
        rig.wait(&u).unwrap();
        assert_eq!(rig.read_block(0, 3), Ok(None), "unmapped: origin (zero)");
    })
}

/// The §3.11 plan: 900 writes + FLUSH, 300 overwrites + FLUSH, 200
/// overwrites + FLUSH, then writes with no FLUSH (pmem: 180 overwrites and
/// 300 new; ssd: 300 new), on a cache of 4080 blocks. Autocommits are off,
/// so only the plan's FLUSHes commit. The kernel's counts (Linux 6.1).
fn reference_plan(mode: Mode) -> wc_writecache::Stats {
    let mut out = None;
    with_mode(mode, || {
        let rig = Rig::new(1, 4080, 4096, Layer::Plain, quiet);
        assert_eq!(rig.stats().blocks, 4080);
        for lba in 0..900 {
            rig.write(0, lba, 1);
        }
        rig.flush(0).unwrap();
        for lba in 0..300 {
            rig.write(0, lba, 2);
        }
        rig.flush(0).unwrap();
        for lba in 300..500 {
            rig.write(0, lba, 2);
        }
        rig.flush(0).unwrap();
        if mode == Mode::Pmem {
            for lba in 500..680 {
                rig.write(0, lba, 3);
            }
        }
        for lba in 900..1200 {
            rig.write(0, lba, 1);
        }
        out = Some(rig.settle());
    });
    out.unwrap()
}

#[test]
fn reference_plan_gives_the_kernels_counts_in_ssd_mode() {
    let s = reference_plan(Mode::Ssd);
    assert_eq!(
        (s.write_blocks, s.writes_allocate, s.write_hits_committed),
        (1700, 1200, 500),
        "{s:?}"
    );
    assert_eq!((s.write_hits_uncommitted, s.flushes), (0, 3), "{s:?}");
    assert_eq!(s.seq_count, 1, "{s:?}");
    assert_eq!((s.blocks, s.free_blocks), (4080, 4080 - 1200), "{s:?}");
}

#[test]
fn reference_plan_gives_the_kernels_counts_in_pmem_mode() {
    let s = reference_plan(Mode::Pmem);
    assert_eq!(
        (s.write_blocks, s.writes_allocate, s.write_hits_committed),
        (1880, 1880, 680),
        "{s:?}"
    );
    assert_eq!((s.write_hits_uncommitted, s.flushes), (0, 3), "{s:?}");
    assert_eq!(s.seq_count, 3, "{s:?}");
    // 900 + 300 new + 180 newer versions (their older ones wait for the
    // commit that covers them).
    assert_eq!((s.blocks, s.free_blocks), (4080, 4080 - 1380), "{s:?}");
}

#[test]
fn committed_data_survives_power_loss_and_unflushed_data_may_not() {
    ssd(|| {
        let rig = Rig::new(1, 64, 256, Layer::Plain, quiet);
        for lba in 0..10 {
            rig.write(0, lba, 1);
        }
        rig.flush(0).unwrap();
        for lba in 5..15 {
            rig.write(0, lba, 2);
        }
        let w = rig.submit_write(0, 40, 7, true); // FUA
        rig.wait(&w).unwrap();
        // Power fails with every unflushed write lost, or every one kept.
        let disk = cache_disk(&rig);
        for img in [
            disk.crash_all_unflushed_lost(),
            disk.crash_all_unflushed_kept(),
        ] {
            let origin = rig.disk.crash_all_unflushed_lost();
            let mut r2 = Rig::new(1, 64, 256, Layer::Plain, quiet);
            let CacheDev::Disk(d2) = &r2.cache else {
                unreachable!()
            };
            let d2 = d2.clone();
            // Reboot the new rig from the images: detach, swap media, attach.
            r2.detach(false).unwrap();
            wc_sim::delete(&r2.cache_name).unwrap();
            wc_sim::delete(&r2.disk_name).unwrap();
            drop(d2);
            let c = Arc::new(SimDisk::from_image(img));
            let o = Arc::new(SimDisk::from_image(origin));
            wc_sim::register_disk_bdev(&r2.cache_name, c.clone(), BS).unwrap();
            wc_sim::register_disk_bdev(&r2.disk_name, o.clone(), BS).unwrap();
            r2.cache = CacheDev::Disk(c);
            r2.disk = o;
            r2.attach().unwrap();
            for lba in 0..5 {
                assert_eq!(r2.read_block(0, lba), Ok(Some((lba, 1))), "lba {lba}");
            }
            for lba in 5..10 {
                let got = r2.read_block(0, lba).unwrap();
                assert!(
                    got == Some((lba, 1)) || got == Some((lba, 2)),
                    "lba {lba}: {got:?}"
                );
            }
            for lba in 10..15 {
                let got = r2.read_block(0, lba).unwrap();
                assert!(got.is_none() || got == Some((lba, 2)), "lba {lba}: {got:?}");
            }
            assert_eq!(r2.read_block(0, 40), Ok(Some((40, 7))), "FUA write");
        }
    })
}

#[test]
fn a_cache_bdev_with_larger_blocks_than_asked_is_refused() {
    ssd(|| {
        let mut rig = Rig::new(1, 64, 256, Layer::Plain, quiet);
        rig.detach(false).unwrap();
        let big = wcrig::unique("big");
        wc_sim::sim_disk_bdev(&big, 64, 4096).unwrap();
        let mut o = rig.opts.clone();
        o.cache_bdev = big.clone();
        o.block_size = Some(512);
        rig.opts = o;
        let e = rig.attach().unwrap_err();
        assert!(
            e.contains("4096-byte blocks, larger than block_size 512"),
            "{e}"
        );
        wc_sim::delete(&big).unwrap();
        // A start_sector off the cache bdev's block boundaries too.
        let odd = wcrig::unique("odd");
        wc_sim::sim_disk_bdev(&odd, 64, 4096).unwrap();
        let mut o = rig.opts.clone();
        o.cache_bdev = odd.clone();
        o.block_size = Some(4096);
        o.start_sector = Some(1);
        rig.opts = o;
        let e = rig.attach().unwrap_err();
        assert!(e.contains("not on a block boundary"), "{e}");
        wc_sim::delete(&odd).unwrap();
        // Restore what the rig's drop deletes.
        rig.opts.cache_bdev = rig.cache_name.clone();
        rig.opts.block_size = Some(BS);
        rig.opts.start_sector = None;
        rig.attach().unwrap();
    })
}

#[test]
fn cache_bdev_errors_enter_the_error_state_and_keep_cached_data() {
    ssd(|| {
        let mut rig = Rig::new(1, 64, 256, Layer::Plain, quiet);
        rig.detach(false).unwrap();
        // Put an error bdev between the writecache and its cache.
        wc_bdev_error::create(&rig.cache_name, None).unwrap();
        let ee = format!("EE_{}", rig.cache_name);
        rig.opts.cache_bdev = ee.clone();
        rig.attach().unwrap();
        for lba in 0..8 {
            rig.write(0, lba, 1);
        }
        rig.flush(0).unwrap();
        wc_bdev_error::inject(&ee, InjectIoType::Write, ErrorType::Failure, 1).unwrap();
        let w = rig.submit_write(0, 50, 1, false);
        assert_eq!(rig.wait(&w), Err(libc::EIO), "failed cache write");
        let s = rig.stats();
        assert_eq!((s.error, s.dirty), (libc::EIO, 8), "{s:?}");
        let info = rig.info_json();
        assert_eq!(
            info["driver_specific"]["writecache"]["error"].as_i64(),
            Some(libc::EIO as i64)
        );
        // Writes and FLUSH fail; reads of cached data still work.
        assert_eq!(rig.flush(0), Err(libc::EIO));
        let w = rig.submit_write(0, 3, 2, false);
        assert_eq!(rig.wait(&w), Err(libc::EIO));
        for lba in 0..8 {
            assert_eq!(rig.read_block(0, lba), Ok(Some((lba, 1))));
        }
        // A cache read error is an error state too (on a fresh instance).
        rig.detach(false).unwrap();
        wc_bdev_error::clear(&ee).unwrap();
        rig.attach().unwrap();
        assert_eq!(rig.stats().dirty, 8, "committed data recovered");
        wc_bdev_error::inject(&ee, InjectIoType::Read, ErrorType::Failure, 1).unwrap();
        let r = rig.submit_read(0, 0, 1);
        assert_eq!(rig.wait(&r), Err(libc::EIO));
        assert_eq!(rig.stats().error, libc::EIO);
        wc_bdev_error::clear(&ee).unwrap();
        rig.detach(false).unwrap();
        wc_bdev_error::delete(&ee).unwrap();
        rig.opts.cache_bdev = rig.cache_name.clone();
        rig.attach().unwrap();
        assert_eq!(rig.stats().dirty, 8, "nothing cached was dropped");
    })
}
