//! [`SimPmem`]: persistent memory under the x86 ADR durability model.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rand::Rng;
use smallvec::SmallVec;
use wc_bdev::PersistentMemory;

use crate::{current_core, Point, PointHook, PointKind, Points};

/// A word with stores not yet made durable.
#[derive(Debug, Clone)]
struct PendingWord {
    /// The durable value (what the media holds if no pending store made it).
    durable: u64,
    /// Pending stores in store order, at most one per core (a core's later
    /// store to the word replaces its earlier one and moves to the end).
    stores: SmallVec<[(usize, u64); 2]>,
}

#[derive(Debug)]
struct Frozen {
    visible: Vec<u8>,
    pending: Vec<(usize, PendingWord)>,
}

#[derive(Debug, Default)]
struct State {
    pending: HashMap<usize, PendingWord>,
    /// Words each core may have pending stores to (may hold stale entries).
    per_core: Vec<Vec<usize>>,
    /// Per core: words stored with ordinary (cached) stores that still need
    /// a cache-line flush before a fence makes them durable.
    deferred: Vec<Vec<usize>>,
    fences: u64,
    stores: u64,
    count_stores: bool,
    points: Points,
    frozen: Option<Frozen>,
}

/// Simulated persistent memory (see the crate docs for the model).
///
/// - `write_nt`/`write_u64` stores are visible at once (through `base()` and
///   `read`) and *pending*: each touched 8-byte word remembers the core
///   that stored it and the word's value after the store.
/// - `fence()` on core `c` makes `c`'s pending stores durable, and only
///   those: another core's fence does not persist them.
/// - A crash keeps every durable word, and each pending store independently
///   with probability 1/2 (the latest surviving store of a word wins).
///   `write_u64` is one word and never tears; a longer `write_nt` may
///   survive in part, at 8-byte boundaries.
///
/// Simplifications: a core's repeated stores to a word before a fence keep
/// only the latest value (an earlier value never reappears alone), a
/// partial-word store stands for the whole word as it is after the store,
/// and a store that leaves a word with nothing pending unchanged is not
/// tracked (it cannot change any image). Each pending word costs about 64
/// bytes of bookkeeping until its fence.
pub struct SimPmem {
    /// Injected media error (errno; 0 = none), see `inject_media_error`.
    media_error: std::sync::atomic::AtomicI32,
    words: Box<[AtomicU64]>,
    len: usize,
    state: Mutex<State>,
    hook: Mutex<Option<PointHook>>,
}

impl std::fmt::Debug for SimPmem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SimPmem({} bytes, {} pending words)",
            self.len,
            self.pending_words()
        )
    }
}

fn word_bytes(w: u64) -> [u8; 8] {
    w.to_ne_bytes()
}

impl SimPmem {
    /// Zero-filled media of `len` bytes, all durable.
    pub fn new(len: usize) -> SimPmem {
        let n = len.div_ceil(8);
        let words: Box<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
        SimPmem {
            media_error: std::sync::atomic::AtomicI32::new(0),
            words,
            len,
            state: Mutex::new(State {
                count_stores: true,
                ..State::default()
            }),
            hook: Mutex::new(None),
        }
    }

    /// Makes the media report a persistent error (as a failed msync or a
    /// poisoned line would): `media_error()` returns `errno` from now on.
    pub fn inject_media_error(&self, errno: i32) {
        self.media_error.store(errno, Ordering::Release);
    }

    /// Media holding `image`, all durable: "reboots" from a crash image.
    pub fn from_image(image: Vec<u8>) -> SimPmem {
        let p = SimPmem::new(image.len());
        for (i, chunk) in image.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            p.words[i].store(u64::from_ne_bytes(b), Ordering::Relaxed);
        }
        p
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_range(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.len),
            "SimPmem: access [{offset}, +{len}) outside the {} byte media",
            self.len
        );
    }

    /// Records a store by `core` to word `w`, whose visible value went from
    /// `old` to `new`.
    fn track(st: &mut State, w: usize, core: usize, old: u64, new: u64) {
        Self::track_as(st, w, core, old, new, false)
    }

    /// Records a store; `deferred` stores need [`flush_range`] before a
    /// fence makes them durable.
    fn track_as(st: &mut State, w: usize, core: usize, old: u64, new: u64, deferred: bool) {
        use std::collections::hash_map::Entry;
        match st.pending.entry(w) {
            // Storing the durable value again changes no crash image.
            Entry::Vacant(_) if old == new => {}
            Entry::Vacant(e) => {
                let mut stores = SmallVec::new();
                stores.push((core, new));
                e.insert(PendingWord {
                    durable: old,
                    stores,
                });
                Self::note(st, core, w, deferred);
            }
            Entry::Occupied(mut e) => {
                let pw = e.get_mut();
                if let Some(i) = pw.stores.iter().position(|s| s.0 == core) {
                    pw.stores.remove(i);
                    pw.stores.push((core, new));
                } else {
                    pw.stores.push((core, new));
                    Self::note(st, core, w, deferred);
                }
            }
        }
    }

    /// One aligned 8-byte store (never torn); `deferred` stores need a
    /// flush before a fence makes them durable.
    fn store_u64(&self, offset: usize, value: u64, deferred: bool) {
        assert!(
            offset % 8 == 0,
            "SimPmem: 8-byte store at unaligned offset {offset}"
        );
        self.check_range(offset, 8);
        let core = current_core();
        let mut st = self.lock();
        st.stores += 1;
        let w = offset / 8;
        let new = u64::from_ne_bytes(value.to_le_bytes());
        let old = self.words[w].swap(new, Ordering::Relaxed);
        Self::track_as(&mut st, w, core, old, new, deferred);
        let p = st
            .count_stores
            .then(|| self.point(&mut st, PointKind::Store, core));
        drop(st);
        if let Some(p) = p {
            self.report(p);
        }
    }

    fn note(st: &mut State, core: usize, w: usize, deferred: bool) {
        if deferred {
            if st.deferred.len() <= core {
                st.deferred.resize_with(core + 1, Vec::new);
            }
            st.deferred[core].push(w);
        } else {
            Self::note_core(st, core, w);
        }
    }

    fn note_core(st: &mut State, core: usize, w: usize) {
        if st.per_core.len() <= core {
            st.per_core.resize_with(core + 1, Vec::new);
        }
        st.per_core[core].push(w);
    }

    /// Counts a point; freezes the crash state when it is the crash point.
    /// Returns the point to report.
    fn point(&self, st: &mut State, kind: PointKind, core: usize) -> Point {
        if st.points.hit() && st.frozen.is_none() {
            st.frozen = Some(self.snapshot(st));
        }
        Point {
            index: st.points.count,
            kind,
            core,
        }
    }

    fn snapshot(&self, st: &State) -> Frozen {
        let mut pending: Vec<(usize, PendingWord)> =
            st.pending.iter().map(|(w, p)| (*w, p.clone())).collect();
        pending.sort_unstable_by_key(|(w, _)| *w);
        Frozen {
            visible: self.visible_image(),
            pending,
        }
    }

    fn report(&self, p: Point) {
        let mut hook = self.hook.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hook.as_mut() {
            h(p);
        }
    }

    fn visible_image(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.words.len() * 8);
        for w in self.words.iter() {
            v.extend_from_slice(&word_bytes(w.load(Ordering::Relaxed)));
        }
        v.truncate(self.len);
        v
    }

    /// Builds a crash image; `choose(word_index, pending)` picks each
    /// pending word's value.
    fn image_with(&self, mut choose: impl FnMut(&PendingWord) -> u64) -> Vec<u8> {
        let st = self.lock();
        let (mut img, pending) = match &st.frozen {
            Some(f) => (f.visible.clone(), f.pending.clone()),
            None => {
                let mut p: Vec<(usize, PendingWord)> =
                    st.pending.iter().map(|(w, p)| (*w, p.clone())).collect();
                p.sort_unstable_by_key(|(w, _)| *w);
                (self.visible_image(), p)
            }
        };
        drop(st);
        for (w, pw) in &pending {
            let v = word_bytes(choose(pw));
            let start = w * 8;
            let end = (start + 8).min(img.len());
            img[start..end].copy_from_slice(&v[..end - start]);
        }
        img
    }

    /// The image after a power failure now (or at the crash point, once
    /// passed): durable words, plus each pending store kept with
    /// probability 1/2, drawn from `rng` in word order (reproducible).
    pub fn crash<R: Rng + ?Sized>(&self, rng: &mut R) -> Vec<u8> {
        self.image_with(|pw| {
            let mut v = pw.durable;
            for &(_, s) in &pw.stores {
                if rng.gen::<bool>() {
                    v = s;
                }
            }
            v
        })
    }

    /// [`crash`](Self::crash) with a generator seeded from `seed`.
    pub fn power_fail(&self, seed: u64) -> Vec<u8> {
        self.crash(&mut crate::rng_from_seed(seed))
    }

    /// The image when every pending store is lost (durable words only).
    pub fn crash_all_pending_lost(&self) -> Vec<u8> {
        self.image_with(|pw| pw.durable)
    }

    /// The image when every pending store survives (the visible contents).
    pub fn crash_all_pending_kept(&self) -> Vec<u8> {
        self.image_with(|pw| pw.stores.last().map(|s| s.1).unwrap_or(pw.durable))
    }

    /// The visible contents (what loads return now).
    pub fn visible(&self) -> Vec<u8> {
        self.visible_image()
    }

    /// Number of fences executed so far.
    pub fn fence_count(&self) -> u64 {
        self.lock().fences
    }

    /// Number of `write_nt`/`write_u64` calls so far.
    pub fn store_count(&self) -> u64 {
        self.lock().stores
    }

    /// Number of 8-byte words with stores not yet durable.
    pub fn pending_words(&self) -> usize {
        self.lock().pending.len()
    }

    /// Number of words with a pending store by `core`.
    pub fn pending_words_of(&self, core: usize) -> usize {
        self.lock()
            .pending
            .values()
            .filter(|p| p.stores.iter().any(|s| s.0 == core))
            .count()
    }

    /// Persistence points counted so far: fences, plus stores unless
    /// [`count_stores`](Self::count_stores) is off.
    pub fn points(&self) -> u64 {
        self.lock().points.count
    }

    /// Whether every store is a persistence point too (default on). With
    /// fences only, a single-core workload is always cut with nothing
    /// pending, so cuts between a store and its fence are never explored.
    pub fn count_stores(&self, on: bool) {
        self.lock().count_stores = on;
    }

    /// Cuts the power at point `k`: crash images are taken as of the state
    /// right after point `k` (`0` = now, when no point has passed yet). The
    /// media keeps working for the code under test, but nothing after point
    /// `k` reaches the images. Panics if point `k` already passed.
    pub fn set_crash_at(&self, k: u64) {
        let mut st = self.lock();
        assert!(
            k >= st.points.count,
            "SimPmem::set_crash_at({k}): point {} already passed",
            st.points.count
        );
        st.points.crash_at = Some(k);
        if k == st.points.count && st.frozen.is_none() {
            st.frozen = Some(self.snapshot(&st));
        }
    }

    /// True once the crash point has passed ("power is off").
    pub fn is_powered_off(&self) -> bool {
        self.lock().frozen.is_some()
    }

    /// Installs a callback run after every persistence point.
    pub fn set_point_hook(&self, hook: PointHook) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Removes the point hook.
    pub fn clear_point_hook(&self) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl PersistentMemory for SimPmem {
    fn len(&self) -> usize {
        self.len
    }

    fn base(&self) -> *const u8 {
        self.words.as_ptr() as *const u8
    }

    fn write_nt(&self, offset: usize, src: &[u8]) {
        self.check_range(offset, src.len());
        if src.is_empty() {
            return;
        }
        let core = current_core();
        let mut st = self.lock();
        st.stores += 1;
        let mut pos = 0;
        while pos < src.len() {
            let at = offset + pos;
            let w = at / 8;
            let in_word = at % 8;
            let n = (8 - in_word).min(src.len() - pos);
            let old = self.words[w].load(Ordering::Relaxed);
            let mut b = word_bytes(old);
            b[in_word..in_word + n].copy_from_slice(&src[pos..pos + n]);
            let new = u64::from_ne_bytes(b);
            self.words[w].store(new, Ordering::Relaxed);
            Self::track(&mut st, w, core, old, new);
            pos += n;
        }
        let p = st
            .count_stores
            .then(|| self.point(&mut st, PointKind::Store, core));
        drop(st);
        if let Some(p) = p {
            self.report(p);
        }
    }

    fn write_u64(&self, offset: usize, value: u64) {
        self.store_u64(offset, value, false);
    }

    fn write_u64_deferred(&self, offset: usize, value: u64) {
        self.store_u64(offset, value, true);
    }

    fn media_error(&self) -> Option<i32> {
        match self.media_error.load(Ordering::Acquire) {
            0 => None,
            e => Some(e),
        }
    }

    fn flush_range(&self, offset: usize, len: usize) {
        self.check_range(offset, len);
        let core = current_core();
        let mut st = self.lock();
        let (first, last) = (offset / 8, (offset + len).div_ceil(8));
        if let Some(d) = st.deferred.get_mut(core) {
            let (flushed, keep): (Vec<usize>, Vec<usize>) =
                d.drain(..).partition(|w| (first..last).contains(w));
            *d = keep;
            for w in flushed {
                Self::note_core(&mut st, core, w);
            }
        }
    }

    fn fence(&self) {
        use std::collections::hash_map::Entry;
        let core = current_core();
        let mut st = self.lock();
        st.fences += 1;
        let words = match st.per_core.get_mut(core) {
            Some(v) => std::mem::take(v),
            None => Vec::new(),
        };
        for w in words {
            if let Entry::Occupied(mut e) = st.pending.entry(w) {
                let pw = e.get_mut();
                if let Some(i) = pw.stores.iter().position(|s| s.0 == core) {
                    // This core's store is durable; stores before it in
                    // coherence order are overwritten and can never be the
                    // durable value again.
                    pw.durable = pw.stores[i].1;
                    pw.stores.drain(..=i);
                    if pw.stores.is_empty() {
                        e.remove();
                    }
                }
            }
        }
        let p = self.point(&mut st, PointKind::Fence, core);
        drop(st);
        self.report(p);
    }

    fn read(&self, offset: usize, dst: &mut [u8]) {
        self.check_range(offset, dst.len());
        let mut pos = 0;
        while pos < dst.len() {
            let at = offset + pos;
            let w = at / 8;
            let in_word = at % 8;
            let n = (8 - in_word).min(dst.len() - pos);
            let b = word_bytes(self.words[w].load(Ordering::Relaxed));
            dst[pos..pos + n].copy_from_slice(&b[in_word..in_word + n]);
            pos += n;
        }
    }

    fn strategy(&self) -> &'static str {
        "simulated"
    }
}
