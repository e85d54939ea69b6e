//! Crash consistency: a seeded, randomized workload across several logical
//! reactors (writes, overwrites of hot sectors, reads checked against an
//! oracle, FLUSH, FUA, UNMAP, writeback under pressure) on a simulated pmem
//! cache and a simulated origin disk. The power is cut at a random
//! persistence point of either device; the run goes on, then both devices
//! "reboot" from their images as of that point, the writecache recovers, and
//! every block is checked against design §3.3:
//! * it reads as one version that was written to it (or its initial
//!   content) — never a mix, never another block's data;
//! * every write completed before a completed FLUSH (or written with FUA)
//!   survives, unless a later write or an UNMAP of the block followed.
//!
//! Both modes run it: pmem mode over `SimPmem` (unfenced stores dropped at
//! random), ssd mode over a `SimDisk` cache (unflushed writes dropped at
//! random, torn at 512-byte sectors, on the cache and the origin).
//!
//! `WC_CRASH_SECONDS` bounds each mode's run (default 12 s; `WC_SOAK=1`:
//! 120 s); `WC_SIM_SEED` replays one seed; `WC_SIM_SEED_BASE` starts the
//! sequence of seeds elsewhere (a soak explores seeds CI never ran).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wc_bdev::{BdevChannel, DmaBuf, FnCompletion, Io, IoCompletion};
use wc_reactor::Harness;
use wc_sim::{PointHook, SimDisk, SimPmem};
use wc_writecache::{CreateOpts, Mode};

const BS: u32 = 512;
const ORIGIN_BLOCKS: u64 = 64;
const HOT: u64 = 4;
const REACTORS: usize = 3;

/// Block content: (lba, version) stamped over the whole block.
fn content(lba: u64, version: u64) -> DmaBuf {
    let mut b = DmaBuf::new(BS as usize);
    for (i, c) in b.chunks_mut(8).enumerate() {
        let v = if i % 2 == 0 { lba } else { version };
        c.copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// Decodes a block: Some((lba, version)) when uniformly stamped, version 0
/// with an all-zero block (initial origin content).
fn decode(b: &[u8]) -> Result<(u64, u64), String> {
    if b.iter().all(|&x| x == 0) {
        return Ok((u64::MAX, 0));
    }
    let lba = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let ver = u64::from_le_bytes(b[8..16].try_into().unwrap());
    for (i, c) in b.chunks(8).enumerate() {
        let want = if i % 2 == 0 { lba } else { ver };
        if u64::from_le_bytes(c.try_into().unwrap()) != want {
            return Err(format!(
                "torn/mixed block: word {i} differs (lba {lba} ver {ver})"
            ));
        }
    }
    Ok((lba, ver))
}

#[derive(Clone, Debug)]
struct WriteRec {
    version: u64,
    submit: u64,
    complete: Option<u64>,
    /// Event clock when it became durable (FUA completion or a covering flush).
    durable: Option<u64>,
}

#[derive(Default)]
struct Oracle {
    /// Per LBA: writes in submission order.
    writes: HashMap<u64, Vec<WriteRec>>,
    /// Per LBA: event clock of the first UNMAP submission.
    unmapped: HashMap<u64, u64>,
    clock: u64,
    /// Persistence points seen when each event clock value was taken.
    clock_points: Vec<u64>,
    reads_checked: u64,
    failures: Vec<String>,
    /// Submitted, not yet completed operations.
    outstanding: u64,
    /// Set once crash images are taken: later events are "after the cut".
    ended: bool,
}

impl Oracle {
    fn tick(&mut self, points: u64) -> u64 {
        self.clock += 1;
        self.clock_points
            .push(if self.ended { u64::MAX } else { points });
        self.clock
    }

    /// Versions a read submitted at `rs` and completed at `rc` may return.
    fn check_read(&mut self, lba: u64, rs: u64, got: Result<(u64, u64), String>) {
        self.reads_checked += 1;
        let (glba, gver) = match got {
            Ok(v) => v,
            Err(e) => return self.failures.push(format!("read lba {lba}: {e}")),
        };
        if gver != 0 && glba != lba {
            return self
                .failures
                .push(format!("read lba {lba} returned block of lba {glba}"));
        }
        if self.unmapped.contains_key(&lba) {
            return; // content undefined after an unmap
        }
        let ws = self.writes.get(&lba).cloned().unwrap_or_default();
        // Not allowed: versions superseded by a write that completed before
        // the read was submitted and was submitted after they completed.
        let allowed = |v: &WriteRec| {
            v.submit < u64::MAX
                && !ws.iter().any(|x| {
                    x.complete.is_some_and(|c| c < rs) && v.complete.is_some_and(|vc| x.submit > vc)
                })
        };
        let ok = if gver == 0 {
            !ws.iter().any(|x| x.complete.is_some_and(|c| c < rs))
        } else {
            ws.iter().any(|w| w.version == gver && allowed(w))
        };
        if !ok {
            self.failures.push(format!(
                "read lba {lba} (submitted at {rs}) returned version {gver}; writes {ws:?}"
            ));
        }
    }
}

/// The simulated cache device of either mode.
#[derive(Clone)]
enum Cache {
    Pmem(Arc<SimPmem>),
    Disk(Arc<SimDisk>),
}

impl Cache {
    fn new(mode: Mode, size: usize) -> Cache {
        match mode {
            Mode::Pmem => Cache::Pmem(Arc::new(SimPmem::new(size))),
            Mode::Ssd => {
                let d = SimDisk::new(size);
                d.set_tearing(true);
                Cache::Disk(Arc::new(d))
            }
        }
    }

    /// "Reboots" from a crash image.
    fn rebooted(&self, img: Vec<u8>) -> Cache {
        match self {
            Cache::Pmem(_) => Cache::Pmem(Arc::new(SimPmem::from_image(img))),
            Cache::Disk(_) => {
                let d = SimDisk::from_image(img);
                d.set_tearing(true);
                Cache::Disk(Arc::new(d))
            }
        }
    }

    fn mode(&self) -> Mode {
        match self {
            Cache::Pmem(_) => Mode::Pmem,
            Cache::Disk(_) => Mode::Ssd,
        }
    }

    fn register(&self, name: &str) -> Result<(), String> {
        match self {
            Cache::Pmem(p) => wc_sim::register_pmem_bdev(name, p.clone(), BS).map(|_| ()),
            Cache::Disk(d) => wc_sim::register_disk_bdev(name, d.clone(), BS).map(|_| ()),
        }
        .map_err(|e| e.to_string())
    }

    fn points(&self) -> u64 {
        match self {
            Cache::Pmem(p) => p.points(),
            Cache::Disk(d) => d.points(),
        }
    }

    fn is_powered_off(&self) -> bool {
        match self {
            Cache::Pmem(p) => p.is_powered_off(),
            Cache::Disk(d) => d.is_powered_off(),
        }
    }

    fn set_crash_at(&self, k: u64) {
        match self {
            Cache::Pmem(p) => p.set_crash_at(k),
            Cache::Disk(d) => d.set_crash_at(k),
        }
    }

    fn set_point_hook(&self, h: PointHook) {
        match self {
            Cache::Pmem(p) => p.set_point_hook(h),
            Cache::Disk(d) => d.set_point_hook(h),
        }
    }

    fn clear_point_hook(&self) {
        match self {
            Cache::Pmem(p) => p.clear_point_hook(),
            Cache::Disk(d) => d.clear_point_hook(),
        }
    }

    fn power_fail(&self, seed: u64) -> Vec<u8> {
        match self {
            Cache::Pmem(p) => p.power_fail(seed),
            Cache::Disk(d) => d.power_fail(seed),
        }
    }
}

struct Rig {
    h: Harness,
    /// Our channels: one per reactor, or only the writer's.
    chans: Vec<Rc<BdevChannel>>,
    /// The only reactor with a channel (None: every reactor has one).
    writer: Option<usize>,
    _descs: Vec<wc_bdev::Desc>,
    pmem: Cache,
    disk: Arc<SimDisk>,
    points: Arc<AtomicU64>,
    names: (String, String, String),
}

static RUN: AtomicU64 = AtomicU64::new(0);

fn unique(tag: &str) -> String {
    format!("{tag}{}", RUN.fetch_add(1, Ordering::Relaxed))
}

fn pmem_size(blocks: u64) -> usize {
    // Metadata rounded to a block, then the data blocks.
    let meta = (64 + 16 * blocks).div_ceil(BS as u64) * BS as u64;
    (meta + blocks * BS as u64) as usize
}

/// Creates the instance on reactor 0 over the given media and opens a
/// channel on every reactor, or only on `writer`'s.
fn build(
    h: Harness,
    pmem: Cache,
    disk: Arc<SimDisk>,
    cache_blocks_hint: u64,
    rng: &mut StdRng,
    writer: Option<usize>,
) -> Result<Rig, String> {
    let (o, c, w) = (unique("o"), unique("c"), unique("w"));
    wc_sim::register_disk_bdev(&o, disk.clone(), BS).map_err(|e| e.to_string())?;
    pmem.register(&c)?;
    let _ = cache_blocks_hint;
    let mut opts = CreateOpts::new(&w, &o, &c);
    opts.mode = Some(pmem.mode());
    opts.block_size = Some(BS);
    opts.high_watermark = Some(rng.gen_range(10..60));
    opts.low_watermark = Some(5);
    opts.autocommit_blocks = Some(rng.gen_range(2..40));
    opts.autocommit_time_ms = Some(rng.gen_range(1..20));
    opts.writeback_jobs = Some(rng.gen_range(1..16));
    opts.fua = Some(rng.gen_bool(0.7));
    let created: Arc<std::sync::Mutex<Option<Result<(), String>>>> = Arc::default();
    let c2 = created.clone();
    h.on(0, move || {
        wc_writecache::create_async(
            opts,
            Box::new(move |r| *c2.lock().unwrap() = Some(r.map(|_| ()).map_err(|e| e.to_string()))),
        )
    });
    h.run_until(100_000, || created.lock().unwrap().is_some());
    let res = created.lock().unwrap().take();
    if res.is_none() || res.as_ref().is_some_and(|r| r.is_err()) {
        // Not created: let the bdevs go so the names do not leak.
        let _ = wc_sim::delete(&o);
        let _ = wc_sim::delete(&c);
    }
    res.unwrap_or_else(|| Err("create did not finish".into()))?;
    let mut chans = Vec::new();
    let mut descs = Vec::new();
    for r in writer.map_or(0..h.len(), |w| w..w + 1) {
        let d = wc_bdev::open(&w, true, None).map_err(|e| e.to_string())?;
        chans.push(h.on(r, || d.channel()).map_err(|e| e.to_string())?);
        descs.push(d);
    }
    Ok(Rig {
        h,
        chans,
        writer,
        _descs: descs,
        pmem,
        disk,
        points: Arc::new(AtomicU64::new(0)),
        names: (o, c, w),
    })
}

impl Rig {
    /// Our channel on reactor `r` (the writer, when there is only one).
    fn chan(&self, r: usize) -> Rc<BdevChannel> {
        match self.writer {
            Some(w) => {
                assert_eq!(r, w, "only reactor {w} has a channel");
                self.chans[0].clone()
            }
            None => self.chans[r].clone(),
        }
    }
}

fn teardown(rig: Rig) {
    let Rig {
        h,
        chans,
        _descs,
        names,
        ..
    } = rig;
    drop(chans);
    drop(_descs);
    let done = Rc::new(RefCell::new(false));
    let d2 = done.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let w = names.2.clone();
    h.on(0, move || {
        wc_writecache::delete(&w, false, Box::new(move |_| tx.send(()).unwrap()))
    });
    h.run_until(100_000, || rx.try_recv().is_ok() || *d2.borrow());
    *done.borrow_mut() = true;
    let _ = wc_sim::delete(&names.0);
    let _ = wc_sim::delete(&names.1);
    h.run_until_idle(1000);
}

type Shared = Rc<RefCell<Oracle>>;

fn submit_write(
    rig: &Rig,
    or: &Shared,
    r: usize,
    lba: u64,
    n: u64,
    fua: bool,
    next_version: &mut u64,
) {
    let mut versions = Vec::new();
    let mut buf = DmaBuf::new((n * BS as u64) as usize);
    for i in 0..n {
        *next_version += 1;
        let v = *next_version;
        versions.push(v);
        buf[(i * BS as u64) as usize..((i + 1) * BS as u64) as usize]
            .copy_from_slice(&content(lba + i, v));
    }
    let submit = or.borrow_mut().tick(rig.points.load(Ordering::Relaxed));
    or.borrow_mut().outstanding += 1;
    for (i, &v) in versions.iter().enumerate() {
        or.borrow_mut()
            .writes
            .entry(lba + i as u64)
            .or_default()
            .push(WriteRec {
                version: v,
                submit,
                complete: None,
                durable: None,
            });
    }
    let or2 = or.clone();
    let points = rig.points.clone();
    let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |io: Io, _| {
        let mut o = or2.borrow_mut();
        o.outstanding -= 1;
        let t = o.tick(points.load(Ordering::Relaxed));
        if !io.status().is_success() {
            o.failures
                .push(format!("write lba {lba} failed: {:?}", io.status()));
            return;
        }
        for (i, &v) in versions.iter().enumerate() {
            if let Some(w) = o
                .writes
                .get_mut(&(lba + i as u64))
                .and_then(|ws| ws.iter_mut().find(|w| w.version == v))
            {
                w.complete = Some(t);
                if fua {
                    w.durable = Some(t);
                }
            }
        }
    }));
    let ch = rig.chan(r);
    rig.h.on(r, move || ch.write(lba, buf, fua, &cb, 0));
}

fn submit_read(rig: &Rig, or: &Shared, r: usize, lba: u64, n: u64) {
    let rs = or.borrow_mut().tick(rig.points.load(Ordering::Relaxed));
    or.borrow_mut().outstanding += 1;
    let or2 = or.clone();
    let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |mut io: Io, _| {
        let buf = io.take_buf();
        let mut o = or2.borrow_mut();
        o.outstanding -= 1;
        if !io.status().is_success() {
            o.failures
                .push(format!("read lba {lba} failed: {:?}", io.status()));
            return;
        }
        let Some(buf) = buf else { return };
        for i in 0..n {
            let blk = &buf[(i * BS as u64) as usize..((i + 1) * BS as u64) as usize];
            o.check_read(lba + i, rs, decode(blk));
        }
    }));
    let ch = rig.chan(r);
    rig.h.on(r, move || {
        ch.read(lba, DmaBuf::new((n * BS as u64) as usize), &cb, 0)
    });
}

fn submit_flush(rig: &Rig, or: &Shared, r: usize) {
    let fs = or.borrow_mut().tick(rig.points.load(Ordering::Relaxed));
    or.borrow_mut().outstanding += 1;
    let or2 = or.clone();
    let points = rig.points.clone();
    let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |io: Io, _| {
        let mut o = or2.borrow_mut();
        o.outstanding -= 1;
        let t = o.tick(points.load(Ordering::Relaxed));
        if !io.status().is_success() {
            o.failures.push(format!("flush failed: {:?}", io.status()));
            return;
        }
        for ws in o.writes.values_mut() {
            for w in ws.iter_mut() {
                if w.complete.is_some_and(|c| c < fs) && w.durable.is_none() {
                    w.durable = Some(t);
                }
            }
        }
    }));
    let ch = rig.chan(r);
    rig.h.on(r, move || ch.flush(0, 0, &cb, 0));
}

fn submit_unmap(rig: &Rig, or: &Shared, r: usize, lba: u64, n: u64) {
    let t = or.borrow_mut().tick(rig.points.load(Ordering::Relaxed));
    for i in 0..n {
        // The earliest unmap counts: from then on the content is undefined.
        or.borrow_mut().unmapped.entry(lba + i).or_insert(t);
    }
    or.borrow_mut().outstanding += 1;
    let or2 = or.clone();
    let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |io: Io, _| {
        or2.borrow_mut().outstanding -= 1;
        if !io.status().is_success() {
            or2.borrow_mut()
                .failures
                .push(format!("unmap failed: {:?}", io.status()));
        }
    }));
    let ch = rig.chan(r);
    rig.h.on(r, move || ch.unmap(lba, n, &cb, 0));
}

/// Installs hooks that count points of both devices on one clock and cut
/// the power of both at global point `k`.
fn arm(rig: &Rig, k: Option<u64>) {
    arm_media(&rig.pmem, &rig.disk, &rig.points, k);
}

fn arm_media(pmem: &Cache, disk: &Arc<SimDisk>, points: &Arc<AtomicU64>, k: Option<u64>) {
    for dev in 0..2 {
        let points = points.clone();
        let pmem2 = pmem.clone();
        let disk2 = disk.clone();
        let hook: PointHook = Box::new(move |_| {
            let g = points.fetch_add(1, Ordering::Relaxed) + 1;
            if Some(g) == k {
                if !pmem2.is_powered_off() {
                    pmem2.set_crash_at(pmem2.points());
                }
                if !disk2.is_powered_off() {
                    disk2.set_crash_at(disk2.points());
                }
            }
        });
        if dev == 0 {
            pmem.set_point_hook(hook);
        } else {
            disk.set_point_hook(hook);
        }
    }
}

/// Images of both devices as of their cut (or now, if power never went).
fn images(pmem: &Cache, disk: &SimDisk, seed: u64) -> (Vec<u8>, Vec<u8>) {
    if !pmem.is_powered_off() {
        pmem.set_crash_at(pmem.points());
    }
    if !disk.is_powered_off() {
        disk.set_crash_at(disk.points());
    }
    let p = pmem.power_fail(seed ^ 0xA5A5);
    let d = disk.power_fail(seed ^ 0x5A5A);
    pmem.clear_point_hook();
    disk.clear_point_hook();
    (p, d)
}

struct Outcome {
    points: u64,
    reads: u64,
    blocks_checked: u64,
}

/// One seeded run: workload, crash at `k` (None = count points only),
/// recovery and checks.
fn run_once(mode: Mode, seed: u64, crash_at: Option<u64>) -> Result<Outcome, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let cache_blocks = rng.gen_range(8..40);
    let pmem = Cache::new(mode, pmem_size(cache_blocks));
    let disk = Arc::new(SimDisk::new((ORIGIN_BLOCKS * BS as u64) as usize));
    if mode == Mode::Ssd {
        disk.set_tearing(true);
    }
    // A third of the seeds write from one reactor only, not home (as
    // fio's job thread does): its autocommits run there, home's FLUSH and
    // timed commits race with them.
    let writer = (seed % 3 == 0).then_some(REACTORS - 1);
    let rig = build(
        Harness::new(REACTORS),
        pmem,
        disk,
        cache_blocks,
        &mut rng,
        writer,
    )?;
    if std::env::var("WC_DEBUG").is_ok() {
        eprintln!(
            "arm at pmem {} disk {}",
            rig.pmem.points(),
            rig.disk.points()
        );
    }
    arm(&rig, crash_at);
    let or: Shared = Rc::default();
    let mut next_version = 0u64;
    let ops = rng.gen_range(20..120);
    for _ in 0..ops {
        let r = writer.unwrap_or_else(|| rng.gen_range(0..REACTORS));
        let lba = if rng.gen_bool(0.5) {
            rng.gen_range(0..HOT)
        } else {
            rng.gen_range(0..ORIGIN_BLOCKS - 2)
        };
        match rng.gen_range(0..100) {
            0..=49 => {
                let n = if rng.gen_bool(0.8) { 1 } else { 2 };
                let fua = rng.gen_bool(0.08);
                submit_write(&rig, &or, r, lba, n, fua, &mut next_version);
            }
            50..=79 => submit_read(&rig, &or, r, lba, if rng.gen_bool(0.8) { 1 } else { 2 }),
            80..=93 => submit_flush(&rig, &or, r),
            _ => submit_unmap(&rig, &or, r, lba, 1),
        }
        // Interleave: poll random reactors a random number of times.
        for _ in 0..rng.gen_range(0..6) {
            rig.h.poll(rng.gen_range(0..REACTORS));
        }
    }
    // Let everything complete (commits, writeback, waiting writers): every
    // submitted operation must finish — a stuck one is a liveness bug.
    let t0 = Instant::now();
    loop {
        rig.h.run_until_idle(20);
        crossbeam_flush();
        let idle = or.borrow().outstanding == 0
            && wc_writecache::get(&rig.names.2)
                .map(|w| w.writeback_in_flight())
                .unwrap_or(0)
                == 0;
        if idle {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "seed {seed}: {} operations never completed",
                or.borrow().outstanding
            ));
        }
    }
    let total_points = rig.points.load(Ordering::Relaxed);
    if std::env::var("WC_DEBUG").is_ok() {
        eprintln!(
            "points: global {total_points} pmem {} disk {} powered_off {}",
            rig.pmem.points(),
            rig.disk.points(),
            rig.pmem.is_powered_off()
        );
    }
    {
        let o = or.borrow();
        if !o.failures.is_empty() {
            return Err(format!(
                "seed {seed}: during the run: {}",
                o.failures.join("\n")
            ));
        }
    }
    let reads = or.borrow().reads_checked;
    let Some(k) = crash_at else {
        teardown(rig);
        return Ok(Outcome {
            points: total_points,
            reads,
            blocks_checked: 0,
        });
    };
    or.borrow_mut().ended = true;
    let (mut pimg, mut dimg) = images(&rig.pmem, &rig.disk, seed);
    teardown(rig);

    // Half of the time the power fails again during recovery (and the
    // writeback it may start): recovery must be crash-safe too.
    let mut rng2 = StdRng::seed_from_u64(seed ^ k);
    let template = Cache::new(mode, 0);
    let reboot_disk = |img: Vec<u8>| {
        let d = SimDisk::from_image(img);
        d.set_tearing(mode == Mode::Ssd);
        Arc::new(d)
    };
    if rng2.gen_bool(0.5) {
        let pmem = template.rebooted(pimg);
        let disk = reboot_disk(dimg);
        let points = Arc::new(AtomicU64::new(0));
        arm_media(&pmem, &disk, &points, Some(rng2.gen_range(1..=12)));
        let rig = build(
            Harness::new(1),
            pmem.clone(),
            disk.clone(),
            0,
            &mut StdRng::seed_from_u64(seed),
            None,
        )
        .map_err(|e| format!("seed {seed} crash at {k}: first recovery failed: {e}"))?;
        rig.h.run_until_idle(100);
        (pimg, dimg) = images(&pmem, &disk, seed ^ 0x1234);
        teardown(rig);
    }

    // Which events happened before the cut (the state right after global
    // point k): events recorded when at most k points had passed.
    let o = or.borrow();
    let before = |t: u64| o.clock_points.get(t as usize - 1).is_some_and(|&p| p <= k);

    if std::env::var("WC_DEBUG").is_ok() {
        for lba in 0..8u64 {
            let d = &dimg[(lba * BS as u64) as usize..((lba + 1) * BS as u64) as usize];
            eprintln!("disk lba {lba}: {:?}", decode(d));
        }
        let meta = (64 + 16 * 64u64).div_ceil(BS as u64) as usize;
        let _ = meta;
        let n = u64::from_le_bytes(pimg[16..24].try_into().unwrap());
        let sbseq = u64::from_le_bytes(pimg[24..32].try_into().unwrap());
        eprintln!("pmem: n_blocks {n} sb seq {sbseq}");
        for b in 0..n as usize {
            let e = &pimg[64 + 16 * b..64 + 16 * b + 16];
            let sec = u64::from_le_bytes(e[0..8].try_into().unwrap());
            let sq = u64::from_le_bytes(e[8..16].try_into().unwrap());
            if sq != u64::MAX {
                eprintln!("  entry {b}: sector {sec} seq {sq}");
            }
        }
    }
    // Reboot and recover.
    let pmem = template.rebooted(pimg);
    let disk = reboot_disk(dimg);
    let rig = build(
        Harness::new(1),
        pmem,
        disk,
        0,
        &mut StdRng::seed_from_u64(seed),
        None,
    )
    .map_err(|e| format!("seed {seed} crash at {k}: recovery failed: {e}"))?;
    let mut failures = Vec::new();
    let mut checked = 0;
    for lba in 0..ORIGIN_BLOCKS {
        let got: Rc<RefCell<Option<Vec<u8>>>> = Rc::default();
        let g2 = got.clone();
        let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |mut io: Io, _| {
            *g2.borrow_mut() = io.take_buf().map(|b| b.to_vec());
        }));
        let ch = rig.chan(0);
        rig.h
            .on(0, move || ch.read(lba, DmaBuf::new(BS as usize), &cb, 0));
        rig.h.run_until(10_000, || got.borrow().is_some());
        let Some(data) = got.borrow_mut().take() else {
            failures.push(format!("lba {lba}: read after recovery did not complete"));
            continue;
        };
        checked += 1;
        if o.unmapped.get(&lba).is_some_and(|&t| before(t)) {
            continue;
        }
        let ws: Vec<WriteRec> = o.writes.get(&lba).cloned().unwrap_or_default();
        let durable: Vec<&WriteRec> = ws
            .iter()
            .filter(|w| w.durable.is_some_and(&before))
            .collect();
        match decode(&data) {
            Err(e) => failures.push(format!("lba {lba}: {e}")),
            Ok((glba, gver)) => {
                if gver != 0 && glba != lba {
                    failures.push(format!("lba {lba}: holds the block of lba {glba}"));
                    continue;
                }
                // Allowed: any version submitted before the cut that no
                // durable write strictly follows; 0 when nothing is durable.
                let follows = |w: &WriteRec| {
                    durable
                        .iter()
                        .any(|d| w.complete.is_none_or(|c| d.submit > c) && d.version != w.version)
                };
                let ok = if gver == 0 {
                    durable.is_empty()
                } else {
                    ws.iter()
                        .any(|w| w.version == gver && before(w.submit) && !follows(w))
                };
                if !ok {
                    let pts = |t: Option<u64>| {
                        t.and_then(|t| o.clock_points.get(t as usize - 1).copied())
                    };
                    let detail: Vec<String> = ws
                        .iter()
                        .map(|w| {
                            format!(
                                "v{} submit@{:?} complete@{:?} durable@{:?}",
                                w.version,
                                pts(Some(w.submit)),
                                pts(w.complete),
                                pts(w.durable)
                            )
                        })
                        .collect();
                    failures.push(format!(
                        "lba {lba}: recovered version {gver}; writes (points) {detail:?}"
                    ));
                }
            }
        }
    }
    drop(o);
    teardown(rig);
    if failures.is_empty() {
        Ok(Outcome {
            points: total_points,
            reads,
            blocks_checked: checked,
        })
    } else {
        Err(format!(
            "seed {seed} crash at point {k} of {total_points}:\n{}",
            failures.join("\n")
        ))
    }
}

fn crossbeam_flush() {
    crossbeam::epoch::pin().flush();
}

#[test]
fn crash_at_random_persistence_points_recovers_every_guarantee() {
    harness(Mode::Pmem);
}

#[test]
fn ssd_mode_crash_at_random_persistence_points_recovers_every_guarantee() {
    harness(Mode::Ssd);
}

fn harness(mode: Mode) {
    let secs: u64 = std::env::var("WC_CRASH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if std::env::var("WC_SOAK").is_ok() {
            120
        } else {
            12
        });
    let fixed = std::env::var("WC_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let t0 = Instant::now();
    let (mut crashes, mut reads, mut blocks) = (0u64, 0u64, 0u64);
    let base = std::env::var("WC_SIM_SEED_BASE")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let mut seed = fixed.or(base).unwrap_or(0xC0FFEE);
    let mut seeds = 0u64;
    loop {
        let counted = run_once(mode, seed, None)
            .unwrap_or_else(|e| panic!("{e}\n(replay: WC_SIM_SEED={seed})"));
        reads += counted.reads;
        // Several cut points per workload, spread over its points.
        let mut rng = StdRng::seed_from_u64(seed ^ 0xDEAD);
        for _ in 0..4 {
            let k = rng.gen_range(1..=counted.points.max(1));
            let out = run_once(mode, seed, Some(k))
                .unwrap_or_else(|e| panic!("{e}\n(replay: WC_SIM_SEED={seed})"));
            blocks += out.blocks_checked;
            crashes += 1;
        }
        seeds += 1;
        if fixed.is_some() || t0.elapsed() > Duration::from_secs(secs) {
            break;
        }
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    }
    eprintln!("crash harness ({mode:?}): {seeds} seeds (last {seed}), {crashes} crash points, {blocks} blocks verified after recovery, {reads} reads checked during runs");
    assert!(crashes >= 4);
}
