//! Functional tests on real reactors: malloc origin + pmem cache file.

use std::sync::mpsc;
use std::time::Duration;

use wc_bdev::testing::{pattern, run_on, test_runtime};
use wc_bdev::DmaBuf;
use wc_writecache::CreateOpts;

fn shm_file(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("wc-basic-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn make_bases(
    tag: &str,
    origin_blocks: u64,
    cache_bytes: u64,
) -> (String, String, std::path::PathBuf) {
    let o = format!("O_{tag}");
    let c = format!("C_{tag}");
    let f = shm_file(tag);
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new(&o, origin_blocks, 4096)).unwrap();
    let mut po = wc_bdev_pmem::PmemOpts::new(&c, f.to_str().unwrap());
    po.size = Some(cache_bytes);
    wc_bdev_pmem::create(po).unwrap();
    (o, c, f)
}

fn crossbeam_pin_flush() {
    for _ in 0..4 {
        crossbeam::epoch::pin().flush();
    }
}

fn wait<T>(rx: mpsc::Receiver<T>) -> T {
    rx.recv_timeout(Duration::from_secs(20))
        .expect("operation finished")
}

#[test]
fn write_read_flush_recover_and_writeback() {
    let rt = test_runtime(2);
    let (o, c, f) = make_bases("wrf", 4096, 4 << 20);
    let (o2, c2) = (o.clone(), c.clone());
    let created = run_on(rt.main(), move || async move {
        let mut opts = CreateOpts::new("WC_wrf", &o2, &c2);
        opts.autocommit_blocks = Some(1 << 30);
        wc_writecache::create(opts).map(|b| (b.num_blocks(), b.block_size()))
    })
    .unwrap();
    assert_eq!(created, (4096, 4096));
    let wc = wc_writecache::get("WC_wrf").unwrap();
    assert!(wc.formatted_on_create());

    // Writes from both reactors, then read back through the cache.
    for (i, h) in rt.handles().iter().enumerate() {
        run_on(h, move || async move {
            let d = wc_bdev::open("WC_wrf", true, None).unwrap();
            let ch = d.channel().unwrap();
            for lba in (i as u64 * 100)..(i as u64 * 100 + 50) {
                ch.write_async(lba, pattern(lba, 1, 4096), false)
                    .await
                    .unwrap();
            }
            for lba in (i as u64 * 100)..(i as u64 * 100 + 50) {
                let got = ch.read_async(lba, DmaBuf::new(4096)).await.unwrap();
                assert!(
                    got.as_slice() == pattern(lba, 1, 4096).as_slice(),
                    "lba {lba}"
                );
            }
            // A read spanning hits and misses is reassembled.
            let got = ch
                .read_async(i as u64 * 100 + 48, DmaBuf::new(4 * 4096))
                .await
                .unwrap();
            assert!(
                got[..8192]
                    == *pattern(i as u64 * 100 + 48, 1, 8192)
                        .as_slice()
                        .get(..0)
                        .map(|_| {
                            let mut v = pattern(i as u64 * 100 + 48, 1, 4096).to_vec();
                            v.extend_from_slice(&pattern(i as u64 * 100 + 49, 1, 4096));
                            v
                        })
                        .unwrap()
            );
            assert!(
                got[8192..].iter().all(|&b| b == 0),
                "misses come from the (zeroed) origin"
            );
            ch.io_async(wc_bdev::IoType::Flush, 0, 0).await.unwrap();
        });
    }
    let s = wc.stats();
    assert_eq!(s.write_blocks, 100);
    assert_eq!(s.writes_allocate, 100);
    assert_eq!(s.read_hits, 100 + 4);
    assert!(s.commits >= 1 && s.seq_count >= 1, "{s:?}");
    assert_eq!(s.dirty, 100);
    // Every completed read and write was timed.
    assert_eq!(s.write_latency_us.count, 100, "{s:?}");
    assert_eq!(s.read_latency_us.count, 102, "{s:?}");
    assert!(s.write_latency_us.p50 > 0.0 && s.write_latency_us.p99 >= s.write_latency_us.p50);

    // Overwrite committed blocks: new blocks allocated, old freed after commit.
    run_on(rt.main(), || async {
        let d = wc_bdev::open("WC_wrf", true, None).unwrap();
        let ch = d.channel().unwrap();
        for lba in 0..10u64 {
            ch.write_async(lba, pattern(lba, 2, 4096), false)
                .await
                .unwrap();
        }
        ch.io_async(wc_bdev::IoType::Flush, 0, 0).await.unwrap();
    });
    let s = wc.stats();
    assert_eq!(s.write_hits_committed, 10);
    assert_eq!(s.dirty, 100);
    // Superseded blocks return to the pool after a grace period.
    let t0 = std::time::Instant::now();
    while wc.stats().free_blocks + 100 != s.blocks && t0.elapsed() < Duration::from_secs(5) {
        crossbeam_pin_flush();
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = wc.stats();
    assert_eq!(
        s.free_blocks + 100,
        s.blocks,
        "superseded blocks went back to the pool: {s:?}"
    );

    // Delete without flush keeps data in the cache; re-create recovers it.
    let (tx, rx) = mpsc::channel();
    rt.main().send(move || {
        wc_writecache::delete(
            "WC_wrf",
            false,
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        )
    });
    assert!(wait(rx));
    assert!(wc_bdev::lookup("WC_wrf").is_none());
    let (o2, c2) = (o.clone(), c.clone());
    run_on(rt.main(), move || async move {
        wc_writecache::create(CreateOpts::new("WC_wrf", &o2, &c2)).unwrap();
        let wc = wc_writecache::get("WC_wrf").unwrap();
        assert!(!wc.formatted_on_create());
        assert_eq!(wc.stats().dirty, 100);
        let d = wc_bdev::open("WC_wrf", true, None).unwrap();
        let ch = d.channel().unwrap();
        for lba in 0..10u64 {
            let got = ch.read_async(lba, DmaBuf::new(4096)).await.unwrap();
            assert!(
                got.as_slice() == pattern(lba, 2, 4096).as_slice(),
                "recovered lba {lba}"
            );
        }
        let got = ch.read_async(120, DmaBuf::new(4096)).await.unwrap();
        assert!(got.as_slice() == pattern(120, 1, 4096).as_slice());
    });

    // Flush writes everything back: the origin alone then has the data.
    let (tx, rx) = mpsc::channel();
    rt.main().send(move || {
        wc_writecache::flush(
            "WC_wrf",
            Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()),
        )
    });
    wait(rx).unwrap();
    let t0 = std::time::Instant::now();
    while wc_writecache::stats("WC_wrf")
        .map(|s| s.free_blocks != s.blocks)
        .unwrap()
        && t0.elapsed() < Duration::from_secs(5)
    {
        crossbeam_pin_flush();
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = wc_writecache::stats("WC_wrf").unwrap();
    assert_eq!(s.dirty, 0, "{s:?}");
    assert_eq!(s.free_blocks, s.blocks);
    assert_eq!(s.writeback_completed_blocks, 100);
    let (tx, rx) = mpsc::channel();
    rt.main().send(move || {
        wc_writecache::delete(
            "WC_wrf",
            true,
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        )
    });
    assert!(wait(rx));
    let o2 = o.clone();
    run_on(rt.main(), move || async move {
        let d = wc_bdev::open(&o2, false, None).unwrap();
        let ch = d.channel().unwrap();
        for lba in [0u64, 9, 10, 49, 100, 149] {
            let round = if lba < 10 { 2 } else { 1 };
            let got = ch.read_async(lba, DmaBuf::new(4096)).await.unwrap();
            assert!(
                got.as_slice() == pattern(lba, round, 4096).as_slice(),
                "origin lba {lba}"
            );
        }
    });
    let _ = std::fs::remove_file(f);
}

#[test]
fn bad_parameters_are_refused_and_leave_nothing_behind() {
    let rt = test_runtime(1);
    let (o, c, f) = make_bases("bad", 256, 1 << 20);
    let (o2, c2) = (o.clone(), c.clone());
    run_on(rt.main(), move || async move {
        let e = |opts: CreateOpts| {
            wc_writecache::create(opts)
                .err()
                .map(|e| (e.errno(), e.to_string()))
        };
        let mut same = CreateOpts::new("WB", &o2, &o2);
        same.block_size = Some(4096);
        assert_eq!(e(same).unwrap().0, libc::EINVAL);
        assert_eq!(
            e(CreateOpts::new("WB", "nope", &c2)).unwrap().0,
            libc::ENODEV
        );
        let mut bs = CreateOpts::new("WB", &o2, &c2);
        bs.block_size = Some(1000);
        assert_eq!(e(bs).unwrap().0, libc::EINVAL);
        let mut bs = CreateOpts::new("WB", &o2, &c2);
        bs.block_size = Some(512);
        let (code, msg) = e(bs).unwrap();
        assert_eq!(code, libc::EINVAL, "{msg}");
        let mut wm = CreateOpts::new("WB", &o2, &c2);
        wm.low_watermark = Some(60);
        assert_eq!(e(wm).unwrap().0, libc::EINVAL);
        // The origin is not a pmem bdev: cannot be a cache.
        assert_eq!(e(CreateOpts::new("WB", &c2, &o2)).unwrap().0, libc::EINVAL);
        // Nothing left behind: bases unclaimed, no bdev.
        assert!(wc_bdev::lookup("WB").is_none());
        assert!(wc_bdev::lookup(&o2).unwrap().claim_info().is_none());
        assert!(wc_bdev::lookup(&c2).unwrap().claim_info().is_none());
        // Claimed bases cannot be used twice.
        wc_writecache::create(CreateOpts::new("WB1", &o2, &c2)).unwrap();
        assert_eq!(e(CreateOpts::new("WB2", &o2, &c2)).unwrap().0, libc::EBUSY);
        assert_eq!(e(CreateOpts::new("WB1", &o2, &c2)).unwrap().0, libc::EEXIST);
    });
    let _ = std::fs::remove_file(f);
}

#[test]
fn a_corrupt_superblock_is_refused_untouched() {
    let rt = test_runtime(1);
    let (o, c, f) = make_bases("corrupt", 256, 1 << 20);
    let (tx, rx) = mpsc::channel();
    let (o2, c2) = (o.clone(), c.clone());
    rt.main().send(move || {
        wc_writecache::create(CreateOpts::new("WCc", &o2, &c2)).unwrap();
        wc_writecache::delete("WCc", false, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    });
    assert!(wait(rx));
    // Scribble a wrong version into the superblock through the file.
    wc_bdev_pmem::delete(&c).unwrap();
    let mut img = std::fs::read(&f).unwrap();
    img[4] = 7;
    std::fs::write(&f, &img).unwrap();
    let mut po = wc_bdev_pmem::PmemOpts::new(&c, f.to_str().unwrap());
    po.size = Some(1 << 20);
    wc_bdev_pmem::create(po).unwrap();
    let (o2, c2) = (o.clone(), c.clone());
    let err = run_on(rt.main(), move || async move {
        wc_writecache::create(CreateOpts::new("WCc", &o2, &c2))
            .err()
            .map(|e| e.to_string())
    })
    .expect("refused");
    assert!(err.contains("version"), "{err}");
    wc_bdev_pmem::delete(&c).unwrap();
    assert_eq!(
        std::fs::read(&f).unwrap(),
        img,
        "a refused cache is left untouched"
    );
    let _ = std::fs::remove_file(f);
}

#[test]
fn creation_waits_for_missing_bases_and_starts_when_they_appear() {
    let rt = test_runtime(1);
    let f = shm_file("pending");
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("O_pending", 256, 4096)).unwrap();
    let f2 = f.clone();
    let started = run_on(rt.main(), move || async move {
        let r =
            wc_writecache::create_or_wait(CreateOpts::new("WC_pending", "O_pending", "C_pending"))
                .unwrap();
        let waiting = match r {
            wc_writecache::Created::Pending { waiting_for } => waiting_for,
            wc_writecache::Created::Started(_) => panic!("started without its cache"),
        };
        assert_eq!(waiting, vec!["C_pending".to_string()]);
        assert!(wc_bdev::lookup("WC_pending").is_none());
        // Same name again is refused while pending.
        assert!(wc_writecache::create_or_wait(CreateOpts::new(
            "WC_pending",
            "O_pending",
            "C_pending"
        ))
        .is_err());
        // The cache appears: the instance starts from the examine hook.
        let mut po = wc_bdev_pmem::PmemOpts::new("C_pending", f2.to_str().unwrap());
        po.size = Some(1 << 20);
        wc_bdev_pmem::create(po).unwrap();
        wc_bdev::lookup("WC_pending").is_some()
    });
    assert!(
        started,
        "pending writecache did not start when its cache registered"
    );
    assert!(wc_writecache::pending_creations()
        .iter()
        .all(|(n, _)| n != "WC_pending"));
    // A pending creation can be cancelled by delete.
    run_on(rt.main(), || async {
        wc_writecache::create_or_wait(CreateOpts::new("WC_pending2", "nope_o", "nope_c")).unwrap();
    });
    let (tx, rx) = mpsc::channel();
    wc_writecache::delete(
        "WC_pending2",
        false,
        Box::new(move |r| tx.send(r.is_ok()).unwrap()),
    );
    assert!(wait(rx));
    assert!(
        wc_writecache::pending_creations().is_empty()
            || wc_writecache::pending_creations()
                .iter()
                .all(|(n, _)| n != "WC_pending2")
    );
    let _ = std::fs::remove_file(f);
}
