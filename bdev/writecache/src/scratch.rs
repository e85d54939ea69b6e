//! Recovery's scratch arrays: fixed-capacity vectors in their own anonymous
//! mapping.
//!
//! Recovery needs arrays as large as the cache for a moment (the committed
//! entries, the free blocks). From the heap they would stay resident after
//! recovery: the allocator keeps freed huge blocks for reuse, and a growing
//! `Vec` briefly holds two copies. Here the capacity is reserved as address
//! space only (no copy ever, pages are touched as elements are pushed) and
//! the whole mapping goes back to the OS on drop.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A vector of at most `capacity` plain values in an anonymous mapping.
pub(crate) struct ScratchVec<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
    capacity: usize,
    /// Bytes mapped (0: nothing mapped).
    mapped: usize,
}

// SAFETY: the mapping is owned exclusively by the vector, like a Vec's
// buffer; sending it moves that ownership.
unsafe impl<T: Copy + Send> Send for ScratchVec<T> {}

impl<T: Copy> ScratchVec<T> {
    /// A vector that can hold `capacity` values. Only address space is
    /// reserved (`MAP_NORESERVE`); pages become resident as values land in
    /// them.
    pub(crate) fn with_capacity(capacity: usize) -> std::io::Result<ScratchVec<T>> {
        let bytes = capacity
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
        if bytes == 0 {
            return Ok(ScratchVec {
                ptr: NonNull::dangling(),
                len: 0,
                capacity: if std::mem::size_of::<T>() == 0 {
                    capacity
                } else {
                    0
                },
                mapped: 0,
            });
        }
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched, and the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // mmap returns page-aligned memory, aligned for any plain `T`.
        let ptr = NonNull::new(p.cast::<T>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(ScratchVec {
            ptr,
            len: 0,
            capacity,
            mapped: bytes,
        })
    }

    /// Appends `v`; false (and nothing stored) when the vector is full.
    #[must_use]
    pub(crate) fn push(&mut self, v: T) -> bool {
        if self.len >= self.capacity {
            return false;
        }
        // SAFETY: `len < capacity`, so the slot lies inside the mapping,
        // which is writable and aligned for `T`.
        unsafe { self.ptr.as_ptr().add(self.len).write(v) };
        self.len += 1;
        true
    }

    /// Keeps the first `len` values.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl<T: Copy> Deref for ScratchVec<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: the first `len` slots were written by `push`, and the
        // mapping lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> DerefMut for ScratchVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<'a, T: Copy> IntoIterator for &'a ScratchVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: Copy> Drop for ScratchVec<T> {
    fn drop(&mut self) {
        if self.mapped > 0 {
            // SAFETY: unmaps exactly the mapping made in `with_capacity`,
            // which nothing references any more.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident KiB of the mapping that contains `addr` (from smaps, so
    /// other tests' allocations do not count).
    fn mapping_rss_kib(addr: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= addr && addr < b;
                    continue;
                }
            }
            if inside && line.starts_with("Rss:") {
                return line.split_whitespace().nth(1)?.parse().ok();
            }
        }
        None
    }

    #[test]
    fn push_sort_truncate_and_capacity() {
        let mut v: ScratchVec<u32> = ScratchVec::with_capacity(5).unwrap();
        for x in [5, 3, 9, 1, 7] {
            assert!(v.push(x));
        }
        assert!(!v.push(0), "full");
        v.sort_unstable();
        assert_eq!(&v[..], &[1, 3, 5, 7, 9]);
        v.truncate(2);
        assert_eq!(v.iter().copied().collect::<Vec<_>>(), vec![1, 3]);
        let e: ScratchVec<u64> = ScratchVec::with_capacity(0).unwrap();
        assert!(e.is_empty());
    }

    #[test]
    fn only_touched_pages_are_resident() {
        // 1 GiB of address space; 4 MiB written.
        let mut v: ScratchVec<u32> = ScratchVec::with_capacity(1 << 28).unwrap();
        for i in 0..(1u32 << 20) {
            assert!(v.push(i));
        }
        let rss = mapping_rss_kib(v.as_ptr() as usize).expect("mapping listed");
        assert!((4 << 10..64 << 10).contains(&rss), "{rss} KiB resident");
        drop(v);
    }
}
