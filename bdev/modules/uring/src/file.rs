//! Opening the backing file or block device and working out its geometry.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::atomic::AtomicBool;

use wc_bdev::BdevError;

use crate::UringOpts;

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)` (not exported by `libc`).
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: libc::c_ulong = 0x4008_1272;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Everything the channels of one bdev share about its backing file.
pub(crate) struct FileState {
    /// The open file (closed when the bdev and all its channels are gone).
    pub(crate) file: File,
    /// Path as given.
    pub(crate) filename: String,
    /// Bdev name (poller names, logs).
    pub(crate) name: String,
    /// Opened with `O_DIRECT`.
    pub(crate) direct_io: bool,
    /// On a memory file system: served inline (see `inline.rs`).
    pub(crate) inline_io: bool,
    /// Opened read-only.
    pub(crate) readonly: bool,
    /// Block size of the bdev.
    pub(crate) block_size: u32,
    /// Number of blocks of the bdev.
    pub(crate) num_blocks: u64,
    /// Alignment announced to the bdev layer.
    pub(crate) required_alignment: u32,
    /// UNMAP / WRITE_ZEROES through fallocate.
    pub(crate) can_fallocate: bool,
    /// Cleared once `FALLOC_FL_ZERO_RANGE` was refused: punch holes then.
    pub(crate) zero_range_ok: AtomicBool,
    /// Memory alignment direct I/O needs of each segment (1 if buffered).
    pub(crate) dio_mem_align: usize,
    /// Length granularity direct I/O needs of each segment (1 if buffered).
    pub(crate) dio_len_align: usize,
}

impl FileState {
    /// The file descriptor.
    pub(crate) fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

fn os_err(context: String) -> impl FnOnce(std::io::Error) -> BdevError {
    move |e| BdevError::os(context, e)
}

/// Opens `opts.filename` and validates the requested geometry.
pub(crate) fn open(opts: &UringOpts, force_buffered: bool) -> Result<FileState, BdevError> {
    let readonly = opts.readonly.unwrap_or(false);
    let filename = opts.filename.clone();
    if filename.is_empty() {
        return Err(BdevError::Invalid("filename must not be empty".into()));
    }
    let (mut file, mut direct_io) = open_file(&filename, readonly, force_buffered)?;
    let meta = file
        .metadata()
        .map_err(os_err(format!("stat {filename}")))?;
    let ft = meta.file_type();
    let is_blockdev = ft.is_block_device();
    if !is_blockdev && !ft.is_file() {
        return Err(BdevError::Invalid(format!(
            "{filename} is neither a regular file nor a block device"
        )));
    }
    let inline_io = serves_inline(ft.is_file(), fs_magic(&file));
    if inline_io && direct_io {
        // tmpfs accepts O_DIRECT (since Linux 6.6) but its pages are the
        // medium: direct I/O there only adds alignment rules.
        (file, direct_io) = open_file(&filename, readonly, true)?;
    }
    let dio = if direct_io { dio_align(&file) } else { None };
    let (size, logical) = if is_blockdev {
        (
            blockdev_size(&file, &filename)?,
            blockdev_lbs(&file, &filename)?,
        )
    } else {
        // Files: 512, unless the file system's direct-I/O granularity is
        // coarser (a 4Kn disk).
        let lbs = dio.map(|(_, off)| off.max(512)).unwrap_or(512);
        (meta.len(), lbs)
    };
    let block_size = match opts.block_size {
        None | Some(0) => logical,
        Some(bs) => {
            if !bs.is_power_of_two() {
                return Err(BdevError::Invalid(format!(
                    "block_size {bs} is not a power of two"
                )));
            }
            if bs < logical {
                return Err(BdevError::Invalid(format!(
                    "block_size {bs} is smaller than the logical block size {logical} of {filename}"
                )));
            }
            bs
        }
    };
    let num_blocks = size / block_size as u64;
    if num_blocks == 0 {
        return Err(BdevError::Invalid(format!(
            "{filename} ({size} bytes) is smaller than one block of {block_size} bytes"
        )));
    }
    let (dio_mem_align, dio_len_align, required_alignment) = if direct_io {
        // Without statx's answer assume the classic rule: 512-byte aligned
        // memory, segments a multiple of the logical block size.
        let (mem, len) = dio.unwrap_or((512, logical));
        let mem = mem.max(1);
        let len = len.max(1);
        // Announce the memory alignment, but never more than half a block:
        // the bdev layer applies it to segment lengths too, and sub-block
        // segments are legal. What the kernel would refuse is bounced.
        let announced = mem.min(block_size / 2).max(1);
        (mem as usize, len as usize, announced)
    } else {
        (1, 1, 1)
    };
    let can_fallocate = !readonly
        && if is_blockdev {
            opts.fallocate.unwrap_or(false)
        } else {
            probe_punch_hole(&file, size, block_size)
        };
    if inline_io {
        tracing::debug!("{filename}: on a memory file system, I/O served inline");
    } else if !direct_io {
        tracing::debug!("{filename}: buffered I/O, FLUSH uses fdatasync");
    }
    Ok(FileState {
        file,
        filename,
        name: opts.name.clone(),
        direct_io,
        inline_io,
        readonly,
        block_size,
        num_blocks,
        required_alignment: required_alignment.next_power_of_two(),
        can_fallocate,
        zero_range_ok: AtomicBool::new(true),
        dio_mem_align,
        dio_len_align,
    })
}

/// Opens with `O_DIRECT`, falling back to buffered I/O where the file
/// system refuses it with `EINVAL`.
fn open_file(
    filename: &str,
    readonly: bool,
    force_buffered: bool,
) -> Result<(File, bool), BdevError> {
    let open = |direct: bool| {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!readonly);
        if direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        oo.open(filename)
    };
    if !force_buffered {
        match open(true) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    "{filename}: O_DIRECT refused (EINVAL); falling back to buffered I/O \
                     with fdatasync on FLUSH"
                );
            }
            Err(e) => return Err(BdevError::os(format!("open {filename}"), e)),
        }
    }
    open(false)
        .map(|f| (f, false))
        .map_err(os_err(format!("open {filename}")))
}

/// `statfs` magic of ramfs (not exported by `libc`).
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// Whether a file is served inline: a regular file on tmpfs or ramfs,
/// whose pages are the medium. Not a device node: `/dev` is a devtmpfs,
/// which reports tmpfs's magic for the NVMe drive's node too.
fn serves_inline(regular_file: bool, fs_magic: Option<u64>) -> bool {
    regular_file && fs_magic.is_some_and(|m| m == libc::TMPFS_MAGIC as u64 || m == RAMFS_MAGIC)
}

/// The `statfs` magic of the file system holding the open file.
fn fs_magic(file: &File) -> Option<u64> {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the duration of the call and `st` is a
    // valid, writable statfs buffer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_type as u64)
}

/// `(memory alignment, offset/length alignment)` for direct I/O, from
/// `statx(STATX_DIOALIGN)` where the kernel and file system report it.
fn dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the duration of the call, the path is a
    // NUL-terminated empty string (AT_EMPTY_PATH: the fd itself), and `stx`
    // is a valid, writable statx buffer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

fn blockdev_size(file: &File, filename: &str) -> Result<u64, BdevError> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to a live, writable u64; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc != 0 {
        return Err(BdevError::os(
            format!("BLKGETSIZE64 {filename}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(size)
}

fn blockdev_lbs(file: &File, filename: &str) -> Result<u32, BdevError> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to
    // a live, writable c_int; the fd is open.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET as _,
            &mut lbs as *mut libc::c_int,
        )
    };
    if rc != 0 {
        return Err(BdevError::os(
            format!("BLKSSZGET {filename}"),
            std::io::Error::last_os_error(),
        ));
    }
    u32::try_from(lbs)
        .ok()
        .filter(|l| l.is_power_of_two() && *l >= 512)
        .ok_or_else(|| BdevError::Invalid(format!("{filename}: odd logical block size {lbs}")))
}

/// Whether the file system can punch holes: punch one block past the end of
/// the file, which changes nothing (KEEP_SIZE, nothing allocated there).
fn probe_punch_hole(file: &File, size: u64, block_size: u32) -> bool {
    let Some(off) = size
        .checked_next_multiple_of(block_size as u64)
        .and_then(|o| libc::off_t::try_from(o).ok())
    else {
        return false;
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is open.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            block_size as libc::off_t,
        )
    };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_on_memory_file_systems_are_served_inline() {
        const EXT4_MAGIC: u64 = 0xEF53;
        let tmpfs = libc::TMPFS_MAGIC as u64;
        assert!(serves_inline(true, Some(tmpfs)));
        assert!(serves_inline(true, Some(RAMFS_MAGIC)));
        assert!(!serves_inline(true, Some(EXT4_MAGIC)));
        assert!(!serves_inline(true, None));
        // A block device's node in /dev (devtmpfs answers tmpfs's magic).
        assert!(!serves_inline(false, Some(tmpfs)));
        // A real device node (its /dev usually answers tmpfs's magic).
        let node = File::open("/dev/null").unwrap();
        assert!(!serves_inline(
            node.metadata().unwrap().is_file(),
            fs_magic(&node)
        ));
    }
}
