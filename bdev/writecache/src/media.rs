//! Persistent layout access in pmem mode: entries, superblock, data blocks,
//! formatting and recovery. All stores go through `PersistentMemory`, so the
//! crash simulator sees every one of them.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use wc_bdev::PersistentMemory;
use wc_writecache_format::{
    Entry, FormatError, Geometry, Superblock, SuperblockState, ENTRY_SIZE, SECTOR_SIZE,
    SUPERBLOCK_SIZE,
};

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
    pub(crate) committed: Vec<Recovered>,
    /// Free blocks.
    pub(crate) free: Vec<u32>,
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
    let free = (0..media.geo.n_blocks() as u32).collect();
    tracing::info!(
        "writecache: formatted cache with {} blocks of {} bytes",
        media.geo.n_blocks(),
        block_size
    );
    Ok(Attached {
        media,
        sb_seq: sb.seq_count,
        committed: Vec::new(),
        free,
        formatted: true,
    })
}

/// One multiply per key: LBAs come from entries already range-checked
/// against the origin, and recovery needs speed, not DoS resistance.
#[derive(Default)]
struct LbaHasher(u64);

impl Hasher for LbaHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0 ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
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
    // Pass 1: validate everything before changing anything.
    // Sized for a full cache up front: rehashing millions of entries would
    // be a good part of the recovery time.
    let mut winners: HashMap<u64, (u32, u64), BuildHasherDefault<LbaHasher>> =
        HashMap::with_capacity_and_hasher(media.geo.n_blocks() as usize, Default::default());
    let mut losers: Vec<u32> = Vec::new();
    let mut uncommitted: Vec<u32> = Vec::new();
    let mut free: Vec<u32> = Vec::new();
    for b in 0..media.geo.n_blocks() as u32 {
        let e = media.read_entry(b);
        // A free writes all-ones to seq, then sector, fenced only once the
        // block is to be reused: a crash in between can persist just the
        // sector. No live entry has an all-ones sector (past any origin),
        // so such an entry is an interrupted free.
        if e.is_unused() || e.original_sector == u64::MAX {
            if !e.is_unused() {
                uncommitted.push(b);
            } else {
                free.push(b);
            }
            continue;
        }
        if !e.is_committed(sb.seq_count) {
            uncommitted.push(b);
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
        match winners.get(&lba).copied() {
            None => {
                winners.insert(lba, (b, e.seq_count));
            }
            Some((ob, oseq)) if oseq == e.seq_count => {
                return Err(AttachError::Corrupt(format!(
                    "blocks {ob} and {b} both hold sector {} with sequence {oseq}",
                    e.original_sector
                )));
            }
            Some((ob, oseq)) if oseq < e.seq_count => {
                losers.push(ob);
                winners.insert(lba, (b, e.seq_count));
            }
            Some(_) => losers.push(b),
        }
    }
    // Pass 2: clear uncommitted and superseded entries, durably.
    for &b in uncommitted.iter().chain(losers.iter()) {
        media.clear_entry(b);
    }
    media.pmem.fence();
    free.extend(uncommitted.iter().copied());
    free.extend(losers.iter().copied());
    free.sort_unstable();
    let mut committed: Vec<Recovered> = winners
        .into_iter()
        .map(|(lba, (block, seq))| Recovered { block, lba, seq })
        .collect();
    committed.sort_unstable_by_key(|r| (r.seq, r.lba));
    tracing::info!(
        "writecache: recovered {} committed blocks (cleared {} uncommitted, {} superseded), seq {}",
        committed.len(),
        uncommitted.len(),
        losers.len(),
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
