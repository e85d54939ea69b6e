//! The per-reactor I/O path: one io_uring, a slab of in-flight requests,
//! an overflow queue and the poller that reaps completions.

use std::cell::{OnceCell, RefCell};
use std::collections::VecDeque;
use std::mem::ManuallyDrop;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use wc_bdev::{BdevError, DmaBuf, Io, IoChannel, IoStatus, IoType};
use wc_reactor::{PollStatus, PollerHandle};

use crate::FileState;

/// Submission queue depth of each channel's ring, and the number of
/// requests a channel keeps in flight (the completion queue is twice as
/// deep, so it cannot overflow).
const RING_DEPTH: u32 = 256;

/// Segments one readv/writev takes (`IOV_MAX`); longer lists are bounced.
const IOV_MAX: usize = 1024;

/// Largest bounce buffer a slot keeps for reuse.
const MAX_KEPT_BOUNCE: usize = 1 << 20;

/// Completions reaped per batch.
const REAP_BATCH: usize = 32;

/// Checks that this process may create rings at all.
pub(crate) fn probe_ring() -> Result<(), BdevError> {
    IoUring::new(2)
        .map(drop)
        .map_err(|e| BdevError::os("io_uring_setup", e))
}

/// Creates the calling reactor's channel: its ring and its poller.
pub(crate) fn create(file: Arc<FileState>) -> Result<Box<dyn IoChannel>, BdevError> {
    if file.inline_io {
        return Ok(Box::new(crate::inline::InlineChannel::new(file)));
    }
    let reactor = wc_reactor::try_current()
        .ok_or_else(|| BdevError::Internal("uring channel created off a reactor".into()))?;
    let ring = IoUring::new(RING_DEPTH).map_err(|e| BdevError::os("io_uring_setup", e))?;
    let depth = RING_DEPTH as usize;
    let slots = (0..depth)
        .map(|_| Slot {
            io: None,
            iovecs: Vec::with_capacity(4),
            bounce: None,
            bounced: false,
            done: 0,
            punch: false,
        })
        .collect();
    let state = Rc::new(RingState {
        inner: RefCell::new(Inner {
            ring: ManuallyDrop::new(ring),
            fd: types::Fd(file.fd()),
            file,
            slots,
            free: (0..depth as u32).rev().collect(),
            overflow: VecDeque::with_capacity(depth),
            inflight: 0,
            unsubmitted: 0,
        }),
        poller: OnceCell::new(),
    });
    let weak: Weak<RingState> = Rc::downgrade(&state);
    let name = format!("bdev_uring_{}", state.inner.borrow().file.name);
    let poller = reactor.register_poller(&name, None, move || match weak.upgrade() {
        Some(s) => s.poll(),
        None => PollStatus::Idle,
    });
    let _ = state.poller.set(poller.clone());
    Ok(Box::new(UringChannel { state, poller }))
}

/// What the bdev layer holds: dropping it stops the poller and drains the
/// ring (see [`Inner`]'s `Drop`).
struct UringChannel {
    state: Rc<RingState>,
    poller: PollerHandle,
}

impl IoChannel for UringChannel {
    fn submit(&self, io: Io) {
        self.state.submit(io);
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        self.poller.unregister();
    }
}

struct RingState {
    inner: RefCell<Inner>,
    /// This channel's poller: paused while no request holds a slot or
    /// waits for one.
    poller: OnceCell<PollerHandle>,
}

/// One in-flight request. Its `iovecs` (and bounce buffer) are what the
/// kernel reads while the SQE is outstanding, so they stay put until the
/// completion is reaped: slots never move their heap buffers while in use.
struct Slot {
    io: Option<Io>,
    iovecs: Vec<libc::iovec>,
    bounce: Option<DmaBuf>,
    bounced: bool,
    /// Bytes transferred so far (short reads/writes are resubmitted).
    done: u64,
    /// WRITE_ZEROES retried as a hole punch.
    punch: bool,
}

impl Slot {
    /// Switches the slot's request to its bounce buffer (grown if needed;
    /// steady-state I/O reuses it), filling it for a write.
    fn use_bounce(&mut self) {
        let Some(io) = self.io.as_ref() else { return };
        let len = io.len_bytes() as usize;
        if self.bounce.as_ref().is_none_or(|b| b.len() < len) {
            self.bounce = Some(DmaBuf::new(len));
        }
        if let Some(b) = self.bounce.as_mut() {
            if io.io_type() == IoType::Write {
                io.copy_from_iovs(&mut b[..len]);
            }
            self.bounced = true;
        }
    }
}

struct Inner {
    /// Dropped by hand, only once nothing is in flight.
    ring: ManuallyDrop<IoUring>,
    fd: types::Fd,
    /// Keeps the fd open while the ring may use it.
    file: Arc<FileState>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    overflow: VecDeque<Io>,
    /// Slots holding a request (queued in the SQ or in the kernel).
    inflight: usize,
    /// SQEs pushed since the last `io_uring_enter`.
    unsubmitted: usize,
}

impl RingState {
    fn submit(&self, io: Io) {
        if let Some(p) = self.poller.get() {
            p.resume();
        }
        let Ok(mut inner) = self.inner.try_borrow_mut() else {
            // Cannot happen (nothing re-enters submit from inside the
            // poller); fail rather than panic.
            io.complete(IoStatus::Failed(libc::EBUSY));
            return;
        };
        if io.io_type() == IoType::Reset {
            io.complete(IoStatus::Success);
            return;
        }
        if !inner.overflow.is_empty() {
            inner.overflow.push_back(io);
            return;
        }
        inner.start(io);
    }

    fn poll(&self) -> PollStatus {
        let Ok(mut inner) = self.inner.try_borrow_mut() else {
            return PollStatus::Idle;
        };
        // Nothing in a slot (queued SQEs and requests in the kernel hold
        // one) and nothing parked: no completion can come, so the poller
        // pauses until the next submission. An idle bdev under a busy
        // reactor (an origin while its cache takes the writes) otherwise
        // costs every iteration a call (it once paid a reap).
        if inner.inflight == 0 && inner.overflow.is_empty() {
            if let Some(p) = self.poller.get() {
                p.pause();
            }
            return PollStatus::Idle;
        }
        let mut busy = inner.reap() > 0;
        busy |= inner.drain_overflow();
        if inner.unsubmitted > 0 {
            inner.flush_sq();
            busy = true;
        }
        PollStatus::from(busy)
    }
}

impl Inner {
    /// Takes a free slot for `io` and queues its SQE, or parks `io` in the
    /// overflow queue when every slot is taken.
    fn start(&mut self, io: Io) {
        let Some(idx) = self.free.pop() else {
            self.overflow.push_back(io);
            return;
        };
        let bounce = io.io_type().has_data() && needs_bounce(&self.file, &io);
        let slot = &mut self.slots[idx as usize];
        slot.done = 0;
        slot.punch = false;
        slot.bounced = false;
        slot.io = Some(io);
        if bounce {
            slot.use_bounce();
        }
        self.inflight += 1;
        self.queue(idx);
    }

    /// Pushes the SQE for slot `idx` (first try or remainder of a short
    /// transfer).
    fn queue(&mut self, idx: u32) {
        let entry = self.build_sqe(idx);
        // Every pointer in the entry (the slot's iovecs, the Io's buffers or
        // the bounce buffer) lives until the completion is reaped: the slot
        // keeps the Io and is not reused before, and `Inner` waits for all
        // completions before freeing. SAFETY: so they are valid until reaped.
        let pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if pushed {
            self.unsubmitted += 1;
            return;
        }
        // SQ full (cannot happen with one SQ entry per slot): hand it to the
        // kernel and try once more, else start over from the overflow queue.
        self.flush_sq();
        // SAFETY: as above.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            self.unsubmitted += 1;
            return;
        }
        let slot = &mut self.slots[idx as usize];
        if let Some(io) = slot.io.take() {
            self.overflow.push_front(io);
        }
        self.free.push(idx);
        self.inflight -= 1;
    }

    fn build_sqe(&mut self, idx: u32) -> squeue::Entry {
        let fd = self.fd;
        let zero_range_ok = self.file.zero_range_ok.load(Ordering::Relaxed);
        let slot = &mut self.slots[idx as usize];
        let Some(io) = slot.io.as_ref() else {
            return opcode::Nop::new().build().user_data(idx as u64);
        };
        let off = io.offset_bytes();
        let len = io.len_bytes();
        let entry = match io.io_type() {
            t @ (IoType::Read | IoType::Write) => {
                slot.iovecs.clear();
                let done = slot.done;
                if slot.bounced {
                    if let Some(b) = slot.bounce.as_mut() {
                        // SAFETY: done < len <= b.len(), so the pointer stays
                        // inside the bounce buffer.
                        let base = unsafe { b.as_mut_ptr().add(done as usize) };
                        slot.iovecs.push(libc::iovec {
                            iov_base: base.cast(),
                            iov_len: (len - done) as usize,
                        });
                    }
                } else {
                    let mut skip = done;
                    for v in io.iovs() {
                        if skip >= v.len as u64 {
                            skip -= v.len as u64;
                            continue;
                        }
                        // SAFETY: skip < v.len, so the pointer stays inside
                        // the segment the submitter vouched for.
                        let base = unsafe { v.base.add(skip as usize) };
                        slot.iovecs.push(libc::iovec {
                            iov_base: base.cast(),
                            iov_len: v.len - skip as usize,
                        });
                        skip = 0;
                    }
                }
                let ptr = slot.iovecs.as_ptr();
                let n = slot.iovecs.len() as u32;
                if t == IoType::Read {
                    opcode::Readv::new(fd, ptr, n).offset(off + done).build()
                } else {
                    let flags = if io.fua() { libc::RWF_DSYNC } else { 0 };
                    opcode::Writev::new(fd, ptr, n)
                        .offset(off + done)
                        .rw_flags(flags)
                        .build()
                }
            }
            IoType::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoType::Unmap => opcode::Fallocate::new(fd, len)
                .offset(off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoType::WriteZeroes => {
                let mode = if slot.punch || !zero_range_ok {
                    libc::FALLOC_FL_PUNCH_HOLE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                };
                opcode::Fallocate::new(fd, len)
                    .offset(off)
                    .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }
            IoType::Reset => opcode::Nop::new().build(),
        };
        entry.user_data(idx as u64)
    }

    /// Enters the kernel with the queued SQEs.
    fn flush_sq(&mut self) {
        match self.ring.submit() {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                ) => {}
            Err(e) => tracing::error!("{}: io_uring_enter: {e}", self.file.name),
        }
        self.unsubmitted = self.ring.submission().len();
    }

    /// Reaps every available completion; returns how many.
    fn reap(&mut self) -> usize {
        let mut total = 0;
        loop {
            let mut batch = [(0u64, 0i32); REAP_BATCH];
            let mut n = 0;
            for cqe in self.ring.completion() {
                batch[n] = (cqe.user_data(), cqe.result());
                n += 1;
                if n == REAP_BATCH {
                    break;
                }
            }
            for &(ud, res) in &batch[..n] {
                self.on_cqe(ud, res);
            }
            total += n;
            if n < REAP_BATCH {
                return total;
            }
        }
    }

    fn on_cqe(&mut self, user_data: u64, res: i32) {
        let Some(slot) = usize::try_from(user_data)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        else {
            tracing::error!(
                "{}: completion for unknown slot {user_data}",
                self.file.name
            );
            return;
        };
        let idx = user_data as u32;
        let Some(io) = slot.io.as_mut() else {
            return;
        };
        let t = io.io_type();
        match t {
            IoType::Read | IoType::Write => {
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    self.queue(idx);
                    return;
                }
                if res == -libc::EINVAL && self.file.direct_io && !slot.bounced && slot.done == 0 {
                    // The kernel wants stricter alignment than it reported:
                    // retry once through an aligned bounce buffer.
                    slot.use_bounce();
                    self.queue(idx);
                    return;
                }
                if res < 0 {
                    return self.finish(idx, IoStatus::Failed(-res));
                }
                let total = io.len_bytes();
                if res == 0 {
                    // End of file inside the bdev: the file shrank.
                    return self.finish(idx, IoStatus::Failed(libc::EIO));
                }
                slot.done += res as u64;
                if slot.done < total {
                    self.queue(idx);
                    return;
                }
                if t == IoType::Read && slot.bounced {
                    if let Some(b) = slot.bounce.as_ref() {
                        io.copy_to_iovs(&b[..total as usize]);
                    }
                }
                self.finish(idx, IoStatus::Success);
            }
            IoType::WriteZeroes if res == -libc::EOPNOTSUPP && !slot.punch => {
                // No ZERO_RANGE here (tmpfs): a punched hole reads as zeroes.
                self.file.zero_range_ok.store(false, Ordering::Relaxed);
                slot.punch = true;
                self.queue(idx);
            }
            _ => {
                let status = if res < 0 {
                    IoStatus::Failed(-res)
                } else {
                    IoStatus::Success
                };
                self.finish(idx, status);
            }
        }
    }

    fn finish(&mut self, idx: u32, status: IoStatus) {
        let slot = &mut self.slots[idx as usize];
        if slot
            .bounce
            .as_ref()
            .is_some_and(|b| b.len() > MAX_KEPT_BOUNCE)
        {
            // Do not pin a huge buffer per slot for one odd request.
            slot.bounce = None;
        }
        if let Some(io) = slot.io.take() {
            self.free.push(idx);
            self.inflight -= 1;
            io.complete(status);
        }
    }

    /// Starts parked requests while slots are free; true if any started.
    fn drain_overflow(&mut self) -> bool {
        let mut started = false;
        while !self.free.is_empty() {
            let Some(io) = self.overflow.pop_front() else {
                break;
            };
            self.start(io);
            started = true;
        }
        started
    }
}

/// True when direct I/O would refuse the segments as they are: a base or
/// length off the file system's granularity, or too many segments.
fn needs_bounce(file: &FileState, io: &Io) -> bool {
    if !file.direct_io {
        return false;
    }
    let iovs = io.iovs();
    iovs.len() > IOV_MAX
        || iovs
            .iter()
            .any(|v| (v.base as usize) % file.dio_mem_align != 0 || v.len % file.dio_len_align != 0)
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Nothing new starts: what waited for a slot is aborted.
        while let Some(io) = self.overflow.pop_front() {
            io.complete(IoStatus::Aborted);
        }
        // The kernel may still write into the slots' iovec arrays, bounce
        // buffers and the Ios' buffers: wait for every completion first.
        while self.inflight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                    ) => {}
                Err(e) => {
                    tracing::error!(
                        "{}: cannot drain the ring ({e}); leaking it and {} requests",
                        self.file.name,
                        self.inflight
                    );
                    // Never free memory the kernel may still write to.
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
            self.reap();
        }
        // SAFETY: nothing is in flight any more and the ring is not used
        // after this point (this is `Inner`'s destructor).
        unsafe { ManuallyDrop::drop(&mut self.ring) };
    }
}
