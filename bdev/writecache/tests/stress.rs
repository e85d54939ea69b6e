//! Randomized stress on real reactor threads: several cores write, read,
//! flush and (through a tiny cache) force writeback and blocked writers on
//! the same few sectors. Every read must return a version that was written
//! to that sector (or its initial zeroes); after a final drain the origin
//! alone holds exactly what the cache showed.
//!
//! Both modes: pmem mode over a pmem file bdev, ssd mode over a malloc
//! bdev (asynchronous data writes and reads, in-place overwrites).

mod wcrig;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wc_bdev::testing::{run_on, test_runtime};
use wc_bdev::{DmaBuf, IoType};
use wc_writecache::{CreateOpts, Mode};

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

/// Bdev names (origin, cache, writecache) of one mode's run (both modes
/// run in one process; the names live as long as the reactor jobs).
/// A runtime of two reactors and a writecache `wn` (this run's mode) of
/// 512 cache blocks over a 64-block malloc origin whose writeback never
/// starts (every LBA written stays a hit), committing every 64 blocks.
/// Returns the runtime, the writecache's name, the cache file (ssd mode's
/// real cache bdev, removed by the caller) and the mode.
fn small_instance(
    tag: &str,
) -> (
    wc_reactor::Runtime,
    &'static str,
    Option<std::path::PathBuf>,
    Mode,
) {
    let rt = test_runtime(2);
    let (on, cn, wn) = names(tag);
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new(on, 64, BS as u32)).unwrap();
    let f = wcrig::real_cache_bdev(wcrig::mode(), cn, 512 * BS as u64, BS as u32);
    let mode = wcrig::mode();
    run_on(rt.main(), move || async move {
        let mut o = CreateOpts::new(wn, on, cn);
        o.mode = Some(mode);
        o.high_watermark = Some(100);
        o.low_watermark = Some(100);
        o.autocommit_blocks = Some(64);
        create(o).await
    })
    .unwrap();
    (rt, wn, f, mode)
}

/// Deletes writecache `wn` (draining it first when `drain`) from the main
/// reactor and waits for the delete to finish.
fn delete_and_wait(rt: &wc_reactor::Runtime, wn: &'static str, drain: bool) {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.main().send(move || {
        wc_writecache::delete(
            wn,
            drain,
            Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()),
        )
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
}

fn names(tag: &str) -> (&'static str, &'static str, &'static str) {
    let m = match wcrig::mode() {
        Mode::Pmem => "pmem",
        Mode::Ssd => "ssd",
    };
    (
        format!("{tag}O{m}").leak(),
        format!("{tag}C{m}").leak(),
        format!("{tag}WC{m}").leak(),
    )
}

/// Creates the instance (ssd mode attaches its cache asynchronously).
async fn create(o: CreateOpts) -> Result<(), String> {
    let (tx, rx) = futures::channel::oneshot::channel();
    wc_writecache::create_async(
        o,
        Box::new(move |r| {
            let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
        }),
    );
    rx.await
        .map_err(|_| "create dropped its callback".to_string())?
}

fn concurrent_writers_readers_flushers_and_writeback_agree() {
    let secs: u64 = std::env::var("WC_STRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rt = test_runtime(2);
    let (on, cn, wn) = names("Stress");
    wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new(on, 256, BS as u32)).unwrap();
    let f = wcrig::real_cache_bdev(wcrig::mode(), cn, 40 * BS as u64, BS as u32);
    let mode = wcrig::mode();
    run_on(rt.main(), move || async move {
        let mut o = CreateOpts::new(wn, on, cn);
        o.mode = Some(mode);
        o.high_watermark = Some(20);
        o.low_watermark = Some(10);
        o.autocommit_blocks = Some(8);
        o.autocommit_time_ms = Some(5);
        create(o).await
    })
    .unwrap();

    let written: Written = Arc::default();
    let whole = mode == Mode::Pmem;
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
                    let d = wc_bdev::open(wn, true, None).unwrap();
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
                                // ssd mode: a read overlapping an in-place
                                // overwrite may mix the two versions.
                                let (l, lo, hi) = match decode(&b) {
                                    Ok((l, v)) => (l, v, v),
                                    Err(e) if whole => panic!("lba {lba}: {e}"),
                                    Err(_) => {
                                        let (lo, hi) = versions_of(&b, lba)
                                            .unwrap_or_else(|e| panic!("lba {lba}: {e}"));
                                        (lba, lo, hi)
                                    }
                                };
                                if hi != 0 {
                                    assert_eq!(
                                        l, lba,
                                        "read of {lba} returned another block's data"
                                    );
                                    let ok = written
                                        .lock()
                                        .unwrap()
                                        .get(&lba)
                                        .is_some_and(|s| s.contains(&lo) && s.contains(&hi));
                                    assert!(
                                        ok,
                                        "lba {lba}: version {lo} or {hi} was never written there"
                                    );
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
    let s = wc_writecache::stats(wn).unwrap();
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
        let d = wc_bdev::open(wn, true, None).unwrap();
        let ch = d.channel().unwrap();
        let mut v = Vec::new();
        for lba in 0..HOT {
            v.push(decode(&ch.read_async(lba, DmaBuf::new(BS)).await.unwrap()).unwrap());
        }
        v
    });
    // ...is exactly what the origin alone holds after a drain and delete.
    delete_and_wait(&rt, wn, true);
    let origin: Vec<(u64, u64)> = run_on(rt.main(), || async {
        let d = wc_bdev::open(on, false, None).unwrap();
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
    if let Some(f) = f {
        let _ = std::fs::remove_file(f);
    }
}

/// Versions a block of `lba` holds, lowest and highest: every even word is
/// `lba`, the odd words versions (a read that overlapped an in-place
/// overwrite of the block may mix two).
fn versions_of(b: &[u8], lba: u64) -> Result<(u64, u64), String> {
    let (mut lo, mut hi) = (u64::MAX, 0);
    for (i, c) in b.chunks(8).enumerate() {
        let w = u64::from_le_bytes(c.try_into().unwrap());
        if i % 2 == 0 {
            if w != lba {
                return Err(format!("word {i} is {w}: not a block of lba {lba}"));
            }
        } else {
            (lo, hi) = (lo.min(w), hi.max(w));
        }
    }
    Ok((lo, hi))
}

/// Reads of cached blocks while another core overwrites them (committed
/// and uncommitted versions, so both the displaced-block free and the
/// superseded path run under the readers): every read returns its own
/// sector, never older than the newest write completed before the read
/// was submitted, never newer than the newest submitted before it
/// completed. pmem mode returns one whole version; ssd mode overwrites
/// in place, so a read overlapping an overwrite of its block may mix the
/// two versions, as a disk's would (only within those bounds). Readers keep
/// several reads in flight so they are looked up and copied as a batch.
fn reads_of_hits_stay_exact_while_they_are_overwritten() {
    const LBAS: u64 = 4;
    const READS_IN_FLIGHT: usize = 8;
    let secs: u64 = std::env::var("WC_STRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let (rt, wn, f, mode) = small_instance("Ovr");
    // Every sector cached before the readers start.
    run_on(rt.main(), || async {
        let d = wc_bdev::open(wn, true, None).unwrap();
        let ch = d.channel().unwrap();
        for lba in 0..LBAS {
            ch.write_async(lba, block(lba, 1), false).await.unwrap();
        }
    });
    // Newest version of each sector whose write has completed / started.
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..LBAS).map(|_| AtomicU64::new(1)).collect());
    let started: Arc<Vec<AtomicU64>> = Arc::new((0..LBAS).map(|_| AtomicU64::new(1)).collect());
    let whole = mode == Mode::Pmem;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let handles = rt.handles();
    let writer = {
        let (h, done, started) = (handles[0].clone(), done.clone(), started.clone());
        std::thread::spawn(move || {
            run_on(&h, move || async move {
                let d = wc_bdev::open(wn, true, None).unwrap();
                let ch = d.channel().unwrap();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let lba = n % LBAS;
                    let v = 2 + n / LBAS;
                    started[lba as usize].store(v, Ordering::Release);
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
        let (h, done, started) = (handles[1].clone(), done.clone(), started.clone());
        std::thread::spawn(move || {
            run_on(&h, move || async move {
                let d = wc_bdev::open(wn, true, None).unwrap();
                let ch = d.channel().unwrap();
                let mut reads = 0u64;
                while Instant::now() < deadline {
                    let batch = (0..READS_IN_FLIGHT).map(|k| {
                        let lba = (reads + k as u64) % LBAS;
                        let floor = done[lba as usize].load(Ordering::Acquire);
                        let (ch, started) = (&ch, &started);
                        async move {
                            let b = ch.read_async(lba, DmaBuf::new(BS)).await.expect("read");
                            let ceil = started[lba as usize].load(Ordering::Acquire);
                            (lba, floor, ceil, versions_of(&b, lba))
                        }
                    });
                    for (lba, floor, ceil, got) in futures::future::join_all(batch).await {
                        let (lo, hi) = got.unwrap_or_else(|e| panic!("lba {lba}: {e}"));
                        assert!(
                            lo >= floor && hi <= ceil,
                            "lba {lba}: read versions {lo}..={hi}, outside {floor}..={ceil}"
                        );
                        assert!(
                            lo == hi || !whole,
                            "lba {lba}: read a mix of versions {lo}..={hi}"
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
    let s = wc_writecache::stats(wn).unwrap();
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
    delete_and_wait(&rt, wn, false);
    if let Some(f) = f {
        let _ = std::fs::remove_file(f);
    }
}

/// One-block writes in flight together (pmem mode serves those of one
/// reactor iteration as a batch, their index slots and displaced blocks
/// fetched first), overwriting committed and uncommitted versions, mixed
/// with batched reads: after each round every sector reads back as its
/// newest write, whole.
fn one_block_writes_in_flight_together_land_whole() {
    const LBAS: u64 = 24;
    const IN_FLIGHT: u64 = 16;
    const ROUNDS: u64 = 200;
    let (rt, wn, f, _) = small_instance("Bat");
    // Off home: the writes' commits and frees cross cores.
    let h = rt.handles()[1].clone();
    run_on(&h, move || async move {
        let d = wc_bdev::open(wn, true, None).unwrap();
        let ch = d.channel().unwrap();
        let mut newest = vec![0u64; LBAS as usize];
        for round in 1..=ROUNDS {
            // Distinct sectors per round (IN_FLIGHT < LBAS, stride 5 is
            // coprime with 24), a different window each round.
            let lbas: Vec<u64> = (0..IN_FLIGHT).map(|k| (round * 7 + k * 5) % LBAS).collect();
            let writes = lbas
                .iter()
                .map(|&lba| ch.write_async(lba, block(lba, round), false));
            for r in futures::future::join_all(writes).await {
                r.expect("write");
            }
            for &lba in &lbas {
                newest[lba as usize] = round;
            }
            if round % 8 == 0 {
                // Commit: later overwrites displace committed blocks.
                ch.io_async(IoType::Flush, 0, 0).await.unwrap();
            }
            let written = (0..LBAS).filter(|&lba| newest[lba as usize] != 0);
            let reads = written.map(|lba| {
                let ch = &ch;
                async move {
                    (
                        lba,
                        ch.read_async(lba, DmaBuf::new(BS)).await.expect("read"),
                    )
                }
            });
            for (lba, b) in futures::future::join_all(reads).await {
                let got = decode(&b).unwrap_or_else(|e| panic!("lba {lba}, round {round}: {e}"));
                assert_eq!(got, (lba, newest[lba as usize]), "lba {lba}, round {round}");
            }
        }
    });
    let s = wc_writecache::stats(wn).unwrap();
    assert!(
        s.write_hits_committed > 0 && s.write_hits_uncommitted > 0,
        "both overwrite paths ran: {s:?}"
    );
    delete_and_wait(&rt, wn, false);
    if let Some(f) = f {
        let _ = std::fs::remove_file(f);
    }
}

both_modes!(
    concurrent_writers_readers_flushers_and_writeback_agree,
    reads_of_hits_stay_exact_while_they_are_overwritten,
    one_block_writes_in_flight_together_land_whole,
);
