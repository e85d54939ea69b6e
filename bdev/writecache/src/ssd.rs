//! ssd mode: the cache is a block bdev. The metadata region (superblock and
//! entries) lives in RAM ([`RamMeta`]), written through the same store
//! interface pmem mode uses for its mapping, so the write path, the commit
//! and recovery share their logic; every store marks its 64 KiB region
//! dirty (dm-writecache's granularity). [`Ssd`] writes the dirty regions to
//! the cache bdev — one metadata sync at a time, so two copies of a region
//! are never in flight together — then FLUSHes the device, and for a commit
//! then writes the superblock with FUA, as dm-writecache orders it:
//!
//! 1. data writes complete (an entry is stamped in RAM only when its data
//!    write has completed, so every entry a commit covers has its data on
//!    the device);
//! 2. the dirty metadata regions are written, then the device is flushed;
//! 3. the superblock with the new sequence count is written (FUA).
//!
//! A freed block's cleared entry must be durable before the block carries
//! other data (or a crash could pair the old entry with new data): frees
//! go back to the pool only after a metadata sync.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use wc_bdev::{BdevChannel, DmaBuf, FnCompletion, Io, IoCompletion, PersistentMemory};
use wc_writecache_format::{Geometry, Superblock, SuperblockState, SECTOR_SIZE, SUPERBLOCK_SIZE};

use crate::cache::Waiter;
use crate::media::{recover_media, scratch, AttachError, Attached, Media};

/// Metadata is written back in regions of this size (dm-writecache's
/// `BITMAP_GRANULARITY`).
pub(crate) const REGION: u64 = 64 << 10;
/// Metadata reads at attach: this many bytes per read, this many in flight.
const READ_CHUNK: u64 = 1 << 20;
const READS_IN_FLIGHT: usize = 16;

/// The metadata region of the cache device, in RAM: device bytes
/// `[0, data_start)` (absolute offsets, as the geometry gives them) as
/// 64-bit words, plus a dirty bit per region.
///
/// The dirty bits are kept per reactor: every write stamps two entry words
/// and marks their region, and the cores allocate neighbouring blocks, so
/// one shared bitmap word would bounce between the cores on every write.
/// Each core sets bits in its own map (an atomic OR on a line it owns);
/// the metadata sync takes the union.
pub(crate) struct RamMeta {
    words: Box<[AtomicU64]>,
    /// Device offset where the metadata starts (the superblock).
    start: u64,
    /// Device offset where it ends (the data area).
    end: u64,
    dirty: Box<[AtomicU64]>,
    /// Words of one map (a region bit each).
    map_words: usize,
    /// Distance between two maps in `dirty` (padded: no shared lines).
    stride: usize,
    maps: usize,
}

thread_local! {
    /// This thread's reactor index (`usize::MAX` until first asked).
    static REACTOR: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// The dirty map this thread marks: its reactor's (any map is correct —
/// the sync takes all of them — this one just stays in this core's cache).
#[inline]
fn map_of_thread(maps: usize) -> usize {
    let i = REACTOR.with(|c| {
        let v = c.get();
        if v != usize::MAX {
            return v;
        }
        let v = wc_reactor::try_current().map_or(0, |r| r.index());
        c.set(v);
        v
    });
    i % maps
}

impl RamMeta {
    fn new(geo: &Geometry) -> RamMeta {
        let maps = wc_reactor::try_current().map_or(1, |r| r.count());
        Self::with_maps(geo, maps)
    }

    fn with_maps(geo: &Geometry, maps: usize) -> RamMeta {
        let maps = maps.max(1);
        let end = geo.data_start();
        let regions = end.div_ceil(REGION) as usize;
        let map_words = regions.div_ceil(64);
        // A cache line of words between maps, whatever the alignment.
        let stride = map_words + 8;
        RamMeta {
            words: (0..end.div_ceil(8)).map(|_| AtomicU64::new(0)).collect(),
            start: geo.superblock_offset(),
            end,
            dirty: (0..stride * maps).map(|_| AtomicU64::new(0)).collect(),
            map_words,
            stride,
            maps,
        }
    }

    #[inline]
    fn mark(&self, offset: usize) {
        self.mark_in(map_of_thread(self.maps), offset);
    }

    /// Marks the region of `offset` in dirty map `map` (< `maps`).
    #[inline]
    fn mark_in(&self, map: usize, offset: usize) {
        let r = offset as u64 / REGION;
        let at = map * self.stride + (r / 64) as usize;
        self.dirty[at].fetch_or(1 << (r % 64), Ordering::AcqRel);
    }

    /// The dirty map reactor `core` marks (see [`map_of_thread`]): for a
    /// per-core caller to look up once, not per entry.
    pub(crate) fn map_of(&self, core: usize) -> usize {
        core % self.maps
    }

    /// Stores an entry (sector and sequence: the two words at `offset`)
    /// and marks its region once in dirty map `map` (from
    /// [`RamMeta::map_of`]; any map is correct, the caller's own stays in
    /// its core's cache). An entry is 16-byte aligned, so both words share
    /// a region; checked anyway.
    #[inline]
    pub(crate) fn write_entry_in(&self, map: usize, offset: usize, sector: u64, seq: u64) {
        self.words[offset / 8].store(sector, Ordering::Release);
        self.words[offset / 8 + 1].store(seq, Ordering::Release);
        self.mark_in(map, offset);
        if (offset as u64 + 8) / REGION != offset as u64 / REGION {
            self.mark_in(map, offset + 8);
        }
    }

    fn mark_all(&self) {
        for r in self.start / REGION..self.end.div_ceil(REGION) {
            self.dirty[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::AcqRel);
        }
    }

    /// Takes (and clears) the dirty regions of every map. A region dirtied
    /// again while it is being copied is simply dirty again for the next
    /// sync.
    fn take_dirty(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for i in 0..self.map_words {
            let mut bits = 0;
            for m in 0..self.maps {
                bits |= self.dirty[m * self.stride + i].swap(0, Ordering::AcqRel);
            }
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                out.push(i as u64 * 64 + b);
            }
        }
        out
    }

    /// Device byte range of region `r`, clipped to the metadata (nothing
    /// before the superblock or past the entries is ever written).
    fn region_range(&self, r: u64) -> (u64, u64) {
        let a = (r * REGION).max(self.start);
        let b = ((r + 1) * REGION).min(self.end);
        (a, b)
    }

    /// Copies device bytes `[from, from + out.len())` (8-byte aligned).
    fn copy_out(&self, from: u64, out: &mut [u8]) {
        let w0 = (from / 8) as usize;
        let whole = out.len() / 8 * 8;
        let (body, tail) = out.split_at_mut(whole);
        // Whole words: fixed 8-byte copies the compiler turns into stores
        // (a commit copies whole 64 KiB regions).
        for (c, w) in body.chunks_exact_mut(8).zip(&self.words[w0..]) {
            c.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        if !tail.is_empty() {
            let v = self.words[w0 + whole / 8]
                .load(Ordering::Acquire)
                .to_le_bytes();
            tail.copy_from_slice(&v[..tail.len()]);
        }
    }

    /// Loads device bytes read from the cache at `from` (8-byte aligned).
    fn copy_in(&self, from: u64, data: &[u8]) {
        let w0 = (from / 8) as usize;
        for (i, c) in data.chunks(8).enumerate() {
            let mut v = [0u8; 8];
            v[..c.len()].copy_from_slice(c);
            self.words[w0 + i].store(u64::from_le_bytes(v), Ordering::Release);
        }
    }

    /// Stores a word without marking its region (the superblock's sequence
    /// count, which only the commit's own superblock write carries).
    fn store_clean(&self, offset: usize, value: u64) {
        self.words[offset / 8].store(value, Ordering::Release);
    }

    /// Bytes of RAM held.
    pub(crate) fn ram_bytes(&self) -> usize {
        self.words.len() * 8 + self.dirty.len() * 8
    }
}

impl PersistentMemory for RamMeta {
    fn len(&self) -> usize {
        self.end as usize
    }

    fn base(&self) -> *const u8 {
        // Only the `read` override below reads the words (atomically);
        // nothing in ssd mode dereferences the base.
        self.words.as_ptr() as *const u8
    }

    fn write_nt(&self, offset: usize, src: &[u8]) {
        // Byte-exact for any range; only the format writes whole ranges.
        for (k, &byte) in src.iter().enumerate() {
            let at = offset + k;
            let shift = (at % 8) * 8;
            let w = &self.words[at / 8];
            let mut cur = w.load(Ordering::Acquire);
            loop {
                let new = (cur & !(0xFF << shift)) | ((byte as u64) << shift);
                match w.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(c) => cur = c,
                }
            }
        }
        if !src.is_empty() {
            self.mark(offset);
            self.mark(offset + src.len() - 1);
        }
    }

    fn write_u64(&self, offset: usize, value: u64) {
        self.words[offset / 8].store(value, Ordering::Release);
        self.mark(offset);
    }

    fn fence(&self) {
        // Durability comes from the metadata sync, not from a fence.
    }

    fn read(&self, offset: usize, dst: &mut [u8]) {
        // Atomic word loads (writers store concurrently); whole words when
        // aligned (entries are: recovery reads millions of them).
        if offset % 8 == 0 && dst.len() % 8 == 0 {
            return self.copy_out(offset as u64, dst);
        }
        for (k, d) in dst.iter_mut().enumerate() {
            let at = offset + k;
            *d = (self.words[at / 8].load(Ordering::Acquire) >> ((at % 8) * 8)) as u8;
        }
    }

    fn strategy(&self) -> &'static str {
        "ssd-metadata-in-ram"
    }
}

/// One request to the metadata writer.
struct SyncReq {
    /// Write the superblock with this sequence count after the flush.
    sb_seq: Option<u64>,
    done: Waiter,
}

/// Home-reactor state of the metadata writer.
struct Home {
    /// The cache bdev's channel on home.
    cache: Option<Rc<BdevChannel>>,
    queue: Vec<SyncReq>,
    busy: bool,
}

// SAFETY: `cache` is an Rc created and used only on the home reactor; the
// mutex around `Home` is only locked on home (like the writeback's).
unsafe impl Send for Home {}

/// The ssd-mode half of an instance.
pub(crate) struct Ssd {
    pub(crate) meta: Arc<RamMeta>,
    /// Cache-bdev block size.
    pub(crate) cache_bs: u32,
    /// Cache-bdev blocks per cache block.
    pub(crate) ratio: u64,
    /// Cache-bdev block of cache block 0.
    pub(crate) data_lba: u64,
    /// Writecache block size.
    block_size: u32,
    /// In-place overwrites completed since the last device flush: a commit
    /// with no new entries still flushes the device for them.
    pub(crate) overwrote: AtomicBool,
    /// Set by a failed metadata write or flush (sticky).
    failed: AtomicI32,
    home: Mutex<Home>,
    /// Block-sized buffers the writeback reads into, reused; taken and
    /// returned on whichever reactor writes a run back.
    bufs: Mutex<Vec<DmaBuf>>,
    /// Metadata syncs requested and not yet done (for delete's wait).
    pending: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ssd {
    fn new(meta: Arc<RamMeta>, geo: &Geometry, cache_bs: u32, cache: Rc<BdevChannel>) -> Ssd {
        Ssd {
            meta,
            cache_bs,
            ratio: (geo.block_size() / cache_bs) as u64,
            data_lba: geo.data_start() / cache_bs as u64,
            block_size: geo.block_size(),
            overwrote: AtomicBool::new(false),
            failed: AtomicI32::new(0),
            home: Mutex::new(Home {
                cache: Some(cache),
                queue: Vec::new(),
                busy: false,
            }),
            bufs: Mutex::new(Vec::new()),
            pending: AtomicU64::new(0),
        }
    }

    /// Cache-bdev block where cache block `b` starts.
    #[inline]
    pub(crate) fn block_lba(&self, b: u32) -> u64 {
        self.data_lba + b as u64 * self.ratio
    }

    /// The error a metadata write or flush hit, if any.
    pub(crate) fn failed(&self) -> Option<i32> {
        match self.failed.load(Ordering::Acquire) {
            0 => None,
            e => Some(e),
        }
    }

    /// True when no metadata sync is queued or running.
    pub(crate) fn idle(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// The home channel of the cache bdev (None after release).
    pub(crate) fn channel(&self) -> Option<Rc<BdevChannel>> {
        lock(&self.home).cache.clone()
    }

    /// Drops the home channel (delete).
    pub(crate) fn release(&self) {
        lock(&self.home).cache = None;
        lock(&self.bufs).clear();
    }

    /// A block-sized buffer for the writeback (reused; allocated only while
    /// the pool grows to the writeback's high-water mark).
    pub(crate) fn take_buf(&self) -> DmaBuf {
        lock(&self.bufs)
            .pop()
            .unwrap_or_else(|| DmaBuf::new(self.block_size as usize))
    }

    /// Returns writeback buffers.
    pub(crate) fn put_bufs(&self, bufs: impl IntoIterator<Item = DmaBuf>) {
        lock(&self.bufs).extend(bufs);
    }

    /// Writes the dirty metadata regions, flushes the device, and — with
    /// `sb_seq` — then writes the superblock carrying that sequence count
    /// (FUA). `done` runs on home. Requests queue behind the running sync;
    /// the ones queued meanwhile share the next one. Call on home.
    pub(crate) fn sync(self: &Arc<Self>, sb_seq: Option<u64>, done: Waiter) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        lock(&self.home).queue.push(SyncReq { sb_seq, done });
        self.kick();
    }

    fn kick(self: &Arc<Self>) {
        let (reqs, ch) = {
            let mut h = lock(&self.home);
            if h.busy || h.queue.is_empty() {
                return;
            }
            let Some(ch) = h.cache.clone() else {
                // Released (delete): nothing can be written any more.
                let reqs = std::mem::take(&mut h.queue);
                drop(h);
                self.pending.fetch_sub(reqs.len() as u64, Ordering::AcqRel);
                for r in reqs {
                    (r.done)(Err(libc::ENODEV));
                }
                return;
            };
            h.busy = true;
            (std::mem::take(&mut h.queue), ch)
        };
        if let Some(e) = self.failed() {
            return self.finish(reqs, Err(e));
        }
        let sb_seq = reqs.iter().filter_map(|r| r.sb_seq).max();
        let me = self.clone();
        write_regions(
            &ch,
            &self.meta,
            self.cache_bs,
            Box::new(move |res| {
                if let Err(e) = res {
                    return me.finish(reqs, Err(e));
                }
                let me2 = me.clone();
                let Some(ch) = me.channel() else {
                    return me.finish(reqs, Err(libc::ENODEV));
                };
                flush(
                    &ch,
                    Box::new(move |res| {
                        let Some(seq) = sb_seq.filter(|_| res.is_ok()) else {
                            return me2.finish(reqs, res);
                        };
                        let me3 = me2.clone();
                        let Some(ch) = me2.channel() else {
                            return me2.finish(reqs, Err(libc::ENODEV));
                        };
                        let sb = me2.meta.start;
                        me2.meta.store_clean(sb as usize + 24, seq);
                        write_superblock(
                            &ch,
                            &me2.meta,
                            me2.block_size,
                            me2.cache_bs,
                            Box::new(move |res| me3.finish(reqs, res)),
                        );
                    }),
                );
            }),
        );
    }

    fn finish(self: &Arc<Self>, reqs: Vec<SyncReq>, res: Result<(), i32>) {
        if let Err(e) = res {
            let _ = self
                .failed
                .compare_exchange(0, e, Ordering::AcqRel, Ordering::Acquire);
        }
        lock(&self.home).busy = false;
        self.pending.fetch_sub(reqs.len() as u64, Ordering::AcqRel);
        for r in reqs {
            (r.done)(res);
        }
        self.kick();
    }
}

type Done = Box<dyn FnOnce(Result<(), i32>)>;

/// The completion of a single I/O: `done` with its status.
fn once(done: Done) -> Rc<dyn IoCompletion> {
    let done = RefCell::new(Some(done));
    Rc::new(FnCompletion(move |io: Io, _| {
        let st = io.status();
        drop(io);
        if let Some(d) = done.borrow_mut().take() {
            d(if st.is_success() {
                Ok(())
            } else {
                Err(st.errno().max(1))
            });
        }
    }))
}

/// Writes every dirty region (all in flight together); `done` once all
/// completed (the first error wins).
fn write_regions(ch: &Rc<BdevChannel>, meta: &Arc<RamMeta>, cache_bs: u32, done: Done) {
    let regions = meta.take_dirty();
    if regions.is_empty() {
        return done(Ok(()));
    }
    let left = Rc::new(Cell::new(regions.len()));
    let result = Rc::new(Cell::new(0i32));
    let done = Rc::new(RefCell::new(Some(done)));
    let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |io: Io, _| {
        if !io.status().is_success() && result.get() == 0 {
            result.set(io.status().errno().max(1));
        }
        drop(io);
        left.set(left.get() - 1);
        if left.get() == 0 {
            if let Some(d) = done.borrow_mut().take() {
                d(match result.get() {
                    0 => Ok(()),
                    e => Err(e),
                });
            }
        }
    }));
    for r in regions {
        let (a, b) = meta.region_range(r);
        let mut buf = DmaBuf::new((b - a) as usize);
        meta.copy_out(a, &mut buf);
        ch.write(a / cache_bs as u64, buf, false, &cb, 0);
    }
}

fn flush(ch: &Rc<BdevChannel>, done: Done) {
    let cb = once(done);
    ch.flush(0, ch.bdev().num_blocks(), &cb, 0);
}

/// Writes the first cache block of the metadata (the superblock and the
/// entries after it, as dm-writecache) with FUA.
fn write_superblock(
    ch: &Rc<BdevChannel>,
    meta: &Arc<RamMeta>,
    block_size: u32,
    cache_bs: u32,
    done: Done,
) {
    let len = (block_size as u64).min(meta.end - meta.start);
    let mut buf = DmaBuf::new(len as usize);
    meta.copy_out(meta.start, &mut buf);
    let cb = once(done);
    ch.write(meta.start / cache_bs as u64, buf, true, &cb, 0);
}

/// Reads device bytes `[from, to)` into the RAM image, several reads in
/// flight.
fn read_range(ch: &Rc<BdevChannel>, meta: &Arc<RamMeta>, cache_bs: u32, to: u64, done: Done) {
    struct Reader {
        ch: Rc<BdevChannel>,
        meta: Arc<RamMeta>,
        cache_bs: u64,
        next: Cell<u64>,
        to: u64,
        in_flight: Cell<usize>,
        err: Cell<i32>,
        done: RefCell<Option<Done>>,
        me: RefCell<Option<Rc<dyn IoCompletion>>>,
    }
    impl Reader {
        fn pump(&self) {
            while self.err.get() == 0
                && self.in_flight.get() < READS_IN_FLIGHT
                && self.next.get() < self.to
            {
                let a = self.next.get();
                let b = (a + READ_CHUNK).min(self.to);
                self.next.set(b);
                self.in_flight.set(self.in_flight.get() + 1);
                let Some(cb) = self.me.borrow().clone() else {
                    return;
                };
                self.ch
                    .read(a / self.cache_bs, DmaBuf::new((b - a) as usize), &cb, a);
            }
            if self.in_flight.get() == 0 {
                // Break the cycle through `me` and report.
                self.me.borrow_mut().take();
                if let Some(d) = self.done.borrow_mut().take() {
                    d(match self.err.get() {
                        0 => Ok(()),
                        e => Err(e),
                    });
                }
            }
        }
    }
    struct ReadDone(std::rc::Weak<Reader>);
    impl IoCompletion for ReadDone {
        fn io_done(&self, mut io: Io, at: u64) {
            let Some(r) = self.0.upgrade() else { return };
            r.in_flight.set(r.in_flight.get() - 1);
            if io.status().is_success() {
                if let Some(buf) = io.take_buf() {
                    r.meta.copy_in(at, &buf);
                }
            } else if r.err.get() == 0 {
                r.err.set(io.status().errno().max(1));
            }
            drop(io);
            r.pump();
        }
    }
    let start = meta.start;
    let r = Rc::new(Reader {
        ch: ch.clone(),
        meta: meta.clone(),
        cache_bs: cache_bs as u64,
        next: Cell::new(start),
        to,
        in_flight: Cell::new(0),
        err: Cell::new(0),
        done: RefCell::new(Some(done)),
        me: RefCell::new(None),
    });
    *r.me.borrow_mut() = Some(Rc::new(ReadDone(Rc::downgrade(&r))));
    // The reader keeps itself alive through its in-flight reads' callback
    // (which holds only a weak reference): hold a strong one until done.
    let keep = r.clone();
    let inner = r.done.borrow_mut().take();
    *r.done.borrow_mut() = inner.map(|d| -> Done {
        Box::new(move |res| {
            drop(keep);
            d(res)
        })
    });
    r.pump();
}

/// What attaching a cache bdev in ssd mode gives the instance.
pub(crate) struct SsdAttached {
    pub(crate) attached: Attached,
    pub(crate) ssd: Arc<Ssd>,
}

/// Formats a blank cache or recovers an existing one on the cache bdev
/// behind `ch` (on home); `done` runs on home. Refuses, without writing
/// anything, what pmem mode refuses, plus geometry the cache bdev cannot
/// address (a superblock not on one of its block boundaries).
pub(crate) fn attach(
    ch: Rc<BdevChannel>,
    start_sector: u64,
    block_size: u32,
    origin_blocks: u64,
    done: Box<dyn FnOnce(Result<SsdAttached, AttachError>)>,
) {
    let cache = ch.bdev().clone();
    let cache_bs = cache.block_size();
    let dev_size = cache.size_bytes();
    if cache_bs > block_size {
        return done(Err(AttachError::Unsuitable(format!(
            "cache bdev '{}' has {cache_bs}-byte blocks, larger than the cache block size {block_size}: \
             ask for block_size {cache_bs} or more",
            cache.name()
        ))));
    }
    let Some(sb_off) = start_sector.checked_mul(SECTOR_SIZE).filter(|o| {
        o.checked_add(SUPERBLOCK_SIZE as u64)
            .is_some_and(|e| e <= dev_size)
    }) else {
        return done(Err(wc_writecache_format::FormatError::StartSectorPastEnd {
            start_sector,
            device_size: dev_size,
        }
        .into()));
    };
    if sb_off % cache_bs as u64 != 0 {
        return done(Err(AttachError::Unsuitable(format!(
            "start_sector {start_sector} is not on a block boundary of cache bdev '{}' ({cache_bs}-byte blocks)",
            cache.name()
        ))));
    }
    let cb: Rc<dyn IoCompletion> = {
        let done = RefCell::new(Some(done));
        let ch = ch.clone();
        Rc::new(FnCompletion(move |mut io: Io, _| {
            let Some(done) = done.borrow_mut().take() else {
                return;
            };
            if !io.status().is_success() {
                return done(Err(AttachError::Io(
                    "reading the superblock",
                    io.status().errno().max(1),
                )));
            }
            let Some(buf) = io.take_buf() else {
                return done(Err(AttachError::Io("reading the superblock", libc::EIO)));
            };
            drop(io);
            let mut raw = [0u8; SUPERBLOCK_SIZE];
            raw.copy_from_slice(&buf[..SUPERBLOCK_SIZE]);
            match Superblock::decode(&raw) {
                Err(e) => done(Err(e.into())),
                Ok(SuperblockState::Blank) => {
                    format(ch.clone(), dev_size, start_sector, block_size, done)
                }
                Ok(SuperblockState::Formatted(sb)) => recover(
                    ch.clone(),
                    sb,
                    (dev_size, start_sector, block_size),
                    origin_blocks,
                    done,
                ),
            }
        }))
    };
    ch.read(
        sb_off / cache_bs as u64,
        DmaBuf::new(cache_bs as usize),
        &cb,
        0,
    );
}

fn format(
    ch: Rc<BdevChannel>,
    dev_size: u64,
    start_sector: u64,
    block_size: u32,
    done: Box<dyn FnOnce(Result<SsdAttached, AttachError>)>,
) {
    let geo = match Geometry::compute(dev_size, start_sector, block_size) {
        Ok(g) => g,
        Err(e) => return done(Err(e.into())),
    };
    if let Err(e) = crate::media::check_indexable(&geo) {
        return done(Err(e));
    }
    let meta = Arc::new(RamMeta::new(&geo));
    let cache_bs = ch.bdev().block_size();
    let sb = geo.initial_superblock();
    // Everything but the magic first, durable; then the magic (FUA). A
    // crash in between leaves a superblock that is refused, never trusted.
    meta.write_nt(geo.superblock_offset() as usize, &sb.encode_without_magic());
    for b in 0..geo.n_blocks() {
        let off = geo.entry_offset(b) as usize;
        meta.store_clean(off, u64::MAX);
        meta.store_clean(off + 8, u64::MAX);
    }
    meta.mark_all();
    let ssd = Arc::new(Ssd::new(meta.clone(), &geo, cache_bs, ch.clone()));
    let ch2 = ch.clone();
    let m0 = meta.clone();
    write_regions(
        &ch,
        &m0,
        cache_bs,
        Box::new(move |res| {
            if let Err(e) = res {
                return done(Err(AttachError::Io("formatting the metadata", e)));
            }
            let ch3 = ch2.clone();
            flush(
                &ch2,
                Box::new(move |res| {
                    if let Err(e) = res {
                        return done(Err(AttachError::Io("flushing the formatted metadata", e)));
                    }
                    let sbo = geo.superblock_offset() as usize;
                    for (i, c) in sb.encode().chunks(8).enumerate() {
                        meta.store_clean(
                            sbo + i * 8,
                            u64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
                        );
                    }
                    let m1 = meta.clone();
                    write_superblock(
                        &ch3,
                        &m1,
                        geo.block_size(),
                        cache_bs,
                        Box::new(move |res| {
                            if let Err(e) = res {
                                return done(Err(AttachError::Io("writing the superblock", e)));
                            }
                            tracing::info!(
                                "writecache: formatted ssd cache with {} blocks of {} bytes",
                                geo.n_blocks(),
                                geo.block_size()
                            );
                            let media = Media {
                                pmem: meta as Arc<dyn PersistentMemory>,
                                geo,
                            };
                            let n = geo.n_blocks() as usize;
                            let (committed, mut free) = match (scratch(0), scratch(n)) {
                                (Ok(c), Ok(f)) => (c, f),
                                (Err(e), _) | (_, Err(e)) => return done(Err(e)),
                            };
                            for b in 0..n as u32 {
                                let _ = free.push(b);
                            }
                            done(Ok(SsdAttached {
                                attached: Attached {
                                    media,
                                    sb_seq: sb.seq_count,
                                    committed,
                                    free,
                                    formatted: true,
                                },
                                ssd,
                            }))
                        }),
                    );
                }),
            );
        }),
    );
}

fn recover(
    ch: Rc<BdevChannel>,
    sb: Superblock,
    (dev_size, start_sector, block_size): (u64, u64, u32),
    origin_blocks: u64,
    done: Box<dyn FnOnce(Result<SsdAttached, AttachError>)>,
) {
    let geo = match wc_writecache_format::validate(&sb, dev_size, start_sector, Some(block_size)) {
        Ok(g) => g,
        Err(e) => return done(Err(e.into())),
    };
    if let Err(e) = crate::media::check_indexable(&geo) {
        return done(Err(e));
    }
    let meta = Arc::new(RamMeta::new(&geo));
    let cache_bs = ch.bdev().block_size();
    let ch2 = ch.clone();
    let m2 = meta.clone();
    read_range(
        &ch,
        &meta,
        cache_bs,
        geo.data_start(),
        Box::new(move |res| {
            if let Err(e) = res {
                return done(Err(AttachError::Io("reading the metadata", e)));
            }
            let media = Media {
                pmem: m2.clone() as Arc<dyn PersistentMemory>,
                geo,
            };
            let attached = match recover_media(media, sb, origin_blocks) {
                Ok(a) => a,
                Err(e) => return done(Err(e)),
            };
            let ssd = Arc::new(Ssd::new(m2.clone(), &geo, cache_bs, ch2.clone()));
            // Cleared entries (uncommitted, superseded) go to the device
            // before anything reuses their blocks, as dm-writecache does at
            // resume; nothing else is written.
            let ch3 = ch2.clone();
            write_regions(
                &ch2,
                &m2,
                cache_bs,
                Box::new(move |res| {
                    if let Err(e) = res {
                        return done(Err(AttachError::Io("writing the recovered metadata", e)));
                    }
                    flush(
                        &ch3,
                        Box::new(move |res| match res {
                            Err(e) => {
                                done(Err(AttachError::Io("flushing the recovered metadata", e)))
                            }
                            Ok(()) => done(Ok(SsdAttached { attached, ssd })),
                        }),
                    );
                }),
            );
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use wc_writecache_format::Geometry;

    #[test]
    fn stores_mark_their_regions_and_read_back() {
        let geo = Geometry::compute(64 << 20, 0, 4096).unwrap();
        let m = RamMeta::new(&geo);
        assert!(m.take_dirty().is_empty());
        m.write_u64(64, 7);
        m.write_u64(geo.entry_offset(10_000) as usize, 9);
        let d = m.take_dirty();
        assert_eq!(d, vec![0, geo.entry_offset(10_000) / REGION]);
        assert!(m.take_dirty().is_empty(), "taken once");
        let mut b = [0u8; 8];
        m.read(64, &mut b);
        assert_eq!(u64::from_le_bytes(b), 7);
        m.write_nt(3, &[1, 2, 3]);
        let mut c = [0u8; 6];
        m.read(2, &mut c);
        assert_eq!(c, [0, 1, 2, 3, 0, 0]);
        m.store_clean(24, 5);
        assert_eq!(
            m.take_dirty(),
            vec![0],
            "write_nt marked; store_clean did not"
        );
    }

    #[test]
    fn each_core_marks_its_own_map_and_the_sync_takes_all() {
        let geo = Geometry::compute(64 << 20, 0, 4096).unwrap();
        let m = RamMeta::with_maps(&geo, 3);
        let r = |b: u64| geo.entry_offset(b) / REGION;
        std::thread::scope(|s| {
            for core in 0..4usize {
                let m = &m;
                let geo = &geo;
                s.spawn(move || {
                    // Core 3 shares map 0 (more reactors than maps).
                    REACTOR.with(|c| c.set(core));
                    m.write_u64(geo.entry_offset(core as u64 * 5000) as usize, 1);
                    m.write_u64(geo.entry_offset(9000) as usize, 2);
                });
            }
        });
        let mut want = vec![r(0), r(5000), r(10_000), r(15_000), r(9000)];
        want.sort_unstable();
        want.dedup();
        assert_eq!(m.take_dirty(), want);
        assert!(m.take_dirty().is_empty(), "every map cleared");
    }

    #[test]
    fn regions_are_clipped_to_the_metadata() {
        // A superblock at sector 8 and metadata ending inside region 0.
        let geo = Geometry::compute(1 << 20, 8, 512).unwrap();
        let m = RamMeta::new(&geo);
        let (a, b) = m.region_range(0);
        assert_eq!(a, 4096);
        assert_eq!(b, geo.data_start());
        m.mark_all();
        let last = (geo.data_start() - 1) / REGION;
        assert_eq!(m.take_dirty(), (0..=last).collect::<Vec<_>>());
    }
}
