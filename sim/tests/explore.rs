//! The crash-exploration workflow the simulators exist for: count the
//! persistence points of a workload, re-run it cut at every point K, and
//! check an invariant on crash images from several seeds. A correct commit
//! protocol survives every cut; one missing fence (or flush) is caught.

use wc_bdev::PersistentMemory;
use wc_sim::{SeedReport, SimDisk, SimPmem};

const RECORDS: u64 = 6;
const SEEDS: u64 = 16;

fn record(n: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&(n * 0x0101_0101 + 7).to_le_bytes());
    r[8..].copy_from_slice(&(!n).to_le_bytes());
    r
}

/// Appends record `n`, then commits it by bumping the counter at 0.
fn pmem_append(p: &SimPmem, n: u64, fence_data: bool) {
    p.write_nt(64 + n as usize * 16, &record(n));
    if fence_data {
        p.fence();
    }
    p.write_u64(0, n + 1);
    p.fence();
}

/// Every committed record is intact.
fn pmem_check(img: &[u8]) -> bool {
    let count = u64::from_le_bytes(img[..8].try_into().unwrap());
    (0..count).all(|n| {
        let at = 64 + n as usize * 16;
        img[at..at + 16] == record(n)
    })
}

/// First (point, seed) whose crash image breaks the invariant.
fn explore_pmem(fence_data: bool) -> Option<(u64, u64)> {
    let dry = SimPmem::new(4096);
    for n in 0..RECORDS {
        pmem_append(&dry, n, fence_data);
    }
    let total = dry.points();
    for k in 0..=total {
        let p = SimPmem::new(4096);
        p.set_crash_at(k);
        for n in 0..RECORDS {
            pmem_append(&p, n, fence_data);
        }
        for seed in 0..SEEDS {
            let _g = SeedReport::new(seed);
            if !pmem_check(&p.power_fail(seed)) {
                return Some((k, seed));
            }
        }
        // Reboot: the recovered media is consistent and usable.
        let img = p.power_fail(k);
        let q = SimPmem::from_image(img.clone());
        assert!(!fence_data || pmem_check(&q.visible()));
        q.write_u64(8, 1);
        q.fence();
    }
    None
}

#[test]
fn pmem_commit_protocol_survives_every_crash_point() {
    assert_eq!(explore_pmem(true), None);
}

#[test]
fn pmem_missing_fence_is_caught() {
    let found = explore_pmem(false);
    assert!(
        found.is_some(),
        "a commit without fencing its data survived"
    );
}

/// Writes block `n` of data, then commits it in a FUA superblock.
fn disk_append(d: &SimDisk, n: u64, flush_data: bool) {
    d.write_at(4096 + n as usize * 512, &[n as u8 + 1; 512], false);
    if flush_data {
        d.flush();
    }
    d.write_at(0, &(n + 1).to_le_bytes(), true);
}

fn disk_check(img: &[u8]) -> bool {
    let count = u64::from_le_bytes(img[..8].try_into().unwrap());
    (0..count).all(|n| {
        let at = 4096 + n as usize * 512;
        img[at..at + 512].iter().all(|&b| b == n as u8 + 1)
    })
}

fn explore_disk(flush_data: bool) -> Option<(u64, u64)> {
    let dry = SimDisk::new(16384);
    for n in 0..RECORDS {
        disk_append(&dry, n, flush_data);
    }
    let total = dry.points();
    for k in 0..=total {
        let d = SimDisk::new(16384);
        d.set_tearing(true);
        d.set_crash_at(k);
        for n in 0..RECORDS {
            disk_append(&d, n, flush_data);
        }
        for seed in 0..SEEDS {
            let _g = SeedReport::new(seed);
            if !disk_check(&d.power_fail(seed)) {
                return Some((k, seed));
            }
        }
    }
    None
}

#[test]
fn disk_commit_protocol_survives_every_crash_point() {
    assert_eq!(explore_disk(true), None);
}

#[test]
fn disk_missing_flush_is_caught() {
    assert!(explore_disk(false).is_some());
}
