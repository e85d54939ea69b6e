//! Benchmark: recovery time of a full cache and the RAM the cache keeps
//! per block. Fills a cache of N blocks (default 4 Mi blocks of 512 bytes,
//! in /dev/shm) through the writecache bdev, deletes the instance (commit
//! only), then times re-creating it (recovery) and reports the anonymous
//! memory the instance holds per cache block. pmem mode maps the cache
//! file (a pmem bdev); ssd mode reads it through a uring bdev (the
//! metadata region is read into RAM at attach).
//!
//! Usage: wc_recovery [blocks] [block_size] [dir] [pmem|ssd]

use std::time::Instant;

use wc_bdev::testing::{run_on, test_runtime};
use wc_bdev::DmaBuf;

/// Anonymous resident memory, after handing freed heap back to the OS
/// (so freed scratch memory is not counted as held).
fn rss_anon_kib() -> u64 {
    // SAFETY: malloc_trim only releases free heap pages; no pointers change.
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let blocks: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4 << 20);
    let bs: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(512);
    let dir = args.get(3).cloned().unwrap_or_else(|| "/dev/shm".into());
    let mode = match args.get(4).map(String::as_str) {
        None | Some("pmem") => wc_writecache::Mode::Pmem,
        Some("ssd") => wc_writecache::Mode::Ssd,
        Some(m) => {
            eprintln!("wc_recovery: mode must be pmem or ssd, not {m}");
            std::process::exit(2);
        }
    };
    let file = format!("{dir}/wc-recovery-{}.pmem", std::process::id());
    let meta = (64 + 16 * blocks).div_ceil(bs as u64) * bs as u64;
    let size = meta + blocks * bs as u64;
    let rt = test_runtime(1);
    let (f2, bsz) = (file.clone(), bs);
    run_on(rt.main(), move || async move {
        wc_bdev_null::create(wc_bdev_null::NullOpts::new("RecO", blocks * 2, bsz)).unwrap();
        if mode == wc_writecache::Mode::Ssd {
            std::fs::File::create(&f2)
                .and_then(|f| f.set_len(size))
                .expect("cache file");
            let mut uo = wc_bdev_uring::UringOpts::new("RecC", &f2);
            uo.block_size = Some(bsz);
            wc_bdev_uring::create(uo).unwrap();
        } else {
            let mut po = wc_bdev_pmem::PmemOpts::new("RecC", &f2);
            po.size = Some(size);
            po.block_size = Some(bsz);
            wc_bdev_pmem::create(po).unwrap();
        }
    });
    let main = rt.main().clone();
    let create = move || {
        let mut o = wc_writecache::CreateOpts::new("RecWC", "RecO", "RecC");
        o.mode = Some(mode);
        o.block_size = Some(bs);
        o.high_watermark = Some(100);
        o.low_watermark = Some(100);
        o.autocommit_blocks = Some(1 << 30);
        let (tx, rx) = std::sync::mpsc::channel();
        main.send(move || {
            wc_writecache::create_async(
                o,
                Box::new(move |r| {
                    let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
                }),
            )
        });
        rx.recv().unwrap_or_else(|e| Err(e.to_string()))
    };
    let before = rss_anon_kib();
    create().unwrap();
    let per_block_fresh = (rss_anon_kib().saturating_sub(before)) as f64 * 1024.0 / blocks as f64;
    let n = wc_writecache::stats("RecWC").unwrap().blocks;
    let t = Instant::now();
    run_on(rt.main(), move || async move {
        let d = wc_bdev::open("RecWC", true, None).unwrap();
        let ch = d.channel().unwrap();
        let chunk = 256u64;
        let mut lba = 0;
        while lba + chunk <= n {
            ch.write_async(lba, DmaBuf::new((chunk * bs as u64) as usize), false)
                .await
                .unwrap();
            lba += chunk;
        }
        ch.io_async(wc_bdev::IoType::Flush, 0, 0).await.unwrap();
    });
    let fill = t.elapsed();
    let before_full = rss_anon_kib();
    let (tx, rx) = std::sync::mpsc::channel();
    rt.main().send(move || {
        wc_writecache::delete(
            "RecWC",
            false,
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        )
    });
    assert!(rx.recv().unwrap());
    let t = Instant::now();
    create().unwrap();
    let recovery = t.elapsed();
    let s = wc_writecache::stats("RecWC").unwrap();
    let after_recovery = rss_anon_kib();
    println!(
        "{mode:?} mode cache: {n} blocks of {bs} bytes; filled in {:.2}s; recovery of {} committed blocks: {:.3}s",
        fill.as_secs_f64(),
        s.dirty,
        recovery.as_secs_f64()
    );
    println!(
        "RAM per cache block: {:.1} bytes when empty, {:.1} bytes when full, {:.1} bytes after recovery (resident); {:.1} bytes in the instance's structures",
        per_block_fresh,
        before_full.saturating_sub(before) as f64 * 1024.0 / blocks as f64,
        after_recovery.saturating_sub(before) as f64 * 1024.0 / blocks as f64,
        s.metadata_ram_bytes as f64 / blocks as f64
    );
    let _ = std::fs::remove_file(&file);
}
