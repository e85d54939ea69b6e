//! Shared rig of `faults.rs`, `writeback.rs` and `ssd.rs`: one writecache
//! instance on the deterministic logical-reactor harness
//! (`wc_reactor::Harness`, driven from the test thread) over a simulated
//! cache — pmem (pmem mode) or a disk with a volatile write cache (ssd
//! mode; [`with_mode`] picks) — and a simulated origin disk, optionally
//! behind an error-injection (`EE_<disk>`) or a latency (delay) vbdev.
//! Timers (autocommit, writeback retries, delay latencies) run on real
//! time, so waits are bounded by wall-clock timeouts.

#![allow(dead_code)]

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wc_bdev::{BdevChannel, DmaBuf, FnCompletion, Io, IoCompletion};
use wc_reactor::Harness;
use wc_sim::{SimDisk, SimPmem};
use wc_writecache::{CreateOpts, Mode, SetOpts, Stats};

thread_local! {
    static MODE: std::cell::Cell<Mode> = const { std::cell::Cell::new(Mode::Pmem) };
}

/// Runs `f` with rigs built in `mode` (on this thread).
pub fn with_mode(mode: Mode, f: impl FnOnce()) {
    let before = MODE.with(|m| m.replace(mode));
    f();
    MODE.with(|m| m.set(before));
}

/// The mode new rigs are built in.
pub fn mode() -> Mode {
    MODE.with(|m| m.get())
}

/// Declares `<test>::pmem` and `<test>::ssd`, running `fn <test>()` in
/// each mode.
#[macro_export]
macro_rules! both_modes {
    ($($t:ident),* $(,)?) => {
        $(
            mod $t {
                #[test]
                fn pmem() {
                    $crate::wcrig::with_mode(wc_writecache::Mode::Pmem, super::$t)
                }
                #[test]
                fn ssd() {
                    $crate::wcrig::with_mode(wc_writecache::Mode::Ssd, super::$t)
                }
            }
        )*
    };
}

/// The simulated cache device.
pub enum CacheDev {
    /// pmem mode.
    Pmem(Arc<SimPmem>),
    /// ssd mode.
    Disk(Arc<SimDisk>),
}

impl CacheDev {
    /// A blank device of `bytes` bytes of the current [`mode`].
    pub fn blank(bytes: usize) -> CacheDev {
        match mode() {
            Mode::Pmem => CacheDev::Pmem(Arc::new(SimPmem::new(bytes))),
            Mode::Ssd => CacheDev::Disk(Arc::new(SimDisk::new(bytes))),
        }
    }

    /// What the device holds now (visible stores or writes).
    pub fn visible(&self) -> Vec<u8> {
        match self {
            CacheDev::Pmem(p) => p.visible(),
            CacheDev::Disk(d) => d.visible(),
        }
    }

    /// The device after a power cut now that loses everything not yet
    /// durable (unfenced stores, unflushed writes).
    pub fn crashed(&self) -> CacheDev {
        match self {
            CacheDev::Pmem(p) => {
                CacheDev::Pmem(Arc::new(SimPmem::from_image(p.crash_all_pending_lost())))
            }
            CacheDev::Disk(d) => {
                CacheDev::Disk(Arc::new(SimDisk::from_image(d.crash_all_unflushed_lost())))
            }
        }
    }

    /// What a power cut now would lose: unfenced words (pmem) or
    /// unflushed writes (disk).
    pub fn not_durable(&self) -> usize {
        match self {
            CacheDev::Pmem(p) => p.pending_words(),
            CacheDev::Disk(d) => d.unflushed_writes(),
        }
    }

    fn register(&self, name: &str) {
        match self {
            CacheDev::Pmem(p) => drop(wc_sim::register_pmem_bdev(name, p.clone(), BS).unwrap()),
            CacheDev::Disk(d) => drop(wc_sim::register_disk_bdev(name, d.clone(), BS).unwrap()),
        }
    }
}

/// Registers a cache bdev `name` of `bytes` bytes in `block_size` blocks for
/// rigs on real reactor threads (`wc_bdev::testing`): a pmem file bdev
/// (pmem mode) or a malloc bdev (ssd mode: any block bdev). Returns the
/// backing file to remove afterwards, if any.
pub fn real_cache_bdev(
    mode: Mode,
    name: &str,
    bytes: u64,
    block_size: u32,
) -> Option<std::path::PathBuf> {
    match mode {
        Mode::Pmem => {
            let f = std::env::temp_dir().join(format!("wc-{name}-{}", std::process::id()));
            let _ = std::fs::remove_file(&f);
            let mut po = wc_bdev_pmem::PmemOpts::new(name, f.to_str().unwrap());
            po.size = Some(bytes);
            wc_bdev_pmem::create(po).unwrap();
            Some(f)
        }
        Mode::Ssd => {
            wc_bdev_malloc::create(wc_bdev_malloc::MallocOpts::new(
                name,
                bytes / block_size as u64,
                block_size,
            ))
            .unwrap();
            None
        }
    }
}

/// Block size of the origin, the cache and the writecache.
pub const BS: u32 = 512;

/// Upper bound of every wait (a stuck operation fails the test, it never
/// hangs it).
pub const WAIT: Duration = Duration::from_secs(10);

static RUN: AtomicU64 = AtomicU64::new(0);

/// A bdev name no other test of the process uses.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}{}_{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    )
}

/// Block content: (lba, version) stamped over the whole block.
pub fn content(lba: u64, version: u64) -> DmaBuf {
    let mut b = DmaBuf::new(BS as usize);
    for (i, c) in b.chunks_mut(8).enumerate() {
        let v = if i % 2 == 0 { lba } else { version };
        c.copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// Content of `n` blocks from `lba` on, each stamped as [`content`] with
/// `version` (one multi-block write's buffer).
pub fn run_content(lba: u64, n: u64, version: u64) -> DmaBuf {
    let mut b = DmaBuf::new((n * BS as u64) as usize);
    for (k, block) in b.chunks_mut(BS as usize).enumerate() {
        block.copy_from_slice(&content(lba + k as u64, version));
    }
    b
}

/// Decodes a block written by [`content`]: `Some((lba, version))`, `None`
/// for an all-zero block; panics on a torn or foreign block.
pub fn decode(b: &[u8]) -> Option<(u64, u64)> {
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    let lba = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let ver = u64::from_le_bytes(b[8..16].try_into().unwrap());
    for (i, c) in b.chunks(8).enumerate() {
        let want = if i % 2 == 0 { lba } else { ver };
        assert_eq!(
            u64::from_le_bytes(c.try_into().unwrap()),
            want,
            "torn/mixed block (lba {lba} ver {ver}), word {i}"
        );
    }
    Some((lba, ver))
}

/// Cache device size holding `blocks` data blocks of [`BS`] bytes.
pub fn pmem_size(blocks: u64) -> usize {
    let meta = (64 + 16 * blocks).div_ceil(BS as u64) * BS as u64;
    (meta + blocks * BS as u64) as usize
}

/// Per block of a pmem-mode cache image: `Some(lba)` of a valid entry,
/// `None` if free.
fn entries_of(img: &[u8]) -> Vec<Option<u64>> {
    use wc_writecache_format::{Entry, Geometry, ENTRY_SIZE};
    let geo = Geometry::compute(img.len() as u64, 0, BS).unwrap();
    (0..geo.n_blocks())
        .map(|b| {
            let off = geo.entry_offset(b) as usize;
            let e = Entry::decode(img[off..off + ENTRY_SIZE].try_into().unwrap());
            (e.seq_count != u64::MAX).then_some(e.original_sector / (BS as u64 / 512))
        })
        .collect()
}

/// What sits between the writecache and the simulated origin disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// The disk itself.
    Plain,
    /// `EE_<disk>` (error injection).
    Error,
    /// A delay bdev adding this many µs to every origin WRITE.
    Delay(u64),
}

/// Outcome of one I/O: `None` while pending, then Ok(read data) or errno.
pub type Slot = Rc<RefCell<Option<Result<Option<Vec<u8>>, i32>>>>;

/// Outcome of a control operation (flush RPC, delete) run on home.
pub type CtlSlot = Arc<Mutex<Option<Result<(), i32>>>>;

fn completion(slot: &Slot) -> Rc<dyn IoCompletion> {
    let s = slot.clone();
    Rc::new(FnCompletion(move |mut io: Io, _| {
        let st = io.status();
        *s.borrow_mut() = Some(if st.is_success() {
            // Only reads hand data back (a write's buffer is its own).
            Ok(if io.io_type() == wc_bdev::IoType::Read {
                io.take_buf().map(|b| b.to_vec())
            } else {
                None
            })
        } else {
            Err(st.errno())
        });
    }))
}

/// One writecache instance on a harness.
pub struct Rig {
    pub h: Harness,
    pub disk: Arc<SimDisk>,
    pub cache: CacheDev,
    /// The simulated disk's bdev.
    pub disk_name: String,
    /// The cache bdev.
    pub cache_name: String,
    /// The bdev the writecache uses as origin (disk, EE_disk or delay).
    pub origin_name: String,
    /// The writecache bdev.
    pub name: String,
    pub layer: Layer,
    pub opts: CreateOpts,
    /// `EE_<cache>` once [`Rig::wrap_cache_in_error`] put it in between.
    pub cache_ee: Option<String>,
    /// Our channel on each reactor (None: not opened, see `writer`).
    chans: Vec<Option<Rc<BdevChannel>>>,
    /// The only reactor the rig opens a channel on (None: every one). A
    /// bdev's channel stays cached on its reactor until the bdev goes, so
    /// this is chosen up front.
    writer: Option<usize>,
    descs: Vec<wc_bdev::Desc>,
}

impl Rig {
    /// Builds the base bdevs and an instance with `reactors` logical
    /// reactors, a cache of `cache_blocks` blocks, an origin of
    /// `origin_blocks` blocks, created with the options `tune` sets.
    pub fn new(
        reactors: usize,
        cache_blocks: u64,
        origin_blocks: u64,
        layer: Layer,
        tune: impl FnOnce(&mut CreateOpts),
    ) -> Rig {
        Rig::writing_on_all(None, reactors, cache_blocks, origin_blocks, layer, tune)
    }

    /// As [`Rig::new`], with a channel on reactor `writer` only (as fio's
    /// job thread: the only core that writes, not home).
    pub fn writing_on(
        writer: usize,
        reactors: usize,
        cache_blocks: u64,
        origin_blocks: u64,
        layer: Layer,
        tune: impl FnOnce(&mut CreateOpts),
    ) -> Rig {
        Rig::writing_on_all(
            Some(writer),
            reactors,
            cache_blocks,
            origin_blocks,
            layer,
            tune,
        )
    }

    /// Blank devices; channels on `writer` only, or every reactor.
    fn writing_on_all(
        writer: Option<usize>,
        reactors: usize,
        cache_blocks: u64,
        origin_blocks: u64,
        layer: Layer,
        tune: impl FnOnce(&mut CreateOpts),
    ) -> Rig {
        let disk = Arc::new(SimDisk::new((origin_blocks * BS as u64) as usize));
        let cache = CacheDev::blank(pmem_size(cache_blocks));
        Rig::build(reactors, cache, disk, layer, tune, writer)
    }

    /// An instance on existing devices (formatted or recovered, as their
    /// contents say), in the device's mode.
    pub fn on_devices(
        reactors: usize,
        cache: CacheDev,
        disk: Arc<SimDisk>,
        layer: Layer,
        tune: impl FnOnce(&mut CreateOpts),
    ) -> Rig {
        Rig::build(reactors, cache, disk, layer, tune, None)
    }

    fn build(
        reactors: usize,
        cache: CacheDev,
        disk: Arc<SimDisk>,
        layer: Layer,
        tune: impl FnOnce(&mut CreateOpts),
        writer: Option<usize>,
    ) -> Rig {
        let h = Harness::new(reactors);
        let disk_name = unique("fo");
        let cache_name = unique("fc");
        wc_sim::register_disk_bdev(&disk_name, disk.clone(), BS).unwrap();
        cache.register(&cache_name);
        let mode = match cache {
            CacheDev::Pmem(_) => Mode::Pmem,
            CacheDev::Disk(_) => Mode::Ssd,
        };
        let origin_name = match layer {
            Layer::Plain => disk_name.clone(),
            Layer::Error => {
                wc_bdev_error::create(&disk_name, None).unwrap();
                format!("EE_{disk_name}")
            }
            Layer::Delay(us) => {
                let d = unique("fd");
                wc_bdev_delay::create(wc_bdev_delay::DelayOpts::new(
                    &d,
                    &disk_name,
                    (0, 0),
                    (us, us),
                ))
                .unwrap()
                .expect("delay bdev created");
                d
            }
        };
        let name = unique("fw");
        let mut opts = CreateOpts::new(&name, &origin_name, &cache_name);
        opts.block_size = Some(BS);
        opts.mode = Some(mode);
        tune(&mut opts);
        let mut rig = Rig {
            h,
            disk,
            cache,
            disk_name,
            cache_name,
            origin_name,
            name,
            layer,
            opts,
            cache_ee: None,
            chans: Vec::new(),
            writer,
            descs: Vec::new(),
        };
        rig.attach().expect("writecache created");
        rig
    }

    /// Creates the instance (formatting or recovering the cache) with
    /// `self.opts` and opens a channel on every reactor.
    pub fn attach(&mut self) -> Result<(), String> {
        let opts = self.opts.clone();
        let slot: Arc<Mutex<Option<Result<(), String>>>> = Arc::default();
        let s = slot.clone();
        self.h.on(0, move || {
            wc_writecache::create_async(
                opts,
                Box::new(move |r| {
                    *s.lock().unwrap() = Some(r.map(|_| ()).map_err(|e| e.to_string()))
                }),
            )
        });
        assert!(
            self.pump_until(WAIT, || slot.lock().unwrap().is_some()),
            "create did not finish within {WAIT:?}"
        );
        slot.lock().unwrap().take().unwrap()?;
        for r in 0..self.h.len() {
            if self.writer.is_some_and(|w| w != r) {
                self.chans.push(None);
                continue;
            }
            let d = wc_bdev::open(&self.name, true, None).map_err(|e| e.to_string())?;
            let ch = self.h.on(r, || d.channel()).map_err(|e| e.to_string())?;
            self.chans.push(Some(ch));
            self.descs.push(d);
        }
        Ok(())
    }

    /// Puts an error bdev (`EE_<cache>`) between the instance and its
    /// cache (detach, wrap, re-attach); returns its name.
    pub fn wrap_cache_in_error(&mut self) -> String {
        self.detach(false).unwrap();
        wc_bdev_error::create(&self.cache_name, None).unwrap();
        let ee = format!("EE_{}", self.cache_name);
        self.opts.cache_bdev = ee.clone();
        self.cache_ee = Some(ee.clone());
        self.attach().expect("re-attached over the error bdev");
        ee
    }

    /// Makes the cache fail from now on: a media error (pmem) or failed
    /// writes of the cache bdev (ssd mode, over [`Rig::wrap_cache_in_error`]).
    pub fn inject_cache_error(&self) {
        match (&self.cache, &self.cache_ee) {
            (CacheDev::Pmem(p), _) => p.inject_media_error(libc::EIO),
            (CacheDev::Disk(_), Some(ee)) => wc_bdev_error::inject(
                ee,
                wc_bdev_error::InjectIoType::Write,
                wc_bdev_error::ErrorType::Failure,
                u32::MAX,
            )
            .unwrap(),
            (CacheDev::Disk(_), None) => panic!("wrap_cache_in_error first"),
        }
    }

    /// Holds the next `n` cache-bdev I/Os of type `t` until
    /// [`Rig::release_cache`] (over [`Rig::wrap_cache_in_error`]).
    pub fn hold_cache(&self, t: wc_bdev_error::InjectIoType, n: u32) {
        let ee = self.cache_ee.as_ref().expect("wrap_cache_in_error first");
        wc_bdev_error::inject(ee, t, wc_bdev_error::ErrorType::Pending, n).unwrap();
    }

    /// Lets the held cache-bdev I/Os go (each on its reactor, when polled).
    pub fn release_cache(&self) {
        let ee = self.cache_ee.as_ref().expect("wrap_cache_in_error first");
        wc_bdev_error::resume_pending(ee).unwrap();
    }

    /// A new instance (on `reactors` reactors, options as `tune` sets)
    /// over copies of both devices after a power cut now that loses all
    /// that is not durable. This rig is left as it is.
    pub fn reboot(&self, reactors: usize, tune: impl FnOnce(&mut CreateOpts)) -> Rig {
        let disk = Arc::new(SimDisk::from_image(self.disk.crash_all_unflushed_lost()));
        Rig::on_devices(reactors, self.cache.crashed(), disk, Layer::Plain, tune)
    }

    /// Closes our channels and deletes the instance (`flush`: write back
    /// everything first). Returns the delete's outcome.
    pub fn detach(&mut self, flush: bool) -> Result<(), i32> {
        let slot = self.start_detach(flush);
        let res = self.wait_ctl(&slot);
        self.run_idle();
        res
    }

    /// Closes our channels and starts deleting the instance; the slot gets
    /// the delete's outcome.
    pub fn start_detach(&mut self, flush: bool) -> CtlSlot {
        self.close_channels();
        let slot: CtlSlot = Arc::default();
        let s = slot.clone();
        let name = self.name.clone();
        self.h.on(0, move || {
            wc_writecache::delete(
                &name,
                flush,
                Box::new(move |r| *s.lock().unwrap() = Some(r.map_err(|e| e.errno()))),
            )
        });
        slot
    }

    fn close_channels(&mut self) {
        let chans = std::mem::take(&mut self.chans);
        for (r, ch) in chans.into_iter().enumerate() {
            if let Some(ch) = ch {
                self.h.on(r, move || drop(ch));
            }
        }
        let descs = std::mem::take(&mut self.descs);
        self.h.on(0, move || drop(descs));
    }

    /// Our channel on reactor `r`; panics where the rig opened none.
    fn chan(&self, r: usize) -> Rc<BdevChannel> {
        self.chans[r]
            .clone()
            .unwrap_or_else(|| panic!("no channel on reactor {r}"))
    }

    /// The running instance.
    pub fn wc(&self) -> Arc<wc_writecache::Writecache> {
        wc_writecache::get(&self.name).expect("instance exists")
    }

    /// Current statistics.
    pub fn stats(&self) -> Stats {
        wc_writecache::stats(&self.name).expect("instance exists")
    }

    /// `bdev_get_bdevs` view of the writecache bdev.
    pub fn info_json(&self) -> serde_json::Value {
        wc_bdev::lookup(&self.name)
            .expect("writecache bdev registered")
            .info_json()
    }

    /// Blocks in use (allocated, or freed and waiting for a grace period).
    pub fn used(&self) -> u64 {
        let s = self.stats();
        s.blocks - s.free_blocks
    }

    // ------------------------------------------------------------- driving

    /// One round: every reactor polls once; deferred frees are pushed.
    /// Returns whether any reactor did work.
    pub fn round(&self) -> bool {
        let mut busy = false;
        for i in 0..self.h.len() {
            busy |= self.h.poll(i);
        }
        crossbeam::epoch::pin().flush();
        busy
    }

    /// Polls until `cond` holds; false after `timeout`.
    pub fn pump_until(&self, timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let t0 = Instant::now();
        loop {
            if cond() {
                return true;
            }
            if t0.elapsed() > timeout {
                return cond();
            }
            if !self.round() {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// Polls for `d` of wall-clock time.
    pub fn pump_for(&self, d: Duration) {
        self.pump_until(d, || false);
    }

    /// Polls until no reactor has work (bounded).
    pub fn run_idle(&self) {
        for _ in 0..10_000 {
            if !self.round() {
                return;
            }
        }
    }

    /// Polls until the I/O in `slot` completes; panics after [`WAIT`].
    pub fn wait(&self, slot: &Slot) -> Result<Option<Vec<u8>>, i32> {
        assert!(
            self.pump_until(WAIT, || slot.borrow().is_some()),
            "I/O did not complete within {WAIT:?}; stats {:?}",
            wc_writecache::stats(&self.name)
        );
        let r = slot.borrow_mut().take().unwrap();
        r
    }

    /// Polls until the control operation completes; panics after [`WAIT`].
    pub fn wait_ctl(&self, slot: &CtlSlot) -> Result<(), i32> {
        assert!(
            self.pump_until(WAIT, || slot.lock().unwrap().is_some()),
            "control operation did not complete within {WAIT:?}"
        );
        let r = slot.lock().unwrap().take().unwrap();
        r
    }

    /// Polls until the stats satisfy `cond`; false after `timeout`.
    pub fn wait_stats(&self, timeout: Duration, mut cond: impl FnMut(&Stats) -> bool) -> bool {
        self.pump_until(timeout, || cond(&self.stats()))
    }

    // ------------------------------------------------------------------ I/O

    /// Submits a write of block `lba` stamped with `version` on reactor `r`.
    pub fn submit_write(&self, r: usize, lba: u64, version: u64, fua: bool) -> Slot {
        self.submit_write_buf(r, lba, content(lba, version), fua)
    }

    /// Submits a write of `n` blocks at `lba`, each stamped with `version`,
    /// on reactor `r`.
    pub fn submit_write_run(&self, r: usize, lba: u64, n: u64, version: u64) -> Slot {
        self.submit_write_buf(r, lba, run_content(lba, n, version), false)
    }

    /// Submits a write of `buf` at `lba` on reactor `r`.
    pub fn submit_write_buf(&self, r: usize, lba: u64, buf: DmaBuf, fua: bool) -> Slot {
        let slot: Slot = Rc::default();
        let cb = completion(&slot);
        let ch = self.chan(r);
        self.h.on(r, move || ch.write(lba, buf, fua, &cb, 0));
        slot
    }

    /// Submits a read of `n` blocks at `lba` on reactor `r`.
    pub fn submit_read(&self, r: usize, lba: u64, n: u64) -> Slot {
        let slot: Slot = Rc::default();
        let cb = completion(&slot);
        let ch = self.chan(r);
        self.h.on(r, move || {
            ch.read(lba, DmaBuf::new((n * BS as u64) as usize), &cb, 0)
        });
        slot
    }

    /// Submits a FLUSH on reactor `r`.
    pub fn submit_flush(&self, r: usize) -> Slot {
        let slot: Slot = Rc::default();
        let cb = completion(&slot);
        let ch = self.chan(r);
        self.h.on(r, move || ch.flush(0, 0, &cb, 0));
        slot
    }

    /// Submits an UNMAP of `n` blocks at `lba` on reactor `r`.
    pub fn submit_unmap(&self, r: usize, lba: u64, n: u64) -> Slot {
        let slot: Slot = Rc::default();
        let cb = completion(&slot);
        let ch = self.chan(r);
        self.h.on(r, move || ch.unmap(lba, n, &cb, 0));
        slot
    }

    /// Submits a WRITE_ZEROES of `n` blocks at `lba` on reactor `r`.
    pub fn submit_write_zeroes(&self, r: usize, lba: u64, n: u64) -> Slot {
        let slot: Slot = Rc::default();
        let cb = completion(&slot);
        let ch = self.chan(r);
        self.h.on(r, move || ch.write_zeroes(lba, n, &cb, 0));
        slot
    }

    /// Writes block `lba` version `version` and waits; panics on failure.
    pub fn write(&self, r: usize, lba: u64, version: u64) {
        let s = self.submit_write(r, lba, version, false);
        if let Err(e) = self.wait(&s) {
            panic!("write lba {lba} v{version} failed: errno {e}");
        }
    }

    /// FLUSH and wait; returns the outcome.
    pub fn flush(&self, r: usize) -> Result<(), i32> {
        let s = self.submit_flush(r);
        self.wait(&s).map(|_| ())
    }

    /// Reads one block through the writecache and decodes it.
    pub fn read_block(&self, r: usize, lba: u64) -> Result<Option<(u64, u64)>, i32> {
        let s = self.submit_read(r, lba, 1);
        self.wait(&s).map(|d| decode(&d.expect("read data")))
    }

    /// Block `lba` as the origin disk holds it now (read directly from the
    /// simulated disk, under every vbdev).
    pub fn origin_block(&self, lba: u64) -> Option<(u64, u64)> {
        let mut b = vec![0u8; BS as usize];
        self.disk.read_at((lba * BS as u64) as usize, &mut b);
        decode(&b)
    }

    /// The cache's metadata entries as the media holds them now (visible
    /// stores): per block, `Some(lba)` of a valid entry, `None` if free.
    pub fn media_entries(&self) -> Vec<Option<u64>> {
        entries_of(&self.cache.visible())
    }

    /// [`Rig::media_entries`] as a power cut now would leave them (durable
    /// stores only).
    pub fn durable_entries(&self) -> Vec<Option<u64>> {
        entries_of(&self.cache.crashed().visible())
    }

    // -------------------------------------------------------------- control

    /// Starts `bdev_writecache_flush` (commit + write back everything) on
    /// home; the slot gets its callback's outcome.
    pub fn start_flush_rpc(&self) -> CtlSlot {
        let slot: CtlSlot = Arc::default();
        let s = slot.clone();
        let name = self.name.clone();
        self.h.on(0, move || {
            wc_writecache::flush(
                &name,
                Box::new(move |r| *s.lock().unwrap() = Some(r.map_err(|e| e.errno()))),
            )
        });
        slot
    }

    /// `bdev_writecache_flush` and wait for its callback.
    pub fn flush_rpc(&self) -> Result<(), i32> {
        let s = self.start_flush_rpc();
        self.wait_ctl(&s)
    }

    /// `bdev_writecache_set_options` with the fields `f` sets.
    pub fn set_options(&self, f: impl FnOnce(&mut SetOpts)) {
        let mut o = SetOpts {
            name: self.name.clone(),
            ..SetOpts::default()
        };
        f(&mut o);
        self.h
            .on(0, || wc_writecache::set_options(&o))
            .expect("set_options accepted");
    }

    /// Polls until every freed block is back in the pool (grace periods
    /// over, and in ssd mode its cleared entry synced), i.e.
    /// `free_blocks + dirty == blocks` with none in grace, for at most 3 s;
    /// returns the stats then (a leaked block shows as a smaller sum, a
    /// block freed twice as a larger one, one stuck in grace as a non-zero
    /// `free_blocks_in_grace`).
    pub fn settle(&self) -> Stats {
        self.wait_stats(Duration::from_secs(3), |s| {
            s.free_blocks + s.dirty == s.blocks
                && s.writeback_blocks == 0
                && s.free_blocks_in_grace == 0
        });
        self.stats()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        self.close_channels();
        if wc_writecache::get(&self.name).is_some() {
            let _ = self.detach(false);
        }
        match self.layer {
            Layer::Plain => {}
            Layer::Error => {
                let _ = wc_bdev_error::delete(&self.origin_name);
            }
            Layer::Delay(_) => {
                let _ = wc_bdev_delay::delete(&self.origin_name);
            }
        }
        if let Some(ee) = &self.cache_ee {
            let _ = wc_bdev_error::delete(ee);
        }
        let _ = wc_sim::delete(&self.disk_name);
        let _ = wc_sim::delete(&self.cache_name);
        self.run_idle();
    }
}
