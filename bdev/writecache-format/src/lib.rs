//! Pure codec for the dm-writecache v1 on-media format.
//!
//! This crate only converts between bytes and values and computes offsets;
//! it performs no I/O. The format is the one used by Linux
//! `drivers/md/dm-writecache.c`, so a cache device written by us can be
//! attached by the kernel target and vice versa.
//!
//! Layout, relative to byte `start_sector * 512` of the cache device; every
//! integer is little-endian:
//!
//! ```text
//! +0                   superblock (64 bytes)
//!                        magic u32 | version u32 | block_size u32 | pad u32
//!                        n_blocks u64 | seq_count u64 | zeros
//! +64                  entries[n_blocks], 16 bytes each
//!                        original_sector u64 (512-byte sectors) | seq_count u64
//! +round_up(64 + 16 * n_blocks, block_size)
//!                      data: cache block i at data_start + i * block_size
//! ```
//!
//! An entry is committed iff its `seq_count` is below the superblock's
//! `seq_count`; a free entry has `seq_count == u64::MAX`.
//!
//! Formatting is driven by the caller and, like the kernel, must be
//! crash-safe: write the superblock from [`Superblock::encode_without_magic`]
//! and every entry as [`Entry::UNUSED`], flush, then write the full
//! [`Superblock::encode`] (which adds the magic) and flush again. A device is
//! only formatted when [`Superblock::decode`] reports
//! [`SuperblockState::Blank`]; anything else is attached through [`validate`]
//! or refused, never silently reformatted.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use thiserror::Error;

/// Superblock magic number (`MEMORY_SUPERBLOCK_MAGIC`).
pub const MAGIC: u32 = 0x2348_9321;
/// The only on-media format version understood (`MEMORY_SUPERBLOCK_VERSION`).
pub const VERSION: u32 = 1;
/// Size of the superblock in bytes; the entry array follows it directly.
pub const SUPERBLOCK_SIZE: usize = 64;
/// Size of one metadata entry in bytes.
pub const ENTRY_SIZE: usize = 16;
/// Sector size used for `start_sector` and `Entry::original_sector`,
/// independent of the cache block size.
pub const SECTOR_SIZE: u64 = 512;
/// Smallest accepted cache block size.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest accepted cache block size (the kernel allows up to `PAGE_SIZE`;
/// 4096 is the portable subset).
pub const MAX_BLOCK_SIZE: u32 = 4096;
/// Largest block count: the kernel keeps the entry index in a 47-bit field,
/// so a bigger cache could not be attached by Linux.
pub const MAX_BLOCKS: u64 = (1 << 47) - 1;

// Byte offsets of the superblock fields.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_BLOCK_SIZE: usize = 8;
const OFF_N_BLOCKS: usize = 16;
const OFF_SEQ_COUNT: usize = 24;

// Compile-time checks of the layout assumptions the code relies on.
const _: () = {
    assert!(SUPERBLOCK_SIZE == 64 && ENTRY_SIZE == 16 && SECTOR_SIZE == 512);
    // Fields are packed in order, naturally aligned, and end inside the
    // 64-byte superblock (the rest is zero padding).
    assert!(OFF_VERSION == OFF_MAGIC + 4 && OFF_BLOCK_SIZE == OFF_VERSION + 4);
    assert!(OFF_N_BLOCKS == OFF_BLOCK_SIZE + 8 && OFF_SEQ_COUNT == OFF_N_BLOCKS + 8);
    assert!(OFF_SEQ_COUNT + 8 <= SUPERBLOCK_SIZE);
    // Entries directly follow the superblock and stay 16-byte aligned.
    assert!(SUPERBLOCK_SIZE % ENTRY_SIZE == 0);
    // Block sizes are whole sectors, so sector <-> block math is exact.
    assert!(MIN_BLOCK_SIZE.is_power_of_two() && MAX_BLOCK_SIZE.is_power_of_two());
    assert!(MIN_BLOCK_SIZE as u64 == SECTOR_SIZE && MIN_BLOCK_SIZE <= MAX_BLOCK_SIZE);
    // Any accepted (n_blocks, block_size) has a layout size that fits in u64,
    // so checked arithmetic below only fails on out-of-range inputs.
    let per_block = MAX_BLOCK_SIZE as u64 + ENTRY_SIZE as u64;
    let worst = match MAX_BLOCKS.checked_mul(per_block) {
        Some(v) => v,
        None => panic!("layout overflows"),
    };
    assert!(worst
        .checked_add(SUPERBLOCK_SIZE as u64 + MAX_BLOCK_SIZE as u64)
        .is_some());
};

/// Why a format operation was refused.
///
/// Each variant carries the offending values so the message is actionable;
/// [`FormatError::errno`] maps it to a Linux errno for RPC replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FormatError {
    /// The superblock magic is neither zero (blank) nor [`MAGIC`].
    #[error("bad superblock magic {found:#010x}, expected {MAGIC:#010x}")]
    BadMagic {
        /// Magic read from the device.
        found: u32,
    },
    /// The superblock version is not [`VERSION`].
    #[error("unsupported superblock version {found}, expected {VERSION}")]
    BadVersion {
        /// Version read from the device.
        found: u32,
    },
    /// A block size is not a power of two in 512..=4096.
    #[error("invalid block size {block_size}: must be a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}")]
    BlockSizeInvalid {
        /// The rejected block size.
        block_size: u32,
    },
    /// The superblock's block size differs from the one requested.
    #[error("superblock block size {found} does not match requested block size {expected}")]
    BlockSizeMismatch {
        /// Block size stored in the superblock.
        found: u32,
        /// Block size the caller asked for.
        expected: u32,
    },
    /// The superblock claims zero cache blocks.
    #[error("superblock n_blocks is 0")]
    ZeroBlocks,
    /// The block count exceeds [`MAX_BLOCKS`].
    #[error("n_blocks {n_blocks} exceeds the maximum {max}")]
    TooManyBlocks {
        /// The rejected block count.
        n_blocks: u64,
        /// The largest supported block count.
        max: u64,
    },
    /// The superblock would start beyond the end of the device.
    #[error("start sector {start_sector} is past the end of a {device_size}-byte device")]
    StartSectorPastEnd {
        /// Requested start sector.
        start_sector: u64,
        /// Device size in bytes.
        device_size: u64,
    },
    /// Not even one cache block fits after `start_sector`.
    #[error("cache device too small: need {needed} bytes for one block, {available} available")]
    DeviceTooSmall {
        /// Bytes needed for a superblock, one entry and one block.
        needed: u64,
        /// Bytes available from the superblock to the end of the device.
        available: u64,
    },
    /// An existing superblock describes more metadata + data than the
    /// device holds (truncated device or corrupt `n_blocks`).
    #[error("superblock n_blocks {n_blocks} needs {needed} bytes, only {available} available")]
    BlocksExceedDevice {
        /// Block count read from the superblock.
        n_blocks: u64,
        /// Bytes that count requires.
        needed: u64,
        /// Bytes available from the superblock to the end of the device.
        available: u64,
    },
    /// An entry index lies outside the supplied metadata buffer.
    #[error("entry {index} is outside a {buf_len}-byte metadata buffer")]
    EntryOutOfBounds {
        /// Requested entry index.
        index: u64,
        /// Length of the buffer.
        buf_len: usize,
    },
}

impl FormatError {
    /// Positive Linux errno for this error (callers send `-errno`).
    ///
    /// Matches dm-writecache where it has a counterpart: `ENOSPC` when the
    /// device cannot hold a single block, `EFBIG` when the size does not fit
    /// the index, `EINVAL` for every bad or inconsistent value.
    pub fn errno(&self) -> i32 {
        const EINVAL: i32 = 22;
        const ENOSPC: i32 = 28;
        const EFBIG: i32 = 27;
        match self {
            Self::DeviceTooSmall { .. } => ENOSPC,
            Self::TooManyBlocks { .. } => EFBIG,
            Self::BadMagic { .. }
            | Self::BadVersion { .. }
            | Self::BlockSizeInvalid { .. }
            | Self::BlockSizeMismatch { .. }
            | Self::ZeroBlocks
            | Self::StartSectorPastEnd { .. }
            | Self::BlocksExceedDevice { .. }
            | Self::EntryOutOfBounds { .. } => EINVAL,
        }
    }
}

fn read_u32(bytes: &[u8], off: usize) -> u32 {
    let mut raw = [0; 4];
    raw.copy_from_slice(&bytes[off..off + 4]);
    u32::from_le_bytes(raw)
}

fn read_u64(bytes: &[u8], off: usize) -> u64 {
    let mut raw = [0; 8];
    raw.copy_from_slice(&bytes[off..off + 8]);
    u64::from_le_bytes(raw)
}

/// Decoded superblock of a formatted cache (magic and version implied).
///
/// A decoded value is only known to carry the right magic and version; pass
/// it to [`validate`] before trusting `block_size` or `n_blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Superblock {
    /// Cache block size in bytes.
    pub block_size: u32,
    /// Number of cache blocks (and entries).
    pub n_blocks: u64,
    /// Commit sequence: entries with a lower `seq_count` are committed.
    pub seq_count: u64,
}

/// What [`Superblock::decode`] found on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperblockState {
    /// Magic and version are both zero: the device may be formatted. The
    /// other bytes are ignored, as in dm-writecache.
    Blank,
    /// A v1 superblock with the right magic.
    Formatted(Superblock),
}

impl Superblock {
    /// Encodes the full 64-byte superblock, padding zeroed.
    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut out = self.encode_without_magic();
        out[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&MAGIC.to_le_bytes());
        out
    }

    /// Encodes the superblock with a zero magic: the first step of a
    /// crash-safe format. Until the magic is written the device decodes as
    /// [`FormatError::BadMagic`] (version is already 1), so an interrupted
    /// format is refused instead of being mistaken for a valid cache.
    pub fn encode_without_magic(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut out = [0; SUPERBLOCK_SIZE];
        out[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
        out[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4].copy_from_slice(&self.block_size.to_le_bytes());
        out[OFF_N_BLOCKS..OFF_N_BLOCKS + 8].copy_from_slice(&self.n_blocks.to_le_bytes());
        out[OFF_SEQ_COUNT..OFF_SEQ_COUNT + 8].copy_from_slice(&self.seq_count.to_le_bytes());
        out
    }

    /// Decodes a superblock, checking only magic and version.
    ///
    /// `pad` and the trailing bytes are ignored, like the kernel does.
    pub fn decode(bytes: &[u8; SUPERBLOCK_SIZE]) -> Result<SuperblockState, FormatError> {
        let magic = read_u32(bytes, OFF_MAGIC);
        let version = read_u32(bytes, OFF_VERSION);
        // dm-writecache formats exactly when both are zero.
        if magic == 0 && version == 0 {
            return Ok(SuperblockState::Blank);
        }
        if magic != MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        if version != VERSION {
            return Err(FormatError::BadVersion { found: version });
        }
        Ok(SuperblockState::Formatted(Superblock {
            block_size: read_u32(bytes, OFF_BLOCK_SIZE),
            n_blocks: read_u64(bytes, OFF_N_BLOCKS),
            seq_count: read_u64(bytes, OFF_SEQ_COUNT),
        }))
    }
}

/// One metadata entry, describing cache block `i` for entry `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Origin-device sector cached by this block, in 512-byte sectors.
    pub original_sector: u64,
    /// Sequence number at which the block was written; `u64::MAX` if free.
    pub seq_count: u64,
}

impl Entry {
    /// A never-used entry, as written at format time (all ones).
    pub const UNUSED: Entry = Entry {
        original_sector: u64::MAX,
        seq_count: u64::MAX,
    };

    /// Whether the entry is free. Only `seq_count` matters: the kernel frees
    /// an entry by setting just its `seq_count` to all ones.
    pub const fn is_unused(&self) -> bool {
        self.seq_count == u64::MAX
    }

    /// Whether the entry is committed under superblock sequence `sb_seq`.
    pub const fn is_committed(&self, sb_seq: u64) -> bool {
        committed(self, sb_seq)
    }

    /// Encodes the entry to its 16 on-media bytes.
    pub fn encode(&self) -> [u8; ENTRY_SIZE] {
        let mut out = [0; ENTRY_SIZE];
        out[..8].copy_from_slice(&self.original_sector.to_le_bytes());
        out[8..].copy_from_slice(&self.seq_count.to_le_bytes());
        out
    }

    /// Decodes an entry from its 16 on-media bytes (every value is valid).
    pub fn decode(bytes: &[u8; ENTRY_SIZE]) -> Entry {
        Entry {
            original_sector: read_u64(bytes, 0),
            seq_count: read_u64(bytes, 8),
        }
    }

    /// Reads entry `index` from `metadata`, a buffer that starts at the
    /// superblock (so entry `index` is at `64 + 16 * index`).
    pub fn read_at(metadata: &[u8], index: u64) -> Result<Entry, FormatError> {
        let range = entry_range(metadata.len(), index)?;
        let mut raw = [0; ENTRY_SIZE];
        raw.copy_from_slice(&metadata[range]);
        Ok(Entry::decode(&raw))
    }

    /// Writes this entry as entry `index` of `metadata`, a buffer that starts
    /// at the superblock.
    pub fn write_at(&self, metadata: &mut [u8], index: u64) -> Result<(), FormatError> {
        let range = entry_range(metadata.len(), index)?;
        metadata[range].copy_from_slice(&self.encode());
        Ok(())
    }
}

/// Byte range of entry `index` in a metadata buffer of `buf_len` bytes.
fn entry_range(buf_len: usize, index: u64) -> Result<std::ops::Range<usize>, FormatError> {
    let start = usize::try_from(index)
        .ok()
        .and_then(|i| i.checked_mul(ENTRY_SIZE))
        .and_then(|off| off.checked_add(SUPERBLOCK_SIZE))
        .filter(|&start| start <= buf_len && buf_len - start >= ENTRY_SIZE)
        .ok_or(FormatError::EntryOutOfBounds { index, buf_len })?;
    Ok(start..start + ENTRY_SIZE)
}

/// Whether `entry` is committed under superblock sequence `sb_seq`: the
/// kernel bumps the superblock `seq_count` after flushing the blocks written
/// at the previous value, so only strictly older entries are durable.
pub const fn committed(entry: &Entry, sb_seq: u64) -> bool {
    entry.seq_count < sb_seq
}

/// Checks that `block_size` is a power of two in 512..=4096.
pub fn check_block_size(block_size: u32) -> Result<(), FormatError> {
    if block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        Ok(())
    } else {
        Err(FormatError::BlockSizeInvalid { block_size })
    }
}

/// Metadata size (superblock + entries, rounded up to a block) and total
/// size (metadata + data) for `n_blocks` blocks; `None` on overflow.
fn layout_size(n_blocks: u64, block_size: u32) -> Option<(u64, u64)> {
    let bs = u64::from(block_size);
    let metadata = n_blocks
        .checked_mul(ENTRY_SIZE as u64)?
        .checked_add(SUPERBLOCK_SIZE as u64)?
        .checked_next_multiple_of(bs)?;
    let total = n_blocks.checked_mul(bs)?.checked_add(metadata)?;
    Some((metadata, total))
}

/// Byte offset of the superblock and bytes from there to the device end.
fn usable(device_size: u64, start_sector: u64) -> Result<(u64, u64), FormatError> {
    start_sector
        .checked_mul(SECTOR_SIZE)
        .filter(|&off| off <= device_size)
        .map(|off| (off, device_size - off))
        .ok_or(FormatError::StartSectorPastEnd {
            start_sector,
            device_size,
        })
}

/// Byte layout of a cache device; every offset is absolute on the device.
///
/// Only built by [`Geometry::compute`] or [`validate`], so all offsets of
/// blocks `0..n_blocks` are known to fit the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    block_size: u32,
    n_blocks: u64,
    superblock_offset: u64,
    metadata_bytes: u64,
}

impl Geometry {
    /// Computes the layout of a fresh format: the largest `n_blocks` whose
    /// metadata and data fit between `start_sector` and the device end.
    pub fn compute(
        device_size: u64,
        start_sector: u64,
        block_size: u32,
    ) -> Result<Geometry, FormatError> {
        check_block_size(block_size)?;
        let (superblock_offset, available) = usable(device_size, start_sector)?;
        let too_small = || FormatError::DeviceTooSmall {
            // One block always fits u64: 64 + 16 rounded up, plus one block.
            needed: layout_size(1, block_size).map_or(u64::MAX, |(_, total)| total),
            available,
        };
        // Like dm-writecache: each block costs at least block_size + 16
        // bytes, so this is an upper bound; walk down to the first fit. The
        // rounding of the metadata wastes less than 64 + block_size bytes,
        // i.e. at most two blocks' worth, so the loop runs at most 3 times.
        let mut n_blocks = available / (u64::from(block_size) + ENTRY_SIZE as u64);
        let metadata_bytes = loop {
            if n_blocks == 0 {
                return Err(too_small());
            }
            match layout_size(n_blocks, block_size) {
                Some((metadata, total)) if total <= available => break metadata,
                _ => n_blocks -= 1,
            }
        };
        if n_blocks > MAX_BLOCKS {
            return Err(FormatError::TooManyBlocks {
                n_blocks,
                max: MAX_BLOCKS,
            });
        }
        Ok(Geometry {
            block_size,
            n_blocks,
            superblock_offset,
            metadata_bytes,
        })
    }

    /// The superblock to write when formatting with this geometry.
    pub fn initial_superblock(&self) -> Superblock {
        Superblock {
            block_size: self.block_size,
            n_blocks: self.n_blocks,
            seq_count: 0,
        }
    }

    /// Cache block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of cache blocks.
    pub fn n_blocks(&self) -> u64 {
        self.n_blocks
    }

    /// Absolute byte offset of the superblock (`start_sector * 512`).
    pub fn superblock_offset(&self) -> u64 {
        self.superblock_offset
    }

    /// Bytes of metadata (superblock + entries, rounded up to a block);
    /// also the data area's offset relative to the superblock.
    pub fn metadata_bytes(&self) -> u64 {
        self.metadata_bytes
    }

    /// Number of blocks occupied by the metadata.
    pub fn n_metadata_blocks(&self) -> u64 {
        self.metadata_bytes / u64::from(self.block_size)
    }

    /// Absolute byte offset of cache block 0.
    pub fn data_start(&self) -> u64 {
        self.superblock_offset + self.metadata_bytes
    }

    /// Absolute byte offset one past the last cache block.
    pub fn end(&self) -> u64 {
        self.block_offset_unchecked(self.n_blocks)
    }

    /// Absolute byte offset of entry `index`.
    ///
    /// # Panics
    /// If `index >= n_blocks`, like slice indexing.
    pub fn entry_offset(&self, index: u64) -> u64 {
        assert!(index < self.n_blocks, "entry {index} out of range");
        self.superblock_offset + SUPERBLOCK_SIZE as u64 + index * ENTRY_SIZE as u64
    }

    /// Absolute byte offset of cache block `index`.
    ///
    /// # Panics
    /// If `index >= n_blocks`, like slice indexing.
    pub fn block_offset(&self, index: u64) -> u64 {
        assert!(index < self.n_blocks, "block {index} out of range");
        self.block_offset_unchecked(index)
    }

    // No overflow for index <= n_blocks: construction checked that the
    // whole layout ends within the device size.
    fn block_offset_unchecked(&self, index: u64) -> u64 {
        self.data_start() + index * u64::from(self.block_size)
    }
}

/// Validates an existing superblock against the device it was read from and
/// returns its geometry.
///
/// `expected_block_size` is the block size the user asked for, if any; a
/// mismatch is refused rather than reformatted. Every size computation is
/// checked, so hostile on-media values produce errors, never panics.
pub fn validate(
    sb: &Superblock,
    device_size: u64,
    start_sector: u64,
    expected_block_size: Option<u32>,
) -> Result<Geometry, FormatError> {
    if let Some(expected) = expected_block_size {
        check_block_size(expected)?;
    }
    check_block_size(sb.block_size)?;
    if let Some(expected) = expected_block_size.filter(|&e| e != sb.block_size) {
        return Err(FormatError::BlockSizeMismatch {
            found: sb.block_size,
            expected,
        });
    }
    if sb.n_blocks == 0 {
        return Err(FormatError::ZeroBlocks);
    }
    if sb.n_blocks > MAX_BLOCKS {
        return Err(FormatError::TooManyBlocks {
            n_blocks: sb.n_blocks,
            max: MAX_BLOCKS,
        });
    }
    let (superblock_offset, available) = usable(device_size, start_sector)?;
    // Cannot fail after the MAX_BLOCKS check (see the const assertions),
    // but stay defensive rather than unwrap.
    let (metadata_bytes, needed) =
        layout_size(sb.n_blocks, sb.block_size).ok_or(FormatError::TooManyBlocks {
            n_blocks: sb.n_blocks,
            max: MAX_BLOCKS,
        })?;
    if needed > available {
        return Err(FormatError::BlocksExceedDevice {
            n_blocks: sb.n_blocks,
            needed,
            available,
        });
    }
    Ok(Geometry {
        block_size: sb.block_size,
        n_blocks: sb.n_blocks,
        superblock_offset,
        metadata_bytes,
    })
}

#[cfg(test)]
mod tests;
