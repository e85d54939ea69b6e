//! The load/store media capability: a bdev backed by (emulated) persistent
//! memory exposes its mapping and how to make stores durable. The writecache
//! uses it in pmem mode; the crash simulator implements it to "lose power".

/// Byte-addressable persistent media.
///
/// Durability model (x86 ADR): stores reach the persistence domain once
/// they are written back (`write_nt` or `flush`) **and** a `fence` on the
/// same core has completed. Implementations decide how (non-temporal stores,
/// clwb/clflushopt + sfence, or msync for a plain file).
pub trait PersistentMemory: Send + Sync {
    /// Size of the mapping in bytes.
    fn len(&self) -> usize;

    /// True for an empty mapping.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Base address for loads. Valid for `len()` bytes for the lifetime of
    /// the object. Callers must only *read* through it; writes go through
    /// [`write_nt`](Self::write_nt) so the durability model sees them.
    fn base(&self) -> *const u8;

    /// Copies `src` to `offset` with stores that bypass the CPU cache (or
    /// stores followed by cache-line write-back). Durable after the next
    /// [`fence`](Self::fence) on this core.
    fn write_nt(&self, offset: usize, src: &[u8]);

    /// Writes an aligned 8-byte little-endian value atomically (it can never
    /// be torn) with the same durability rules as `write_nt`.
    fn write_u64(&self, offset: usize, value: u64);

    /// Writes an aligned 8-byte value with an ordinary (cached) store that
    /// becomes durable only after [`flush_range`](Self::flush_range) over
    /// it and then a [`fence`](Self::fence) on this core. Cheaper than a
    /// partial-line non-temporal store when the flush can be batched.
    /// The default is [`write_u64`](Self::write_u64) (durable at the fence).
    fn write_u64_deferred(&self, offset: usize, value: u64) {
        self.write_u64(offset, value)
    }

    /// Writes back the cache lines of `[offset, offset+len)` written with
    /// `write_u64_deferred` (durable at the next fence on this core).
    fn flush_range(&self, _offset: usize, _len: usize) {}

    /// Orders and completes this core's earlier `write_nt`/`write_u64`
    /// (and flushed deferred stores).
    fn fence(&self);

    /// Copies `len` bytes at `offset` out of the media.
    fn read(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset
            .checked_add(dst.len())
            .is_some_and(|e| e <= self.len()));
        // SAFETY: the range is inside the mapping (checked above) and
        // `base()` is valid for `len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base().add(offset), dst.as_mut_ptr(), dst.len())
        };
    }

    /// A media error seen since creation (an msync that failed, a
    /// poisoned line...), as a positive errno. Sticky: once the media has
    /// failed to persist something, durability can no longer be promised.
    fn media_error(&self) -> Option<i32> {
        None
    }

    /// Name of the persistence strategy, for `driver_specific` (e.g.
    /// "movnt+sfence", "clwb+sfence", "msync", "simulated").
    fn strategy(&self) -> &'static str;
}
