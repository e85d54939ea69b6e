//! Randomized stress on real reactor threads: several cores write, read,
//! flush and (through a tiny cache) force writeback and blocked writers on
//! the same few sectors. Every read must return a version that was written
//! to that sector (or its initial zeroes); after a final drain the origin
//! alone holds exactly what the cache showed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wc_bdev::testing::{run_on, test_runtime};
use wc_bdev::{DmaBuf, IoType};
use wc_writecache::CreateOpts;

const BS: usize = 4096;
const HOT: u64 = 16;

fn block(lba: u64, version: u64) -> DmaBuf {
    let mut b = DmaBuf::new(BS);
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(if i % 2 == 0 { lba } else { version }).to_le_bytes());
    }
    b
}

/// (lba, version) of a uniformly stamped block; Err for a mix.
fn decode(b: &[u8]) -> Result<(u64, u64), String> {
    if b.iter().all(|&x| x == 0) {
        return Ok((u64::MAX, 0));
    }
    let lba = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let ver = u64::from_le_bytes(b[8..16].try_into().unwrap());
    for (i, c) in b.chunks(8).enumerate() {
        let want = if i % 2 == 0 { lba } else { ver };
        if u64::from_le_bytes(c.try_into().unwrap()) != want {
            return Err(format!("mixed block (lba {lba} ver {ver}, word {i})"));
        }
    }
    Ok((lba, ver))
}

type Written = Arc<Mutex<HashMap<u64, HashSet<u64>>>>;

#[test]
fn concurrent_writers_readers_flushers_and_writeback_agree() {
    let secs: u64 = std::env::var("WC_STRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rt = test_runtime(2);
    let f = std::env::temp_dir().join(format!("wc-stress-{}", std::process::id()));
    let _ = std::fs::remove_file(&f);
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("StressO", 256, BS as u32)).unwrap();
    let mut po = wc_bdev_pmem::PmemOpts::new("StressC", f.to_str().unwrap());
    po.size = Some(40 * BS as u64);
    wc_bdev_pmem::create(po).unwrap();
    run_on(rt.main(), || async {
        let mut o = CreateOpts::new("StressWC", "StressO", "StressC");
        o.high_watermark = Some(20);
        o.low_watermark = Some(10);
        o.autocommit_blocks = Some(8);
        o.autocommit_time_ms = Some(5);
        wc_writecache::create(o)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .unwrap();

    let written: Written = Arc::default();
    let next = Arc::new(AtomicU64::new(1));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = rt
        .handles()
        .iter()
        .enumerate()
        .map(|(core, h)| {
            let h = h.clone();
            let written = written.clone();
            let next = next.clone();
            std::thread::spawn(move || {
                run_on(&h, move || async move {
                    let d = wc_bdev::open("StressWC", true, None).unwrap();
                    let ch = d.channel().unwrap();
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ core as u64;
                    let (mut writes, mut reads, mut flushes) = (0u64, 0u64, 0u64);
                    while Instant::now() < deadline {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let lba = x % HOT;
                        match (x >> 8) % 10 {
                            0..=4 => {
                                let v = next.fetch_add(1, Ordering::Relaxed);
                                written.lock().unwrap().entry(lba).or_default().insert(v);
                                ch.write_async(lba, block(lba, v), (x >> 16) % 16 == 0)
                                    .await
                                    .expect("write");
                                writes += 1;
                            }
                            5..=8 => {
                                let b = ch.read_async(lba, DmaBuf::new(BS)).await.expect("read");
                                let (l, v) =
                                    decode(&b).unwrap_or_else(|e| panic!("lba {lba}: {e}"));
                                if v != 0 {
                                    assert_eq!(
                                        l, lba,
                                        "read of {lba} returned another block's data"
                                    );
                                    let ok = written
                                        .lock()
                                        .unwrap()
                                        .get(&lba)
                                        .is_some_and(|s| s.contains(&v));
                                    assert!(ok, "lba {lba}: version {v} was never written there");
                                }
                                reads += 1;
                            }
                            _ => {
                                ch.io_async(IoType::Flush, 0, 0).await.expect("flush");
                                flushes += 1;
                            }
                        }
                    }
                    (writes, reads, flushes)
                })
            })
        })
        .collect();
    let mut totals = (0, 0, 0);
    for t in threads {
        let (w, r, f) = t.join().expect("no reactor job panicked");
        totals = (totals.0 + w, totals.1 + r, totals.2 + f);
    }
    let s = wc_writecache::stats("StressWC").unwrap();
    eprintln!("stress: {totals:?} (writes, reads, flushes); {s:?}");
    assert!(
        totals.0 > 100 && totals.1 > 100,
        "too little work done: {totals:?}"
    );
    assert!(
        s.writeback_completed_blocks > 0,
        "writeback never ran: {s:?}"
    );
    assert!(
        s.writes_blocked_on_freelist > 0 || s.blocks > 16,
        "the tiny cache never filled: {s:?}"
    );

    // What the cache shows now...
    let view: Vec<(u64, u64)> = run_on(rt.main(), || async {
        let d = wc_bdev::open("StressWC", true, None).unwrap();
        let ch = d.channel().unwrap();
        let mut v = Vec::new();
        for lba in 0..HOT {
            v.push(decode(&ch.read_async(lba, DmaBuf::new(BS)).await.unwrap()).unwrap());
        }
        v
    });
    // ...is exactly what the origin alone holds after a drain and delete.
    let (tx, rx) = std::sync::mpsc::channel();
    rt.main().send(move || {
        wc_writecache::delete(
            "StressWC",
            true,
            Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()),
        )
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
    let origin: Vec<(u64, u64)> = run_on(rt.main(), || async {
        let d = wc_bdev::open("StressO", false, None).unwrap();
        let ch = d.channel().unwrap();
        let mut v = Vec::new();
        for lba in 0..HOT {
            v.push(decode(&ch.read_async(lba, DmaBuf::new(BS)).await.unwrap()).unwrap());
        }
        v
    });
    assert_eq!(
        view, origin,
        "origin differs from what the cache showed before the drain"
    );
    let _ = std::fs::remove_file(f);
}

/// Reads of cached blocks while another core overwrites them (committed
/// and uncommitted versions, so both the displaced-block free and the
/// superseded path run under the readers): every read returns one whole
/// version of its own sector, never older than the newest write completed
/// before the read was submitted. Readers keep several reads in flight so
/// they are looked up and copied as a batch.
#[test]
fn reads_of_hits_stay_exact_while_they_are_overwritten() {
    const LBAS: u64 = 4;
    const READS_IN_FLIGHT: usize = 8;
    let secs: u64 = std::env::var("WC_STRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let rt = test_runtime(2);
    let f = std::env::temp_dir().join(format!("wc-overwrite-{}", std::process::id()));
    let _ = std::fs::remove_file(&f);
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new("OvrO", 64, BS as u32)).unwrap();
    let mut po = wc_bdev_pmem::PmemOpts::new("OvrC", f.to_str().unwrap());
    po.size = Some(512 * BS as u64);
    wc_bdev_pmem::create(po).unwrap();
    run_on(rt.main(), || async {
        let mut o = CreateOpts::new("OvrWC", "OvrO", "OvrC");
        // Writeback never starts: every read is a hit.
        o.high_watermark = Some(100);
        o.low_watermark = Some(100);
        o.autocommit_blocks = Some(64);
        wc_writecache::create(o)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .unwrap();
    // Every sector cached before the readers start.
    run_on(rt.main(), || async {
        let d = wc_bdev::open("OvrWC", true, None).unwrap();
        let ch = d.channel().unwrap();
        for lba in 0..LBAS {
            ch.write_async(lba, block(lba, 1), false).await.unwrap();
        }
    });
    // Newest version of each sector whose write has completed.
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..LBAS).map(|_| AtomicU64::new(1)).collect());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let handles = rt.handles();
    let writer = {
        let (h, done) = (handles[0].clone(), done.clone());
        std::thread::spawn(move || {
            run_on(&h, move || async move {
                let d = wc_bdev::open("OvrWC", true, None).unwrap();
                let ch = d.channel().unwrap();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let lba = n % LBAS;
                    let v = 2 + n / LBAS;
                    ch.write_async(lba, block(lba, v), false).await.unwrap();
                    done[lba as usize].store(v, Ordering::Release);
                    n += 1;
                    if n % 32 == 0 {
                        // Commit: later overwrites displace committed blocks.
                        ch.io_async(IoType::Flush, 0, 0).await.unwrap();
                    }
                }
                n
            })
        })
    };
    let reader = {
        let (h, done) = (handles[1].clone(), done.clone());
        std::thread::spawn(move || {
            run_on(&h, move || async move {
                let d = wc_bdev::open("OvrWC", true, None).unwrap();
                let ch = d.channel().unwrap();
                let mut reads = 0u64;
                while Instant::now() < deadline {
                    let batch = (0..READS_IN_FLIGHT).map(|k| {
                        let lba = (reads + k as u64) % LBAS;
                        let floor = done[lba as usize].load(Ordering::Acquire);
                        let ch = &ch;
                        async move {
                            let b = ch.read_async(lba, DmaBuf::new(BS)).await.expect("read");
                            (lba, floor, decode(&b))
                        }
                    });
                    for (lba, floor, got) in futures::future::join_all(batch).await {
                        let (l, v) = got.unwrap_or_else(|e| panic!("lba {lba}: {e}"));
                        assert_eq!(l, lba, "read of {lba} returned another sector's data");
                        assert!(
                            v >= floor,
                            "lba {lba}: read version {v}, older than {floor} written before"
                        );
                    }
                    reads += READS_IN_FLIGHT as u64;
                }
                reads
            })
        })
    };
    let writes = writer.join().expect("writer");
    let reads = reader.join().expect("reader");
    let s = wc_writecache::stats("OvrWC").unwrap();
    eprintln!("overwrite: {writes} writes, {reads} reads; {s:?}");
    assert!(
        writes > 100 && reads > 100,
        "too little work: {writes} / {reads}"
    );
    assert_eq!(s.read_hits, s.read_blocks, "every read was a hit");
    assert!(
        s.write_hits_committed > 0 && s.write_hits_uncommitted > 0,
        "both overwrite paths ran: {s:?}"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    rt.main().send(move || {
        wc_writecache::delete(
            "OvrWC",
            false,
            Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()),
        )
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
    let _ = std::fs::remove_file(f);
}
