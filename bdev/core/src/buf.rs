//! Aligned, caller-owned data buffers (the DMA-able buffers of SPDK).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every [`DmaBuf`]: enough for O_DIRECT on any device and
/// for non-temporal 64-byte stores.
pub const BUF_ALIGN: usize = 4096;

/// Buffers at least this large are mapped directly and asked to use
/// transparent huge pages: random I/O over a large RAM disk is otherwise
/// bound by TLB misses.
const HUGE_THRESHOLD: usize = 2 << 20;

/// A zero-initialised heap buffer aligned to [`BUF_ALIGN`]. Its memory does
/// not move when the `DmaBuf` is moved, so I/O descriptors may point into it.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    mapped: bool,
}

// SAFETY: DmaBuf uniquely owns its allocation, like a Box<[u8]>.
unsafe impl Send for DmaBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// Allocates `len` zeroed bytes (a zero length allocates one page so
    /// the pointer is always valid and aligned).
    /// Aborts the process if the memory cannot be had, like `Box::new`; use
    /// [`DmaBuf::try_new`] for sizes that come from users.
    pub fn new(len: usize) -> DmaBuf {
        Self::try_new(len).unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(len)))
    }

    /// Like [`DmaBuf::new`], but `None` when the memory cannot be allocated
    /// (or `len` is absurd), so a bad `bdev_malloc_create` size becomes an
    /// error reply instead of killing the target.
    pub fn try_new(len: usize) -> Option<DmaBuf> {
        if len >= HUGE_THRESHOLD {
            if let Some(b) = Self::new_mapped(len) {
                return Some(b);
            }
        }
        let size = len.max(1).checked_next_multiple_of(BUF_ALIGN)?;
        let layout = Layout::from_size_align(size, BUF_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size (at least one page).
        let raw = unsafe { alloc_zeroed(layout) };
        Some(DmaBuf {
            ptr: NonNull::new(raw)?,
            len,
            mapped: false,
        })
    }

    fn new_mapped(len: usize) -> Option<DmaBuf> {
        let size = len.checked_next_multiple_of(BUF_ALIGN)?;
        // SAFETY: an anonymous private mapping with no address hint has no
        // preconditions; the result is checked against MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: [raw, raw+size) is the mapping just created; the advice is
        // only a hint and failure is harmless.
        unsafe { libc::madvise(raw, size, libc::MADV_HUGEPAGE) };
        // Fault everything in now: a fault on the I/O path (with huge-page
        // compaction) costs up to milliseconds.
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: as above; populating only touches the mapping.
        if unsafe { libc::madvise(raw, size, MADV_POPULATE_WRITE) } != 0 {
            for off in (0..size).step_by(4096) {
                // SAFETY: off < size, inside the fresh writable mapping.
                unsafe { std::ptr::write_volatile((raw as *mut u8).add(off), 0) };
            }
        }
        Some(DmaBuf {
            ptr: NonNull::new(raw as *mut u8)?,
            len,
            mapped: true,
        })
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> DmaBuf {
        let mut b = DmaBuf::new(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// A buffer of `len` bytes all equal to `byte`.
    pub fn filled(len: usize, byte: u8) -> DmaBuf {
        let mut b = DmaBuf::new(len);
        b.as_mut_slice().fill(byte);
        b
    }

    fn layout(len: usize) -> Layout {
        let size = len.max(1).next_multiple_of(BUF_ALIGN);
        Layout::from_size_align(size, BUF_ALIGN).expect("buffer size overflows a Layout")
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer to the first byte.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in `new_mapped` with exactly this size.
            unsafe {
                libc::munmap(
                    self.ptr.as_ptr() as *mut libc::c_void,
                    self.len.next_multiple_of(BUF_ALIGN),
                )
            };
        } else {
            // SAFETY: allocated in `new` with exactly this layout.
            unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl Clone for DmaBuf {
    fn clone(&self) -> Self {
        DmaBuf::from_slice(self.as_slice())
    }
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmaBuf({} bytes)", self.len)
    }
}

impl std::ops::Deref for DmaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for DmaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_stable() {
        let mut b = DmaBuf::new(5000);
        assert_eq!(b.as_mut_ptr() as usize % BUF_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        let p = b.as_mut_ptr();
        let mut moved = b;
        assert_eq!(moved.as_mut_ptr(), p);
        assert_eq!(DmaBuf::new(0).len(), 0);
        assert_eq!(DmaBuf::filled(3, 7).as_slice(), &[7, 7, 7]);
    }
}
