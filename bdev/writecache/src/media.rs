//! Persistent layout access in pmem mode: entries, superblock, data blocks,
//! formatting and recovery. All stores go through `PersistentMemory`, so the
//! crash simulator sees every one of them.

use std::sync::Arc;

use wc_bdev::PersistentMemory;
use wc_writecache_format::{
    Entry, FormatError, Geometry, Superblock, SuperblockState, ENTRY_SIZE, SECTOR_SIZE,
    SUPERBLOCK_SIZE,
};

use crate::scratch::ScratchVec;

/// The cache's persistent media plus its geometry.
pub(crate) struct Media {
    pub(crate) pmem: Arc<dyn PersistentMemory>,
    pub(crate) geo: Geometry,
}

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The superblock or geometry is invalid.
    #[error("cache superblock: {0}")]
    Format(#[from] FormatError),
    /// Entries contradict each other or the origin.
    #[error("cache metadata is corrupt: {0}")]
    Corrupt(String),
    /// The cache bdev cannot hold a cache as asked (ssd mode).
    #[error("{0}")]
    Unsuitable(String),
    /// Reading or writing the cache bdev failed (ssd mode).
    #[error("cache bdev I/O failed while {0} (errno {1})")]
    Io(&'static str, i32),
}

impl AttachError {
    /// errno for RPC replies.
    pub fn errno(&self) -> i32 {
        match self {
            AttachError::Format(f) => f.errno(),
            AttachError::Corrupt(_) => libc::EUCLEAN,
            AttachError::Unsuitable(_) => libc::EINVAL,
            AttachError::Io(_, e) => *e,
        }
    }
}

/// A committed block found by recovery.
#[derive(Clone, Copy)]
pub(crate) struct Recovered {
    pub(crate) block: u32,
    pub(crate) lba: u64,
    pub(crate) seq: u64,
}

/// What recovery hands to the instance.
pub(crate) struct Attached {
    pub(crate) media: Media,
    pub(crate) sb_seq: u64,
    /// Committed winners, sorted by (seq, lba): the writeback order.
    /// Scratch memory, returned to the OS once the instance is built.
    pub(crate) committed: ScratchVec<Recovered>,
    /// Free blocks (scratch memory too).
    pub(crate) free: ScratchVec<u32>,
    pub(crate) formatted: bool,
}

/// Entries are written back by cache line.
const ENTRY_LINE: usize = 64;

impl Media {
    #[inline]
    pub(crate) fn data_offset(&self, b: u32) -> usize {
        self.geo.block_offset(b as u64) as usize
    }

    #[inline]
    fn entry_offset(&self, b: u32) -> usize {
        self.geo.entry_offset(b as u64) as usize
    }

    /// Starts loading block `b`'s entry line into the cache, owned, as it
    /// is written next (a hint: no fault, no effect on what is stored).
    #[inline]
    pub(crate) fn prefetch_entry_for_write(&self, b: u32) {
        let off = self.entry_offset(b);
        if off < self.pmem.len() {
            crate::meta::prefetch_for_write(self.pmem.base().wrapping_add(off));
        }
    }

    /// Stamps block `b`'s entry with cached stores, sector first: durable
    /// once written back ([`flush_entries`]) and fenced on this core, which
    /// the commit does for every block it covers. A torn stamp is harmless:
    /// the entry is uncommitted until that commit, and an entry with the
    /// old all-ones half reads as unused or as an interrupted free.
    ///
    /// [`flush_entries`]: Self::flush_entries
    #[inline]
    pub(crate) fn write_entry(&self, b: u32, sector: u64, seq: u64) {
        let off = self.entry_offset(b);
        self.pmem.write_u64_deferred(off, sector);
        self.pmem.write_u64_deferred(off + 8, seq);
    }

    /// Writes back the entry lines of `logged` blocks (in log order): one
    /// write-back per line, not per entry, since blocks a core allocates
    /// in a row share entry lines (four 16-byte entries per line). This
    /// runs inside the commit, in front of the I/O waiting on the reactor.
    pub(crate) fn flush_entries(&self, logged: &[crate::cache::LogEntry]) {
        let mut last = usize::MAX;
        for e in logged {
            let line = self.entry_offset(e.block) & !(ENTRY_LINE - 1);
            if line != last {
                self.pmem.flush_range(line, ENTRY_LINE);
                last = line;
            }
        }
    }

    /// Marks `b`'s entry unused (all ones), seq first so a torn update is
    /// already "unused".
    pub(crate) fn clear_entry(&self, b: u32) {
        let off = self.entry_offset(b);
        self.pmem.write_u64(off + 8, u64::MAX);
        self.pmem.write_u64(off, u64::MAX);
    }

    /// Writes the superblock's sequence count (one atomic 8-byte store).
    pub(crate) fn write_sb_seq(&self, seq: u64) {
        self.pmem
            .write_u64(self.geo.superblock_offset() as usize + 24, seq);
    }

    pub(crate) fn read_entry(&self, b: u32) -> Entry {
        let mut raw = [0u8; ENTRY_SIZE];
        self.pmem.read(self.entry_offset(b), &mut raw);
        Entry::decode(&raw)
    }

    /// Pointer to block `b`'s data (valid for `block_size` bytes while the
    /// cache bdev is open).
    #[inline]
    pub(crate) fn data_ptr(&self, b: u32) -> *const u8 {
        // SAFETY: block_offset(b) + block_size <= geometry end <= pmem len,
        // checked when the geometry was computed against the mapping size.
        unsafe { self.pmem.base().add(self.data_offset(b)) }
    }
}

/// Formats a blank cache or recovers an existing one.
///
/// Refuses (touching nothing) a superblock with a bad magic/version/block
/// size/size, and metadata whose committed entries contradict each other or
/// point past the origin. `origin_blocks` is the vbdev size in cache blocks.
pub(crate) fn attach(
    pmem: Arc<dyn PersistentMemory>,
    start_sector: u64,
    block_size: u32,
    origin_blocks: u64,
) -> Result<Attached, AttachError> {
    let dev_size = pmem.len() as u64;
    let sb_off = start_sector
        .checked_mul(SECTOR_SIZE)
        .filter(|o| {
            o.checked_add(SUPERBLOCK_SIZE as u64)
                .is_some_and(|e| e <= dev_size)
        })
        .ok_or(FormatError::StartSectorPastEnd {
            start_sector,
            device_size: dev_size,
        })?;
    let mut raw = [0u8; SUPERBLOCK_SIZE];
    pmem.read(sb_off as usize, &mut raw);
    match Superblock::decode(&raw)? {
        SuperblockState::Blank => format(pmem, start_sector, block_size),
        SuperblockState::Formatted(sb) => {
            recover(pmem, sb, start_sector, block_size, origin_blocks)
        }
    }
}

/// Block ids are 32-bit, with `u32::MAX` reserved by the index.
pub(crate) fn check_indexable(geo: &Geometry) -> Result<(), AttachError> {
    if geo.n_blocks() >= u32::MAX as u64 {
        return Err(AttachError::Corrupt(format!(
            "{} cache blocks exceed what we index ({} at most); use larger blocks",
            geo.n_blocks(),
            u32::MAX - 1
        )));
    }
    Ok(())
}

fn format(
    pmem: Arc<dyn PersistentMemory>,
    start_sector: u64,
    block_size: u32,
) -> Result<Attached, AttachError> {
    let geo = Geometry::compute(pmem.len() as u64, start_sector, block_size)?;
    check_indexable(&geo)?;
    let media = Media { pmem, geo };
    let sb = media.geo.initial_superblock();
    // Everything but the magic first, durable; then the magic. A crash in
    // between leaves a superblock that is refused, never half-trusted.
    media.pmem.write_nt(
        media.geo.superblock_offset() as usize,
        &sb.encode_without_magic(),
    );
    for b in 0..media.geo.n_blocks() as u32 {
        media.clear_entry(b);
    }
    media.pmem.fence();
    media
        .pmem
        .write_nt(media.geo.superblock_offset() as usize, &sb.encode());
    media.pmem.fence();
    let n = media.geo.n_blocks() as usize;
    let mut free = scratch(n)?;
    for b in 0..n as u32 {
        let _ = free.push(b);
    }
    tracing::info!(
        "writecache: formatted cache with {} blocks of {} bytes",
        media.geo.n_blocks(),
        block_size
    );
    Ok(Attached {
        media,
        sb_seq: sb.seq_count,
        committed: scratch(0)?,
        free,
        formatted: true,
    })
}

/// A scratch array for `n` values (address space only until filled).
pub(crate) fn scratch<T: Copy>(n: usize) -> Result<ScratchVec<T>, AttachError> {
    ScratchVec::with_capacity(n)
        .map_err(|e| AttachError::Corrupt(format!("no memory for recovery of {n} blocks: {e}")))
}

fn recover(
    pmem: Arc<dyn PersistentMemory>,
    sb: Superblock,
    start_sector: u64,
    block_size: u32,
    origin_blocks: u64,
) -> Result<Attached, AttachError> {
    let geo =
        wc_writecache_format::validate(&sb, pmem.len() as u64, start_sector, Some(block_size))?;
    check_indexable(&geo)?;
    recover_media(Media { pmem, geo }, sb, origin_blocks)
}

/// Recovery proper over media whose geometry was validated: the committed
/// winners, with uncommitted and superseded entries cleared (durable once
/// the media's fence returns; in ssd mode, once the cleared entries are
/// written).
pub(crate) fn recover_media(
    media: Media,
    sb: Superblock,
    origin_blocks: u64,
) -> Result<Attached, AttachError> {
    let block_size = media.geo.block_size();
    let sectors_per_block = block_size as u64 / SECTOR_SIZE;
    // Pass 1: validate everything before changing anything. Committed
    // entries are collected as they are; the newest copy of each sector is
    // found by sorting them (no table sized for the whole cache).
    let n = media.geo.n_blocks() as usize;
    let mut committed: ScratchVec<Recovered> = scratch(n)?;
    let mut free: ScratchVec<u32> = scratch(n)?;
    // Uncommitted and superseded blocks, whose entries pass 2 clears.
    let mut cleared: ScratchVec<u32> = scratch(n)?;
    let mut uncommitted = 0usize;
    for b in 0..n as u32 {
        let e = media.read_entry(b);
        // A free writes all-ones to seq, then sector, fenced only once the
        // block is to be reused: a crash in between can persist just the
        // sector. No live entry has an all-ones sector (past any origin),
        // so such an entry is an interrupted free.
        if e.is_unused() || e.original_sector == u64::MAX {
            if !e.is_unused() {
                let _ = cleared.push(b);
                uncommitted += 1;
            } else {
                let _ = free.push(b);
            }
            continue;
        }
        if !e.is_committed(sb.seq_count) {
            let _ = cleared.push(b);
            uncommitted += 1;
            continue;
        }
        if e.original_sector % sectors_per_block != 0 {
            return Err(AttachError::Corrupt(format!(
                "block {b}: sector {} is not aligned to the {block_size}-byte block size",
                e.original_sector
            )));
        }
        let lba = e.original_sector / sectors_per_block;
        if lba >= origin_blocks {
            return Err(AttachError::Corrupt(format!(
                "block {b}: sector {} is past the end of the origin ({} blocks of {block_size})",
                e.original_sector, origin_blocks
            )));
        }
        let _ = committed.push(Recovered {
            block: b,
            lba,
            seq: e.seq_count,
        });
    }
    // Copies of one sector end up side by side, in block order: judged
    // as a scan of the entries would, the newest wins and a copy as new
    // as the newest seen so far is corruption.
    committed.sort_unstable_by_key(|r| (r.lba, r.block));
    let mut kept = 0;
    let mut i = 0;
    while i < committed.len() {
        let mut win = committed[i];
        let mut j = i + 1;
        while let Some(&r) = committed.get(j).filter(|r| r.lba == win.lba) {
            if r.seq == win.seq {
                return Err(AttachError::Corrupt(format!(
                    "blocks {} and {} both hold sector {} with sequence {}",
                    win.block,
                    r.block,
                    r.lba * sectors_per_block,
                    r.seq
                )));
            }
            let loser = if r.seq > win.seq {
                std::mem::replace(&mut win, r)
            } else {
                r
            };
            let _ = cleared.push(loser.block);
            j += 1;
        }
        committed[kept] = win;
        kept += 1;
        i = j;
    }
    committed.truncate(kept);
    let losers = cleared.len() - uncommitted;
    // Pass 2: clear uncommitted and superseded entries, durably.
    for &b in cleared.iter() {
        media.clear_entry(b);
        let _ = free.push(b);
    }
    media.pmem.fence();
    drop(cleared);
    free.sort_unstable();
    committed.sort_unstable_by_key(|r| (r.seq, r.lba));
    tracing::info!(
        "writecache: recovered {} committed blocks (cleared {} uncommitted, {} superseded), seq {}",
        committed.len(),
        uncommitted,
        losers,
        sb.seq_count
    );
    Ok(Attached {
        media,
        sb_seq: sb.seq_count,
        committed,
        free,
        formatted: false,
    })
}
