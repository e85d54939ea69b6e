//! Per-queue-pair data buffers: one anonymous mapping cut into equal slots,
//! one per request slot, made at Connect time. Pages are touched only when
//! a slot first carries data, so a deep queue with large maximum I/O costs
//! address space, not memory, until it is used; after that no I/O
//! allocates.

use std::ptr::NonNull;

pub(crate) struct Arena {
    base: NonNull<u8>,
    slot_size: usize,
    slots: usize,
    map_len: usize,
}

impl Arena {
    /// `slots` buffers of `slot_size` bytes each (page-aligned).
    pub(crate) fn new(slots: usize, slot_size: usize) -> Option<Arena> {
        let slot_size = slot_size.max(4096).checked_next_multiple_of(4096)?;
        let map_len = slot_size.checked_mul(slots.max(1))?;
        // SAFETY: an anonymous private mapping with no address hint has no
        // preconditions; the result is checked against MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        Some(Arena {
            base: NonNull::new(raw as *mut u8)?,
            slot_size,
            slots: slots.max(1),
            map_len,
        })
    }

    pub(crate) fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Start of slot `i`'s buffer. The caller keeps to `slot_size` bytes
    /// and to one user (the socket or the bdev) at a time.
    pub(crate) fn ptr(&self, i: usize) -> *mut u8 {
        assert!(i < self.slots, "slot {i} out of range");
        // SAFETY: i < slots, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(i * self.slot_size) }
    }

    /// Slot `i`'s bytes `[off, off + len)`.
    ///
    /// # Safety
    /// No bdev I/O may be using that part of the slot while the slice lives.
    pub(crate) unsafe fn slice(&self, i: usize, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.slot_size);
        // SAFETY: in bounds (checked above); the caller guarantees that no
        // one writes the range meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr(i).add(off), len) }
    }

    /// Slot `i`'s bytes `[off, off + len)`, mutably.
    ///
    /// # Safety
    /// No bdev I/O may be using that part of the slot, and no other slice
    /// of it may be alive, while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice_mut(&self, i: usize, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.slot_size);
        // SAFETY: in bounds; exclusive access is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(i).add(off), len) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: base/map_len are exactly the mapping made in `new`; the
        // owner drops the arena only once no I/O uses it.
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.map_len) };
    }
}
