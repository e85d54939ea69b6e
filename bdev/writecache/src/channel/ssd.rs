//! ssd mode's per-core I/O path: data goes to and comes from the cache bdev
//! with block I/O, asynchronously.
//!
//! * A write allocates blocks (lowest free first) or, for a block already
//!   cached and idle, overwrites it in place (as dm-writecache in ssd
//!   mode: no new block, no new entry); its entry is stamped — and the
//!   block published in the index — only when its data write completed, so
//!   a commit never covers an entry whose data is not on the device.
//! * An in-place overwrite holds the block's WB bit while in flight: no
//!   writeback copies it meanwhile and nobody frees it; if the block left
//!   the index meanwhile (displaced, unmapped, written back), the writer
//!   hands it to the next commit to free.
//! * A read of hits reads the cache bdev; a block freed and reallocated
//!   while we read it shows a new generation at completion, and is read
//!   again (from the cache or the origin, wherever it is then).

use super::*;
use crate::meta::{seq32, seq_at_or_after, BlockMeta};

/// What a cache-bdev I/O of the data path is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A read of cached blocks.
    Read,
    /// A write into newly allocated blocks.
    Alloc,
    /// A write over cached blocks.
    InPlace,
}

/// One cache-bdev I/O over adjacent cache blocks holding adjacent LBAs.
/// Kept small: it is built, parked in a slot and taken back once per
/// cache-bdev I/O.
pub(super) struct Run {
    key: usize,
    /// Index (in blocks) of its first block within the parent I/O.
    first: u64,
    /// LBA of its first block.
    lba: u64,
    /// Its first cache block; block `j` of the run is `block + j`.
    block: u32,
    kind: Kind,
    /// Each block's allocation generation when the I/O started.
    gens: SmallVec<[u32; 8]>,
}

impl Run {
    fn new(key: usize, kind: Kind, first: u64, lba: u64, b: u32, g: u32) -> Run {
        let mut gens = SmallVec::new();
        gens.push(g);
        Run {
            key,
            first,
            lba,
            block: b,
            kind,
            gens,
        }
    }

    fn len(&self) -> usize {
        self.gens.len()
    }

    /// (cache block, generation) of each block of the run.
    fn blocks(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.gens
            .iter()
            .enumerate()
            .map(|(j, &g)| (self.block + j as u32, g))
    }

    /// Whether block `b` for parent block `i` extends this run.
    fn extends(&self, kind: Kind, i: u64, b: u32) -> bool {
        let n = self.len();
        self.kind == kind
            && self.first + n as u64 == i
            && (self.block as u64 + n as u64) == b as u64
            && n < 64
    }

    /// Appends block `b` (which [`Run::extends`] it) with generation `g`.
    fn push(&mut self, g: u32) {
        self.gens.push(g);
    }
}

/// Tag bit of a cache-bdev write's completion context: the rest is a slot
/// of `Local::one_writes` (a one-block write without a parent), not of
/// `Local::runs`.
const ONE: u64 = 1 << 63;
/// Where a one-block write in flight keeps its placement, in its own
/// `driver_ctx`: the cache block, its generation, and the [`Kind`].
const ONE_BLOCK: usize = 0;
const ONE_GEN: usize = 1;
const ONE_KIND: usize = 2;

/// Completion of the data path's cache-bdev I/O.
pub(super) struct RunDone(pub(super) Weak<Local>);

impl IoCompletion for RunDone {
    fn io_done(&self, io: Io, ctx: u64) {
        let status = io.status();
        drop(io);
        if let Some(l) = self.0.upgrade() {
            // A completion callback, outside any submit: the parent this
            // finishes may complete inline (see `Local::complete_now`).
            l.complete_now.set(true);
            if ctx & ONE != 0 {
                l.one_done((ctx & !ONE) as usize, status.errno());
            } else {
                l.run_done(ctx as usize, status.errno());
            }
            l.complete_now.set(false);
        }
    }
}

/// Source of WRITE_ZEROES data (aligned for any cache bdev).
#[repr(C, align(4096))]
struct ZeroBlock([u8; 4096]);
static ZERO_BLOCK: ZeroBlock = ZeroBlock([0; 4096]);

impl Local {
    pub(super) fn ssd_dispatch(self: &Rc<Self>, io: Io) {
        match io.io_type() {
            IoType::Read => self.ssd_read(io),
            IoType::Write | IoType::WriteZeroes => {
                if self.wc.error() != 0 {
                    return io.complete(IoStatus::Failed(libc::EIO));
                }
                // A one-block write's index slot is a cache miss on a large
                // cache: several per iteration are batched (`Local::queue`)
                // so their misses overlap.
                if io.num_blocks() == 1 && !io.fua() {
                    self.queue(io)
                } else {
                    self.ssd_write(io)
                }
            }
            IoType::Flush => self.flush(io),
            IoType::Unmap => self.unmap(io),
            IoType::Reset => io.complete(IoStatus::Success),
        }
    }

    fn new_run(&self, run: Run) -> usize {
        match self.free_runs.borrow_mut().pop() {
            Some(k) => {
                self.runs.borrow_mut()[k] = Some(run);
                k
            }
            None => {
                let mut v = self.runs.borrow_mut();
                v.push(Some(run));
                v.len() - 1
            }
        }
    }

    /// One more child of parent `key`.
    fn add_child(&self, key: usize) {
        if let Some(Some(p)) = self.parents.borrow_mut().get_mut(key) {
            p.remaining += 1;
        }
    }

    /// First LBA, block count and type of parent `key`'s I/O.
    fn parent_io(&self, key: usize) -> Option<(u64, u64, IoType)> {
        let v = self.parents.borrow();
        let io = v.get(key)?.as_ref()?.io.as_ref()?;
        Some((io.offset_blocks(), io.num_blocks(), io.io_type()))
    }

    /// The segments of bytes `[start, start+len)` of parent `key`'s I/O.
    fn parent_iovs(&self, key: usize, start: usize, len: usize) -> SmallVec<[IoVec; 4]> {
        let v = self.parents.borrow();
        match v
            .get(key)
            .and_then(|p| p.as_ref())
            .and_then(|p| p.io.as_ref())
        {
            // The whole I/O (a one-run write, the common case): as is.
            Some(io) if start == 0 && len as u64 == io.len_bytes() => {
                SmallVec::from_slice(io.iovs())
            }
            Some(io) => slice_iovs(io.iovs(), start, len),
            None => SmallVec::new(),
        }
    }

    fn cache_error(&self, what: &str, errno: i32) {
        tracing::error!(
            "writecache {}: cache bdev {what} failed (errno {errno})",
            self.wc.name
        );
        self.wc.set_error(libc::EIO);
    }

    // ------------------------------------------------------------------ read

    fn ssd_read(self: &Rc<Self>, io: Io) {
        let n = io.num_blocks();
        let key = self.new_parent(io, 1);
        let hits = self.ssd_read_blocks(key, 0, n);
        let st = self.stats();
        inc(&st.read_blocks, n);
        inc(&st.read_hits, hits);
        // The submission's own reference.
        self.child_done(key, 0);
    }

    /// Reads blocks `[from, to)` of read `key`: hits from the cache bdev,
    /// misses from the origin (adjacent ones together). Returns the hits.
    fn ssd_read_blocks(self: &Rc<Self>, key: usize, from: u64, to: u64) -> u64 {
        let wc = &self.wc;
        let (Some(ssd), Some(cache), Some((first, _, _))) =
            (wc.ssd.as_ref(), self.cache.as_ref(), self.parent_io(key))
        else {
            return 0;
        };
        let bs = wc.block_size as usize;
        let mut hits: SmallVec<[Run; 4]> = SmallVec::new();
        let mut misses: SmallVec<[(u64, u64); 4]> = SmallVec::new();
        let mut n_hits = 0;
        for i in from..to {
            let lba = first + i;
            let hit = wc.index.get(&wc.meta, lba).and_then(|b| {
                let (g, st) = wc.meta.get(b).gen_state();
                (st & VALID != 0).then_some((b, g))
            });
            match hit {
                Some((b, g)) => {
                    n_hits += 1;
                    match hits.last_mut() {
                        Some(r) if r.extends(Kind::Read, i, b) => r.push(g),
                        _ => hits.push(Run::new(key, Kind::Read, i, lba, b, g)),
                    }
                }
                None => match misses.last_mut() {
                    Some((s, len)) if *s + *len == i => *len += 1,
                    _ => misses.push((i, 1)),
                },
            }
        }
        for run in hits {
            let len = run.len();
            let iovs = self.parent_iovs(key, run.first as usize * bs, len * bs);
            let at = ssd.block_lba(run.block);
            self.add_child(key);
            let slot = self.new_run(run);
            // SAFETY: the segments are sub-ranges of the parent I/O's
            // buffers, which stay valid until the parent completes, and
            // that only happens after this child is done.
            unsafe {
                cache.readv(at, len as u64 * ssd.ratio, &iovs, &self.ssd_cb, slot as u64);
            }
        }
        let ratio = wc.origin_ratio;
        for (i, len) in misses {
            let iovs = self.parent_iovs(key, i as usize * bs, len as usize * bs);
            self.add_child(key);
            // SAFETY: as above.
            unsafe {
                self.origin.readv(
                    (first + i) * ratio,
                    len * ratio,
                    &iovs,
                    &self.child_cb,
                    key as u64,
                );
            }
        }
        n_hits
    }

    // ----------------------------------------------------------------- write

    pub(super) fn ssd_write(self: &Rc<Self>, io: Io) {
        let wc = &self.wc;
        let (first, n) = (io.offset_blocks(), io.num_blocks());
        // Cleaner mode: new data goes around the cache (see `write`).
        if wc.tunables.cleaner.load(Ordering::Relaxed) {
            let cached = (0..n).any(|i| wc.index.get(&wc.meta, first + i).is_some())
                || wc.writeback_busy_on(first, n);
            if !cached {
                return self.write_around(io);
            }
        }
        inc(&self.stats().write_blocks, n);
        let fua = io.fua();
        let io = if n == 1 && !fua {
            match self.ssd_write_one(io) {
                None => return,
                // No free block: the parent path waits for one.
                Some(io) => io,
            }
        } else {
            io
        };
        let key = self.new_parent(io, 1);
        if fua {
            if let Some(Some(p)) = self.parents.borrow_mut().get_mut(key) {
                p.fua = true;
            }
        }
        self.ssd_write_blocks(key, 0);
    }

    /// Places blocks `from..` of write `key` (in place or in new blocks)
    /// and sends their data to the cache bdev, each run as soon as it is
    /// complete (no run vector); waits for free
    /// blocks when there are none (holding the submission's reference),
    /// else drops that reference.
    fn ssd_write_blocks(self: &Rc<Self>, key: usize, from: u64) {
        let Some((first, n, t)) = self.parent_io(key) else {
            return;
        };
        let zeroes = t == IoType::WriteZeroes;
        let mut run: Option<Run> = None;
        // One pin for the write's index lookups (each `Index::get` would
        // pin on its own).
        let guard = crossbeam::epoch::pin();
        for i in from..n {
            let lba = first + i;
            let Some((b, g, kind)) = self.ssd_place(lba, &guard) else {
                drop(guard);
                self.ssd_wait(key, i);
                if let Some(r) = run {
                    self.ssd_submit(r, zeroes);
                }
                return;
            };
            match &mut run {
                Some(r) if r.extends(kind, i, b) => r.push(g),
                _ => {
                    let next = Run::new(key, kind, i, lba, b, g);
                    if let Some(done) = run.replace(next) {
                        self.ssd_submit(done, zeroes);
                    }
                }
            }
        }
        drop(guard);
        if let Some(r) = run {
            self.ssd_submit(r, zeroes);
        }
        // The submission's own reference.
        self.child_done(key, 0);
    }

    /// Where block `lba` of a write goes: over its cached block when that
    /// is idle (in place), else into a newly allocated block; `None` when
    /// it needs a new block and none is free. Counts the hit or the
    /// allocation.
    fn ssd_place(&self, lba: u64, guard: &crossbeam::epoch::Guard) -> Option<(u32, u32, Kind)> {
        let wc = &self.wc;
        // Some(committed) when a version of the block is cached.
        let mut hit = None;
        let mut placed = None;
        if let Some(b) = wc.index.lookup(&wc.meta, lba, guard, |_| {}) {
            let m = wc.meta.get(b);
            let (g, state) = m.gen_state();
            hit = Some(!seq_at_or_after(
                m.seq(),
                seq32(wc.sb_seq.load(Ordering::Acquire)),
            ));
            if state == VALID && wc.meta.begin_inplace(b, g) {
                if wc.index.lookup(&wc.meta, lba, guard, |_| {}) == Some(b) {
                    placed = Some((b, g, Kind::InPlace));
                } else {
                    // Left the index between our two looks (written
                    // back, unmapped, displaced): not ours to write.
                    wc.meta.end_inplace(b);
                    wc.free_after_next_commit(b, g);
                }
            }
        }
        let st = self.stats();
        let placed = match placed {
            Some(p) => p,
            None => {
                let b = self.alloc()?;
                // The insert follows the data write's completion.
                wc.index.prefetch_insert(lba);
                let m = wc.meta.get(b);
                let g = BlockMeta::next_gen(m.gen());
                // A new allocation: readers that still hold the old
                // generation will read again.
                m.set(g, 0);
                inc(&st.writes_allocate, 1);
                (b, g, Kind::Alloc)
            }
        };
        match hit {
            Some(true) => inc(&st.write_hits_committed, 1),
            Some(false) => inc(&st.write_hits_uncommitted, 1),
            None => {}
        }
        Some(placed)
    }

    /// The common write, one block and no FUA: placed and sent to the
    /// cache bdev without a parent — the write itself waits in
    /// `one_writes`, its placement in its `driver_ctx`, and completes from
    /// the cache-bdev completion ([`Local::one_done`]). Gives the write
    /// back when it needs a new block and none is free.
    fn ssd_write_one(self: &Rc<Self>, mut io: Io) -> Option<Io> {
        let wc = &self.wc;
        let (Some(ssd), Some(cache)) = (wc.ssd.as_ref(), self.cache.as_ref()) else {
            return Some(io);
        };
        let placed = self.ssd_place(io.offset_blocks(), &crossbeam::epoch::pin());
        let Some((b, g, kind)) = placed else {
            return Some(io);
        };
        inc(&self.stats().inflight, 1);
        let d = io.driver_ctx();
        d[ONE_BLOCK] = b as u64;
        d[ONE_GEN] = g as u64;
        d[ONE_KIND] = kind as u64;
        // The segments, copied (the write moves into `one_writes`): one on
        // the stack, as nearly always.
        let mut one = [IoVec {
            // Only read (a write's source); block sizes are at most 4096.
            base: ZERO_BLOCK.0.as_ptr() as *mut u8,
            len: wc.block_size as usize,
        }];
        let many: SmallVec<[IoVec; 4]>;
        let iovs: &[IoVec] = match io.iovs() {
            _ if io.io_type() == IoType::WriteZeroes => &one,
            [v] => {
                one[0] = *v;
                &one
            }
            v => {
                many = SmallVec::from_slice(v);
                &many
            }
        };
        let slot = self.one_writes.borrow_mut().insert(io) as u64;
        // The write stays in `one_writes` until this I/O's completion.
        // SAFETY: the segments are the write's buffers (valid until that
        // completion) or the static zero block.
        unsafe {
            cache.writev(
                ssd.block_lba(b),
                ssd.ratio,
                iovs,
                false,
                &self.ssd_cb,
                ONE | slot,
            );
        }
        None
    }

    /// The cache-bdev write of one-block write `slot` is done: as
    /// [`Local::run_done`] for its one block, then the write completes.
    fn one_done(self: &Rc<Self>, slot: usize, errno: i32) {
        let Some(mut io) = self.one_writes.borrow_mut().try_remove(slot) else {
            return;
        };
        let lba = io.offset_blocks();
        let d = *io.driver_ctx();
        let (b, g) = (d[ONE_BLOCK] as u32, d[ONE_GEN] as u32);
        let errno = if d[ONE_KIND] == Kind::InPlace as u64 {
            self.inplace_done(lba, b, &[g], errno)
        } else {
            self.alloc_done(lba, b, &[g], errno)
        };
        let st = self.stats();
        st.inflight.store(
            st.inflight.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
        let status = if errno == 0 {
            IoStatus::Success
        } else {
            IoStatus::Failed(errno)
        };
        self.finish(io, status);
    }

    /// Parks write `key` at block `next` until blocks are free.
    fn ssd_wait(self: &Rc<Self>, key: usize, next: u64) {
        if let Some(Some(p)) = self.parents.borrow_mut().get_mut(key) {
            p.next = next;
            if !p.blocked {
                p.blocked = true;
                inc(&self.stats().writes_blocked_on_freelist, 1);
            }
        }
        self.ssd_waiting.borrow_mut().push_back(key);
        self.stats()
            .waiting
            .store(self.ssd_waiting.borrow().len() as u64, Ordering::Relaxed);
        self.make_room();
    }

    /// Sends run `run` of its write to the cache bdev.
    fn ssd_submit(self: &Rc<Self>, run: Run, zeroes: bool) {
        let (Some(ssd), Some(cache)) = (self.wc.ssd.as_ref(), self.cache.as_ref()) else {
            return;
        };
        let bs = self.wc.block_size as usize;
        let len = run.len();
        let key = run.key;
        let iovs: SmallVec<[IoVec; 4]> = if zeroes {
            (0..len)
                .map(|_| IoVec {
                    // Only read (a write's source); block sizes are at
                    // most 4096 bytes.
                    base: ZERO_BLOCK.0.as_ptr() as *mut u8,
                    len: bs,
                })
                .collect()
        } else {
            self.parent_iovs(key, run.first as usize * bs, len * bs)
        };
        let at = ssd.block_lba(run.block);
        self.add_child(key);
        let slot = self.new_run(run);
        // SAFETY: the segments are the parent's buffers (valid until it
        // completes, after this child) or the static zero block.
        unsafe {
            cache.writev(
                at,
                len as u64 * ssd.ratio,
                &iovs,
                false,
                &self.ssd_cb,
                slot as u64,
            );
        }
    }

    fn run_done(self: &Rc<Self>, slot: usize, errno: i32) {
        let Some(run) = self.runs.borrow_mut().get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free_runs.borrow_mut().push(slot);
        let wc = &self.wc;
        match run.kind {
            Kind::Read => {
                if errno != 0 {
                    self.cache_error("read", errno);
                    return self.child_done(run.key, libc::EIO);
                }
                // A block reallocated while we read it may have given us
                // another sector's data: read those blocks again.
                for (j, (b, g)) in run.blocks().enumerate() {
                    if wc.meta.get(b).gen() != g {
                        let i = run.first + j as u64;
                        self.ssd_read_blocks(run.key, i, i + 1);
                    }
                }
                self.child_done(run.key, 0);
            }
            Kind::Alloc => {
                let errno = self.alloc_done(run.lba, run.block, &run.gens, errno);
                self.child_done(run.key, errno);
            }
            Kind::InPlace => {
                let errno = self.inplace_done(run.lba, run.block, &run.gens, errno);
                self.child_done(run.key, errno);
            }
        }
    }

    /// The write of newly allocated blocks `block + j` (generation
    /// `gens[j]`, for LBA `lba + j`) to the cache bdev is done: published,
    /// or on an error handed back to this core's free cache. Returns the
    /// errno of the write's part.
    fn alloc_done(&self, lba: u64, block: u32, gens: &[u32], errno: i32) -> i32 {
        if errno != 0 {
            self.cache_error("write", errno);
            // Never published: straight back to this core's cache.
            let mut free = self.free.borrow_mut();
            free.extend((0..gens.len() as u32).map(|j| block + j));
            self.stats()
                .free_cached
                .store(free.len() as u64, Ordering::Relaxed);
            return libc::EIO;
        }
        self.ssd_publish(lba, block, gens);
        0
    }

    /// The in-place write of cached blocks `block + j` (generation
    /// `gens[j]`, mapping LBA `lba + j`) is done: their WB bits drop, and
    /// the next commit flushes the device for them. Returns the errno of
    /// the write's part.
    fn inplace_done(&self, lba: u64, block: u32, gens: &[u32], errno: i32) -> i32 {
        let wc = &self.wc;
        for (j, &g) in gens.iter().enumerate() {
            let b = block + j as u32;
            wc.meta.end_inplace(b);
            if wc.index.get(&wc.meta, lba + j as u64) != Some(b) {
                // Displaced or unmapped meanwhile: whoever tried to
                // free it could not (we held it).
                wc.free_after_next_commit(b, g);
            }
        }
        if errno != 0 {
            self.cache_error("write", errno);
            return libc::EIO;
        }
        if let Some(ssd) = &wc.ssd {
            // The next commit flushes the device for it. Set only when
            // clear: every core's in-place writes would otherwise bounce
            // the flag's line between the cores. (Seen set, it is still to
            // be taken by a commit that flushes after taking it, so after
            // this write.)
            if !ssd.overwrote.load(Ordering::Acquire) {
                ssd.overwrote.store(true, Ordering::Release);
            }
        }
        0
    }

    /// The data of newly allocated blocks is on the cache device: stamp
    /// their entries, publish them (one index lock per shard group of the
    /// run), log them for the commit.
    fn ssd_publish(&self, first: u64, block: u32, gens: &[u32]) {
        let wc = &self.wc;
        // The stamp: a commit that bumps the sequence after this load runs
        // its per-core step here only after this (see `Writecache::start_commit`).
        let seq = wc.seq.load(Ordering::Acquire);
        let Some(ssd) = wc.ssd.as_ref() else {
            return;
        };
        let one = gens.len() == 1;
        // A one-block run (a 4 KiB write) is mapped with a single insert.
        let mut mapped: SmallVec<[(u64, u32); 8]> = SmallVec::new();
        {
            let mut log = self.write_log.borrow_mut();
            for (j, &g) in gens.iter().enumerate() {
                let b = block + j as u32;
                let lba = first + j as u64;
                let m = wc.meta.get(b);
                // The RAM metadata directly (one region mark per entry in
                // this core's dirty map, no dynamic dispatch): what
                // `Media::write_entry` does.
                ssd.meta.write_entry_in(
                    self.meta_map,
                    wc.media.geo.entry_offset(b as u64) as usize,
                    wc.sector_of(lba),
                    seq,
                );
                m.lba.store(lba, Ordering::Relaxed);
                m.set_seq(seq);
                m.set(g, VALID);
                if !one {
                    mapped.push((lba, b));
                }
                log.push(LogEntry {
                    block: b,
                    gen: g,
                    seq,
                });
            }
            self.stats()
                .uncommitted
                .store(log.len() as u64, Ordering::Release);
        }
        if one {
            if let Some(old) = wc.index.insert(&wc.meta, first, block) {
                self.ssd_displace(old, seq);
            }
        } else {
            let mut displaced: SmallVec<[u32; 8]> = SmallVec::new();
            wc.index
                .insert_run(&wc.meta, &mapped, |_, old| displaced.push(old));
            for old in displaced {
                self.ssd_displace(old, seq);
            }
        }
        if self.to_free.borrow().len() >= FREE_BATCH {
            self.free_displaced();
        }
        self.maybe_autocommit();
    }

    /// The older block a publish displaced (a concurrent write of the same
    /// LBA, or one placed while the block was busy): an uncommitted one is
    /// freed now, a committed one after our version's commit, one held by
    /// an in-place write or the writeback by that when it ends.
    fn ssd_displace(&self, old: u32, my_seq: u64) {
        let wc = &self.wc;
        let m = wc.meta.get(old);
        let ogen = m.gen();
        if seq_at_or_after(m.seq(), seq32(my_seq)) {
            if wc.meta.begin_free(old, ogen) {
                self.to_free.borrow_mut().push(old);
            } else {
                wc.forget_held_entry(old, ogen);
            }
        } else {
            self.superseded.borrow_mut().push(LogEntry {
                block: old,
                gen: ogen,
                seq: my_seq,
            });
        }
    }

    pub(super) fn ssd_retry_waiting(self: &Rc<Self>) -> PollStatus {
        if self.ssd_waiting.borrow().is_empty() {
            return PollStatus::Idle;
        }
        if let Some(errno) = self.waiting_fails_with() {
            let keys: Vec<usize> = self.ssd_waiting.borrow_mut().drain(..).collect();
            self.stats().waiting.store(0, Ordering::Relaxed);
            for k in keys {
                self.child_done(k, errno);
            }
            return PollStatus::Busy;
        }
        self.flush_deferred_frees();
        let ready = || !self.free.borrow().is_empty() || self.wc.pool.len() > 0;
        if !ready() {
            let wc = &self.wc;
            let dirty: u64 = wc
                .stats
                .iter()
                .map(|c| c.uncommitted.load(Ordering::Relaxed))
                .sum();
            if dirty > 0 && !wc.commit_requested.swap(true, Ordering::AcqRel) {
                wc.request_commit(None);
            }
            return PollStatus::Idle;
        }
        let mut progressed = false;
        while ready() {
            let Some(key) = self.ssd_waiting.borrow_mut().pop_front() else {
                break;
            };
            progressed = true;
            self.stats()
                .waiting
                .store(self.ssd_waiting.borrow().len() as u64, Ordering::Relaxed);
            let next = self
                .parents
                .borrow()
                .get(key)
                .and_then(|p| p.as_ref())
                .map(|p| p.next);
            if let Some(next) = next {
                self.ssd_write_blocks(key, next);
            }
        }
        PollStatus::from(progressed)
    }
}
