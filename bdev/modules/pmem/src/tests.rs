//! Strategy-level tests: every strategy this CPU has, forced explicitly.

use super::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use wc_bdev::testing::{conformance, run_on, test_runtime, Expect};

fn dirs() -> Vec<std::path::PathBuf> {
    let mut v = vec![std::env::temp_dir()];
    if std::path::Path::new("/dev/shm").is_dir() {
        v.push("/dev/shm".into());
    }
    v
}

fn temp_path(dir: &std::path::Path, tag: &str) -> std::path::PathBuf {
    dir.join(format!(
        "wc-pmem-unit-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ))
}

fn strategies() -> Vec<Strategy> {
    Strategy::ALL
        .into_iter()
        .filter(|s| s.supported())
        .collect()
}

fn open(path: &std::path::Path, size: u64, s: Strategy) -> PmemMap {
    PmemMap::open(&MapRequest {
        filename: path.to_str().unwrap(),
        size: Some(size),
        block_size: 4096,
        strategy: Some(s),
    })
    .unwrap()
}

fn contents(m: &PmemMap) -> Vec<u8> {
    let mut v = vec![0u8; m.len()];
    m.read(0, &mut v);
    v
}

#[test]
fn this_cpu_runs_msync_and_movnt_at_least() {
    let s = strategies();
    println!(
        "strategies on this CPU: {:?}",
        s.iter().map(|s| s.name()).collect::<Vec<_>>()
    );
    assert!(s.contains(&Strategy::Msync));
    #[cfg(target_arch = "x86_64")]
    assert!(s.contains(&Strategy::MovntSfence));
}

#[test]
fn every_strategy_matches_an_oracle_and_reaches_the_file() {
    const LEN: usize = 1 << 20;
    for dir in dirs() {
        for s in strategies() {
            let path = temp_path(&dir, s.name());
            let m = open(&path, LEN as u64, s);
            assert_eq!((m.len(), m.strategy()), (LEN, s.name()));
            let mut oracle = vec![0u8; LEN];
            let mut rng = StdRng::seed_from_u64(0x5eed ^ s as u64);
            for i in 0..3000 {
                match rng.gen_range(0..10) {
                    0..=5 => {
                        let off = rng.gen_range(0..LEN);
                        let max = if rng.gen_bool(0.1) { 20_000 } else { 300 };
                        let n = rng.gen_range(0..=max.min(LEN - off));
                        let data: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                        m.write_nt(off, &data);
                        oracle[off..off + n].copy_from_slice(&data);
                    }
                    6..=7 => {
                        let off = rng.gen_range(0..LEN / 8) * 8;
                        let v: u64 = rng.gen();
                        m.write_u64(off, v);
                        oracle[off..off + 8].copy_from_slice(&v.to_le_bytes());
                    }
                    8 => {
                        let off = rng.gen_range(0..LEN);
                        let n = rng.gen_range(0..=5000.min(LEN - off));
                        assert!(m.zero(off, n));
                        oracle[off..off + n].fill(0);
                    }
                    _ => m.fence(),
                }
                if i % 500 == 0 {
                    assert!(contents(&m) == oracle, "{} diverged at op {i}", s.name());
                }
            }
            m.fence();
            if s == Strategy::Msync {
                assert_eq!(m.dirty_ranges(), 0, "fence left dirty pages");
            }
            // Loads through base() see every store.
            // SAFETY: base() is valid for len() bytes while `m` lives, and
            // nothing writes meanwhile.
            let via_base = unsafe { std::slice::from_raw_parts(m.base(), m.len()) };
            assert!(via_base == oracle.as_slice(), "{} via base()", s.name());
            drop(m);
            let file = std::fs::read(&path).unwrap();
            assert!(file[..LEN] == oracle[..], "{} file contents", s.name());
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[test]
fn every_head_and_tail_alignment() {
    let dir = dirs().pop().unwrap();
    for s in strategies() {
        let path = temp_path(&dir, "edges");
        let m = open(&path, 64 << 10, s);
        let mut oracle = vec![0u8; m.len()];
        let mut byte = 1u8;
        for start in 0..80usize {
            for n in 0..140usize {
                let off = 4096 + start * 257 + n * 3;
                let data: Vec<u8> = (0..n).map(|i| byte.wrapping_add(i as u8)).collect();
                byte = byte.wrapping_add(7);
                m.write_nt(off, &data);
                oracle[off..off + n].copy_from_slice(&data);
            }
        }
        m.fence();
        assert!(contents(&m) == oracle, "{}", s.name());
        drop(m);
        assert!(std::fs::read(&path).unwrap() == oracle, "{} file", s.name());
        let _ = std::fs::remove_file(&path);
    }
}

/// Copies long enough for the wide (AVX2) loop, at every destination
/// alignment mod 64 and from unaligned sources, around a whole block.
#[test]
fn long_copies_at_every_alignment() {
    let dir = dirs().pop().unwrap();
    for s in strategies() {
        let path = temp_path(&dir, "long");
        let m = open(&path, 256 << 10, s);
        let mut oracle = vec![0u8; m.len()];
        let src: Vec<u8> = (0..8192 + 64).map(|i| (i * 31 + 7) as u8).collect();
        let mut at = 4096;
        for align in 0..64usize {
            for (k, n) in [
                127usize, 128, 129, 255, 256, 257, 300, 511, 4095, 4096, 4097,
            ]
            .iter()
            .enumerate()
            {
                let off = at + align;
                let from = (align + k) % 64;
                let data = &src[from..from + n];
                m.write_nt(off, data);
                oracle[off..off + n].copy_from_slice(data);
                at += 4096;
                if at + 8192 > m.len() {
                    at = 4096;
                }
            }
        }
        m.fence();
        assert!(contents(&m) == oracle, "{}", s.name());
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn bad_offsets_are_ignored_not_fatal() {
    let dir = dirs().pop().unwrap();
    for s in strategies() {
        let path = temp_path(&dir, "oob");
        let m = open(&path, 8192, s);
        m.write_nt(8191, &[1, 2]);
        m.write_nt(usize::MAX, &[1]);
        m.write_u64(8190, 5);
        m.write_u64(8192, 5);
        m.write_u64(4, 5);
        assert!(!m.zero(8000, 500));
        m.fence();
        assert!(contents(&m).iter().all(|&b| b == 0), "{}", s.name());
        // Edges that are in range work.
        m.write_u64(8184, u64::MAX);
        m.write_nt(8190, &[9, 9]);
        m.fence();
        assert_eq!(&contents(&m)[8184..], &[255, 255, 255, 255, 255, 255, 9, 9]);
        drop(m);
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn every_strategy_passes_bdev_conformance() {
    let rt = test_runtime(2);
    let dir = dirs().pop().unwrap();
    for s in strategies() {
        let path = temp_path(&dir, "conf");
        let name = format!("PmemUnit-{}", s.name());
        let mut o = PmemOpts::new(&name, path.to_str().unwrap());
        o.size = Some(1 << 20);
        o.block_size = Some(512);
        let b = create_with(o, Some(s)).unwrap();
        assert_eq!(
            b.info_json()["driver_specific"]["pmem"]["strategy"],
            json!(s.name())
        );
        conformance(
            &rt,
            &name,
            Expect {
                stores_data: true,
                unmap_zeroes: true,
            },
        );
        let n = name.clone();
        run_on(rt.main(), move || async move { delete(&n) }).unwrap();
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn default_strategy_follows_map_sync() {
    assert_eq!(Strategy::pick(false), Strategy::Msync);
    #[cfg(target_arch = "x86_64")]
    assert_eq!(Strategy::pick(true), Strategy::MovntSfence);
}
