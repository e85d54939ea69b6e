//! The mapping and its persistence strategies ([`PersistentMemory`]).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::{Condvar, Mutex, MutexGuard};

use wc_bdev::{BdevError, PersistentMemory};

#[cfg(target_arch = "x86_64")]
use crate::x86::{self, FlushInsn};

/// How stores are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// Ordinary stores, `clwb` of every touched line, `sfence`.
    ClwbSfence,
    /// Ordinary stores, `clflushopt` of every touched line, `sfence`.
    ClflushoptSfence,
    /// Non-temporal stores (ordinary stores + write-back for unaligned
    /// edges), `sfence`.
    MovntSfence,
    /// Ordinary stores into the page cache, `msync` of the dirty pages at
    /// fence time: the only durable choice for a file without DAX.
    Msync,
}

impl Strategy {
    /// Every strategy, in order of preference.
    #[cfg(test)]
    pub(crate) const ALL: [Strategy; 4] = [
        Strategy::MovntSfence,
        Strategy::ClwbSfence,
        Strategy::ClflushoptSfence,
        Strategy::Msync,
    ];

    /// Name for `driver_specific`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Strategy::ClwbSfence => "clwb+sfence",
            Strategy::ClflushoptSfence => "clflushopt+sfence",
            Strategy::MovntSfence => "movnt+sfence",
            Strategy::Msync => "msync",
        }
    }

    /// Whether this CPU can run the strategy.
    pub(crate) fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Strategy::ClwbSfence => x86::has_clwb(),
                Strategy::ClflushoptSfence => x86::has_clflushopt(),
                Strategy::MovntSfence | Strategy::Msync => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Strategy::Msync
        }
    }

    /// The default for a mapping: CPU cache management only persists data
    /// on a DAX (`MAP_SYNC`) mapping; anything else needs msync.
    pub(crate) fn pick(map_sync: bool) -> Strategy {
        if !map_sync {
            return Strategy::Msync;
        }
        if Strategy::MovntSfence.supported() {
            Strategy::MovntSfence
        } else if Strategy::ClwbSfence.supported() {
            Strategy::ClwbSfence
        } else if Strategy::ClflushoptSfence.supported() {
            Strategy::ClflushoptSfence
        } else {
            Strategy::Msync
        }
    }
}

/// The mapping itself: a `MAP_SYNC` map made by hand (memmap2 has no flag
/// for it) or memmap2's shared map.
enum Mapping {
    Sync { ptr: *mut u8, len: usize },
    Plain { _map: memmap2::MmapRaw },
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Mapping::Sync { ptr, len } = *self {
            // SAFETY: ptr/len are exactly what mmap returned, and nobody
            // uses the mapping any more (this is its owner's destructor).
            unsafe { libc::munmap(ptr.cast(), len) };
        }
    }
}

/// A mapped file (or device-DAX node) with its persistence strategy.
pub(crate) struct PmemMap {
    _mapping: Mapping,
    base: *mut u8,
    len: usize,
    strategy: Strategy,
    map_sync: bool,
    #[cfg(target_arch = "x86_64")]
    flush: FlushInsn,
    page: usize,
    dirty: DirtyTracker,
    /// First errno a persist (msync) failed with; 0 while none did.
    media_error: std::sync::atomic::AtomicI32,
}

// SAFETY: the mapping is shared memory owned by this object until it drops;
// all writes go through raw copies of range-checked regions (racing
// writers leave unspecified *contents*, as on any shared disk, never touch
// memory outside the mapping); the dirty tracker is behind a Mutex.
unsafe impl Send for PmemMap {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for PmemMap {}

/// What `open` was asked for.
pub(crate) struct MapRequest<'a> {
    pub(crate) filename: &'a str,
    pub(crate) size: Option<u64>,
    pub(crate) block_size: u32,
    pub(crate) strategy: Option<Strategy>,
}

fn os_err(context: String) -> impl FnOnce(std::io::Error) -> BdevError {
    move |e| BdevError::os(context, e)
}

impl PmemMap {
    /// Opens (creating or extending to `size` if given) and maps the file;
    /// the mapping covers whole blocks only.
    pub(crate) fn open(req: &MapRequest<'_>) -> Result<PmemMap, BdevError> {
        let filename = req.filename;
        if filename.is_empty() {
            return Err(BdevError::Invalid("filename must not be empty".into()));
        }
        let bs = req.block_size as u64;
        if let Some(size) = req.size {
            if size < bs {
                return Err(BdevError::Invalid(format!(
                    "size {size} is smaller than one block of {bs} bytes"
                )));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(req.size.is_some())
            .truncate(false)
            .open(filename)
            .map_err(os_err(format!("open {filename}")))?;
        let meta = file
            .metadata()
            .map_err(os_err(format!("stat {filename}")))?;
        let ft = meta.file_type();
        let avail = if ft.is_file() {
            let cur = meta.len();
            match req.size {
                Some(size) if cur < size => {
                    file.set_len(size)
                        .map_err(os_err(format!("extend {filename} to {size} bytes")))?;
                    size
                }
                Some(size) => size,
                None if cur == 0 => {
                    return Err(BdevError::Invalid(format!(
                        "{filename} is empty and no size was given"
                    )))
                }
                None => cur,
            }
        } else if ft.is_char_device() {
            // Device DAX: the size is in sysfs.
            let dev = devdax_size(&meta, filename)?;
            match req.size {
                Some(size) if size > dev => {
                    return Err(BdevError::Invalid(format!(
                        "size {size} exceeds {filename} ({dev} bytes)"
                    )))
                }
                Some(size) => size,
                None => dev,
            }
        } else {
            return Err(BdevError::Invalid(format!(
                "{filename} is neither a regular file nor a device-DAX node"
            )));
        };
        let num_blocks = avail / bs;
        if num_blocks == 0 {
            return Err(BdevError::Invalid(format!(
                "{filename} ({avail} bytes) is smaller than one block of {bs} bytes"
            )));
        }
        let len = usize::try_from(num_blocks * bs)
            .ok()
            .filter(|l| *l <= isize::MAX as usize)
            .ok_or_else(|| BdevError::Invalid(format!("{filename} is too large to map")))?;
        if ft.is_file() {
            allocate(&file, len, filename)?;
        }
        let (mapping, base, map_sync) = map(&file, len, filename)?;
        // A file in RAM (tmpfs, e.g. /dev/shm) has no backing store to sync
        // to: its page cache *is* the media, as for emulated pmem
        // (memmap=) — so the store + fence strategies apply, not msync.
        let memory_backed = !map_sync && is_memory_fs(&file);
        let strategy = req
            .strategy
            .unwrap_or_else(|| Strategy::pick(map_sync || memory_backed));
        if !strategy.supported() {
            return Err(BdevError::NotSupported(format!(
                "persistence strategy {} is not supported by this CPU",
                strategy.name()
            )));
        }
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        Ok(PmemMap {
            _mapping: mapping,
            base,
            len,
            strategy,
            map_sync,
            #[cfg(target_arch = "x86_64")]
            flush: FlushInsn::best(),
            page,
            dirty: DirtyTracker::default(),
            media_error: std::sync::atomic::AtomicI32::new(0),
        })
    }

    /// The strategy in use.
    pub(crate) fn strategy_kind(&self) -> Strategy {
        self.strategy
    }

    /// Whether the map is `MAP_SYNC` (DAX).
    pub(crate) fn map_sync(&self) -> bool {
        self.map_sync
    }

    fn in_range(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|e| e <= self.len)
    }

    /// Remembers that `[offset, offset + len)` needs an msync.
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let start = offset & !(self.page - 1);
        let end = (offset + len).next_multiple_of(self.page).min(self.len);
        self.dirty.record(start, end);
    }

    /// Zeroes `[offset, offset + len)` with the strategy's stores; durable
    /// after the next [`persist`](Self::persist). Out-of-range: false.
    pub(crate) fn zero(&self, offset: usize, len: usize) -> bool {
        if !self.in_range(offset, len) {
            return false;
        }
        // SAFETY: the range is inside the mapping (checked above).
        let dst = unsafe { self.base.add(offset) };
        match self.strategy {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: range checked; the CPU supports the flush insn (best()).
            Strategy::MovntSfence => unsafe { x86::zero_nt(dst, len, self.flush) },
            #[cfg(target_arch = "x86_64")]
            Strategy::ClwbSfence | Strategy::ClflushoptSfence => {
                // SAFETY: range checked; the strategy was checked supported.
                unsafe {
                    std::ptr::write_bytes(dst, 0, len);
                    x86::flush_range(dst, len, self.line_insn());
                }
            }
            _ => {
                // SAFETY: range checked.
                unsafe { std::ptr::write_bytes(dst, 0, len) };
                self.mark_dirty(offset, len);
            }
        }
        true
    }

    #[cfg(target_arch = "x86_64")]
    fn line_insn(&self) -> FlushInsn {
        match self.strategy {
            Strategy::ClwbSfence => FlushInsn::Clwb,
            Strategy::ClflushoptSfence => FlushInsn::Clflushopt,
            _ => self.flush,
        }
    }

    /// Makes every earlier write durable: `sfence`, or msync of the dirty
    /// pages. Unlike [`fence`](PersistentMemory::fence) it reports errors.
    pub(crate) fn persist(&self) -> std::io::Result<()> {
        match self.strategy {
            Strategy::Msync => self.dirty.sync(|start, end| self.msync(start, end)),
            _ => {
                #[cfg(target_arch = "x86_64")]
                x86::sfence();
                Ok(())
            }
        }
    }

    fn msync(&self, start: usize, end: usize) -> std::io::Result<()> {
        // SAFETY: start is page aligned and [start, end) lies inside the
        // mapping (mark_dirty clamps to len), which stays mapped while
        // `self` lives.
        let rc = unsafe { libc::msync(self.base.add(start).cast(), end - start, libc::MS_SYNC) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Pages waiting for an msync (tests).
    #[cfg(test)]
    pub(crate) fn dirty_ranges(&self) -> usize {
        self.dirty.lock().ranges.len()
    }
}

impl PersistentMemory for PmemMap {
    fn len(&self) -> usize {
        self.len
    }

    fn base(&self) -> *const u8 {
        self.base
    }

    fn write_nt(&self, offset: usize, src: &[u8]) {
        let len = src.len();
        if !self.in_range(offset, len) {
            tracing::error!(
                "pmem write_nt out of range: {offset}+{len} > {}; ignored",
                self.len
            );
            return;
        }
        // SAFETY: the range is inside the mapping (checked above).
        let dst = unsafe { self.base.add(offset) };
        match self.strategy {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: src is a valid len-byte slice, dst len bytes inside the
            // mapping (only written via raw pointers, so no overlap with src);
            // the flush instruction is this CPU's best (checked at creation).
            Strategy::MovntSfence => unsafe { x86::copy_nt(dst, src.as_ptr(), len, self.flush) },
            #[cfg(target_arch = "x86_64")]
            Strategy::ClwbSfence | Strategy::ClflushoptSfence => {
                // SAFETY: as above; the strategy was checked supported.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst, len);
                    x86::flush_range(dst, len, self.line_insn());
                }
            }
            _ => {
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, len) };
                self.mark_dirty(offset, len);
            }
        }
    }

    fn write_u64(&self, offset: usize, value: u64) {
        if offset % 8 != 0 || !self.in_range(offset, 8) {
            tracing::error!("pmem write_u64 at {offset} is unaligned or out of range; ignored");
            return;
        }
        // SAFETY: 8 bytes at offset are inside the mapping, and the address
        // is 8-byte aligned (page-aligned base, offset % 8 == 0).
        let dst = unsafe { self.base.add(offset) } as *mut u64;
        let bits = value.to_le();
        match self.strategy {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: aligned, in range (above).
            Strategy::MovntSfence => unsafe { x86::stream_u64(dst, bits) },
            _ => {
                // SAFETY: aligned, in range, and only ever accessed
                // atomically or by raw copies (no Rust references exist).
                let a = unsafe { std::sync::atomic::AtomicU64::from_ptr(dst) };
                a.store(bits, std::sync::atomic::Ordering::Relaxed);
                match self.strategy {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: in range; the strategy was checked supported.
                    Strategy::ClwbSfence | Strategy::ClflushoptSfence => unsafe {
                        x86::flush_range(dst as *const u8, 8, self.line_insn())
                    },
                    _ => self.mark_dirty(offset, 8),
                }
            }
        }
    }

    fn write_u64_deferred(&self, offset: usize, value: u64) {
        if self.strategy == Strategy::Msync {
            return self.write_u64(offset, value);
        }
        if offset % 8 != 0 || !self.in_range(offset, 8) {
            tracing::error!(
                "pmem write_u64_deferred at {offset} is unaligned or out of range; ignored"
            );
            return;
        }
        // SAFETY: 8 bytes at offset are inside the mapping, 8-byte aligned,
        // and only ever accessed atomically or by raw copies.
        let a =
            unsafe { std::sync::atomic::AtomicU64::from_ptr(self.base.add(offset) as *mut u64) };
        a.store(value.to_le(), std::sync::atomic::Ordering::Relaxed);
    }

    fn flush_range(&self, offset: usize, len: usize) {
        if self.strategy == Strategy::Msync || !self.in_range(offset, len) {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the range is inside the mapping (checked above) and the
        // flush instruction was checked supported at creation.
        unsafe {
            x86::flush_range(self.base.add(offset) as *const u8, len, self.line_insn())
        };
    }

    fn fence(&self) {
        if let Err(e) = self.persist() {
            tracing::error!("pmem fence: msync failed: {e}");
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            let _ = self.media_error.compare_exchange(
                0,
                errno,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            );
        }
    }

    fn media_error(&self) -> Option<i32> {
        match self.media_error.load(std::sync::atomic::Ordering::Acquire) {
            0 => None,
            e => Some(e),
        }
    }

    fn strategy(&self) -> &'static str {
        self.strategy.name()
    }
}

/// Preallocates the file's blocks so a store into the mapping can never
/// fault for lack of space (SIGBUS). File systems without fallocate skip it.
fn allocate(file: &File, len: usize, filename: &str) -> Result<(), BdevError> {
    // SAFETY: fallocate only reads its integer arguments; the fd is open.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => {
            tracing::warn!("{filename}: cannot preallocate ({e}); a full disk may fault");
            Ok(())
        }
        _ => Err(BdevError::os(
            format!("allocate {len} bytes of {filename}"),
            e,
        )),
    }
}

/// Maps `len` bytes: `MAP_SYNC` first (DAX only), else a plain shared map.
fn map(file: &File, len: usize, filename: &str) -> Result<(Mapping, *mut u8, bool), BdevError> {
    // SAFETY: a fresh mapping (NULL hint) of an open fd; the result is
    // checked against MAP_FAILED before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
            file.as_raw_fd(),
            0,
        )
    };
    if p != libc::MAP_FAILED {
        let ptr = p.cast::<u8>();
        return Ok((Mapping::Sync { ptr, len }, ptr, true));
    }
    tracing::debug!(
        "{filename}: MAP_SYNC refused ({}); plain shared mapping, msync for durability",
        std::io::Error::last_os_error()
    );
    // Populate up front: a cache touches all of its media anyway, and page
    // faults on the write path would cost microseconds each.
    let raw = memmap2::MmapOptions::new()
        .len(len)
        .populate()
        .map_raw(file)
        .map_err(os_err(format!("mmap {filename}")))?;
    let base = raw.as_mut_ptr();
    Ok((Mapping::Plain { _map: raw }, base, false))
}

/// True for file systems whose pages live only in RAM (tmpfs, hugetlbfs).
fn is_memory_fs(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes a statfs into the provided buffer for an open
    // fd; we read it only on success.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded, so the struct is initialised.
    // (f_type's integer type differs between targets, hence the cast.)
    #[allow(clippy::unnecessary_cast)]
    let f_type = unsafe { st.assume_init() }.f_type as i64;
    f_type == TMPFS_MAGIC || f_type == HUGETLBFS_MAGIC
}

fn devdax_size(meta: &std::fs::Metadata, filename: &str) -> Result<u64, BdevError> {
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let path = format!("/sys/dev/char/{major}:{minor}/size");
    let text = std::fs::read_to_string(&path).map_err(os_err(format!(
        "{filename}: not a device-DAX node (reading {path})"
    )))?;
    text.trim()
        .parse()
        .map_err(|_| BdevError::Invalid(format!("{path}: bad size '{}'", text.trim())))
}

/// Page ranges waiting for msync. `sync` takes the pending ranges and syncs
/// them outside the lock, then waits for every sync that started before it:
/// when a fence returns, everything recorded before it is durable, even the
/// ranges another thread's concurrent fence picked up.
#[derive(Default)]
struct DirtyTracker {
    state: Mutex<DirtyState>,
    done: Condvar,
}

#[derive(Default)]
struct DirtyState {
    /// `[start, end)` byte ranges, page aligned.
    ranges: Vec<(usize, usize)>,
    next_ticket: u64,
    /// Tickets of syncs in progress.
    running: Vec<u64>,
}

/// Pending ranges before they are merged in place.
const MAX_PENDING: usize = 1024;

impl DirtyTracker {
    fn lock(&self) -> MutexGuard<'_, DirtyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, start: usize, end: usize) {
        let mut st = self.lock();
        if let Some(last) = st.ranges.last_mut() {
            if start <= last.1 && end >= last.0 {
                *last = (last.0.min(start), last.1.max(end));
                return;
            }
        }
        st.ranges.push((start, end));
        if st.ranges.len() >= MAX_PENDING {
            coalesce(&mut st.ranges);
        }
    }

    fn sync(&self, msync: impl Fn(usize, usize) -> std::io::Result<()>) -> std::io::Result<()> {
        let (ticket, mut mine) = {
            let mut st = self.lock();
            let t = st.next_ticket;
            st.next_ticket += 1;
            st.running.push(t);
            (t, std::mem::take(&mut st.ranges))
        };
        coalesce(&mut mine);
        let mut result = Ok(());
        for &(start, end) in &mine {
            if let Err(e) = msync(start, end) {
                result = Err(e);
            }
        }
        let mut st = self.lock();
        st.running.retain(|&t| t != ticket);
        if result.is_err() {
            // Keep them for the next fence to retry.
            st.ranges.extend(mine);
        }
        self.done.notify_all();
        while st.running.iter().any(|&t| t < ticket) {
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        result
    }
}

/// Sorts and merges overlapping or touching ranges.
fn coalesce(r: &mut Vec<(usize, usize)>) {
    r.sort_unstable();
    let mut out = 0;
    for i in 0..r.len() {
        if out > 0 && r[i].0 <= r[out - 1].1 {
            r[out - 1].1 = r[out - 1].1.max(r[i].1);
        } else {
            r[out] = r[i];
            out += 1;
        }
    }
    r.truncate(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_overlaps_and_neighbours() {
        let mut r = vec![(8, 12), (0, 4), (4, 6), (20, 24), (10, 16), (30, 31)];
        coalesce(&mut r);
        assert_eq!(r, vec![(0, 6), (8, 16), (20, 24), (30, 31)]);
        let mut e: Vec<(usize, usize)> = vec![];
        coalesce(&mut e);
        assert!(e.is_empty());
    }

    #[test]
    fn concurrent_fences_wait_for_each_other() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let t = Arc::new(DirtyTracker::default());
        let synced = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let t = t.clone();
                let synced = synced.clone();
                std::thread::spawn(move || {
                    for j in 0..200 {
                        t.record(i * 4096 * 1000 + j * 4096, i * 4096 * 1000 + (j + 1) * 4096);
                        t.sync(|s, e| {
                            synced.fetch_add((e - s) / 4096, Ordering::Relaxed);
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert!(t.lock().ranges.is_empty() && t.lock().running.is_empty());
        assert_eq!(synced.load(Ordering::Relaxed), 800);
    }
}
