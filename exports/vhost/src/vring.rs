//! The vrings of a connection: rust-vmm's `VringRwLock`, plus the check of
//! the ring size the frontend asks for.
//!
//! `VHOST_USER_SET_VRING_NUM` reaches a vring through `set_queue_size`,
//! which cannot fail, and `virtio-queue` only logs a size it ignores: the
//! queue would keep its previous size while the driver lays out a ring of
//! another. So a size the virtio spec does not allow (not a power of two)
//! is refused here, with a log line naming the message and the value, and
//! the ring cannot be set up afterwards: the `SET_VRING_ADDR` that follows
//! fails, and the vhost-user handler closes the connection. Sizes above
//! [`MAX_QUEUE_SIZE`] never get here (the handler refuses them itself).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLockReadGuard, RwLockWriteGuard};

use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as QueueError;
use vm_memory::GuestMemoryAtomic;

use crate::blk::Mem;

/// The largest ring the virtio spec allows (split rings: 2^15 entries).
pub(crate) const MAX_QUEUE_SIZE: usize = 32768;

type M = GuestMemoryAtomic<Mem>;

/// A vring whose size is checked when the frontend sets it.
#[derive(Clone)]
pub(crate) struct SizedVring {
    inner: VringRwLock<M>,
    /// The refused ring size (0: none); the ring cannot start while set.
    refused: Arc<AtomicU32>,
}

/// Why a ring size is refused, or `None` when the virtio spec allows it.
pub(crate) fn ring_size_error(num: u32) -> Option<&'static str> {
    if num == 0 {
        Some("zero")
    } else if num as usize > MAX_QUEUE_SIZE {
        Some("larger than 32768")
    } else if !num.is_power_of_two() {
        Some("not a power of two")
    } else {
        None
    }
}

impl<'a> VringStateGuard<'a, M> for SizedVring {
    type G = RwLockReadGuard<'a, VringState<M>>;
}

impl<'a> VringStateMutGuard<'a, M> for SizedVring {
    type G = RwLockWriteGuard<'a, VringState<M>>;
}

impl VringT<M> for SizedVring {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, QueueError> {
        Ok(SizedVring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            refused: Arc::new(AtomicU32::new(0)),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), QueueError> {
        if self.refused.load(Ordering::Acquire) != 0 {
            // Fails SET_VRING_ADDR: the handler closes the connection.
            return Err(QueueError::InvalidSize);
        }
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        if let Some(why) = ring_size_error(u32::from(num)) {
            // The handler runs on the daemon's thread, named after the
            // controller.
            let thread = std::thread::current();
            tracing::error!(
                "{}: vhost-user SET_VRING_NUM {num} refused: ring size is {why} \
                 (virtio allows powers of two up to {MAX_QUEUE_SIZE}); closing the connection",
                thread.name().unwrap_or("vhost")
            );
            self.refused.store(u32::from(num), Ordering::Release);
            return;
        }
        self.refused.store(0, Ordering::Release);
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        // A refused ring never starts, whatever the frontend sends next.
        let ready = ready && self.refused.load(Ordering::Acquire) == 0;
        self.inner.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    #[test]
    fn ring_sizes_the_spec_allows() {
        for n in [1, 2, 128, 256, 512, 1024, 4096, 32768] {
            assert_eq!(ring_size_error(n), None, "{n}");
        }
        assert_eq!(ring_size_error(0), Some("zero"));
        assert_eq!(ring_size_error(1000), Some("not a power of two"));
        assert_eq!(ring_size_error(3), Some("not a power of two"));
        assert_eq!(ring_size_error(65536), Some("larger than 32768"));
    }

    #[test]
    fn a_refused_size_keeps_the_ring_from_starting() {
        let v = SizedVring::new(GuestMemoryAtomic::new(Mem::new()), 32768).unwrap();
        v.set_queue_size(512);
        assert_eq!(v.get_ref().get_queue().size(), 512);
        v.set_queue_size(1000);
        assert_eq!(v.get_ref().get_queue().size(), 512, "size unchanged");
        assert!(v.set_queue_info(0, 0x1000, 0x2000).is_err());
        v.set_queue_ready(true);
        assert!(!v.get_ref().get_queue().ready());
        // A valid size afterwards lifts the refusal.
        v.set_queue_size(1024);
        assert_eq!(v.get_ref().get_queue().size(), 1024);
        assert!(v.set_queue_info(0, 0x4000, 0x5000).is_ok());
    }
}
