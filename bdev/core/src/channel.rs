//! Descriptors (who opened a bdev) and per-reactor channels (how I/O is
//! submitted): validation, statistics, deferred completion, pool waits.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use smallvec::SmallVec;
use wc_reactor::{current, PollStatus};

use crate::bdev::{Bdev, EventCallback, Opener};
use crate::buf::DmaBuf;
use crate::error::BdevError;
use crate::io::{FnCompletion, Io, IoCompletion, IoContext, IoStatus, IoType, IoVec, IO_POOL_SIZE};
use crate::registry::lookup;
use crate::stats::IoStats;

static NEXT_DESC: AtomicU64 = AtomicU64::new(1);

/// An open handle on a bdev. `Send + Sync`; channels are per reactor.
pub struct Desc {
    id: u64,
    bdev: Arc<Bdev>,
    writable: bool,
}

/// Opens a bdev by name or alias. A writable open fails on a claimed bdev
/// (the claimer opens first, then claims). `on_event` runs on the calling
/// reactor (or inline off-reactor) when the bdev is removed or resized.
pub fn open(
    name: &str,
    writable: bool,
    on_event: Option<EventCallback>,
) -> Result<Desc, BdevError> {
    let bdev = lookup(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    if writable {
        if let Some(c) = bdev.claim_info() {
            return Err(BdevError::Claimed {
                name: bdev.name.clone(),
                module: c.module,
            });
        }
    }
    let id = NEXT_DESC.fetch_add(1, Ordering::Relaxed);
    bdev.add_opener(Opener {
        id,
        reactor: wc_reactor::try_current().map(|r| r.handle()),
        cb: on_event,
    });
    Ok(Desc { id, bdev, writable })
}

impl Desc {
    /// The bdev.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    /// True when opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The calling reactor's channel to the bdev (created on first use and
    /// cached per reactor until the bdev goes away).
    pub fn channel(&self) -> Result<Rc<BdevChannel>, BdevError> {
        if self.bdev.is_removed() {
            return Err(BdevError::NotFound(self.bdev.name.clone()));
        }
        let r = current();
        let cache = r.local(ChannelCache::default);
        if let Some(ch) = cache.map.borrow().get(&self.bdev.id) {
            return Ok(ch.clone());
        }
        let inner = self.bdev.ops.create_channel()?;
        let stats = Arc::new(IoStats::default());
        if let Ok(mut s) = self.bdev.stats.lock() {
            s.push(stats.clone());
        }
        let ch = Rc::new(BdevChannel {
            bdev: self.bdev.clone(),
            inner,
            stats,
            ctx: io_context(),
        });
        cache.map.borrow_mut().insert(self.bdev.id, ch.clone());
        Ok(ch)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        self.bdev.remove_opener(self.id);
    }
}

impl std::fmt::Debug for Desc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Desc({}, writable {})", self.bdev.name, self.writable)
    }
}

#[derive(Default)]
struct ChannelCache {
    map: RefCell<HashMap<u64, Rc<BdevChannel>>>,
}

/// Drops cached channels of a removed bdev on every reactor.
pub(crate) fn forget_channels(bdev_id: u64) {
    if let Some(r) = wc_reactor::try_current() {
        for h in r.siblings() {
            h.send(move || {
                if let Some(r) = wc_reactor::try_current() {
                    r.local(ChannelCache::default)
                        .map
                        .borrow_mut()
                        .remove(&bdev_id);
                }
            });
        }
    }
}

/// The reactor's I/O context, creating it (and its completion poller) on
/// first use.
fn io_context() -> Rc<IoContext> {
    let r = current();
    r.local(|| {
        let ctx = Rc::new(IoContext::new(IO_POOL_SIZE));
        let weak = Rc::downgrade(&ctx);
        // Completions are queued by I/O submitted or finished on this
        // reactor, so only ever after a busy iteration: an event poller.
        current().register_event_poller("bdev_io_completions", move || match weak.upgrade() {
            Some(ctx) => run_completions(&ctx),
            None => PollStatus::Idle,
        });
        IoContextCell(ctx)
    })
    .0
    .clone()
}

struct IoContextCell(Rc<IoContext>);

fn run_completions(ctx: &Rc<IoContext>) -> PollStatus {
    // Only what is queued now: completions issued by the callbacks below
    // (resubmissions completing inline) wait for the next iteration.
    let n = ctx.completed.borrow().len();
    for _ in 0..n {
        let Some(io) = ctx.completed.borrow_mut().pop_front() else {
            break;
        };
        finish_io(io);
    }
    let mut served = false;
    loop {
        if ctx.waiters.borrow().is_empty() {
            break;
        }
        let Some(io) = Io::alloc(ctx) else { break };
        let Some(w) = ctx.waiters.borrow_mut().pop_front() else {
            break;
        };
        w(io);
        served = true;
    }
    PollStatus::from(n > 0 || served)
}

/// Records a completed I/O in its channel's statistics and runs its
/// callback.
pub(crate) fn finish_io(mut io: Io) {
    if let Some(ch) = io.inner_mut().channel.take() {
        let b = io.inner_mut();
        b.complete_ticks = wc_reactor::tick::ticks();
        let lat = b.complete_ticks.wrapping_sub(b.submit_ticks);
        ch.stats
            .record(b.io_type, b.num_blocks * b.block_size as u64, lat, b.status);
    }
    if let Some((cb, tag)) = io.take_callback() {
        cb.io_done(io, tag);
    }
}

/// Where a submission's data lives.
enum Data<'a> {
    None,
    Owned(DmaBuf),
    Raw(&'a [IoVec]),
}

/// One bdev's I/O path on one reactor.
pub struct BdevChannel {
    bdev: Arc<Bdev>,
    inner: Box<dyn IoChannel>,
    stats: Arc<IoStats>,
    ctx: Rc<IoContext>,
}

use crate::bdev::IoChannel;

impl BdevChannel {
    /// The bdev.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    /// Reads `buf.len()` bytes (a multiple of the block size) at
    /// `offset_blocks` into `buf`; the buffer comes back with the I/O.
    pub fn read(
        self: &Rc<Self>,
        offset_blocks: u64,
        buf: DmaBuf,
        cb: &Rc<dyn IoCompletion>,
        ctx: u64,
    ) {
        let n = buf.len() as u64 / self.bdev.block_size as u64;
        self.start(
            IoType::Read,
            offset_blocks,
            n,
            false,
            Data::Owned(buf),
            cb,
            ctx,
        );
    }

    /// Writes `buf` at `offset_blocks`; with `fua` it is durable on completion.
    pub fn write(
        self: &Rc<Self>,
        offset_blocks: u64,
        buf: DmaBuf,
        fua: bool,
        cb: &Rc<dyn IoCompletion>,
        ctx: u64,
    ) {
        let n = buf.len() as u64 / self.bdev.block_size as u64;
        self.start(
            IoType::Write,
            offset_blocks,
            n,
            fua,
            Data::Owned(buf),
            cb,
            ctx,
        );
    }

    /// Scatter-gather read into caller memory.
    ///
    /// # Safety
    /// Every segment must be valid, writable memory, not aliased by anyone
    /// else, until the completion callback runs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn readv(
        self: &Rc<Self>,
        offset_blocks: u64,
        num_blocks: u64,
        iovs: &[IoVec],
        cb: &Rc<dyn IoCompletion>,
        ctx: u64,
    ) {
        self.start(
            IoType::Read,
            offset_blocks,
            num_blocks,
            false,
            Data::Raw(iovs),
            cb,
            ctx,
        );
    }

    /// Scatter-gather write from caller memory.
    ///
    /// # Safety
    /// Every segment must be valid, readable memory that stays unchanged
    /// until the completion callback runs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn writev(
        self: &Rc<Self>,
        offset_blocks: u64,
        num_blocks: u64,
        iovs: &[IoVec],
        fua: bool,
        cb: &Rc<dyn IoCompletion>,
        ctx: u64,
    ) {
        self.start(
            IoType::Write,
            offset_blocks,
            num_blocks,
            fua,
            Data::Raw(iovs),
            cb,
            ctx,
        );
    }

    /// FLUSH of a range (SPDK flushes are ranged; most devices flush all).
    pub fn flush(
        self: &Rc<Self>,
        offset_blocks: u64,
        num_blocks: u64,
        cb: &Rc<dyn IoCompletion>,
        ctx: u64,
    ) {
        self.start(
            IoType::Flush,
            offset_blocks,
            num_blocks,
            false,
            Data::None,
            cb,
            ctx,
        );
    }

    /// UNMAP a range.
    pub fn unmap(
        self: &Rc<Self>,
        offset_blocks: u64,
        num_blocks: u64,
        cb: &Rc<dyn IoCompletion>,
        ctx: u64,
    ) {
        self.start(
            IoType::Unmap,
            offset_blocks,
            num_blocks,
            false,
            Data::None,
            cb,
            ctx,
        );
    }

    /// WRITE_ZEROES a range.
    pub fn write_zeroes(
        self: &Rc<Self>,
        offset_blocks: u64,
        num_blocks: u64,
        cb: &Rc<dyn IoCompletion>,
        ctx: u64,
    ) {
        self.start(
            IoType::WriteZeroes,
            offset_blocks,
            num_blocks,
            false,
            Data::None,
            cb,
            ctx,
        );
    }

    /// RESET the device.
    pub fn reset(self: &Rc<Self>, cb: &Rc<dyn IoCompletion>, ctx: u64) {
        self.start(IoType::Reset, 0, 0, false, Data::None, cb, ctx);
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        self: &Rc<Self>,
        t: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        fua: bool,
        data: Data<'_>,
        cb: &Rc<dyn IoCompletion>,
        ctx: u64,
    ) {
        let Some(mut io) = Io::alloc(&self.ctx) else {
            // Pool dry: queue the request (cold path) until a descriptor is
            // freed, as SPDK's io_wait; never fail it.
            let me = self.clone();
            let cb = cb.clone();
            let iovs: SmallVec<[IoVec; 4]>;
            let owned = match data {
                Data::None => None,
                Data::Owned(b) => Some(b),
                Data::Raw(v) => {
                    iovs = v.iter().copied().collect();
                    return self.ctx.waiters.borrow_mut().push_back(Box::new(move |io| {
                        me.setup_and_submit(
                            io,
                            t,
                            offset_blocks,
                            num_blocks,
                            fua,
                            Data::Raw(&iovs),
                            &cb,
                            ctx,
                        )
                    }));
                }
            };
            self.ctx.waiters.borrow_mut().push_back(Box::new(move |io| {
                let data = owned.map(Data::Owned).unwrap_or(Data::None);
                me.setup_and_submit(io, t, offset_blocks, num_blocks, fua, data, &cb, ctx)
            }));
            return;
        };
        io.inner_mut().submit_ticks = wc_reactor::tick::ticks();
        self.setup_and_submit(io, t, offset_blocks, num_blocks, fua, data, cb, ctx);
    }

    // Inlined into `start`'s fast path (once per I/O, twice for a
    // stacked one): no call, no arguments spilled to the stack. (Plain
    // `#[inline]` leaves it out of line: it has two callers.)
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn setup_and_submit(
        self: &Rc<Self>,
        mut io: Io,
        t: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        fua: bool,
        data: Data<'_>,
        cb: &Rc<dyn IoCompletion>,
        ctx: u64,
    ) {
        let bs = self.bdev.block_size;
        io.set_common(t, offset_blocks, num_blocks, bs, cb.clone(), ctx);
        if io.inner().submit_ticks == 0 {
            io.inner_mut().submit_ticks = wc_reactor::tick::ticks();
        }
        let b = io.inner_mut();
        b.fua = fua && t == IoType::Write;
        let mut data_len: Option<u64> = None;
        match data {
            Data::None => {}
            Data::Owned(mut buf) => {
                data_len = Some(buf.len() as u64);
                let base = buf.as_mut_ptr();
                b.iovs.push(IoVec {
                    base,
                    len: buf.len(),
                });
                b.buf = Some(buf);
            }
            // One segment (most I/O): a push, not SmallVec's generic extend.
            Data::Raw(&[one]) => {
                data_len = Some(one.len as u64);
                b.iovs.push(one);
            }
            Data::Raw(v) => {
                data_len = Some(v.iter().map(|x| x.len as u64).sum());
                b.iovs.extend(v.iter().copied());
            }
        }
        if let Err(errno) = self.validate(t, offset_blocks, num_blocks, data_len, &io) {
            io.complete(IoStatus::Failed(errno));
            return;
        }
        io.inner_mut().channel = Some(self.clone());
        self.inner.submit(io);
    }

    fn validate(
        &self,
        t: IoType,
        offset: u64,
        n: u64,
        data_len: Option<u64>,
        io: &Io,
    ) -> Result<(), i32> {
        let bdev = &self.bdev;
        if bdev.is_removed() {
            return Err(libc::ENODEV);
        }
        if !bdev.io_type_supported(t) {
            return Err(libc::ENOTSUP);
        }
        if t == IoType::Reset {
            return Ok(());
        }
        let end = offset.checked_add(n).ok_or(libc::EINVAL)?;
        if end > bdev.num_blocks {
            return Err(libc::EINVAL);
        }
        if t.has_data() {
            if n == 0 {
                return Err(libc::EINVAL);
            }
            let want = n.checked_mul(bdev.block_size as u64).ok_or(libc::EINVAL)?;
            if data_len != Some(want) {
                return Err(libc::EINVAL);
            }
            let align = bdev.required_alignment as usize;
            if align > 1 && io.iovs().iter().any(|v| (v.base as usize) % align != 0) {
                return Err(libc::EINVAL);
            }
        } else if t != IoType::Flush && n == 0 {
            return Err(libc::EINVAL);
        }
        Ok(())
    }

    /// Submits a child I/O with the same type, range, FUA flag and segments
    /// as `parent` (a vbdev forwarding to its base).
    ///
    /// # Safety
    /// `parent` must not complete (nor be dropped) before this child's
    /// completion has run: the child reads or writes the parent's segments.
    pub unsafe fn submit_like(self: &Rc<Self>, parent: &Io, cb: &Rc<dyn IoCompletion>, ctx: u64) {
        let (off, n) = (parent.offset_blocks(), parent.num_blocks());
        match parent.io_type() {
            // SAFETY: the caller keeps the parent, whose segments these are,
            // alive until the child completes.
            IoType::Read => unsafe { self.readv(off, n, parent.iovs(), cb, ctx) },
            // SAFETY: as above.
            IoType::Write => unsafe { self.writev(off, n, parent.iovs(), parent.fua(), cb, ctx) },
            IoType::Flush => self.flush(off, n, cb, ctx),
            IoType::Unmap => self.unmap(off, n, cb, ctx),
            IoType::WriteZeroes => self.write_zeroes(off, n, cb, ctx),
            IoType::Reset => self.reset(cb, ctx),
        }
    }

    /// Read that resolves with the buffer, for control paths and tests.
    pub async fn read_async(
        self: &Rc<Self>,
        offset_blocks: u64,
        buf: DmaBuf,
    ) -> Result<DmaBuf, IoStatus> {
        let (cb, rx) = oneshot_completion();
        self.read(offset_blocks, buf, &cb, 0);
        let (status, buf) = rx.await.map_err(|_| IoStatus::Aborted)?;
        if status.is_success() {
            Ok(buf.unwrap_or_else(|| DmaBuf::new(0)))
        } else {
            Err(status)
        }
    }

    /// Write that resolves when complete.
    pub async fn write_async(
        self: &Rc<Self>,
        offset_blocks: u64,
        buf: DmaBuf,
        fua: bool,
    ) -> Result<DmaBuf, IoStatus> {
        let (cb, rx) = oneshot_completion();
        self.write(offset_blocks, buf, fua, &cb, 0);
        let (status, buf) = rx.await.map_err(|_| IoStatus::Aborted)?;
        if status.is_success() {
            Ok(buf.unwrap_or_else(|| DmaBuf::new(0)))
        } else {
            Err(status)
        }
    }

    /// A data-less I/O (flush, unmap, write_zeroes, reset) that resolves
    /// when complete.
    pub async fn io_async(
        self: &Rc<Self>,
        t: IoType,
        offset_blocks: u64,
        num_blocks: u64,
    ) -> Result<(), IoStatus> {
        let (cb, rx) = oneshot_completion();
        match t {
            IoType::Flush => self.flush(offset_blocks, num_blocks, &cb, 0),
            IoType::Unmap => self.unmap(offset_blocks, num_blocks, &cb, 0),
            IoType::WriteZeroes => self.write_zeroes(offset_blocks, num_blocks, &cb, 0),
            IoType::Reset => self.reset(&cb, 0),
            IoType::Read | IoType::Write => return Err(IoStatus::Failed(libc::EINVAL)),
        }
        let (status, _) = rx.await.map_err(|_| IoStatus::Aborted)?;
        if status.is_success() {
            Ok(())
        } else {
            Err(status)
        }
    }
}

type Reply = (IoStatus, Option<DmaBuf>);

fn oneshot_completion() -> (
    Rc<dyn IoCompletion>,
    futures::channel::oneshot::Receiver<Reply>,
) {
    let (tx, rx) = futures::channel::oneshot::channel::<Reply>();
    let tx = RefCell::new(Some(tx));
    let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |mut io: Io, _| {
        if let Some(tx) = tx.borrow_mut().take() {
            let buf = io.take_buf();
            let _ = tx.send((io.status(), buf));
        }
    }));
    (cb, rx)
}
