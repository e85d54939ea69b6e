//! Golden on-media images (design §3.2–§3.3).
//!
//! Every expected image here is built by hand from the spec — literal bytes
//! and numbers worked out in the comments — never with the format codec, so
//! a bug shared by the codec and the writecache cannot hide. The instance
//! runs on a one-reactor deterministic `Harness` over simulated media
//! (`SimPmem` cache, `SimDisk` origin), and each check compares the whole
//! cache device byte for byte, both as loads see it (`visible`) and as a
//! power failure would leave it (`crash_all_pending_lost`).
//!
//! * format of a blank device, and what format must not touch;
//! * three writes + FLUSH, then an overwrite + FLUSH (pmem: new block, old
//!   one freed after the commit), then re-attach;
//! * the same in ssd mode (a `SimDisk` cache): the same format and layout,
//!   the overwrite in place, its commit only a flush;
//! * `start_sector`;
//! * every corrupt superblock / entry table refused with a precise error,
//!   the device left untouched (not a single store);
//! * the torn free (all-ones sector, committed seq) accepted and cleared;
//! * an image laid out by hand as Linux dm-writecache leaves it, attached,
//!   and the image we leave after writing read back the way Linux would.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use wc_bdev::{BdevChannel, Desc, DmaBuf, FnCompletion, Io, IoCompletion};
use wc_reactor::Harness;
use wc_sim::{SimDisk, SimPmem};
use wc_writecache::{AttachError, CreateOpts, WcError};
use wc_writecache_format::FormatError;

const EINVAL: i32 = 22;
const EFBIG: i32 = 27;
const ENOSPC: i32 = 28;
const EUCLEAN: i32 = 117;
const ONES: [u8; 16] = [0xff; 16];

// ---------------------------------------------------------------- bytes

fn put(img: &mut [u8], off: usize, bytes: &[u8]) {
    img[off..off + bytes.len()].copy_from_slice(bytes);
}

fn get_u64(img: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(img[off..off + 8].try_into().unwrap())
}

/// A superblock spelled out field by field (§3.2), little-endian.
fn sb_bytes(magic: u32, version: u32, block_size: u32, n_blocks: u64, seq: u64) -> [u8; 64] {
    let mut b = [0u8; 64];
    put(&mut b, 0, &magic.to_le_bytes());
    put(&mut b, 4, &version.to_le_bytes());
    put(&mut b, 8, &block_size.to_le_bytes());
    // 12..16: pad, zero.
    put(&mut b, 16, &n_blocks.to_le_bytes());
    put(&mut b, 24, &seq.to_le_bytes());
    b
}

fn entry_bytes(sector: u64, seq: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    put(&mut b, 0, &sector.to_le_bytes());
    put(&mut b, 8, &seq.to_le_bytes());
    b
}

/// Recognizable block content: 8-byte word `k` is `tag << 32 | k`, so a
/// wrong block, a shifted block or a torn block all show.
fn content(tag: u64, len: usize) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|k| ((tag << 32) | k as u64).to_le_bytes())
        .collect()
}

/// (sector, seq) of entry `i` of the table starting at `sb_off`.
fn entry_at(img: &[u8], sb_off: usize, i: usize) -> (u64, u64) {
    let off = sb_off + 64 + 16 * i;
    (get_u64(img, off), get_u64(img, off + 8))
}

/// Whole-image comparison that reports where, instead of dumping 16 KiB.
#[track_caller]
fn assert_image(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: image length");
    let diff = |(a, b): (&u8, &u8)| a != b;
    if let Some(first) = got.iter().zip(want).position(diff) {
        let last = got.iter().zip(want).rposition(diff).unwrap();
        let n = got.iter().zip(want).filter(|p| diff(*p)).count();
        let end = (first + 16).min(got.len());
        panic!(
            "{what}: {n} bytes differ in [{first}, {last}]; at {first}: got {:02x?}, want {:02x?}",
            &got[first..end],
            &want[first..end]
        );
    }
}

/// The device as loads see it and as a power failure now would leave it
/// must both be `want`: the state is the expected one *and* durable.
#[track_caller]
fn assert_durable_image(pmem: &SimPmem, want: &[u8], what: &str) {
    assert_image(&pmem.visible(), want, &format!("{what} (visible)"));
    assert_image(
        &pmem.crash_all_pending_lost(),
        want,
        &format!("{what} (durable)"),
    );
}

// ------------------------------------------------------------- the rig

static RUN: AtomicU64 = AtomicU64::new(0);

fn unique(tag: &str) -> String {
    format!("golden_{tag}{}", RUN.fetch_add(1, Ordering::Relaxed))
}

/// A simulated cache device and origin, registered as bdevs.
struct Bases {
    origin: String,
    cache: String,
    pmem: Arc<SimPmem>,
}

/// A writecache bdev opened on reactor 0.
struct Vol {
    _desc: Desc,
    ch: Rc<BdevChannel>,
}

struct Rig {
    h: Harness,
}

impl Rig {
    fn new() -> Rig {
        Rig { h: Harness::new(1) }
    }

    /// Registers `pmem_img` as a pmem cache (512-byte blocks) and
    /// `origin_img` as an origin with `origin_bs`-byte blocks.
    fn bases(&self, pmem_img: Vec<u8>, origin_img: Vec<u8>, origin_bs: u32) -> Bases {
        let pmem = Arc::new(SimPmem::from_image(pmem_img));
        let disk = Arc::new(SimDisk::from_image(origin_img));
        let (origin, cache) = (unique("o"), unique("c"));
        wc_sim::register_disk_bdev(&origin, disk, origin_bs).unwrap();
        wc_sim::register_pmem_bdev(&cache, pmem.clone(), 512).unwrap();
        Bases {
            origin,
            cache,
            pmem,
        }
    }

    /// Creates `name` with only commits we ask for (no timer, no count
    /// autocommit for these sizes) and no writeback below a full cache, so
    /// every image is deterministic.
    fn create(
        &self,
        name: &str,
        b: &Bases,
        block_size: u32,
        start_sector: Option<u64>,
    ) -> Result<(), WcError> {
        let mut o = CreateOpts::new(name, &b.origin, &b.cache);
        o.block_size = Some(block_size);
        o.start_sector = start_sector;
        o.autocommit_time_ms = Some(3_600_000);
        o.autocommit_blocks = Some(1 << 20);
        o.high_watermark = Some(100);
        o.low_watermark = Some(100);
        self.h.on(0, move || wc_writecache::create(o).map(|_| ()))
    }

    fn open(&self, name: &str) -> Vol {
        let d = wc_bdev::open(name, true, None).unwrap();
        let ch = self.h.on(0, || d.channel()).unwrap();
        Vol { _desc: d, ch }
    }

    fn wait(&self, done: &Cell<bool>, what: &str) {
        assert!(
            self.h.run_until(100_000, || done.get()),
            "{what} did not complete"
        );
    }

    fn write(&self, v: &Vol, lba: u64, data: &[u8]) {
        let done = Rc::new(Cell::new(false));
        let d2 = done.clone();
        let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |io: Io, _| {
            assert!(io.status().is_success(), "write {lba}: {:?}", io.status());
            d2.set(true);
        }));
        let (ch, buf) = (v.ch.clone(), DmaBuf::from_slice(data));
        self.h.on(0, move || ch.write(lba, buf, false, &cb, 0));
        self.wait(&done, "write");
    }

    fn read(&self, v: &Vol, lba: u64, len: usize) -> Vec<u8> {
        let got: Rc<RefCell<Option<Vec<u8>>>> = Rc::default();
        let g2 = got.clone();
        let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |mut io: Io, _| {
            assert!(io.status().is_success(), "read {lba}: {:?}", io.status());
            *g2.borrow_mut() = Some(io.take_buf().unwrap().to_vec());
        }));
        let ch = v.ch.clone();
        self.h.on(0, move || ch.read(lba, DmaBuf::new(len), &cb, 0));
        assert!(self.h.run_until(100_000, || got.borrow().is_some()));
        let v = got.borrow_mut().take().unwrap();
        v
    }

    fn flush(&self, v: &Vol) {
        let done = Rc::new(Cell::new(false));
        let d2 = done.clone();
        let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |io: Io, _| {
            assert!(io.status().is_success(), "flush: {:?}", io.status());
            d2.set(true);
        }));
        let ch = v.ch.clone();
        self.h.on(0, move || ch.flush(0, 0, &cb, 0));
        self.wait(&done, "flush");
    }

    /// Deletes the instance without writeback (commit only: the cache keeps
    /// its data for the next attach).
    fn delete(&self, name: &str, vol: Option<Vol>) {
        drop(vol);
        let result = Rc::new(Cell::new(None));
        let (tx, rx) = std::sync::mpsc::channel();
        let n = name.to_string();
        self.h.on(0, move || {
            wc_writecache::delete(&n, false, Box::new(move |r| tx.send(r.is_ok()).unwrap()))
        });
        let r2 = result.clone();
        assert!(self.h.run_until(100_000, || {
            if let Ok(ok) = rx.try_recv() {
                r2.set(Some(ok));
            }
            r2.get().is_some()
        }));
        assert_eq!(result.get(), Some(true), "delete {name}");
        self.h.run_until_idle(1000);
        assert!(wc_bdev::lookup(name).is_none());
    }

    fn release(&self, b: Bases) {
        wc_sim::delete(&b.origin).unwrap();
        wc_sim::delete(&b.cache).unwrap();
        self.h.run_until_idle(1000);
    }
}

/// `create` must fail with `check`'s error, leaving no bdev, no claim, and
/// a cache device that was not stored to at all.
#[track_caller]
fn assert_refused(
    rig: &Rig,
    b: &Bases,
    block_size: u32,
    start_sector: Option<u64>,
    what: &str,
    check: impl FnOnce(&WcError),
) {
    let before = b.pmem.visible();
    let stores = b.pmem.store_count();
    let name = unique("refused");
    let r = rig.create(&name, b, block_size, start_sector);
    let Err(e) = r else {
        panic!("{what}: corrupt cache was accepted");
    };
    check(&e);
    assert_eq!(
        b.pmem.store_count(),
        stores,
        "{what}: refused, but stored to the cache device"
    );
    assert_durable_image(&b.pmem, &before, &format!("{what}: refused device"));
    assert!(wc_bdev::lookup(&name).is_none(), "{what}: bdev left behind");
    assert!(wc_writecache::get(&name).is_none(), "{what}: instance left");
    for base in [&b.origin, &b.cache] {
        let bd = wc_bdev::lookup(base).unwrap();
        assert!(bd.claim_info().is_none(), "{what}: {base} still claimed");
    }
}

#[track_caller]
fn expect_format(e: &WcError, want: FormatError, errno: i32, what: &str) {
    match e {
        WcError::Attach(AttachError::Format(f)) => assert_eq!(*f, want, "{what}"),
        other => panic!("{what}: want {want:?}, got {other:?}"),
    }
    assert_eq!(e.errno(), errno, "{what}: errno of {e}");
}

#[track_caller]
fn expect_corrupt(e: &WcError, needles: &[&str], what: &str) {
    match e {
        WcError::Attach(AttachError::Corrupt(msg)) => {
            for n in needles {
                assert!(msg.contains(n), "{what}: {msg:?} lacks {n:?}");
            }
        }
        other => panic!("{what}: want a corruption error, got {other:?}"),
    }
    assert_eq!(e.errno(), EUCLEAN, "{what}: errno of {e}");
}

// ------------------------------------------------- geometry A: 512-byte
//
// Cache device of 16384 bytes, block size 512, start_sector 0.
// n_blocks is the largest n with round_up(64 + 16n, 512) + 512n <= 16384:
// * n = 31 (the 16384 / (512 + 16) upper bound): 64 + 496 = 560 -> 1024 of
//   metadata, + 31 * 512 = 16896 > 16384: does not fit;
// * n = 30: 64 + 480 = 544 -> 1024, + 30 * 512 = 15360 -> 16384: fits.
// So 30 blocks; entries in [64, 544); [544, 1024) is metadata padding; the
// data area starts at 1024 (two metadata blocks) and ends exactly at 16384.

const A_DEV: usize = 16384;
const A_N: usize = 30;
const A_ENTRIES_END: usize = 544;
const A_DATA: usize = 1024;
/// Origin: 64 blocks of 512 bytes (sector == LBA at this block size).
const A_ORIGIN: usize = 64 * 512;

/// The superblock a fresh format of geometry A writes, as literal bytes.
const A_SB_FRESH: [u8; 64] = {
    let mut b = [0u8; 64];
    // magic 0x23489321, little-endian
    b[0] = 0x21;
    b[1] = 0x93;
    b[2] = 0x48;
    b[3] = 0x23;
    // version 1
    b[4] = 1;
    // block_size 512 = 0x200
    b[9] = 0x02;
    // pad (12..16) 0; n_blocks 30 = 0x1e
    b[16] = 0x1e;
    // seq_count 0 (24..32), rest zero
    b
};

/// Geometry A right after formatting a zeroed device.
fn a_formatted_image() -> Vec<u8> {
    let mut img = vec![0u8; A_DEV];
    put(&mut img, 0, &A_SB_FRESH);
    img[64..A_ENTRIES_END].fill(0xff);
    img
}

#[test]
fn format_blank_device_golden_image() {
    let rig = Rig::new();
    let b = rig.bases(vec![0; A_DEV], vec![0; A_ORIGIN], 512);
    let name = unique("fmt");
    rig.create(&name, &b, 512, None).unwrap();
    let wc = wc_writecache::get(&name).unwrap();
    assert!(wc.formatted_on_create());
    let s = wc.stats();
    assert_eq!((s.blocks, s.free_blocks, s.seq_count), (30, 30, 0));
    assert_eq!(s.dirty, 0);
    let want = a_formatted_image();
    // Sanity of the hand-made image itself.
    assert_eq!(want[..32], {
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&[0x21, 0x93, 0x48, 0x23]);
        h[4] = 1;
        h[8..12].copy_from_slice(&512u32.to_le_bytes());
        h[16..24].copy_from_slice(&30u64.to_le_bytes());
        h
    });
    assert_eq!(A_ENTRIES_END, 64 + 16 * A_N);
    assert_durable_image(&b.pmem, &want, "fresh format");
    rig.delete(&name, None);
    // An idle instance's delete commits nothing: the superblock stays.
    assert_durable_image(&b.pmem, &want, "after delete");
    rig.release(b);
}

/// §3.2: "formatting writes everything except the magic, persists, then
/// writes the magic and persists". Power cut at every persistence point of
/// a format (each store and each fence), several crash images per cut:
/// every image either attaches to exactly the golden image (blank again, so
/// formatted anew, or complete) or is refused as an interrupted format —
/// never trusted half-written.
#[test]
fn crash_during_format_is_never_half_trusted() {
    let rig = Rig::new();
    let golden = a_formatted_image();
    // One store for the magic-less superblock, two per entry (seq, then
    // sector), a fence, the full superblock, a fence.
    let points = 1 + 2 * A_N as u64 + 1 + 1 + 1;
    let (mut refused, mut accepted) = (0, 0);
    for k in 0..=points {
        let pmem = Arc::new(SimPmem::new(A_DEV));
        pmem.set_crash_at(k);
        let (o, c) = (unique("o"), unique("c"));
        wc_sim::register_disk_bdev(&o, Arc::new(SimDisk::new(A_ORIGIN)), 512).unwrap();
        wc_sim::register_pmem_bdev(&c, pmem.clone(), 512).unwrap();
        let name = unique("fmtcrash");
        rig.create(
            &name,
            &Bases {
                origin: o.clone(),
                cache: c.clone(),
                pmem: pmem.clone(),
            },
            512,
            None,
        )
        .unwrap();
        assert_eq!(pmem.points(), points, "points of one format");
        rig.delete(&name, None);
        rig.release(Bases {
            origin: o,
            cache: c,
            pmem: pmem.clone(),
        });
        let mut images = vec![pmem.crash_all_pending_lost(), pmem.crash_all_pending_kept()];
        images.extend((0..4).map(|seed| pmem.power_fail(k * 16 + seed)));
        for img in images {
            let b = rig.bases(img.clone(), vec![0; A_ORIGIN], 512);
            let name = unique("fmtreboot");
            match rig.create(&name, &b, 512, None) {
                Ok(()) => {
                    accepted += 1;
                    assert_durable_image(&b.pmem, &golden, &format!("crash at {k}"));
                    rig.delete(&name, None);
                }
                Err(e) => {
                    refused += 1;
                    expect_format(&e, FormatError::BadMagic { found: 0 }, EINVAL, "");
                    assert_image(&b.pmem.visible(), &img, "refused image untouched");
                }
            }
            rig.release(b);
        }
    }
    // Both outcomes occur: the cut points do reach inside the format.
    assert!(
        refused > 0 && accepted > 0,
        "{refused} refused {accepted} ok"
    );
}

/// Format writes the superblock (all 64 bytes, zero tail) and the entries,
/// nothing else: padding and data keep whatever they held. Leftover bytes
/// in the superblock besides magic and version do not stop the format.
#[test]
fn format_touches_only_superblock_and_entries() {
    let rig = Rig::new();
    let mut img = vec![0u8; A_DEV];
    img[8..64].fill(0x5a); // magic and version zero: blank
    img[64..A_ENTRIES_END].fill(0x11);
    img[A_ENTRIES_END..A_DATA].fill(0xc3);
    img[A_DATA..].fill(0x77);
    let b = rig.bases(img.clone(), vec![0; A_ORIGIN], 512);
    let name = unique("fmtgarbage");
    rig.create(&name, &b, 512, None).unwrap();
    let mut want = img;
    put(&mut want, 0, &A_SB_FRESH);
    want[64..A_ENTRIES_END].fill(0xff);
    assert_durable_image(&b.pmem, &want, "format over garbage");
    rig.delete(&name, None);
    rig.release(b);
}

/// §3.2 + §3.3: three writes, FLUSH; an overwrite, FLUSH; re-attach.
#[test]
fn writes_and_flush_golden_image() {
    let rig = Rig::new();
    let b = rig.bases(vec![0; A_DEV], vec![0; A_ORIGIN], 512);
    let name = unique("wr");
    rig.create(&name, &b, 512, None).unwrap();
    let v = rig.open(&name);
    let lbas = [3u64, 17, 40];
    for &l in &lbas {
        rig.write(&v, l, &content(l + 1, 512));
    }
    // Before the FLUSH the writes are stamped with the open sequence 0 and
    // the superblock still says 0: nothing is committed.
    let img = b.pmem.visible();
    assert_eq!(get_u64(&img, 24), 0);
    let mut stamped: Vec<(u64, u64)> = (0..A_N)
        .map(|i| entry_at(&img, 0, i))
        .filter(|e| e.1 != u64::MAX)
        .collect();
    stamped.sort_unstable();
    assert_eq!(stamped, vec![(3, 0), (17, 0), (40, 0)]);

    rig.flush(&v);
    let img = b.pmem.visible();
    // Which slots the allocator chose is its business; what they hold is
    // not.
    let mut used: BTreeMap<u64, usize> = BTreeMap::new(); // sector -> slot
    for i in 0..A_N {
        let (sector, seq) = entry_at(&img, 0, i);
        if (sector, seq) == (u64::MAX, u64::MAX) {
            continue;
        }
        assert_eq!(seq, 0, "slot {i}: sector {sector} seq {seq}");
        assert!(used.insert(sector, i).is_none(), "sector {sector} twice");
    }
    assert_eq!(used.keys().copied().collect::<Vec<_>>(), lbas.to_vec());
    let mut want = a_formatted_image();
    want[24] = 1; // superblock seq_count 1: sequence 0 is committed
    for (&sector, &slot) in &used {
        put(&mut want, 64 + 16 * slot, &entry_bytes(sector, 0));
        let data = A_DATA + 512 * slot;
        assert_eq!(
            img[data..data + 512],
            content(sector + 1, 512)[..],
            "data of slot {slot} (sector {sector})"
        );
        put(&mut want, data, &content(sector + 1, 512));
    }
    assert_durable_image(&b.pmem, &want, "3 writes + FLUSH");
    let s = wc_writecache::get(&name).unwrap().stats();
    assert_eq!((s.seq_count, s.dirty, s.commits), (1, 3, 1));

    // pmem mode never overwrites a committed block: the new version of LBA
    // 17 goes to a new slot stamped 1; the commit writes seq_count 2 and
    // then frees (all-ones) the old slot.
    rig.write(&v, 17, &content(99, 512));
    rig.flush(&v);
    let img = b.pmem.visible();
    let old17 = used[&17];
    let new17 = (0..A_N)
        .find(|&i| entry_at(&img, 0, i) == (17, 1))
        .expect("a slot holds (17, 1)");
    assert_ne!(new17, old17);
    want[24] = 2;
    put(&mut want, 64 + 16 * old17, &ONES);
    put(&mut want, 64 + 16 * new17, &entry_bytes(17, 1));
    put(&mut want, A_DATA + 512 * new17, &content(99, 512));
    // The old block's data stays (freeing only clears its entry).
    assert_durable_image(&b.pmem, &want, "overwrite + FLUSH");
    for (l, tag) in [(3, 4), (17, 99), (40, 41), (5, 0)] {
        let want = if tag == 0 {
            vec![0; 512]
        } else {
            content(tag, 512)
        };
        assert_eq!(rig.read(&v, l, 512), want, "read lba {l}");
    }

    // Re-attach: recovery finds exactly these three committed blocks and
    // has nothing to clear, so the image does not change.
    rig.delete(&name, Some(v));
    assert_durable_image(&b.pmem, &want, "after delete");
    rig.create(&name, &b, 512, None).unwrap();
    let wc = wc_writecache::get(&name).unwrap();
    assert!(!wc.formatted_on_create());
    let s = wc.stats();
    assert_eq!((s.seq_count, s.dirty, s.free_blocks), (2, 3, 27));
    assert_durable_image(&b.pmem, &want, "after re-attach");
    let v = rig.open(&name);
    assert_eq!(rig.read(&v, 17, 512), content(99, 512));
    assert_eq!(rig.read(&v, 40, 512), content(41, 512));
    rig.delete(&name, Some(v));
    rig.release(b);
}

/// The cache device as reads see it and as a power failure now would leave
/// it (unflushed writes lost) must both be `want` (ssd mode).
#[track_caller]
fn assert_durable_disk(disk: &SimDisk, want: &[u8], what: &str) {
    assert_image(&disk.visible(), want, &format!("{what} (visible)"));
    assert_image(
        &disk.crash_all_unflushed_lost(),
        want,
        &format!("{what} (durable)"),
    );
}

/// ssd mode writes the same on-media format (§3.2, issue 13): on a blank
/// `SimDisk` cache, the format, three writes + FLUSH, then an overwrite +
/// FLUSH, and a re-attach give the images pmem mode gives — except that
/// the overwrite of a committed block goes in place (same slot, same
/// entry, new data) and its commit, having no new entry, only flushes
/// (`seq_count` stays 1, as the kernel leaves it; §3.11).
#[test]
fn ssd_mode_writes_the_same_golden_image() {
    let rig = Rig::new();
    let disk = Arc::new(SimDisk::new(A_DEV));
    let (o, c) = (unique("o"), unique("c"));
    wc_sim::register_disk_bdev(&o, Arc::new(SimDisk::new(A_ORIGIN)), 512).unwrap();
    wc_sim::register_disk_bdev(&c, disk.clone(), 512).unwrap();
    let create = |name: &str| {
        let mut opts = CreateOpts::new(name, &o, &c);
        opts.mode = Some(wc_writecache::Mode::Ssd);
        opts.block_size = Some(512);
        opts.autocommit_time_ms = Some(3_600_000);
        opts.autocommit_blocks = Some(1 << 20);
        opts.high_watermark = Some(100);
        opts.low_watermark = Some(100);
        let done: Arc<std::sync::Mutex<Option<Result<(), String>>>> = Arc::default();
        let d2 = done.clone();
        rig.h.on(0, move || {
            wc_writecache::create_async(
                opts,
                Box::new(move |r| {
                    *d2.lock().unwrap() = Some(r.map(|_| ()).map_err(|e| e.to_string()))
                }),
            )
        });
        assert!(rig.h.run_until(100_000, || done.lock().unwrap().is_some()));
        let r = done.lock().unwrap().take().unwrap();
        r.unwrap();
        wc_writecache::get(name).unwrap()
    };
    let name = unique("ssd");
    let wc = create(&name);
    assert!(wc.formatted_on_create());
    let mut want = a_formatted_image();
    assert_durable_disk(&disk, &want, "ssd format");

    let v = rig.open(&name);
    let lbas = [3u64, 17, 40];
    for &l in &lbas {
        rig.write(&v, l, &content(l + 1, 512));
    }
    rig.flush(&v);
    let img = disk.visible();
    let mut used: BTreeMap<u64, usize> = BTreeMap::new(); // sector -> slot
    for i in 0..A_N {
        let (sector, seq) = entry_at(&img, 0, i);
        if (sector, seq) != (u64::MAX, u64::MAX) {
            assert_eq!(seq, 0, "slot {i}: sector {sector} seq {seq}");
            assert!(used.insert(sector, i).is_none(), "sector {sector} twice");
        }
    }
    assert_eq!(used.keys().copied().collect::<Vec<_>>(), lbas.to_vec());
    // Free blocks go out lowest first: slots 0, 1, 2 in write order.
    assert_eq!(used.values().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
    want[24] = 1;
    for (&sector, &slot) in &used {
        put(&mut want, 64 + 16 * slot, &entry_bytes(sector, 0));
        put(&mut want, A_DATA + 512 * slot, &content(sector + 1, 512));
    }
    assert_durable_disk(&disk, &want, "ssd: 3 writes + FLUSH");
    let s = wc.stats();
    assert_eq!((s.seq_count, s.dirty, s.commits), (1, 3, 1));

    rig.write(&v, 17, &content(99, 512));
    rig.flush(&v);
    put(&mut want, A_DATA + 512 * used[&17], &content(99, 512));
    assert_durable_disk(&disk, &want, "ssd: in-place overwrite + FLUSH");
    let s = wc.stats();
    assert_eq!((s.seq_count, s.dirty, s.writes_allocate), (1, 3, 3));
    for (l, tag) in [(3, 4), (17, 99), (40, 41), (5, 0)] {
        let want = if tag == 0 {
            vec![0; 512]
        } else {
            content(tag, 512)
        };
        assert_eq!(rig.read(&v, l, 512), want, "read lba {l}");
    }

    // Re-attach: recovered as is, the image unchanged.
    drop(wc);
    rig.delete(&name, Some(v));
    assert_durable_disk(&disk, &want, "ssd: after delete");
    let wc = create(&name);
    assert!(!wc.formatted_on_create());
    let s = wc.stats();
    assert_eq!((s.seq_count, s.dirty, s.free_blocks), (1, 3, 27));
    assert_durable_disk(&disk, &want, "ssd: after re-attach");
    let v = rig.open(&name);
    assert_eq!(rig.read(&v, 17, 512), content(99, 512));
    drop(wc);
    rig.delete(&name, Some(v));
    wc_sim::delete(&o).unwrap();
    wc_sim::delete(&c).unwrap();
    rig.h.run_until_idle(1000);
}

/// The superblock lives at `start_sector * 512`; nothing before it is read
/// as metadata or written.
#[test]
fn start_sector_offsets_the_whole_layout() {
    // start_sector 3: superblock at byte 1536. The device is geometry A plus
    // those 1536 bytes (17920 = 35 sectors), so the layout from 1536 on is
    // geometry A's: 30 blocks, entries at 1600, data at 1536 + 1024 = 2560.
    const OFF: usize = 1536;
    let rig = Rig::new();
    let mut img = vec![0u8; OFF + A_DEV];
    img[..OFF].fill(0xa5);
    let b = rig.bases(img, vec![0; A_ORIGIN], 512);
    let name = unique("start");
    rig.create(&name, &b, 512, Some(3)).unwrap();
    let mut want = vec![0xa5u8; OFF];
    want.extend_from_slice(&a_formatted_image());
    assert_durable_image(&b.pmem, &want, "format at sector 3");

    let v = rig.open(&name);
    rig.write(&v, 7, &content(8, 512));
    rig.flush(&v);
    let img = b.pmem.visible();
    let slot = (0..A_N)
        .find(|&i| entry_at(&img, OFF, i) == (7, 0))
        .expect("entry (7, 0) in the table at 1536");
    want[OFF + 24] = 1;
    put(&mut want, OFF + 64 + 16 * slot, &entry_bytes(7, 0));
    put(&mut want, OFF + A_DATA + 512 * slot, &content(8, 512));
    assert_durable_image(&b.pmem, &want, "write + FLUSH at sector 3");
    rig.delete(&name, Some(v));

    // Attached at sector 0, the prefix is no superblock: refused untouched.
    assert_refused(&rig, &b, 512, None, "start_sector 0", |e| {
        expect_format(e, FormatError::BadMagic { found: 0xa5a5_a5a5 }, EINVAL, "")
    });
    // A superblock that would not fit the device.
    assert_refused(&rig, &b, 512, Some(35), "start_sector 35", |e| {
        expect_format(
            e,
            FormatError::StartSectorPastEnd {
                start_sector: 35,
                device_size: 17920,
            },
            EINVAL,
            "",
        )
    });
    assert_refused(&rig, &b, 512, Some(u64::MAX), "start_sector max", |e| {
        expect_format(
            e,
            FormatError::StartSectorPastEnd {
                start_sector: u64::MAX,
                device_size: 17920,
            },
            EINVAL,
            "",
        )
    });
    // Sector 34 reads as blank (zeros), but 512 bytes cannot hold a
    // metadata block and a data block (1024).
    assert_refused(&rig, &b, 512, Some(34), "start_sector 34", |e| {
        expect_format(
            e,
            FormatError::DeviceTooSmall {
                needed: 1024,
                available: 512,
            },
            ENOSPC,
            "",
        )
    });
    // The right start sector recovers the data.
    rig.create(&name, &b, 512, Some(3)).unwrap();
    assert_durable_image(&b.pmem, &want, "re-attach at sector 3");
    let v = rig.open(&name);
    assert_eq!(rig.read(&v, 7, 512), content(8, 512));
    rig.delete(&name, Some(v));
    rig.release(b);
}

/// Geometry A formatted, sequence 1 committed with LBA 5 cached in slot 0.
fn a_committed_image() -> Vec<u8> {
    let mut img = a_formatted_image();
    img[24] = 1;
    put(&mut img, 64, &entry_bytes(5, 0));
    put(&mut img, A_DATA, &content(6, 512));
    img
}

#[test]
fn corrupt_superblocks_are_refused_untouched() {
    let rig = Rig::new();
    // The base image attaches (control), then each case changes one thing.
    {
        let b = rig.bases(a_committed_image(), vec![0; A_ORIGIN], 512);
        let name = unique("ctl");
        rig.create(&name, &b, 512, None).unwrap();
        assert_eq!(wc_writecache::get(&name).unwrap().stats().dirty, 1);
        rig.delete(&name, None);
        rig.release(b);
    }
    type Case = (&'static str, fn(&mut Vec<u8>), u32, FormatError, i32);
    let cases: [Case; 12] = [
        (
            "bad magic",
            |i| put(i, 0, &0x2348_9322u32.to_le_bytes()),
            512,
            FormatError::BadMagic { found: 0x2348_9322 },
            EINVAL,
        ),
        (
            // The state a crash leaves mid-format: all but the magic.
            "interrupted format (magic 0, version 1)",
            |i| put(i, 0, &[0; 4]),
            512,
            FormatError::BadMagic { found: 0 },
            EINVAL,
        ),
        (
            "bad version",
            |i| i[4] = 2,
            512,
            FormatError::BadVersion { found: 2 },
            EINVAL,
        ),
        (
            "version 0",
            |i| i[4] = 0,
            512,
            FormatError::BadVersion { found: 0 },
            EINVAL,
        ),
        (
            // 1024-byte blocks: 14 fit (1024 metadata + 14 * 1024 = 15360),
            // so only the block size is wrong.
            "block size mismatch",
            |i| {
                put(i, 8, &1024u32.to_le_bytes());
                put(i, 16, &14u64.to_le_bytes());
            },
            512,
            FormatError::BlockSizeMismatch {
                found: 1024,
                expected: 512,
            },
            EINVAL,
        ),
        (
            "block size not a power of two",
            |i| put(i, 8, &1000u32.to_le_bytes()),
            512,
            FormatError::BlockSizeInvalid { block_size: 1000 },
            EINVAL,
        ),
        (
            "block size 8192",
            |i| put(i, 8, &8192u32.to_le_bytes()),
            512,
            FormatError::BlockSizeInvalid { block_size: 8192 },
            EINVAL,
        ),
        (
            "block size 0",
            |i| put(i, 8, &0u32.to_le_bytes()),
            512,
            FormatError::BlockSizeInvalid { block_size: 0 },
            EINVAL,
        ),
        (
            "n_blocks 0",
            |i| put(i, 16, &0u64.to_le_bytes()),
            512,
            FormatError::ZeroBlocks,
            EINVAL,
        ),
        (
            // 31 blocks need 1024 + 31 * 512 = 16896 bytes.
            "n_blocks 31 on a 30-block device",
            |i| put(i, 16, &31u64.to_le_bytes()),
            512,
            FormatError::BlocksExceedDevice {
                n_blocks: 31,
                needed: 16896,
                available: 16384,
            },
            EINVAL,
        ),
        (
            // 2^47 is one past what the kernel's 47-bit index holds.
            "n_blocks 2^47",
            |i| put(i, 16, &(1u64 << 47).to_le_bytes()),
            512,
            FormatError::TooManyBlocks {
                n_blocks: 1 << 47,
                max: (1 << 47) - 1,
            },
            EFBIG,
        ),
        (
            // 16 * n overflows u64: must be an error, not a wrap or panic.
            "n_blocks u64::MAX",
            |i| put(i, 16, &u64::MAX.to_le_bytes()),
            512,
            FormatError::TooManyBlocks {
                n_blocks: u64::MAX,
                max: (1 << 47) - 1,
            },
            EFBIG,
        ),
    ];
    for (what, corrupt, bs, want, errno) in cases {
        let mut img = a_committed_image();
        corrupt(&mut img);
        let b = rig.bases(img, vec![0; A_ORIGIN], 512);
        assert_refused(&rig, &b, bs, None, what, |e| {
            expect_format(e, want, errno, what);
            assert!(!e.to_string().is_empty());
        });
        rig.release(b);
    }
    // A valid 512-byte cache attached with another block size.
    let b = rig.bases(a_committed_image(), vec![0; A_ORIGIN], 512);
    assert_refused(&rig, &b, 4096, None, "requested 4096", |e| {
        expect_format(
            e,
            FormatError::BlockSizeMismatch {
                found: 512,
                expected: 4096,
            },
            EINVAL,
            "requested 4096",
        );
        assert!(e.to_string().contains("512") && e.to_string().contains("4096"));
    });
    rig.release(b);
}

// ------------------------------------------------ geometry B: 4096-byte
//
// Cache block size 4096 (Linux's default), start_sector 0, 8 blocks:
// round_up(64 + 16 * 8 = 192, 4096) = 4096 of metadata + 8 * 4096 = 36864
// bytes, which is also the largest n for a 36864-byte device (9 would need
// 4096 + 36864). Entries in [64, 192); data block i at 4096 + 4096 * i.
// Origin: 64 cache blocks of 4096 bytes, exposed with 512-byte blocks, so
// entry sectors are 8 * LBA and the last valid sector is 504.

const B_DEV: usize = 36864;
const B_N: usize = 8;
const B_DATA: usize = 4096;
const B_ORIGIN: usize = 64 * 4096;

/// Geometry B at superblock sequence 3 with LBA 0 (seq 0) and LBA 1 (seq 2)
/// committed in slots 0 and 1.
fn b_image() -> Vec<u8> {
    let mut img = vec![0u8; B_DEV];
    put(&mut img, 0, &sb_bytes(0x2348_9321, 1, 4096, 8, 3));
    img[64..64 + 16 * B_N].fill(0xff);
    put(&mut img, 64, &entry_bytes(0, 0));
    put(&mut img, 80, &entry_bytes(8, 2));
    put(&mut img, B_DATA, &content(50, 4096));
    put(&mut img, B_DATA + 4096, &content(51, 4096));
    img
}

fn b_with_entry(slot: usize, sector: u64, seq: u64) -> Vec<u8> {
    let mut img = b_image();
    put(&mut img, 64 + 16 * slot, &entry_bytes(sector, seq));
    img
}

#[test]
fn corrupt_entries_are_refused_untouched() {
    let rig = Rig::new();
    // Control: the base image attaches, with LBA 63 (sector 504, the last
    // one) committed too.
    {
        let b = rig.bases(b_with_entry(5, 504, 1), vec![0; B_ORIGIN], 512);
        let name = unique("ctlB");
        rig.create(&name, &b, 4096, None).unwrap();
        assert_eq!(wc_writecache::get(&name).unwrap().stats().dirty, 3);
        rig.delete(&name, None);
        rig.release(b);
    }
    let cases: [(&str, Vec<u8>, &[&str]); 5] = [
        (
            "committed sector not a multiple of 8",
            b_with_entry(4, 12, 1),
            &["block 4", "sector 12", "aligned"],
        ),
        (
            "committed sector 512 = LBA 64 of a 64-block origin",
            b_with_entry(3, 512, 2),
            &["block 3", "sector 512", "past the end"],
        ),
        (
            "committed sector far past the origin",
            b_with_entry(6, u64::MAX - 7, 0),
            &["block 6", "past the end"],
        ),
        (
            "two committed entries with one sector and one seq",
            b_with_entry(7, 8, 2),
            &["blocks 1 and 7", "sector 8", "sequence 2"],
        ),
        (
            "duplicate of the seq-0 entry",
            b_with_entry(2, 0, 0),
            &["blocks 0 and 2", "sequence 0"],
        ),
    ];
    for (what, img, needles) in cases {
        let b = rig.bases(img, vec![0; B_ORIGIN], 512);
        assert_refused(&rig, &b, 4096, None, what, |e| {
            expect_corrupt(e, needles, what)
        });
        rig.release(b);
    }
    // The same values in *uncommitted* entries are garbage from an
    // interrupted write, not corruption: accepted and cleared.
    let mut img = b_image();
    put(&mut img, 64 + 16 * 4, &entry_bytes(12, 3));
    put(&mut img, 64 + 16 * 3, &entry_bytes(512, 4));
    put(&mut img, 64 + 16 * 7, &entry_bytes(8, 3));
    let b = rig.bases(img, vec![0; B_ORIGIN], 512);
    let name = unique("uncommittedB");
    rig.create(&name, &b, 4096, None).unwrap();
    assert_durable_image(&b.pmem, &b_image(), "uncommitted garbage cleared");
    rig.delete(&name, None);
    rig.release(b);
}

/// A free writes all-ones to seq then sector, fenced only when the block is
/// reused, so a crash can persist just the sector. Such an entry (all-ones
/// sector, seq below the superblock's) is an interrupted free: accepted,
/// cleared, the block free.
#[test]
fn torn_free_is_accepted_and_cleared() {
    let rig = Rig::new();
    let mut img = b_image();
    put(&mut img, 64 + 16 * 2, &entry_bytes(u64::MAX, 1)); // "committed"
    put(&mut img, 64 + 16 * 3, &entry_bytes(u64::MAX, 3)); // uncommitted
    let b = rig.bases(img, vec![0; B_ORIGIN], 512);
    let name = unique("torn");
    rig.create(&name, &b, 4096, None).unwrap();
    let s = wc_writecache::get(&name).unwrap().stats();
    assert_eq!((s.dirty, s.free_blocks, s.seq_count), (2, 6, 3));
    assert_durable_image(&b.pmem, &b_image(), "torn frees cleared");
    let v = rig.open(&name);
    assert_eq!(rig.read(&v, 0, 4096), content(50, 4096));
    assert_eq!(rig.read(&v, 1, 4096), content(51, 4096));
    rig.delete(&name, Some(v));
    rig.release(b);
}

// ------------------------------------------------- Linux interop fixture
//
// A cache as Linux dm-writecache (pmem mode, 4 KiB blocks) leaves it, laid
// out by hand. 45056-byte device: n = 10 (4096 of metadata for
// 64 + 160 = 224 bytes of superblock + entries, + 10 * 4096 = 45056, the
// largest fit: 11 would need 4096 + 45056). Superblock seq_count 5, so
// entries with seq <= 4 are committed. Slot: (sector, seq) -> fate.
//  0: (8, 2)     LBA 1, committed, superseded by slot 3 -> cleared
//  1: (0, 4)     LBA 0, committed winner
//  2: (16, 5)    LBA 2, seq == superblock's: uncommitted -> cleared
//  3: (8, 3)     LBA 1, committed winner
//  4: (80, 1)    LBA 10, committed, superseded by slot 6 -> cleared
//  5: (24, MAX)  freed by the kernel (it sets only seq_count to -1): free
//  6: (80, 4)    LBA 10, committed winner (found after its loser)
//  7: (44, 9)    uncommitted garbage, not even aligned -> cleared
//  8: all-ones   never used
//  9: (8, 6)     LBA 1, newer but uncommitted -> cleared; LBA 1 = slot 3
// Block i holds content(100 + i); origin LBA k holds content(1000 + k).

const L_DEV: usize = 45056;
const L_N: usize = 10;
const L_DATA: usize = 4096;
const L_SEQ: u64 = 5;
const L_ENTRIES: [(u64, u64); L_N] = [
    (8, 2),
    (0, 4),
    (16, 5),
    (8, 3),
    (80, 1),
    (24, u64::MAX),
    (80, 4),
    (44, 9),
    (u64::MAX, u64::MAX),
    (8, 6),
];

fn linux_image() -> Vec<u8> {
    let mut img = vec![0u8; L_DEV];
    // Literal superblock as the kernel writes it (struct wc_memory_superblock).
    let sb: [u8; 64] = [
        0x21, 0x93, 0x48, 0x23, // magic
        0x01, 0x00, 0x00, 0x00, // version 1
        0x00, 0x10, 0x00, 0x00, // block_size 4096
        0x00, 0x00, 0x00, 0x00, // padding
        0x0a, 0, 0, 0, 0, 0, 0, 0, // n_blocks 10
        0x05, 0, 0, 0, 0, 0, 0, 0, // seq_count 5
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    put(&mut img, 0, &sb);
    assert_eq!(sb, sb_bytes(0x2348_9321, 1, 4096, 10, 5));
    for (i, &(sector, seq)) in L_ENTRIES.iter().enumerate() {
        put(&mut img, 64 + 16 * i, &entry_bytes(sector, seq));
        put(&mut img, L_DATA + 4096 * i, &content(100 + i as u64, 4096));
    }
    img
}

fn linux_origin() -> Vec<u8> {
    (0..64).flat_map(|k| content(1000 + k, 4096)).collect()
}

/// What Linux's recovery (writecache_resume) makes of an image: committed
/// entries, highest seq per sector. Written independently of ours.
fn linux_view(img: &[u8], n: usize) -> BTreeMap<u64, (usize, u64)> {
    let sb_seq = get_u64(img, 24);
    let mut map: BTreeMap<u64, (usize, u64)> = BTreeMap::new();
    for i in 0..n {
        let (sector, seq) = entry_at(img, 0, i);
        if seq >= sb_seq {
            continue;
        }
        match map.get(&sector) {
            Some(&(j, s)) if s == seq => panic!("slots {j} and {i}: sector {sector} seq {seq}"),
            Some(&(_, s)) if s > seq => {}
            _ => {
                map.insert(sector, (i, seq));
            }
        }
    }
    map
}

#[test]
fn linux_dm_writecache_image_attaches() {
    let rig = Rig::new();
    let img = linux_image();
    let b = rig.bases(img.clone(), linux_origin(), 512);
    let name = unique("linux");
    rig.create(&name, &b, 4096, None).unwrap();
    let wc = wc_writecache::get(&name).unwrap();
    assert!(!wc.formatted_on_create());
    let s = wc.stats();
    assert_eq!((s.blocks, s.seq_count), (10, L_SEQ));
    assert_eq!((s.dirty, s.free_blocks), (3, 7), "{s:?}");

    // Cleared: uncommitted (2, 7, 9) and superseded (0, 4). Kept byte for
    // byte: the superblock, the winners, the never-used entry, all data.
    let got = b.pmem.visible();
    let mut want = img.clone();
    for slot in [0, 2, 4, 7, 9] {
        put(&mut want, 64 + 16 * slot, &ONES);
    }
    // Slot 5 is free either way; only its seq_count is specified.
    assert_eq!(entry_at(&got, 0, 5).1, u64::MAX);
    put(&mut want, 64 + 16 * 5, &got[64 + 16 * 5..64 + 16 * 6]);
    assert_eq!(got[..64], img[..64], "superblock untouched");
    assert_durable_image(&b.pmem, &want, "Linux image after recovery");

    let v = rig.open(&name);
    let expect = [
        (0, 101),  // slot 1
        (1, 103),  // slot 3, not the older slot 0 or the uncommitted slot 9
        (2, 1002), // only an uncommitted version: origin
        (3, 1003), // freed by the kernel: origin
        (5, 1005), // garbage slot 7 did not become LBA 5
        (10, 106), // slot 6, not the older slot 4
        (11, 1011),
        (63, 1063),
    ];
    for (lba, tag) in expect {
        assert_eq!(rig.read(&v, lba, 4096), content(tag, 4096), "lba {lba}");
    }
    // One read across hits and misses.
    let span: Vec<u8> = [101, 103, 1002, 1003]
        .iter()
        .flat_map(|&t| content(t, 4096))
        .collect();
    assert_eq!(rig.read(&v, 0, 4 * 4096), span);

    // And the reverse: after our writes + FLUSH, the image reads back the
    // way Linux would recover it.
    rig.write(&v, 0, &content(2000, 4096));
    rig.write(&v, 20, &content(2020, 4096));
    rig.flush(&v);
    let got = b.pmem.visible();
    assert_eq!(get_u64(&got, 24), L_SEQ + 1, "one commit: seq_count 6");
    assert_eq!(got[..24], img[..24], "rest of the superblock untouched");
    assert_eq!(got[32..64], img[32..64]);
    let view = linux_view(&got, L_N);
    let sectors: BTreeSet<u64> = view.keys().copied().collect();
    assert_eq!(sectors, BTreeSet::from([0, 8, 80, 160]));
    assert_eq!(view[&8], (3, 3));
    assert_eq!(view[&80], (6, 4));
    assert_eq!(view[&0].1, L_SEQ, "new version stamped with the open seq");
    assert_eq!(view[&160].1, L_SEQ);
    // The superseded version of LBA 0 (slot 1) is freed after the commit.
    assert_eq!(entry_at(&got, 0, 1).1, u64::MAX);
    for (sector, tag) in [(0u64, 2000u64), (8, 103), (80, 106), (160, 2020)] {
        let slot = view[&sector].0;
        let at = L_DATA + 4096 * slot;
        assert_eq!(got[at..at + 4096], content(tag, 4096)[..], "{sector}");
    }
    // Everything not committed is free.
    let used = (0..L_N)
        .filter(|&i| entry_at(&got, 0, i).1 != u64::MAX)
        .count();
    assert_eq!(used, 4);
    assert_image(
        &b.pmem.crash_all_pending_lost(),
        &got,
        "our image is durable after FLUSH",
    );
    rig.delete(&name, Some(v));
    rig.release(b);
}
