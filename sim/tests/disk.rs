//! SimDisk loses exactly what a volatile write cache may lose.

use wc_bdev::testing::{conformance, run_on, test_runtime, Expect};
use wc_bdev::{DmaBuf, IoType};
use wc_sim::{sim_disk_bdev, PointKind, SeedReport, SimDisk, SECTOR_SIZE};

#[test]
fn flush_makes_prior_writes_durable() {
    let d = SimDisk::new(8192);
    d.write_at(0, &[1; 512], false);
    d.write_at(512, &[2; 512], false);
    assert_eq!(d.unflushed_writes(), 2);
    let mut b = [0u8; 512];
    d.read_at(0, &mut b);
    assert_eq!(b, [1; 512], "cached writes are visible");
    assert!(d.crash_all_unflushed_lost()[..1024].iter().all(|&x| x == 0));
    d.flush();
    d.write_at(1024, &[3; 512], false);
    for seed in 0..32 {
        let img = d.power_fail(seed);
        assert!(img[..512].iter().all(|&x| x == 1), "seed {seed}");
        assert!(img[512..1024].iter().all(|&x| x == 2), "seed {seed}");
    }
    assert!(d.crash_all_unflushed_lost()[1024..1536]
        .iter()
        .all(|&x| x == 0));
    assert_eq!((d.write_count(), d.flush_count()), (3, 1));
}

#[test]
fn fua_makes_that_write_durable_only() {
    let d = SimDisk::new(4096);
    d.write_at(0, &[1; 512], false);
    d.write_at(512, &[2; 512], true);
    assert_eq!(d.unflushed_writes(), 1);
    let img = d.crash_all_unflushed_lost();
    assert!(img[512..1024].iter().all(|&x| x == 2));
    assert!(img[..512].iter().all(|&x| x == 0));
}

#[test]
fn older_cached_write_never_lands_over_a_newer_fua_write() {
    let d = SimDisk::new(4096);
    d.set_tearing(true);
    d.write_at(0, &[1; 2048], false);
    d.write_at(512, &[2; 512], true);
    for seed in 0..64 {
        let img = d.power_fail(seed);
        assert!(img[512..1024].iter().all(|&x| x == 2), "seed {seed}");
    }
    let img = d.crash_all_unflushed_kept();
    assert!(img[..512].iter().all(|&x| x == 1));
    assert!(img[512..1024].iter().all(|&x| x == 2));
    assert!(img[1024..2048].iter().all(|&x| x == 1));
}

#[test]
fn unflushed_writes_may_vanish_whole() {
    let d = SimDisk::new(16384);
    d.write_at(0, &[7; 4096], false);
    let (mut kept, mut lost) = (0, 0);
    for seed in 0..64 {
        let img = d.power_fail(seed);
        if img[..4096].iter().all(|&x| x == 7) {
            kept += 1;
        } else if img[..4096].iter().all(|&x| x == 0) {
            lost += 1;
        } else {
            panic!("seed {seed}: write torn with tearing off");
        }
    }
    assert!(kept > 0 && lost > 0, "kept {kept} lost {lost}");
}

#[test]
fn tearing_only_at_sector_boundaries() {
    let d = SimDisk::new(16384);
    d.write_at(0, &[0x11; 8192], false);
    d.flush();
    d.set_tearing(true);
    // A write that starts mid-sector: its first and last sectors are
    // partial, the rest whole.
    d.write_at(256, &[0xEE; 4096], false);
    let mut torn = 0;
    for seed in 0..128 {
        let _g = SeedReport::new(seed);
        let img = d.power_fail(seed);
        let mut kinds = std::collections::BTreeSet::new();
        for s in 0..16384 / SECTOR_SIZE {
            let sec = &img[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE];
            let old = &d.crash_all_unflushed_lost()[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE];
            let new = &d.crash_all_unflushed_kept()[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE];
            assert!(
                sec == old || sec == new,
                "seed {seed}: sector {s} torn inside"
            );
            if old != new {
                kinds.insert(sec == new);
            }
        }
        if kinds.len() == 2 {
            torn += 1;
        }
    }
    assert!(torn > 0, "tearing on, yet no write tore in 128 crashes");
}

#[test]
fn same_seed_same_image() {
    let d = SimDisk::new(65536);
    d.set_tearing(true);
    for i in 0..64 {
        d.write_at(i * 1024, &[i as u8 + 1; 1024], false);
    }
    let a = d.power_fail(77);
    assert_eq!(a, d.power_fail(77));
    assert!((0..8).any(|s| d.power_fail(s) != a));
}

#[test]
fn crash_at_k_freezes_the_image_at_point_k() {
    let d = SimDisk::new(4096);
    d.count_writes(false);
    d.set_crash_at(1);
    d.write_at(0, &[1; 512], false);
    d.flush(); // point 1: cut
    d.write_at(512, &[2; 512], true); // point 2
    d.flush(); // point 3
    assert!(d.is_powered_off());
    assert_eq!(d.points(), 3);
    let img = d.crash_all_unflushed_kept();
    assert!(img[..512].iter().all(|&x| x == 1));
    assert!(img[512..1024].iter().all(|&x| x == 0));

    // Writes as points: cut after an unflushed write.
    // Writes count by default.
    let e = SimDisk::new(4096);
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = log.clone();
    e.set_point_hook(Box::new(move |p| l.lock().unwrap().push(p.kind)));
    e.set_crash_at(1);
    e.write_at(0, &[3; 512], false); // 1: cut, cached
    e.flush(); // 2
    assert!(e.crash_all_unflushed_lost()[..512].iter().all(|&x| x == 0));
    assert!(e.crash_all_unflushed_kept()[..512].iter().all(|&x| x == 3));
    e.write_at(0, &[4; 512], true);
    assert_eq!(
        *log.lock().unwrap(),
        vec![PointKind::Write, PointKind::Flush, PointKind::FuaWrite]
    );
}

#[test]
fn reboot_from_a_crash_image() {
    let d = SimDisk::new(2048);
    d.write_at(0, &[9; 512], true);
    d.write_at(512, &[8; 512], false);
    let img = d.crash_all_unflushed_lost();
    let e = SimDisk::from_image(img.clone());
    assert_eq!(e.visible(), img);
    assert_eq!(e.unflushed_writes(), 0);
    assert_eq!(e.power_fail(3), img);
}

#[test]
fn disk_bdev_passes_conformance_and_caches_writes() {
    let rt = test_runtime(2);
    let (bdev, disk) = sim_disk_bdev("SimDiskConf", 2048, 512).unwrap();
    assert!(bdev.ops().write_cache());
    assert!(bdev.pmem().is_none());
    conformance(
        &rt,
        "SimDiskConf",
        Expect {
            stores_data: true,
            unmap_zeroes: true,
        },
    );
    run_on(rt.main(), || async {
        let desc = wc_bdev::open("SimDiskConf", true, None).unwrap();
        let ch = desc.channel().unwrap();
        ch.io_async(IoType::Flush, 0, 0).await.unwrap();
        ch.write_async(5, DmaBuf::filled(512, 0x77), false)
            .await
            .unwrap();
        ch.write_async(6, DmaBuf::filled(512, 0x66), true)
            .await
            .unwrap();
    });
    let lost = disk.crash_all_unflushed_lost();
    assert!(
        lost[5 * 512..6 * 512].iter().all(|&b| b != 0x77),
        "unflushed"
    );
    assert!(lost[6 * 512..7 * 512].iter().all(|&b| b == 0x66), "FUA");
    run_on(rt.main(), || async {
        let desc = wc_bdev::open("SimDiskConf", true, None).unwrap();
        let ch = desc.channel().unwrap();
        ch.io_async(IoType::Flush, 0, 1).await.unwrap();
    });
    let lost = disk.crash_all_unflushed_lost();
    assert!(lost[5 * 512..6 * 512].iter().all(|&b| b == 0x77), "flushed");
    wc_sim::delete("SimDiskConf").unwrap();
    assert!(sim_disk_bdev("SimDiskBad", 0, 512).is_err());
    assert!(sim_disk_bdev("SimDiskBad", u64::MAX, 4096).is_err());
}
