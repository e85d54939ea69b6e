//! I/O descriptors: types, statuses, scatter-gather vectors, and the pooled
//! [`Io`] handle that travels from submitter to module and back.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use smallvec::SmallVec;

use crate::buf::DmaBuf;
use crate::channel::BdevChannel;

/// Kinds of I/O, named as SPDK's `bdev_get_bdevs` `supported_io_types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoType {
    /// Read blocks.
    Read,
    /// Write blocks (optionally FUA).
    Write,
    /// Deallocate blocks.
    Unmap,
    /// Make completed writes durable.
    Flush,
    /// Abort everything in flight and reset the device.
    Reset,
    /// Write zeroes without a data buffer.
    WriteZeroes,
}

impl IoType {
    /// Every type, in SPDK's order.
    pub const ALL: [IoType; 6] = [
        IoType::Read,
        IoType::Write,
        IoType::Unmap,
        IoType::Flush,
        IoType::Reset,
        IoType::WriteZeroes,
    ];

    /// SPDK's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Unmap => "unmap",
            IoType::Flush => "flush",
            IoType::Reset => "reset",
            IoType::WriteZeroes => "write_zeroes",
        }
    }

    /// True for types that carry a data buffer.
    pub fn has_data(self) -> bool {
        matches!(self, IoType::Read | IoType::Write)
    }
}

/// Outcome of an I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// Not completed yet.
    Pending,
    /// Done.
    Success,
    /// Failed with a positive errno (EIO, EINVAL, ENODEV, ENOTSUP...).
    Failed(i32),
    /// Aborted by a reset or a removal.
    Aborted,
}

impl IoStatus {
    /// True on success.
    pub fn is_success(self) -> bool {
        self == IoStatus::Success
    }

    /// The errno of a failure (EIO for aborted, 0 for success).
    pub fn errno(self) -> i32 {
        match self {
            IoStatus::Success | IoStatus::Pending => 0,
            IoStatus::Failed(e) => e,
            IoStatus::Aborted => libc::ECANCELED,
        }
    }
}

/// One segment of a scatter-gather list. Raw by design: it may point into
/// guest memory or a vbdev's mapping; whoever builds it vouches for it.
#[derive(Debug, Clone, Copy)]
pub struct IoVec {
    /// Start of the segment.
    pub base: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

/// Receives completed I/O on the submitting reactor. Implemented by whoever
/// submits (a bdevperf job, a vbdev channel); `ctx` is the caller's tag.
pub trait IoCompletion {
    /// Called once per I/O with the completed descriptor; drop it (or reuse
    /// its buffer) when done.
    fn io_done(&self, io: Io, ctx: u64);
}

/// Adapts a closure into an [`IoCompletion`] (allocates; for control paths).
pub struct FnCompletion<F: Fn(Io, u64)>(pub F);

impl<F: Fn(Io, u64)> IoCompletion for FnCompletion<F> {
    fn io_done(&self, io: Io, ctx: u64) {
        (self.0)(io, ctx)
    }
}

/// The descriptor proper. Lives in a per-reactor pool and is reused.
pub struct BdevIo {
    pub(crate) io_type: IoType,
    pub(crate) offset_blocks: u64,
    pub(crate) num_blocks: u64,
    pub(crate) block_size: u32,
    pub(crate) fua: bool,
    pub(crate) iovs: SmallVec<[IoVec; 4]>,
    pub(crate) buf: Option<DmaBuf>,
    pub(crate) status: IoStatus,
    pub(crate) cb: Option<Rc<dyn IoCompletion>>,
    pub(crate) ctx: u64,
    pub(crate) submit_ticks: u64,
    pub(crate) complete_ticks: u64,
    pub(crate) channel: Option<Rc<BdevChannel>>,
    /// Scratch space for the module handling the I/O (SPDK's driver_ctx).
    pub driver_ctx: [u64; 4],
}

impl BdevIo {
    fn blank() -> BdevIo {
        BdevIo {
            io_type: IoType::Read,
            offset_blocks: 0,
            num_blocks: 0,
            block_size: 512,
            fua: false,
            iovs: SmallVec::new(),
            buf: None,
            status: IoStatus::Pending,
            cb: None,
            ctx: 0,
            submit_ticks: 0,
            complete_ticks: 0,
            channel: None,
            driver_ctx: [0; 4],
        }
    }
}

/// A submission parked until a descriptor frees up.
pub(crate) type IoWaiter = Box<dyn FnOnce(Io)>;

/// Per-reactor I/O context: the descriptor pool and the queue of completed
/// I/O whose callbacks have not run yet.
pub(crate) struct IoContext {
    // Boxed so an Io moves as one pointer between submitter and module.
    #[allow(clippy::vec_box)]
    pub(crate) free: RefCell<Vec<Box<BdevIo>>>,
    pub(crate) allocated: std::cell::Cell<usize>,
    pub(crate) capacity: usize,
    pub(crate) completed: RefCell<VecDeque<Io>>,
    pub(crate) waiters: RefCell<VecDeque<IoWaiter>>,
}

/// Descriptors per reactor, as SPDK's default `bdev_io_pool_size` / cores.
pub const IO_POOL_SIZE: usize = 16 * 1024;

impl IoContext {
    pub(crate) fn new(capacity: usize) -> IoContext {
        IoContext {
            free: RefCell::new(Vec::with_capacity(capacity.min(1024))),
            allocated: std::cell::Cell::new(0),
            capacity,
            completed: RefCell::new(VecDeque::with_capacity(1024)),
            waiters: RefCell::new(VecDeque::new()),
        }
    }
}

/// A pooled I/O descriptor. Dropping it returns it to its reactor's pool.
pub struct Io {
    inner: Option<Box<BdevIo>>,
    ctx: Rc<IoContext>,
}

impl Io {
    #[inline(always)]
    pub(crate) fn alloc(ctx: &Rc<IoContext>) -> Option<Io> {
        let boxed = ctx.free.borrow_mut().pop();
        let inner = match boxed {
            Some(b) => b,
            None => {
                if ctx.allocated.get() >= ctx.capacity {
                    return None;
                }
                ctx.allocated.set(ctx.allocated.get() + 1);
                Box::new(BdevIo::blank())
            }
        };
        Some(Io {
            inner: Some(inner),
            ctx: ctx.clone(),
        })
    }

    pub(crate) fn inner(&self) -> &BdevIo {
        self.inner.as_deref().expect("live Io has a descriptor")
    }

    pub(crate) fn inner_mut(&mut self) -> &mut BdevIo {
        self.inner.as_deref_mut().expect("live Io has a descriptor")
    }

    /// Tick count when the I/O was submitted (for latency accounting by
    /// modules; see `wc_reactor::tick`).
    pub fn submit_ticks(&self) -> u64 {
        self.inner().submit_ticks
    }

    /// Tick count when the channel recorded the I/O's completion, just
    /// before its callback runs (0 for an I/O the channel refused). A
    /// submitter takes its latency as `complete_ticks - submit_ticks`
    /// without reading the clock again, as SPDK's bdevperf reads the bdev
    /// layer's own timestamps.
    pub fn complete_ticks(&self) -> u64 {
        self.inner().complete_ticks
    }

    /// The I/O type.
    pub fn io_type(&self) -> IoType {
        self.inner().io_type
    }

    /// First block.
    pub fn offset_blocks(&self) -> u64 {
        self.inner().offset_blocks
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> u64 {
        self.inner().num_blocks
    }

    /// Block size of the bdev the I/O was submitted to.
    pub fn block_size(&self) -> u32 {
        self.inner().block_size
    }

    /// Byte offset on the bdev.
    pub fn offset_bytes(&self) -> u64 {
        self.inner().offset_blocks * self.inner().block_size as u64
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.inner().num_blocks * self.inner().block_size as u64
    }

    /// Force unit access: the write is durable when it completes.
    pub fn fua(&self) -> bool {
        self.inner().fua
    }

    /// The scatter-gather list (empty for data-less types).
    pub fn iovs(&self) -> &[IoVec] {
        &self.inner().iovs
    }

    /// The completion status (Pending until completed).
    pub fn status(&self) -> IoStatus {
        self.inner().status
    }

    /// Module scratch space.
    pub fn driver_ctx(&mut self) -> &mut [u64; 4] {
        &mut self.inner_mut().driver_ctx
    }

    /// Takes back the owned buffer given with a safe submission.
    pub fn take_buf(&mut self) -> Option<DmaBuf> {
        let b = self.inner_mut();
        b.iovs.clear();
        b.buf.take()
    }

    /// The owned buffer, if the submission gave one.
    pub fn buf(&self) -> Option<&DmaBuf> {
        self.inner().buf.as_ref()
    }

    /// Copies `src` into the I/O's segments (for READ completions by a
    /// module). Copies at most the I/O length.
    pub fn copy_to_iovs(&mut self, src: &[u8]) {
        let mut off = 0;
        for v in self.inner().iovs.iter() {
            if off >= src.len() {
                break;
            }
            let n = v.len.min(src.len() - off);
            // SAFETY: submission validated that every segment is writable
            // memory of `len` bytes that stays valid until completion
            // (owned buffer, or the unsafe submit contract).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(off), v.base, n) };
            off += n;
        }
    }

    /// Copies the I/O's segments into `dst` (for WRITE handling).
    pub fn copy_from_iovs(&self, dst: &mut [u8]) {
        let mut off = 0;
        for v in self.inner().iovs.iter() {
            if off >= dst.len() {
                break;
            }
            let n = v.len.min(dst.len() - off);
            // SAFETY: as in copy_to_iovs; the segment is readable for `len`.
            unsafe { std::ptr::copy_nonoverlapping(v.base, dst.as_mut_ptr().add(off), n) };
            off += n;
        }
    }

    /// Calls `f` on each segment as a byte range `(iov_offset_bytes, slice)`.
    pub fn for_each_segment(&self, mut f: impl FnMut(u64, &[u8])) {
        let mut off = 0u64;
        for v in self.inner().iovs.iter() {
            // SAFETY: as in copy_from_iovs.
            let s = unsafe { std::slice::from_raw_parts(v.base, v.len) };
            f(off, s);
            off += v.len as u64;
        }
    }

    /// Mutable variant of [`for_each_segment`](Self::for_each_segment).
    pub fn for_each_segment_mut(&mut self, mut f: impl FnMut(u64, &mut [u8])) {
        let mut off = 0u64;
        for v in self.inner().iovs.iter() {
            // SAFETY: as in copy_to_iovs; segments do not overlap each other
            // by the submission contract.
            let s = unsafe { std::slice::from_raw_parts_mut(v.base, v.len) };
            f(off, s);
            off += v.len as u64;
        }
    }

    /// Completes the I/O. The callback runs later on this reactor (never
    /// inside the module's submit), which keeps stacks shallow when a
    /// submitter resubmits from its completion.
    pub fn complete(mut self, status: IoStatus) {
        self.inner_mut().status = status;
        let ctx: *const IoContext = Rc::as_ptr(&self.ctx);
        // SAFETY: `self` holds an Rc to the context, and moving `self` into
        // the context's own queue keeps that Rc alive, so the context
        // outlives this call. (Saves a refcount round trip per I/O.)
        unsafe { (*ctx).completed.borrow_mut().push_back(self) };
    }

    /// Completes the I/O at once: records it and runs its callback before
    /// returning, as SPDK completes a bdev_io outside its submit call. For
    /// a stacked module completing its parent I/O from a child's
    /// completion callback, which saves the parent a trip through the
    /// completion queue. Never call it inside the module's own `submit`
    /// (a submitter resubmitting from its callback would recurse; use
    /// [`complete`](Self::complete) there), nor while holding state the
    /// submitter's callback could reach (it may submit again at once).
    pub fn complete_now(mut self, status: IoStatus) {
        self.inner_mut().status = status;
        crate::channel::finish_io(self);
    }

    /// Shorthand: success, or failure with `errno`.
    pub fn complete_errno(self, errno: i32) {
        self.complete(if errno == 0 {
            IoStatus::Success
        } else {
            IoStatus::Failed(errno)
        })
    }

    pub(crate) fn take_callback(&mut self) -> Option<(Rc<dyn IoCompletion>, u64)> {
        let b = self.inner_mut();
        b.cb.take().map(|cb| (cb, b.ctx))
    }

    pub(crate) fn set_common(
        &mut self,
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        block_size: u32,
        cb: Rc<dyn IoCompletion>,
        ctx: u64,
    ) {
        let b = self.inner_mut();
        // A descriptor comes from the pool with no segments, buffer,
        // callback nor channel (`Drop` clears them): nothing to clear.
        debug_assert!(b.iovs.is_empty() && b.buf.is_none() && b.cb.is_none());
        b.io_type = io_type;
        b.offset_blocks = offset_blocks;
        b.num_blocks = num_blocks;
        b.block_size = block_size;
        b.fua = false;
        b.status = IoStatus::Pending;
        b.cb = Some(cb);
        b.ctx = ctx;
        b.driver_ctx = [0; 4];
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        if let Some(mut b) = self.inner.take() {
            b.cb = None;
            b.buf = None;
            b.channel = None;
            // A reused descriptor starts without timestamps (a parked
            // submission sets its own when it gets one).
            b.submit_ticks = 0;
            b.complete_ticks = 0;
            b.iovs.clear();
            self.ctx.free.borrow_mut().push(b);
        }
    }
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.inner();
        write!(
            f,
            "Io({} off {} n {} fua {} {:?})",
            b.io_type.name(),
            b.offset_blocks,
            b.num_blocks,
            b.fua,
            b.status
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn complete_now_runs_the_callback_before_returning_and_complete_defers_it() {
        let ctx = Rc::new(IoContext::new(4));
        let seen: Rc<Cell<Option<(IoStatus, u64)>>> = Rc::new(Cell::new(None));
        let s = seen.clone();
        let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |io: Io, tag| {
            s.set(Some((io.status(), tag)))
        }));

        let mut io = Io::alloc(&ctx).expect("pool has room");
        io.set_common(IoType::Write, 0, 1, 512, cb.clone(), 7);
        io.complete_now(IoStatus::Failed(libc::EIO));
        assert_eq!(seen.take(), Some((IoStatus::Failed(libc::EIO), 7)));
        assert!(ctx.completed.borrow().is_empty(), "nothing queued");
        assert_eq!(ctx.free.borrow().len(), 1, "descriptor back in the pool");

        let mut io = Io::alloc(&ctx).expect("pool has room");
        io.set_common(IoType::Write, 0, 1, 512, cb, 8);
        io.complete(IoStatus::Success);
        assert_eq!(seen.take(), None, "complete defers the callback");
        assert_eq!(ctx.completed.borrow().len(), 1);
    }
}
