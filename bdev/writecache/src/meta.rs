//! In-RAM state of each cache block, the sector index, and the free pool.
//!
//! Block ownership rules (who may change what):
//! * a writer owns a block from allocation until it inserts it in the index;
//! * afterwards blocks are freed through [`Meta::begin_free`], a CAS that
//!   exactly one party wins, and only after an epoch grace period do they go
//!   back to the pool ([`FreePool::free_after_grace`]) so no reader that
//!   found them in the index can see them reused;
//! * `gen` increments at every allocation, so logs that remember a block
//!   (write-order logs, supersede logs) can tell a stale reference from the
//!   block they meant.
//!
//! RAM is the budget here (design: ≤ 32 bytes per cache block, all
//! structures together): a block's state is 16 bytes, the index keeps only
//! 32-bit block ids (the key is read back from the block's state), the free
//! pool and the writeback queue 4 bytes per block each.

use std::sync::atomic::{fence, AtomicPtr, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam::epoch::{self, Atomic, Guard, Owned};
use crossbeam::utils::CachePadded;

/// Block state bits.
pub(crate) const VALID: u32 = 1;
/// Under writeback: must not be freed by anyone but the writeback.
pub(crate) const WB: u32 = 2;
const STATE_BITS: u32 = 2;
const STATE_MASK: u32 = (1 << STATE_BITS) - 1;
/// Generations are 30 bits (they share a word with the state).
pub(crate) const GEN_MASK: u32 = u32::MAX >> STATE_BITS;

/// How far back (in commits) a block's in-RAM sequence may lag the current
/// one before [`Meta::rebase_seqs`] pulls it forward; sequences are kept in
/// 32 bits and compared by wrapping distance, which is exact within 2^31.
pub(crate) const SEQ_WINDOW: u64 = 1 << 29;
/// Every this many commits the lagging sequences are pulled forward, so no
/// live block ever lags by more than `SEQ_WINDOW + SEQ_REBASE_PERIOD`.
pub(crate) const SEQ_REBASE_PERIOD: u64 = 1 << 28;

/// Low 32 bits of a sequence number, as kept in RAM.
#[inline]
pub(crate) fn seq32(seq: u64) -> u32 {
    seq as u32
}

/// Whether in-RAM sequence `a` is `b` or newer (wrapping comparison; exact
/// while the two are within 2^31 of each other).
#[inline]
pub(crate) fn seq_at_or_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

/// Per-block state: 16 bytes.
#[derive(Default)]
pub(crate) struct BlockMeta {
    /// The vbdev LBA (in cache blocks) the block holds; stable while the
    /// block is in the index (the index reads it as the block's key).
    pub(crate) lba: AtomicU64,
    /// Low 32 bits of the sequence number stamped in its entry.
    seq: AtomicU32,
    /// Allocation generation (high 30 bits) and VALID | WB (low 2 bits),
    /// in one word so that checking the generation and changing the state
    /// is a single compare-and-swap (no reuse can slip in between).
    gs: AtomicU32,
}

impl BlockMeta {
    #[inline]
    fn pack(gen: u32, state: u32) -> u32 {
        (gen << STATE_BITS) | state
    }

    /// The generation after `gen` (wraps within 30 bits).
    #[inline]
    pub(crate) fn next_gen(gen: u32) -> u32 {
        gen.wrapping_add(1) & GEN_MASK
    }

    /// Allocation generation.
    #[inline]
    pub(crate) fn gen(&self) -> u32 {
        self.gs.load(Ordering::Acquire) >> STATE_BITS
    }

    /// VALID | WB bits.
    #[inline]
    pub(crate) fn state(&self) -> u32 {
        self.gs.load(Ordering::Acquire) & STATE_MASK
    }

    /// Generation and state read together.
    #[inline]
    pub(crate) fn gen_state(&self) -> (u32, u32) {
        let v = self.gs.load(Ordering::Acquire);
        (v >> STATE_BITS, v & STATE_MASK)
    }

    /// Sets generation and state together (the owner of the block only).
    #[inline]
    pub(crate) fn set(&self, gen: u32, state: u32) {
        self.gs.store(Self::pack(gen, state), Ordering::Release);
    }

    /// The in-RAM (32-bit) sequence of the block's entry.
    #[inline]
    pub(crate) fn seq(&self) -> u32 {
        self.seq.load(Ordering::Acquire)
    }

    /// Records the sequence stamped in the block's entry (the owner only).
    #[inline]
    pub(crate) fn set_seq(&self, seq: u64) {
        self.seq.store(seq32(seq), Ordering::Release);
    }
}

const _: () = assert!(std::mem::size_of::<BlockMeta>() == 16);

/// All blocks' state.
pub(crate) struct Meta {
    blocks: Box<[BlockMeta]>,
}

impl Meta {
    pub(crate) fn new(n: usize) -> Meta {
        Meta {
            blocks: (0..n).map(|_| BlockMeta::default()).collect(),
        }
    }

    /// Starts loading block `b`'s state into the cache (a hint; nothing
    /// for a block out of range).
    #[inline]
    pub(crate) fn prefetch_block(&self, b: u32) {
        if let Some(m) = self.blocks.get(b as usize) {
            prefetch((m as *const BlockMeta).cast());
        }
    }

    /// [`prefetch_block`](Self::prefetch_block) for a block whose state
    /// is written next (a block about to be allocated).
    pub(crate) fn prefetch_block_for_write(&self, b: u32) {
        if let Some(m) = self.blocks.get(b as usize) {
            prefetch_for_write((m as *const BlockMeta).cast());
        }
    }

    #[inline]
    pub(crate) fn get(&self, b: u32) -> &BlockMeta {
        &self.blocks[b as usize]
    }

    /// Bytes of RAM the block states take.
    pub(crate) fn ram_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.blocks)
    }

    /// Takes the right to free `b` (allocation `gen`): true for exactly one
    /// caller, and never while the block is under writeback.
    pub(crate) fn begin_free(&self, b: u32, gen: u32) -> bool {
        self.get(b)
            .gs
            .compare_exchange(
                BlockMeta::pack(gen, VALID),
                BlockMeta::pack(gen, 0),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Marks `b` as under writeback if it is still allocation `gen` and idle.
    pub(crate) fn begin_writeback(&self, b: u32, gen: u32) -> bool {
        self.get(b)
            .gs
            .compare_exchange(
                BlockMeta::pack(gen, VALID),
                BlockMeta::pack(gen, VALID | WB),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Ends writeback of `b`, leaving it VALID.
    pub(crate) fn end_writeback(&self, b: u32) {
        self.get(b).gs.fetch_and(!WB, Ordering::AcqRel);
    }

    /// Takes `b` (allocation `gen`, valid and idle) for an in-place
    /// overwrite (ssd mode). It shares the WB bit with the writeback: while
    /// it is set nobody frees the block and no writeback of it starts, so
    /// the writeback never copies a block whose overwrite is in flight.
    pub(crate) fn begin_inplace(&self, b: u32, gen: u32) -> bool {
        self.begin_writeback(b, gen)
    }

    /// Ends an in-place overwrite of `b`.
    pub(crate) fn end_inplace(&self, b: u32) {
        self.end_writeback(b)
    }

    /// Pulls the in-RAM sequence of every block lagging `current` by more
    /// than `SEQ_WINDOW` forward to exactly that lag, so wrapping
    /// comparisons with the current sequence stay exact. Such a block is
    /// long committed and stays "older than current" either way. A writer
    /// that restamps the block meanwhile wins (compare-and-swap).
    pub(crate) fn rebase_seqs(&self, current: u64) {
        let cur = seq32(current);
        let floor = cur.wrapping_sub(SEQ_WINDOW as u32);
        for m in self.blocks.iter() {
            let s = m.seq.load(Ordering::Acquire);
            if cur.wrapping_sub(s) as u64 > SEQ_WINDOW {
                let _ = m
                    .seq
                    .compare_exchange(s, floor, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }
}

/// Starts loading the cache line at `p` into the cache (a hint).
#[inline]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch never faults and reads nothing observable.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Like [`prefetch`], with the intent to write (`prefetchw`): the line
/// arrives owned, so a store or locked instruction later finds it without
/// asking another core for it.
#[inline]
pub(crate) fn prefetch_for_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    if *HAS_PREFETCHW {
        // SAFETY: PREFETCHW exists on this CPU (checked once, below); a
        // prefetch never faults, whatever the address, and changes no
        // register, flag or memory contents.
        unsafe {
            std::arch::asm!("prefetchw [{p}]", p = in(reg) p, options(nostack, preserves_flags, readonly));
        }
    } else {
        prefetch(p);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Whether the CPU has PREFETCHW (CPUID 0x8000_0001 ECX bit 8, "3DNow!
/// prefetch"); without the `prfchw` target feature LLVM turns a
/// write-intent `_mm_prefetch` into a plain read prefetch.
#[cfg(target_arch = "x86_64")]
static HAS_PREFETCHW: std::sync::LazyLock<bool> = std::sync::LazyLock::new(has_prefetchw);

// `__cpuid` is a safe function in newer Rust, an unsafe one in our
// minimum (1.85).
#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)]
fn has_prefetchw() -> bool {
    use std::arch::x86_64::__cpuid;
    // SAFETY: CPUID is available on every x86_64 CPU; the extended leaf is
    // only read when the maximum extended leaf covers it.
    unsafe { __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0 }
}

/// The slot marker of an empty index slot (block ids are below it).
const EMPTY: u32 = u32::MAX;
/// Largest distance of an entry from its home slot; an insert that would
/// go further grows the shard instead.
const MAX_DISP: usize = u8::MAX as usize;

/// The slots of one shard: Robin Hood linear probing over 32-bit block
/// ids, with each entry's tag in a parallel array: its distance from its
/// home slot (low byte) and a fingerprint of its LBA (high byte, see
/// [`fingerprint`]). The key (the LBA) is not stored: it is the block's
/// `lba`. The distance lets a probe skip entries of other home slots
/// without reading their block's state, stop early on a miss (clusters are
/// ordered by home slot), and lets a removal shift entries back without
/// rehashing them; the fingerprint lets it skip the entries of its own
/// home slot that hold other LBAs (all but 1 in 256) without reading their
/// block's state either: that read is a cache miss of its own, after the
/// slot's, on a random write to a large cache.
///
/// Readers probe without the shard's lock (every slot is an atomic, read
/// relaxed, and the shard's version tells them whether a writer moved
/// entries meanwhile); writers change slots only under the lock.
struct Slots {
    ids: Box<[AtomicU32]>,
    tags: Box<[AtomicU16]>,
}

/// What a probe found: the slot holding the key and its block, or the slot
/// (and its distance from the key's home) where the key belongs.
enum Probe {
    Found(usize, u32),
    Vacant(usize, usize),
}

impl Slots {
    fn with_capacity(cap: usize) -> Slots {
        // At least a group's worth, so a group's homes never wrap twice.
        let cap = cap.max(GROUP as usize);
        Slots {
            ids: (0..cap).map(|_| AtomicU32::new(EMPTY)).collect(),
            tags: (0..cap).map(|_| AtomicU16::new(0)).collect(),
        }
    }

    #[inline]
    fn cap(&self) -> usize {
        self.ids.len()
    }

    /// The home slot of `lba` (whose group hashes to `h`): the group's
    /// home plus the LBA's place in the group, so the blocks of one
    /// sequential I/O sit in neighbouring slots.
    #[inline]
    fn home(&self, h: u32, lba: u64) -> usize {
        home_of(h, lba, self.cap())
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.cap() {
            0
        } else {
            i + 1
        }
    }

    #[inline]
    fn id(&self, i: usize) -> u32 {
        self.ids[i].load(Ordering::Relaxed)
    }

    /// Slot `i`'s tag: fingerprint `<< 8 |` distance.
    #[inline]
    fn tag(&self, i: usize) -> u16 {
        self.tags[i].load(Ordering::Relaxed)
    }

    #[inline]
    fn dist(&self, i: usize) -> usize {
        (self.tag(i) & 0xff) as usize
    }

    /// Writes slot `i` (writers, under the shard's lock): block `b` at
    /// distance `d` (at most [`MAX_DISP`]) with fingerprint `fp`.
    #[inline]
    fn put(&self, i: usize, b: u32, d: usize, fp: u8) {
        debug_assert!(d <= MAX_DISP);
        self.put_tag(i, b, (fp as u16) << 8 | d as u16);
    }

    #[inline]
    fn put_tag(&self, i: usize, b: u32, tag: u16) {
        self.ids[i].store(b, Ordering::Relaxed);
        self.tags[i].store(tag, Ordering::Relaxed);
    }

    /// Finds `lba`. `candidate` sees each block whose LBA is compared (a
    /// reader prefetches its data while the comparison waits for memory).
    /// Ends within `MAX_DISP + 1` steps even on slots a writer is moving
    /// (distances never exceed `MAX_DISP`).
    #[inline]
    fn probe(&self, meta: &Meta, lba: u64, h: u32, mut candidate: impl FnMut(u32)) -> Probe {
        let mut i = self.home(h, lba);
        let mut d = 0;
        // The tag an entry for `lba` has at distance `d`: `want + d`.
        let want = (fingerprint(h) as u16) << 8;
        loop {
            let b = self.id(i);
            let tag = self.tag(i);
            // Entries closer to their home than we are to ours have homes
            // after ours: the key would sit before them.
            if b == EMPTY || ((tag & 0xff) as usize) < d {
                return Probe::Vacant(i, d);
            }
            // Same home (distance) and fingerprint: maybe ours.
            if tag == want | d as u16 {
                candidate(b);
                if meta.get(b).lba.load(Ordering::Relaxed) == lba {
                    return Probe::Found(i, b);
                }
            }
            i = self.next(i);
            d += 1;
        }
    }

    /// Puts `b` at slot `i` (distance `d`), shifting the rest of the
    /// cluster one slot on; false (nothing changed) if a distance would
    /// overflow or no slot is empty.
    fn insert_at(&self, len: &mut usize, i: usize, d: usize, b: u32, fp: u8) -> bool {
        if d > MAX_DISP || *len + 1 >= self.cap() {
            return false;
        }
        let mut e = i;
        while self.id(e) != EMPTY {
            if self.dist(e) == MAX_DISP {
                return false;
            }
            e = self.next(e);
        }
        // Shift [i, e) one slot on, back to front.
        while e != i {
            let p = if e == 0 { self.cap() - 1 } else { e - 1 };
            // Distance + 1 (below MAX_DISP: checked above), same
            // fingerprint.
            self.put_tag(e, self.id(p), self.tag(p) + 1);
            e = p;
        }
        self.put(i, b, d, fp);
        *len += 1;
        true
    }

    fn remove_at(&self, len: &mut usize, mut hole: usize) {
        let mut j = self.next(hole);
        // Shift the rest of the cluster back: each entry away from its
        // home moves one step closer (Robin Hood keeps homes in order, so
        // the first entry at its home ends the cluster).
        while self.id(j) != EMPTY && self.dist(j) > 0 {
            // Distance - 1 (above 0), same fingerprint.
            self.put_tag(hole, self.id(j), self.tag(j) - 1);
            hole = j;
            j = self.next(j);
        }
        self.put_tag(hole, EMPTY, 0);
        *len -= 1;
    }

    /// A copy with at least `cap` slots (rehashing every entry through
    /// `meta`).
    fn regrown(&self, meta: &Meta, mut cap: usize) -> Slots {
        loop {
            let t = Slots::with_capacity(cap);
            let mut len = 0;
            let fits = self
                .ids
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .filter(|&b| b != EMPTY)
                .all(|b| t.place(meta, &mut len, b));
            if fits {
                return t;
            }
            // Only pathological hash clustering gets here: spread wider.
            cap *= 2;
        }
    }

    /// Places `b` (whose LBA is not in the table).
    fn place(&self, meta: &Meta, len: &mut usize, b: u32) -> bool {
        let lba = meta.get(b).lba.load(Ordering::Relaxed);
        let (_, h) = Index::hash(lba);
        match self.probe(meta, lba, h, |_| {}) {
            Probe::Vacant(i, d) => self.insert_at(len, i, d, b, fingerprint(h)),
            Probe::Found(..) => false,
        }
    }
}

/// The fingerprint an index entry keeps of its LBA (whose group hashes to
/// `h`): bits of the hash that the home slot does not use (it takes the
/// top ones). LBAs that share a home slot are of different groups (the
/// LBAs of one group have distinct homes), so their fingerprints differ
/// but for one pair in 256.
#[inline]
fn fingerprint(h: u32) -> u8 {
    h as u8
}

/// The home slot of `lba` (whose group hashes to `h`) among `cap` slots.
#[inline]
fn home_of(h: u32, lba: u64, cap: usize) -> usize {
    // Fast range reduction: the table size need not be a power of two,
    // so the index can be sized close to the cache.
    let i = ((h as u64 * cap as u64) >> 32) as usize + (lba % GROUP) as usize;
    if i >= cap {
        i - cap
    } else {
        i
    }
}

/// One shard: its slots, the writers' lock, and a version readers check.
struct Shard {
    /// Serializes writers; holds the number of entries.
    lock: Mutex<usize>,
    /// Even while the slots are stable, odd while a writer moves entries
    /// (a seqlock: a reader whose probe saw two different versions, or an
    /// odd one, probes again).
    version: AtomicU64,
    /// Replaced (and the old one freed after a grace period) when the
    /// shard grows.
    slots: Atomic<Slots>,
    /// Where the current slots' arrays are and how many slots they have,
    /// for prefetching without a pin: only ever used to compute an
    /// address to prefetch (never dereferenced), so a stale or mismatched
    /// triple costs a useless prefetch, nothing else.
    ids_hint: AtomicPtr<AtomicU32>,
    tags_hint: AtomicPtr<AtomicU16>,
    cap_hint: AtomicUsize,
}

impl Shard {
    fn new(cap: usize) -> Shard {
        let shard = Shard {
            lock: Mutex::new(0),
            version: AtomicU64::new(0),
            slots: Atomic::new(Slots::with_capacity(cap)),
            ids_hint: AtomicPtr::new(std::ptr::null_mut()),
            tags_hint: AtomicPtr::new(std::ptr::null_mut()),
            cap_hint: AtomicUsize::new(0),
        };
        let l = shard.lock();
        shard.set_hints(shard.slots_locked(&l));
        drop(l);
        shard
    }

    /// Records where `slots` (now the current ones) live, for prefetches.
    fn set_hints(&self, slots: &Slots) {
        self.ids_hint
            .store(slots.ids.as_ptr() as *mut AtomicU32, Ordering::Relaxed);
        self.tags_hint
            .store(slots.tags.as_ptr() as *mut AtomicU16, Ordering::Relaxed);
        self.cap_hint.store(slots.cap(), Ordering::Relaxed);
    }

    /// The writers' lock (and the entry count).
    fn lock(&self) -> MutexGuard<'_, usize> {
        // A poisoned lock only means a panic elsewhere; the slots
        // themselves are consistent after every operation.
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current slots, for a writer holding the lock.
    fn slots_locked<'a>(&'a self, _lock: &MutexGuard<'a, usize>) -> &'a Slots {
        // SAFETY: only a lock holder (the caller, see `_lock`) replaces the
        // slots, old ones are freed after a grace period; never null.
        unsafe {
            self.slots
                .load(Ordering::Acquire, epoch::unprotected())
                .deref()
        }
    }

    /// Runs `f`, which moves entries, as a seqlock write section.
    #[inline]
    fn moving<R>(&self, f: impl FnOnce() -> R) -> R {
        let v = self.version.load(Ordering::Relaxed);
        self.version.store(v.wrapping_add(1), Ordering::Relaxed);
        // The odd version is visible before any slot changes.
        fence(Ordering::Release);
        let r = f();
        self.version.store(v.wrapping_add(2), Ordering::Release);
        r
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader or writer is left; the slots were
        // allocated by `Atomic::new` / `Owned::new` and are freed once.
        unsafe {
            let s = self.slots.load(Ordering::Relaxed, epoch::unprotected());
            if !s.is_null() {
                drop(s.into_owned());
            }
        }
    }
}

/// The concurrent sector index: LBA → cache block, sharded by LBA hash so
/// that cores writing different sectors almost never meet on a lock. There
/// is no global lock; each shard's write section is one short probe, and
/// readers take no lock at all (they probe and check the shard's version).
pub(crate) struct Index {
    shards: Box<[CachePadded<Shard>]>,
}

/// LBAs per hash group (a 128 KiB I/O of 4 KiB blocks).
const GROUP: u64 = 32;
/// Shards in the index (a power of two; the top hash bits pick one).
const SHARDS: usize = 256;
/// Slots per expected entry: a full cache keeps its shards at 80% load.
const SLOTS_PER_ENTRY: f64 = 1.25;
/// A shard that gets fuller than this (an unlucky LBA mix) grows.
const MAX_LOAD_PCT: usize = 90;

impl Index {
    /// An index for up to `expected` entries (the cache's block count).
    pub(crate) fn new(expected: usize) -> Index {
        let per = (expected as f64 / SHARDS as f64 * SLOTS_PER_ENTRY) as usize + 8;
        Index {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(Shard::new(per)))
                .collect(),
        }
    }

    /// Shard (top 8 bits) and in-shard hash (the next 32) of an LBA's
    /// group of `GROUP` neighbouring LBAs: one I/O's blocks take one
    /// shard's lock once (see [`Index::insert_run`]) and share slot cache
    /// lines. Fibonacci hashing spreads neighbouring groups over all
    /// shards, so sequential writers on several cores do not meet on one
    /// lock.
    #[inline]
    fn hash(lba: u64) -> (usize, u32) {
        let g = lba / GROUP;
        let x = (g ^ (g >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((x >> 56) as usize, (x >> 24) as u32)
    }

    /// The block `lba` maps to (pins the epoch itself).
    #[inline]
    pub(crate) fn get(&self, meta: &Meta, lba: u64) -> Option<u32> {
        self.lookup(meta, lba, &epoch::pin(), |_| {})
    }

    /// The block `lba` maps to, without a lock: probes the shard's slots
    /// and probes again if a writer moved entries meanwhile. `guard` keeps
    /// slots a writer replaced (and blocks freed) from being reused while
    /// the caller looks at them. `candidate` sees each block compared on
    /// the way (see [`Slots::probe`]).
    #[inline]
    pub(crate) fn lookup(
        &self,
        meta: &Meta,
        lba: u64,
        guard: &Guard,
        mut candidate: impl FnMut(u32),
    ) -> Option<u32> {
        let (s, h) = Self::hash(lba);
        let shard = &self.shards[s];
        let mut tries = 0u32;
        loop {
            let v = shard.version.load(Ordering::Acquire);
            if v & 1 == 0 {
                // SAFETY: never null; `guard` keeps slots a writer replaced
                // after this load alive until the caller unpins.
                let slots = unsafe { shard.slots.load(Ordering::Acquire, guard).deref() };
                let found = slots.probe(meta, lba, h, &mut candidate);
                // The probe's loads happen before the version re-check.
                fence(Ordering::Acquire);
                if shard.version.load(Ordering::Relaxed) == v {
                    return match found {
                        Probe::Found(_, b) => Some(b),
                        Probe::Vacant(..) => None,
                    };
                }
            }
            // A writer moved entries (or is moving them): probe again. A
            // writer preempted mid-change gets the core after a while.
            tries += 1;
            if tries % 64 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Starts loading the slots where `lba` would be (a hint: a later
    /// lookup finds them in the cache).
    #[inline]
    pub(crate) fn prefetch_slot(&self, lba: u64) {
        let (_, ids, tags) = self.home_hint(lba);
        prefetch(ids);
        prefetch(tags);
    }

    /// `lba`'s shard and the addresses of its home slot's id and tag, from
    /// the shard's hints. Without a pin the slots may be replaced and
    /// freed meanwhile: the addresses are only for prefetching, never read.
    #[inline]
    fn home_hint(&self, lba: u64) -> (&Shard, *const u8, *const u8) {
        let (s, h) = Self::hash(lba);
        let shard = &self.shards[s];
        let cap = shard.cap_hint.load(Ordering::Relaxed).max(1);
        let i = home_of(h, lba, cap);
        (
            shard,
            shard.ids_hint.load(Ordering::Relaxed).wrapping_add(i) as *const u8,
            shard.tags_hint.load(Ordering::Relaxed).wrapping_add(i) as *const u8,
        )
    }

    /// Asks for the lines an insert of `lba` writes first — its shard's
    /// lock (with the seqlock version) and the home slot's id and tag — in
    /// the owned state, ahead of the insert: a write whose data copy runs
    /// between its lookup and its insert (ssd mode) then takes the lock
    /// without waiting for the line from the core that took it last.
    #[inline]
    pub(crate) fn prefetch_insert(&self, lba: u64) {
        let (shard, ids, tags) = self.home_hint(lba);
        prefetch_for_write(shard as *const Shard as *const u8);
        prefetch_for_write(ids);
        prefetch_for_write(tags);
    }

    /// Calls `f` with each block a lookup of `lba` would compare, without
    /// comparing (no read of any block's state): for prefetching ahead of
    /// the lookup. Racing writers may make it name other blocks; harmless.
    #[inline]
    pub(crate) fn prefetch_candidates(&self, lba: u64, guard: &Guard, mut f: impl FnMut(u32)) {
        let (s, h) = Self::hash(lba);
        // SAFETY: never null; `guard` keeps replaced slots alive.
        let slots = unsafe { self.shards[s].slots.load(Ordering::Acquire, guard).deref() };
        let mut i = slots.home(h, lba);
        let want = (fingerprint(h) as u16) << 8;
        for d in 0..=MAX_DISP {
            let b = slots.id(i);
            let tag = slots.tag(i);
            if b == EMPTY || ((tag & 0xff) as usize) < d {
                return;
            }
            if tag == want | d as u16 {
                f(b);
            }
            i = slots.next(i);
        }
    }

    /// Maps `lba` to `b` (whose `lba` field already says so), returning
    /// the block it displaced.
    #[inline]
    pub(crate) fn insert(&self, meta: &Meta, lba: u64, b: u32) -> Option<u32> {
        debug_assert_eq!(meta.get(b).lba.load(Ordering::Relaxed), lba);
        let (s, h) = Self::hash(lba);
        let shard = &self.shards[s];
        let mut len = shard.lock();
        Self::insert_locked(shard, &mut len, meta, lba, h, b)
    }

    /// Maps each `(lba, block)` of `run` (the blocks' `lba` fields already
    /// say so; the LBAs distinct), taking each shard's lock once for the
    /// entries next to each other in `run` that hash to it — one lock for
    /// the blocks of one I/O of up to `GROUP` aligned blocks. Calls
    /// `displaced(k, old)` for each entry `k` that replaced a block.
    pub(crate) fn insert_run(
        &self,
        meta: &Meta,
        run: &[(u64, u32)],
        mut displaced: impl FnMut(usize, u32),
    ) {
        let mut k = 0;
        while k < run.len() {
            let (s, _) = Self::hash(run[k].0);
            let shard = &self.shards[s];
            let mut len = shard.lock();
            while k < run.len() {
                let (lba, b) = run[k];
                let (s2, h) = Self::hash(lba);
                if s2 != s {
                    break;
                }
                debug_assert_eq!(meta.get(b).lba.load(Ordering::Relaxed), lba);
                if let Some(old) = Self::insert_locked(shard, &mut len, meta, lba, h, b) {
                    displaced(k, old);
                }
                k += 1;
            }
        }
    }

    /// One insert into `shard`, whose lock the caller holds (`len`).
    #[inline]
    fn insert_locked(
        shard: &Shard,
        len: &mut MutexGuard<'_, usize>,
        meta: &Meta,
        lba: u64,
        h: u32,
        b: u32,
    ) -> Option<u32> {
        loop {
            let slots = shard.slots_locked(len);
            match slots.probe(meta, lba, h, |_| {}) {
                // One store: a reader sees the old block or the new one,
                // both mapped to `lba` (the old one is not reused before
                // the reader unpins), so no version change. Writers are
                // serialized by the lock: no read-modify-write needed.
                Probe::Found(i, old) => {
                    slots.ids[i].store(b, Ordering::Relaxed);
                    return Some(old);
                }
                Probe::Vacant(i, d) => {
                    if (**len + 1) * 100 <= slots.cap() * MAX_LOAD_PCT {
                        let mut n = **len;
                        if shard.moving(|| slots.insert_at(&mut n, i, d, b, fingerprint(h))) {
                            **len = n;
                            return None;
                        }
                    }
                    // Too full (an unlucky LBA mix) or too clustered.
                    let grown = slots.regrown(meta, slots.cap() + slots.cap() / 2);
                    let guard = epoch::pin();
                    let old = shard.moving(|| {
                        shard
                            .slots
                            .swap(Owned::new(grown), Ordering::AcqRel, &guard)
                    });
                    shard.set_hints(shard.slots_locked(len));
                    // SAFETY: unlinked above; readers that still see it
                    // are pinned, and it is freed after they unpin.
                    unsafe { guard.defer_destroy(old) };
                }
            }
        }
    }

    /// Removes `lba` only if it still maps to `b`.
    pub(crate) fn remove_if(&self, meta: &Meta, lba: u64, b: u32) -> bool {
        let (s, h) = Self::hash(lba);
        let shard = &self.shards[s];
        let mut len = shard.lock();
        let slots = shard.slots_locked(&len);
        match slots.probe(meta, lba, h, |_| {}) {
            Probe::Found(i, found) if found == b => {
                shard.moving(|| slots.remove_at(&mut len, i));
                true
            }
            _ => false,
        }
    }

    /// Number of mapped LBAs.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| *s.lock()).sum()
    }

    /// Bytes of RAM the index holds.
    pub(crate) fn ram_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let l = s.lock();
                s.slots_locked(&l).cap() * 6
            })
            .sum()
    }
}

/// The free blocks themselves: a stack (pmem mode: the most recently freed
/// block is reused first, still warm in the CPU cache) or a sorted set
/// (ssd mode: the lowest free block goes out first, so cache-device writes
/// stay mostly sequential, as dm-writecache's sorted freelist).
enum Blocks {
    Lifo(Vec<u32>),
    Sorted(SortedBlocks),
}

impl Blocks {
    fn len(&self) -> usize {
        match self {
            Blocks::Lifo(v) => v.len(),
            Blocks::Sorted(s) => s.len,
        }
    }

    fn extend(&mut self, blocks: &[u32]) {
        match self {
            Blocks::Lifo(v) => v.extend_from_slice(blocks),
            Blocks::Sorted(s) => s.extend(blocks),
        }
    }

    /// Moves `k` blocks into `out` so that `out.pop()` yields them in
    /// allocation order (the stack's top first, or the lowest first).
    fn take(&mut self, k: usize, out: &mut Vec<u32>) {
        match self {
            Blocks::Lifo(v) => {
                let at = v.len() - k;
                out.extend_from_slice(&v[at..]);
                v.truncate(at);
            }
            Blocks::Sorted(s) => {
                let start = out.len();
                s.take_lowest(k, out);
                out[start..].reverse();
            }
        }
    }
}

/// A set of block numbers below a fixed bound, one bit each, handing out
/// the lowest first: a batch of 64 costs a few word scans (a binary heap
/// paid a sift-down of ~log2(n) levels per block, in the allocating
/// write's path).
struct SortedBlocks {
    words: Vec<u64>,
    /// The bound: blocks are below it.
    n: usize,
    len: usize,
    /// Every word below this one is zero.
    low: usize,
}

impl SortedBlocks {
    fn new(n: usize) -> SortedBlocks {
        SortedBlocks {
            words: vec![0; n.div_ceil(64)],
            n,
            len: 0,
            low: 0,
        }
    }

    fn extend(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let w = b as usize / 64;
            let bit = 1u64 << (b % 64);
            match self.words.get_mut(w).filter(|_| (b as usize) < self.n) {
                Some(word) if *word & bit == 0 => {
                    *word |= bit;
                    self.len += 1;
                    self.low = self.low.min(w);
                }
                Some(_) => tracing::error!("writecache: block {b} freed twice"),
                None => tracing::error!("writecache: freed block {b} is past the cache"),
            }
        }
    }

    /// Appends the `k` (at most `len`) lowest blocks to `out`, ascending.
    fn take_lowest(&mut self, k: usize, out: &mut Vec<u32>) {
        let mut left = k.min(self.len);
        self.len -= left;
        let mut w = self.low;
        while left > 0 && w < self.words.len() {
            let word = &mut self.words[w];
            while *word != 0 && left > 0 {
                let bit = word.trailing_zeros();
                *word &= *word - 1;
                out.push((w * 64) as u32 + bit);
                left -= 1;
            }
            if *word == 0 {
                w += 1;
            }
        }
        self.low = w;
    }
}

/// Free blocks: a global pool the writers refill their per-core caches
/// from in batches (one lock round trip per batch, not per block), 4 bytes
/// per block.
pub(crate) struct FreePool {
    stack: Mutex<Blocks>,
    cap: usize,
    /// Mirrors the stack's length (updated under its lock) for lock-free
    /// reads by the watermark and starvation checks.
    len: AtomicU64,
    /// Freed blocks waiting for their grace period (counted as free for
    /// the watermarks: nobody can allocate them, but they are not in use).
    grace: AtomicU64,
}

impl FreePool {
    pub(crate) fn new(n: usize) -> Arc<FreePool> {
        Self::with_blocks(n, Blocks::Lifo(Vec::with_capacity(n)))
    }

    /// A pool that always hands out its lowest free blocks first.
    pub(crate) fn new_sorted(n: usize) -> Arc<FreePool> {
        Self::with_blocks(n, Blocks::Sorted(SortedBlocks::new(n)))
    }

    fn with_blocks(n: usize, blocks: Blocks) -> Arc<FreePool> {
        Arc::new(FreePool {
            stack: Mutex::new(blocks),
            cap: n,
            len: AtomicU64::new(0),
            grace: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Blocks> {
        self.stack.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub(crate) fn push(&self, b: u32) {
        self.push_all(&[b]);
    }

    /// Returns blocks to the pool.
    pub(crate) fn push_all(&self, blocks: &[u32]) {
        let mut s = self.lock();
        // The pool never holds more than the cache's blocks unless a block
        // is freed twice — which the state CAS prevents.
        let room = self.cap - s.len();
        if blocks.len() > room {
            tracing::error!(
                "writecache: free pool overflow ({} blocks, room for {room}; double free?)",
                blocks.len()
            );
        }
        s.extend(&blocks[..blocks.len().min(room)]);
        self.len.store(s.len() as u64, Ordering::Release);
    }

    #[cfg(test)]
    pub(crate) fn pop(&self) -> Option<u32> {
        let mut out = Vec::new();
        self.pop_batch(1, &mut out);
        out.pop()
    }

    /// Moves up to `k` blocks into `out`; returns how many.
    pub(crate) fn pop_batch(&self, k: usize, out: &mut Vec<u32>) -> usize {
        let mut s = self.lock();
        let take = k.min(s.len());
        s.take(take, out);
        self.len.store(s.len() as u64, Ordering::Release);
        take
    }

    /// Blocks freed but still in their grace period.
    pub(crate) fn in_grace(&self) -> u64 {
        self.grace.load(Ordering::Relaxed)
    }

    pub(crate) fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Bytes of RAM the pool holds.
    pub(crate) fn ram_bytes(&self) -> usize {
        match &*self.lock() {
            Blocks::Lifo(_) => self.cap * std::mem::size_of::<u32>(),
            Blocks::Sorted(s) => s.words.len() * 8,
        }
    }

    /// Returns `blocks` to the pool once every reader pinned now has
    /// unpinned (one deferred closure per batch).
    pub(crate) fn free_after_grace(self: &Arc<Self>, blocks: Vec<u32>) {
        if blocks.is_empty() {
            return;
        }
        self.grace.fetch_add(blocks.len() as u64, Ordering::Relaxed);
        self.reserved_free_after_grace(blocks);
    }

    /// Counts `n` blocks as on their way back (free for the watermarks and
    /// stats) before [`reserved_free_after_grace`] returns them: in ssd
    /// mode a freed block waits for its cleared entry to be durable first.
    ///
    /// [`reserved_free_after_grace`]: Self::reserved_free_after_grace
    pub(crate) fn reserve_grace(&self, n: u64) {
        self.grace.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes back a [`reserve_grace`](Self::reserve_grace) of blocks that
    /// will not come back (the instance failed to persist their frees).
    pub(crate) fn unreserve_grace(&self, n: u64) {
        self.grace.fetch_sub(n, Ordering::Relaxed);
    }

    /// [`free_after_grace`](Self::free_after_grace) for blocks already
    /// counted by [`reserve_grace`](Self::reserve_grace).
    pub(crate) fn reserved_free_after_grace(self: &Arc<Self>, blocks: Vec<u32>) {
        if blocks.is_empty() {
            return;
        }
        let me = self.clone();
        let n = blocks.len() as u64;
        let guard = crossbeam::epoch::pin();
        guard.defer(move || {
            me.push_all(&blocks);
            me.grace.fetch_sub(n, Ordering::Relaxed);
        });
        // Push the deferred work out promptly so freed blocks return soon.
        guard.flush();
    }
}

#[cfg(test)]
mod tests {
    //! Model tests: `Index` against a `HashMap`, the `Meta` free/writeback
    //! protocol against a small state machine, `FreePool` against a bounded
    //! queue. Seeded and deterministic.

    use super::*;
    use std::collections::HashMap;

    /// xorshift64: tiny, seeded, reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// LBAs that exercise the sharding: dense small ones, pairs that share a
    /// shard ((lba ^ lba >> 8) & 255 is 0 for 0, 257, 514...), and huge ones.
    fn pick_lba(rng: &mut Rng) -> u64 {
        match rng.below(4) {
            0 | 1 => rng.below(64),
            2 => rng.below(8) * 257,
            _ => u64::MAX - rng.below(4),
        }
    }

    /// Maps LBAs to blocks the way the cache does: each insert takes a free
    /// block and records its LBA in `meta` first; displaced and removed
    /// blocks go back to the free list.
    struct IndexRig {
        meta: Meta,
        index: Index,
        free: Vec<u32>,
    }

    impl IndexRig {
        fn new(blocks: u32, expected: usize) -> IndexRig {
            IndexRig {
                meta: Meta::new(blocks as usize),
                index: Index::new(expected),
                free: (0..blocks).rev().collect(),
            }
        }

        fn insert(&mut self, lba: u64) -> (u32, Option<u32>) {
            let b = self.free.pop().expect("rig has free blocks");
            self.meta.get(b).lba.store(lba, Ordering::Relaxed);
            // As ssd mode's writes do (hints that go stale as shards grow).
            self.index.prefetch_insert(lba);
            self.meta.prefetch_block_for_write(b);
            let old = self.index.insert(&self.meta, lba, b);
            if let Some(o) = old {
                self.free.push(o);
            }
            (b, old)
        }
    }

    /// A write-intent prefetch is a hint: any address (null, unmapped,
    /// the top of the address space) is harmless; PREFETCHW is detected as
    /// the kernel reports it.
    #[test]
    fn prefetch_for_write_takes_any_address() {
        prefetch_for_write(std::ptr::null());
        prefetch_for_write(0x10 as *const u8);
        prefetch_for_write(usize::MAX as *const u8);
        let rig = IndexRig::new(4, 4);
        rig.meta.prefetch_block_for_write(u32::MAX); // out of range: nothing
        rig.index.prefetch_insert(u64::MAX);
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
            let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
            let listed = flags.split_whitespace().any(|f| f == "3dnowprefetch");
            assert_eq!(*HAS_PREFETCHW, listed, "CPUID vs /proc/cpuinfo");
        }
    }

    #[test]
    fn index_matches_hashmap_model() {
        for seed in [1u64, 0xDEAD_BEEF, 0x1234_5678_9ABC_DEF1] {
            let mut rng = Rng(seed);
            // Sized for 16 entries, holding up to 300: shards must grow.
            let mut rig = IndexRig::new(400, 16);
            let mut model: HashMap<u64, u32> = HashMap::new();
            for op in 0..20_000 {
                let lba = pick_lba(&mut rng);
                match rng.below(10) {
                    0..=3 if model.len() < 300 || model.contains_key(&lba) => {
                        let (b, old) = rig.insert(lba);
                        assert_eq!(
                            old,
                            model.insert(lba, b),
                            "seed {seed} op {op}: insert({lba})"
                        );
                    }
                    4..=5 => {
                        // Half the time the current block, else another.
                        let b = match model.get(&lba) {
                            Some(&b) if rng.below(2) == 0 => b,
                            _ => rng.below(400) as u32,
                        };
                        let want = model.get(&lba) == Some(&b);
                        if want {
                            model.remove(&lba);
                            rig.free.push(b);
                        }
                        assert_eq!(
                            rig.index.remove_if(&rig.meta, lba, b),
                            want,
                            "seed {seed} op {op}: remove_if({lba}, {b})"
                        );
                    }
                    _ => assert_eq!(
                        rig.index.get(&rig.meta, lba),
                        model.get(&lba).copied(),
                        "seed {seed} op {op}: get({lba})"
                    ),
                }
                if op % 64 == 0 {
                    assert_eq!(rig.index.len(), model.len(), "seed {seed} op {op}: len");
                }
            }
            for (&lba, &b) in &model {
                assert_eq!(rig.index.get(&rig.meta, lba), Some(b));
            }
            assert_eq!(rig.index.len(), model.len());
        }
    }

    /// Dense and clustered keys fill shards far past their initial size;
    /// removal in every order keeps every other key findable (the backward
    /// shift of a linear-probing cluster).
    #[test]
    fn index_grows_and_shifts_back_correctly() {
        let n = 20_000u32;
        let mut rig = IndexRig::new(n, 64);
        // LBAs sharing the low bits, which a weak hash would cluster.
        let lbas: Vec<u64> = (0..n as u64).map(|i| i << 20).collect();
        for &l in &lbas {
            assert_eq!(rig.insert(l).1, None);
        }
        assert_eq!(rig.index.len(), n as usize);
        let mut rng = Rng(77);
        let mut order = lbas.clone();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for (k, &l) in order.iter().enumerate() {
            let b = rig.index.get(&rig.meta, l).expect("present");
            assert!(rig.index.remove_if(&rig.meta, l, b));
            if k % 997 == 0 {
                for &r in &order[k + 1..] {
                    assert!(
                        rig.index.get(&rig.meta, r).is_some(),
                        "lost {r} after {k} removals"
                    );
                }
            }
        }
        assert_eq!(rig.index.len(), 0);
    }

    /// Lock-free lookups while a writer shifts entries (inserts and
    /// removals around them) and grows the shards: a key that stays mapped
    /// is always found, with its block, and a key never mapped never is.
    #[test]
    fn index_lookups_stay_exact_while_writers_move_entries() {
        use std::sync::atomic::AtomicBool;
        const STABLE: u64 = 512;
        const CHURN: u64 = 4096;
        // Sized small: the churn grows the shards several times.
        let meta = Meta::new((STABLE + CHURN) as usize);
        let index = Index::new(64);
        for l in 0..STABLE {
            meta.get(l as u32).lba.store(l * 3, Ordering::Relaxed);
            assert_eq!(index.insert(&meta, l * 3, l as u32), None);
        }
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let (meta, index, stop) = (&meta, &index, &stop);
            s.spawn(move || {
                // Churn LBAs interleave with the stable ones (3l + 1).
                for round in 0..20u64 {
                    for k in 0..CHURN {
                        let b = (STABLE + k) as u32;
                        let l = (k + round * 7) * 3 + 1;
                        meta.get(b).lba.store(l, Ordering::Relaxed);
                        index.insert(meta, l, b);
                    }
                    for k in 0..CHURN {
                        let b = (STABLE + k) as u32;
                        let l = meta.get(b).lba.load(Ordering::Relaxed);
                        assert!(index.remove_if(meta, l, b));
                    }
                }
                stop.store(true, Ordering::Release);
            });
            let mut rng = Rng(99);
            let mut checks = 0u64;
            while !stop.load(Ordering::Acquire) || checks < 10_000 {
                let guard = epoch::pin();
                let l = rng.below(STABLE);
                assert_eq!(index.lookup(meta, l * 3, &guard, |_| {}), Some(l as u32));
                assert_eq!(index.lookup(meta, l * 3 + 2, &guard, |_| {}), None);
                checks += 1;
            }
        });
        assert_eq!(index.len(), STABLE as usize);
    }

    /// A run of neighbouring LBAs (crossing groups, so several shards) is
    /// mapped like one insert per entry, and each displaced block is named
    /// with its entry.
    #[test]
    fn insert_run_maps_every_entry_and_names_what_it_displaced() {
        let meta = Meta::new(400);
        let index = Index::new(64);
        let first: Vec<(u64, u32)> = (0..100u32).map(|k| (7 + k as u64, k)).collect();
        // Every other LBA of the second run is new; the rest replace.
        let second: Vec<(u64, u32)> = (0..100u32).map(|k| (7 + 2 * k as u64, 200 + k)).collect();
        for &(l, b) in first.iter().chain(&second) {
            meta.get(b).lba.store(l, Ordering::Relaxed);
        }
        index.insert_run(&meta, &first, |k, old| panic!("entry {k} displaced {old}"));
        let mut got = Vec::new();
        index.insert_run(&meta, &second, |k, old| got.push((k, old)));
        let want: Vec<(usize, u32)> = (0..50).map(|k| (k, 2 * k as u32)).collect();
        assert_eq!(got, want);
        for &(l, b) in &second {
            assert_eq!(index.get(&meta, l), Some(b));
        }
        for &(l, b) in first.iter().filter(|(l, _)| (l - 7) % 2 == 1) {
            assert_eq!(index.get(&meta, l), Some(b));
        }
        assert_eq!(index.len(), 150);
    }

    #[test]
    fn index_remove_if_only_removes_the_named_block() {
        let mut rig = IndexRig::new(8, 0);
        assert_eq!(rig.index.len(), 0);
        let (b1, _) = rig.insert(0);
        let (b2, _) = rig.insert(257);
        let (b3, old) = rig.insert(0);
        assert_eq!(old, Some(b1));
        let (m, i) = (&rig.meta, &rig.index);
        assert!(!i.remove_if(m, 0, b1), "stale block must not unmap");
        assert!(!i.remove_if(m, 0, b2), "another LBA's block must not unmap");
        assert_eq!(i.get(m, 0), Some(b3));
        assert!(i.remove_if(m, 0, b3));
        assert!(!i.remove_if(m, 0, b3), "exactly once");
        assert_eq!((i.get(m, 0), i.get(m, 257)), (None, Some(b2)));
        assert_eq!(i.len(), 1);
    }

    /// LBAs whose entries share a shard and a home slot (in a fresh
    /// index's 32-slot shards) and a fingerprint: only their blocks' LBAs
    /// tell them apart.
    fn lbas_with_one_fingerprint(n: usize) -> Vec<u64> {
        let mut seen: HashMap<(usize, usize, u8), Vec<u64>> = HashMap::new();
        for g in 0.. {
            let lba = g * GROUP + 5;
            let (s, h) = Index::hash(lba);
            let v = seen
                .entry((s, home_of(h, lba, GROUP as usize), fingerprint(h)))
                .or_default();
            v.push(lba);
            if v.len() == n {
                return v.clone();
            }
        }
        unreachable!()
    }

    #[test]
    fn index_tells_apart_lbas_with_one_home_and_fingerprint() {
        let lbas = lbas_with_one_fingerprint(3);
        let mut rig = IndexRig::new(16, 0);
        let blocks: Vec<u32> = lbas.iter().map(|&l| rig.insert(l).0).collect();
        for (&l, &b) in lbas.iter().zip(&blocks) {
            assert_eq!(rig.index.get(&rig.meta, l), Some(b), "lba {l}");
        }
        // An overwrite of the last one displaces its own block only.
        let (b, old) = rig.insert(lbas[2]);
        assert_eq!(old, Some(blocks[2]));
        // Removing the first shifts the others back; each still found.
        assert!(!rig.index.remove_if(&rig.meta, lbas[0], blocks[1]));
        assert!(rig.index.remove_if(&rig.meta, lbas[0], blocks[0]));
        assert_eq!(rig.index.get(&rig.meta, lbas[0]), None);
        assert_eq!(rig.index.get(&rig.meta, lbas[1]), Some(blocks[1]));
        assert_eq!(rig.index.get(&rig.meta, lbas[2]), Some(b));
        assert_eq!(rig.index.len(), 2);
    }

    #[test]
    fn index_ram_is_about_seven_and_a_half_bytes_per_block() {
        let i = Index::new(1 << 20);
        let per = i.ram_bytes() as f64 / (1 << 20) as f64;
        assert!((7.0..8.0).contains(&per), "{per} bytes per block");
    }

    #[test]
    fn wrapping_sequence_comparison() {
        assert!(seq_at_or_after(5, 5));
        assert!(seq_at_or_after(6, 5));
        assert!(!seq_at_or_after(4, 5));
        // Across the 32-bit wrap.
        assert!(seq_at_or_after(seq32(1 << 32), seq32((1 << 32) - 1)));
        assert!(!seq_at_or_after(seq32((1 << 32) - 1), seq32(1 << 32)));
    }

    #[test]
    fn rebase_keeps_old_blocks_older_than_current() {
        let meta = Meta::new(3);
        meta.get(0).set_seq(10); // ancient
        meta.get(1).set_seq(5_000_000_000); // recent
        meta.get(2).set_seq(5_000_000_001); // current
        let cur = 5_000_000_001u64;
        // Without the rebase the ancient block would look like the future.
        let stale = 10 + (1u64 << 32) * 2 - cur;
        assert!(stale > 0);
        meta.rebase_seqs(cur);
        let c = seq32(cur);
        assert_eq!(meta.get(0).seq(), c.wrapping_sub(SEQ_WINDOW as u32));
        assert!(!seq_at_or_after(meta.get(0).seq(), c));
        assert_eq!(meta.get(1).seq(), seq32(5_000_000_000), "recent untouched");
        assert!(seq_at_or_after(meta.get(2).seq(), c));
        // A block that lags by the maximum between rebases still compares
        // as older.
        let lag = SEQ_WINDOW + SEQ_REBASE_PERIOD;
        assert!(!seq_at_or_after(seq32(cur - lag), seq32(cur - 1)));
    }

    /// One block of the state-machine model.
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    struct Model {
        gen: u32,
        valid: bool,
        wb: bool,
    }

    /// What the write path does to a block it takes from the free pool.
    fn allocate(meta: &Meta, b: u32) -> u32 {
        let m = meta.get(b);
        let gen = BlockMeta::next_gen(m.gen());
        m.set(gen, VALID);
        gen
    }

    fn observe(meta: &Meta, b: u32) -> Model {
        let m = meta.get(b);
        let s = m.state();
        assert_eq!(s & !(VALID | WB), 0, "unknown state bits {s:#x}");
        Model {
            gen: m.gen(),
            valid: s & VALID != 0,
            wb: s & WB != 0,
        }
    }

    #[test]
    fn meta_free_and_writeback_match_state_machine() {
        const N: u32 = 8;
        let mut rng = Rng(0x05EE_D0FA_CE00);
        let meta = Meta::new(N as usize);
        let mut model = vec![Model::default(); N as usize];
        let mut frees = vec![0u32; N as usize];
        let mut allocs = vec![0u32; N as usize];
        for op in 0..50_000 {
            let b = rng.below(N as u64) as u32;
            let mb = &mut model[b as usize];
            // Mostly the current generation, sometimes a stale or future one.
            let gen = match rng.below(4) {
                0 => mb.gen.wrapping_sub(1 + rng.below(3) as u32) & GEN_MASK,
                1 => BlockMeta::next_gen(mb.gen),
                _ => mb.gen,
            };
            match rng.below(5) {
                // Only free blocks are allocated (they come from the pool).
                0 if !mb.valid && !mb.wb => {
                    mb.gen = BlockMeta::next_gen(mb.gen);
                    mb.valid = true;
                    allocs[b as usize] += 1;
                    assert_eq!(allocate(&meta, b), mb.gen);
                }
                1 => {
                    let want = mb.gen == gen && mb.valid && !mb.wb;
                    if want {
                        mb.valid = false;
                        frees[b as usize] += 1;
                    }
                    assert_eq!(
                        meta.begin_free(b, gen),
                        want,
                        "op {op}: begin_free({b}, {gen}) on {mb:?}"
                    );
                }
                2 => {
                    let want = mb.gen == gen && mb.valid && !mb.wb;
                    if want {
                        mb.wb = true;
                    }
                    assert_eq!(
                        meta.begin_writeback(b, gen),
                        want,
                        "op {op}: begin_writeback({b}, {gen}) on {mb:?}"
                    );
                }
                // Only the writeback ends a writeback it started.
                3 if mb.wb => {
                    mb.wb = false;
                    meta.end_writeback(b);
                }
                _ => {}
            }
            assert_eq!(observe(&meta, b), model[b as usize], "op {op}: block {b}");
        }
        for b in 0..N as usize {
            // Each allocation was freed at most once (the last one may be live).
            let live = u32::from(model[b].valid);
            assert_eq!(frees[b] + live, allocs[b], "block {b}");
            assert!(allocs[b] > 100, "block {b}: the walk reached it");
        }
    }

    #[test]
    fn meta_protocol_scenarios() {
        let meta = Meta::new(2);
        // A fresh block is neither valid nor freeable.
        assert!(!meta.begin_free(0, 0));
        assert!(!meta.begin_writeback(0, 0));
        let g = allocate(&meta, 0);
        assert_eq!(g, 1);
        // Generation mismatch refuses both.
        assert!(!meta.begin_free(0, g + 1));
        assert!(!meta.begin_free(0, g - 1));
        assert!(!meta.begin_writeback(0, g + 1));
        // Under writeback: no free, no second writeback.
        assert!(meta.begin_writeback(0, g));
        assert!(!meta.begin_writeback(0, g));
        assert!(!meta.begin_free(0, g));
        assert_eq!(
            observe(&meta, 0),
            Model {
                gen: g,
                valid: true,
                wb: true
            }
        );
        meta.end_writeback(0);
        assert_eq!(
            observe(&meta, 0),
            Model {
                gen: g,
                valid: true,
                wb: false
            }
        );
        // Exactly once.
        assert!(meta.begin_free(0, g));
        assert!(!meta.begin_free(0, g));
        assert!(!meta.begin_writeback(0, g));
        // A log entry of the old allocation cannot touch the new one.
        let g2 = allocate(&meta, 0);
        assert_eq!(g2, g + 1);
        assert!(!meta.begin_free(0, g));
        assert!(!meta.begin_writeback(0, g));
        assert!(meta.begin_free(0, g2));
        // Blocks are independent.
        let h = allocate(&meta, 1);
        assert!(meta.begin_writeback(1, h));
        assert_eq!(
            observe(&meta, 0),
            Model {
                gen: g2,
                valid: false,
                wb: false
            }
        );
        // Generations wrap without sticking.
        meta.get(1).set(GEN_MASK, 0);
        let w = allocate(&meta, 1);
        assert_eq!(w, 0);
        assert!(!meta.begin_free(1, GEN_MASK));
        assert!(meta.begin_free(1, 0));
    }

    #[test]
    fn begin_free_races_have_exactly_one_winner() {
        const THREADS: usize = 4;
        const ROUNDS: u32 = 2_000;
        let meta = Meta::new(1);
        let wins = AtomicU64::new(0);
        // Round r: the main thread allocates (generation r + 1), everyone
        // passes `start`, the racers race, everyone passes `end`, the main
        // thread checks.
        let start = std::sync::Barrier::new(THREADS + 1);
        let end = std::sync::Barrier::new(THREADS + 1);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (meta, wins, start, end) = (&meta, &wins, &start, &end);
                s.spawn(move || {
                    for r in 0..ROUNDS {
                        start.wait();
                        let g = r + 1;
                        // Half the racers free, half start a writeback, which
                        // (like `retire`) ends it and then frees.
                        if t % 2 == 0 {
                            if meta.begin_free(0, g) {
                                wins.fetch_add(1, Ordering::Relaxed);
                            }
                        } else if meta.begin_writeback(0, g) {
                            meta.end_writeback(0);
                            if meta.begin_free(0, g) {
                                wins.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        end.wait();
                    }
                });
            }
            for r in 0..ROUNDS {
                wins.store(0, Ordering::Relaxed);
                assert_eq!(allocate(&meta, 0), r + 1);
                start.wait();
                end.wait();
                assert_eq!(wins.load(Ordering::Relaxed), 1, "round {r}: one free");
                assert!(!observe(&meta, 0).valid);
            }
        });
    }

    #[test]
    fn free_pool_matches_bounded_stack_model() {
        const CAP: usize = 16;
        let pool = FreePool::new(CAP);
        let mut model: Vec<u32> = Vec::new();
        let mut rng = Rng(0xF00D);
        for op in 0..20_000 {
            match rng.below(3) {
                0 => {
                    let b = rng.below(1000) as u32;
                    pool.push(b);
                    // A push beyond capacity (a double free) is dropped.
                    if model.len() < CAP {
                        model.push(b);
                    }
                }
                1 => assert_eq!(pool.pop(), model.pop(), "op {op}: pop"),
                _ => {
                    let k = rng.below(5) as usize;
                    let mut got = Vec::new();
                    let n = pool.pop_batch(k, &mut got);
                    let at = model.len() - k.min(model.len());
                    let want = model.split_off(at);
                    assert_eq!((n, got), (want.len(), want), "op {op}: pop_batch({k})");
                }
            }
            assert_eq!(pool.len(), model.len() as u64, "op {op}: len");
        }
    }

    #[test]
    fn sorted_free_pool_matches_ordered_set_model() {
        const CAP: usize = 200;
        let pool = FreePool::new_sorted(CAP);
        let mut model = std::collections::BTreeSet::new();
        let mut rng = Rng(0x5EED);
        for op in 0..20_000 {
            match rng.below(3) {
                0 => {
                    // Some pushes are double frees or out of range: ignored.
                    let b: Vec<u32> = (0..rng.below(8)).map(|_| rng.below(210) as u32).collect();
                    pool.push_all(&b);
                    for x in b {
                        if (x as usize) < CAP {
                            model.insert(x);
                        }
                    }
                }
                1 => assert_eq!(pool.pop(), model.pop_first(), "op {op}: pop"),
                _ => {
                    let k = rng.below(70) as usize;
                    let mut got = vec![u32::MAX];
                    let n = pool.pop_batch(k, &mut got);
                    let mut want: Vec<u32> = (0..k).map_while(|_| model.pop_first()).collect();
                    // `out.pop()` yields the lowest first.
                    want.reverse();
                    assert_eq!(
                        (n, &got[1..]),
                        (want.len(), &want[..]),
                        "op {op}: pop_batch({k})"
                    );
                }
            }
            assert_eq!(pool.len(), model.len() as u64, "op {op}: len");
        }
        assert_eq!(pool.ram_bytes(), 32, "one bit per block");
    }

    #[test]
    fn free_pool_edges() {
        let p = FreePool::new(0);
        assert_eq!((p.len(), p.pop()), (0, None));
        p.push(7); // overflow: dropped
        assert_eq!(p.len(), 0);

        let p = FreePool::new(4);
        p.push_all(&[0, 1, 2]);
        p.push_all(&[3, 99]);
        assert_eq!(p.len(), 4);
        let mut got: Vec<u32> = std::iter::from_fn(|| p.pop()).collect();
        got.sort_unstable();
        assert_eq!(got, vec![0, 1, 2, 3], "overflow dropped");
        assert_eq!(p.len(), 0);
        assert_eq!(p.ram_bytes(), 16);
    }

    #[test]
    fn free_after_grace_returns_every_block_once() {
        let p = FreePool::new(8);
        p.free_after_grace(Vec::new());
        assert_eq!(p.len(), 0);
        p.free_after_grace(vec![3, 1, 4]);
        p.free_after_grace(vec![5]);
        // The blocks come back once the epoch advances past this point.
        let t0 = std::time::Instant::now();
        while p.len() < 4 && t0.elapsed() < std::time::Duration::from_secs(2) {
            crossbeam::epoch::pin().flush();
        }
        assert_eq!(p.len(), 4);
        let mut got: Vec<u32> = std::iter::from_fn(|| p.pop()).collect();
        got.sort_unstable();
        assert_eq!(got, vec![1, 3, 4, 5]);
    }

    #[test]
    fn free_after_grace_waits_for_pinned_readers() {
        let p = FreePool::new(4);
        let reader = crossbeam::epoch::pin();
        p.free_after_grace(vec![2]);
        for _ in 0..64 {
            crossbeam::epoch::pin().flush();
        }
        assert_eq!(p.len(), 0, "reused while a reader that saw it is pinned");
        drop(reader);
        let t0 = std::time::Instant::now();
        while p.len() < 1 && t0.elapsed() < std::time::Duration::from_secs(2) {
            crossbeam::epoch::pin().flush();
        }
        assert_eq!(p.pop(), Some(2));
    }

    /// Pushes (grace-period frees, channel teardown,
    /// `return_cached_blocks`) and pops (`alloc`) run on different reactor
    /// threads: `len()` must never be seen beyond the capacity (a counter
    /// updated outside the push/pop could wrap below zero, and
    /// `Writecache::used_blocks` would overflow).
    #[test]
    fn free_pool_len_never_exceeds_capacity_under_concurrency() {
        use std::sync::atomic::AtomicBool;
        let pool = FreePool::new(4);
        let token = AtomicBool::new(true); // the pusher may push one block
        let stop = AtomicBool::new(false);
        let t0 = std::time::Instant::now();
        let mut worst = 0;
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    if token.swap(false, Ordering::AcqRel) {
                        pool.push(1);
                    }
                }
            });
            while t0.elapsed() < std::time::Duration::from_secs(1) {
                if pool.pop().is_some() {
                    worst = worst.max(pool.len());
                    token.store(true, Ordering::Release);
                    if worst > 4 {
                        break;
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(worst <= 4, "a 4-block pool reported {worst} free blocks");
    }
}
