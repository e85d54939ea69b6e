//! The I/O path of a file on a memory file system (tmpfs, ramfs): every
//! request is one system call made on the submitting reactor, as malloc's
//! memcpy is.
//!
//! io_uring cannot run a tmpfs write without blocking semantics it does not
//! have there (no non-blocking buffered writes), so it hands each one to a
//! kernel worker thread: a wake-up and a context switch per write, ~30 k
//! writes/s at one request in flight on this machine's cores against
//! ~600 k for a plain `pwritev`. The call itself only copies pages (there
//! is no device to wait for), so making it inline costs the reactor what a
//! malloc bdev's copy costs. SPDK's aio bdev behaves the same way on such
//! files (libaio runs buffered requests inside `io_submit`).

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use wc_bdev::{Io, IoChannel, IoStatus, IoType};

use crate::FileState;

/// Segments one preadv/pwritev takes (`IOV_MAX`); longer lists take
/// several calls.
const IOV_MAX: usize = 1024;

/// A channel that serves each request with one system call.
pub(crate) struct InlineChannel {
    file: Arc<FileState>,
    /// The current request's iovec array (reused: no allocation per I/O).
    iovecs: RefCell<Vec<libc::iovec>>,
}

impl InlineChannel {
    pub(crate) fn new(file: Arc<FileState>) -> Self {
        InlineChannel {
            file,
            iovecs: RefCell::new(Vec::with_capacity(16)),
        }
    }

    fn transfer(&self, io: &Io) -> Result<(), i32> {
        let write = io.io_type() == IoType::Write;
        let flags = if write && io.fua() {
            libc::RWF_DSYNC
        } else {
            0
        };
        let mut iovecs = self.iovecs.try_borrow_mut().map_err(|_| libc::EBUSY)?;
        let mut off = io.offset_bytes();
        let mut segs = io.iovs();
        while !segs.is_empty() {
            let (now, rest) = segs.split_at(segs.len().min(IOV_MAX));
            segs = rest;
            iovecs.clear();
            iovecs.extend(now.iter().map(|v| libc::iovec {
                iov_base: v.base.cast(),
                iov_len: v.len,
            }));
            let mut first = 0usize;
            while first < iovecs.len() {
                let pos = libc::off_t::try_from(off).map_err(|_| libc::EINVAL)?;
                let list = &iovecs[first..];
                let n = list.len() as libc::c_int;
                // Every iovec points into a segment of `io`, which the
                // submitter keeps valid (and, for a read, writable) until
                // the request completes, i.e. past this call; the array
                // itself is live and unaliased for the call.
                let res = if write {
                    // SAFETY: as above; pwritev2 only reads the segments.
                    unsafe { libc::pwritev2(self.file.fd(), list.as_ptr(), n, pos, flags) }
                } else {
                    // SAFETY: as above; the segments are writable.
                    unsafe { libc::preadv2(self.file.fd(), list.as_ptr(), n, pos, 0) }
                };
                if res < 0 {
                    let errno = last_errno();
                    if errno == libc::EINTR {
                        continue;
                    }
                    return Err(errno);
                }
                if res == 0 {
                    // End of file inside the bdev: the file shrank.
                    return Err(libc::EIO);
                }
                let mut moved = res as usize;
                off += moved as u64;
                // Skip what was transferred: whole segments, then the
                // front of a partly done one.
                while first < iovecs.len() && moved >= iovecs[first].iov_len {
                    moved -= iovecs[first].iov_len;
                    first += 1;
                }
                if moved > 0 {
                    let v = &mut iovecs[first];
                    // SAFETY: moved < v.iov_len, so the new base stays
                    // inside the same segment.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(moved) }.cast();
                    v.iov_len -= moved;
                }
            }
        }
        Ok(())
    }

    fn fallocate(&self, io: &Io, mode: libc::c_int) -> Result<(), i32> {
        let off = libc::off_t::try_from(io.offset_bytes()).map_err(|_| libc::EINVAL)?;
        let len = libc::off_t::try_from(io.len_bytes()).map_err(|_| libc::EINVAL)?;
        let mode = mode | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate only reads its integer arguments; the fd is open
        // while the channel holds the file state.
        errno_of(unsafe { libc::fallocate(self.file.fd(), mode, off, len) })
    }

    fn serve(&self, io: &Io) -> Result<(), i32> {
        match io.io_type() {
            IoType::Read | IoType::Write => self.transfer(io),
            IoType::Flush => {
                // SAFETY: fdatasync only takes the fd, open while the channel
                // holds the file state.
                errno_of(unsafe { libc::fdatasync(self.file.fd()) })
            }
            IoType::Unmap => self.fallocate(io, libc::FALLOC_FL_PUNCH_HOLE),
            IoType::WriteZeroes => {
                if self.file.zero_range_ok.load(Ordering::Relaxed) {
                    match self.fallocate(io, libc::FALLOC_FL_ZERO_RANGE) {
                        Err(libc::EOPNOTSUPP) => {
                            // No ZERO_RANGE (tmpfs): a punched hole reads as
                            // zeroes.
                            self.file.zero_range_ok.store(false, Ordering::Relaxed);
                        }
                        done => return done,
                    }
                }
                self.fallocate(io, libc::FALLOC_FL_PUNCH_HOLE)
            }
            IoType::Reset => Ok(()),
        }
    }
}

impl IoChannel for InlineChannel {
    fn submit(&self, io: Io) {
        let status = match self.serve(&io) {
            Ok(()) => IoStatus::Success,
            Err(errno) => IoStatus::Failed(errno),
        };
        io.complete(status);
    }
}

/// `errno` of the system call that just failed.
fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// A system call's return code (0 or -1 with `errno`) as a result.
fn errno_of(rc: libc::c_int) -> Result<(), i32> {
    if rc == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}
