//! [`SimDisk`]: a block device with a volatile write cache.

use std::sync::{Mutex, MutexGuard};

use rand::Rng;

use crate::{current_core, Point, PointHook, PointKind, Points};

/// Granularity of torn writes: the device writes 512-byte sectors
/// atomically, so a torn write keeps whole sectors only.
pub const SECTOR_SIZE: usize = 512;

/// A completed write still in the volatile cache.
#[derive(Debug, Clone)]
struct CachedWrite {
    offset: usize,
    data: Vec<u8>,
}

#[derive(Debug)]
struct Frozen {
    durable: Vec<u8>,
    unflushed: Vec<CachedWrite>,
}

#[derive(Debug, Default)]
struct State {
    visible: Vec<u8>,
    durable: Vec<u8>,
    /// Completed writes not yet durable, in completion order.
    unflushed: Vec<CachedWrite>,
    tearing: bool,
    writes: u64,
    flushes: u64,
    count_writes: bool,
    points: Points,
    frozen: Option<Frozen>,
}

/// Simulated disk with a volatile write cache.
///
/// - Writes (and UNMAP/WRITE_ZEROES, which write zeroes) are visible to
///   reads as soon as they complete, but stay in the cache.
/// - FLUSH makes every write completed before it durable (the whole device:
///   ranges are ignored, as NVMe flushes the namespace). A FUA write is
///   durable when it completes; it does not flush other writes.
/// - A crash applies each cached write, in completion order, whole or not
///   at all with probability 1/2. With tearing on, half the writes are
///   instead torn: each of their 512-byte sectors survives independently.
///   An older cached write never lands over a newer durable one.
pub struct SimDisk {
    len: usize,
    state: Mutex<State>,
    hook: Mutex<Option<PointHook>>,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SimDisk({} bytes, {} unflushed writes)",
            self.len,
            self.unflushed_writes()
        )
    }
}

fn apply(img: &mut [u8], w: &CachedWrite) {
    img[w.offset..w.offset + w.data.len()].copy_from_slice(&w.data);
}

impl SimDisk {
    /// A zero-filled disk of `len` bytes, all durable.
    pub fn new(len: usize) -> SimDisk {
        SimDisk::from_image(vec![0; len])
    }

    /// A disk holding `image`, all durable: "reboots" from a crash image.
    pub fn from_image(image: Vec<u8>) -> SimDisk {
        SimDisk {
            len: image.len(),
            state: Mutex::new(State {
                durable: image.clone(),
                visible: image,
                count_writes: true,
                ..State::default()
            }),
            hook: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_range(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.len),
            "SimDisk: access [{offset}, +{len}) outside the {} byte disk",
            self.len
        );
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-byte disk.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads what the device returns now (cached writes included).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) {
        self.check_range(offset, dst.len());
        let st = self.lock();
        dst.copy_from_slice(&st.visible[offset..offset + dst.len()]);
    }

    /// Runs `f` on the visible bytes of a range (block reads).
    pub(crate) fn read_with(&self, offset: usize, len: usize, f: impl FnOnce(&[u8])) {
        self.check_range(offset, len);
        let st = self.lock();
        f(&st.visible[offset..offset + len]);
    }

    /// Completes a write of `data` at byte `offset`; with `fua` it is
    /// durable at once.
    pub fn write_at(&self, offset: usize, data: &[u8], fua: bool) {
        self.write_with(offset, data.len(), fua, |dst| dst.copy_from_slice(data));
    }

    /// Completes a write of `len` zero bytes (UNMAP, WRITE_ZEROES).
    pub fn zero_at(&self, offset: usize, len: usize) {
        self.write_with(offset, len, false, |dst| dst.fill(0));
    }

    /// Completes a write whose bytes `fill` produces into the visible
    /// contents (so block I/O copies straight from its segments).
    pub(crate) fn write_with(
        &self,
        offset: usize,
        len: usize,
        fua: bool,
        fill: impl FnOnce(&mut [u8]),
    ) {
        self.check_range(offset, len);
        if len == 0 {
            return;
        }
        let core = current_core();
        let mut st = self.lock();
        st.writes += 1;
        let count_writes = st.count_writes;
        let State {
            visible,
            durable,
            unflushed,
            ..
        } = &mut *st;
        let range = offset..offset + len;
        fill(&mut visible[range.clone()]);
        let data = &visible[range.clone()];
        let point = if fua {
            durable[range.clone()].copy_from_slice(data);
            // An older cached write that lands later must not undo this
            // one: give its overlap this write's bytes.
            for w in unflushed.iter_mut() {
                let s = w.offset.max(offset);
                let e = (w.offset + w.data.len()).min(offset + len);
                if s < e {
                    w.data[s - w.offset..e - w.offset]
                        .copy_from_slice(&data[s - offset..e - offset]);
                }
            }
            Some(PointKind::FuaWrite)
        } else {
            unflushed.push(CachedWrite {
                offset,
                data: data.to_vec(),
            });
            count_writes.then_some(PointKind::Write)
        };
        let p = point.map(|k| self.point(&mut st, k, core));
        drop(st);
        if let Some(p) = p {
            self.report(p);
        }
    }

    /// FLUSH: every write completed so far becomes durable.
    pub fn flush(&self) {
        let core = current_core();
        let mut st = self.lock();
        st.flushes += 1;
        let State {
            durable, unflushed, ..
        } = &mut *st;
        for w in unflushed.drain(..) {
            apply(durable, &w);
        }
        let p = self.point(&mut st, PointKind::Flush, core);
        drop(st);
        self.report(p);
    }

    fn point(&self, st: &mut State, kind: PointKind, core: usize) -> Point {
        if st.points.hit() && st.frozen.is_none() {
            st.frozen = Some(Frozen {
                durable: st.durable.clone(),
                unflushed: st.unflushed.clone(),
            });
        }
        Point {
            index: st.points.count,
            kind,
            core,
        }
    }

    fn report(&self, p: Point) {
        let mut hook = self.hook.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hook.as_mut() {
            h(p);
        }
    }

    /// Builds an image from the durable contents and the cached writes
    /// (as of the crash point once passed); `pick` applies one write.
    fn image_with(&self, mut pick: impl FnMut(&mut Vec<u8>, &CachedWrite, bool)) -> Vec<u8> {
        let st = self.lock();
        let tearing = st.tearing;
        let (mut img, unflushed) = match &st.frozen {
            Some(f) => (f.durable.clone(), f.unflushed.clone()),
            None => (st.durable.clone(), st.unflushed.clone()),
        };
        drop(st);
        for w in &unflushed {
            pick(&mut img, w, tearing);
        }
        img
    }

    /// The image after a power failure now (or at the crash point, once
    /// passed): durable data plus a random subset of the cached writes,
    /// drawn from `rng` in completion order (reproducible).
    pub fn crash<R: Rng + ?Sized>(&self, rng: &mut R) -> Vec<u8> {
        self.image_with(|img, w, tearing| {
            if tearing && rng.gen::<bool>() {
                // Torn: whole sectors (aligned on the device) survive.
                let end = w.offset + w.data.len();
                let mut s = w.offset;
                while s < end {
                    let e = ((s / SECTOR_SIZE + 1) * SECTOR_SIZE).min(end);
                    if rng.gen::<bool>() {
                        img[s..e].copy_from_slice(&w.data[s - w.offset..e - w.offset]);
                    }
                    s = e;
                }
            } else if rng.gen::<bool>() {
                apply(img, w);
            }
        })
    }

    /// [`crash`](Self::crash) with a generator seeded from `seed`.
    pub fn power_fail(&self, seed: u64) -> Vec<u8> {
        self.crash(&mut crate::rng_from_seed(seed))
    }

    /// The image when every cached write is lost.
    pub fn crash_all_unflushed_lost(&self) -> Vec<u8> {
        self.image_with(|_, _, _| {})
    }

    /// The image when every cached write survives.
    pub fn crash_all_unflushed_kept(&self) -> Vec<u8> {
        self.image_with(|img, w, _| apply(img, w))
    }

    /// The contents reads return now.
    pub fn visible(&self) -> Vec<u8> {
        self.lock().visible.clone()
    }

    /// Whether crashes may tear writes at sector boundaries (default off).
    pub fn set_tearing(&self, on: bool) {
        self.lock().tearing = on;
    }

    /// Number of writes (including zeroing ones) so far.
    pub fn write_count(&self) -> u64 {
        self.lock().writes
    }

    /// Number of flushes so far.
    pub fn flush_count(&self) -> u64 {
        self.lock().flushes
    }

    /// Number of completed writes still only in the cache.
    pub fn unflushed_writes(&self) -> usize {
        self.lock().unflushed.len()
    }

    /// Persistence points so far: flushes and FUA writes, plus every other
    /// write unless [`count_writes`](Self::count_writes) is off.
    pub fn points(&self) -> u64 {
        self.lock().points.count
    }

    /// Whether every write is a persistence point (default on; off: only
    /// flushes and FUA writes are).
    pub fn count_writes(&self, on: bool) {
        self.lock().count_writes = on;
    }

    /// Cuts the power at point `k` (see [`SimPmem::set_crash_at`]).
    /// Panics if point `k` already passed.
    ///
    /// [`SimPmem::set_crash_at`]: crate::SimPmem::set_crash_at
    pub fn set_crash_at(&self, k: u64) {
        let mut st = self.lock();
        assert!(
            k >= st.points.count,
            "SimDisk::set_crash_at({k}): point {} already passed",
            st.points.count
        );
        st.points.crash_at = Some(k);
        if k == st.points.count && st.frozen.is_none() {
            st.frozen = Some(Frozen {
                durable: st.durable.clone(),
                unflushed: st.unflushed.clone(),
            });
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
