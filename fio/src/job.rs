//! One fio job thread: the hosted reactor it polls, the bdevs it opened
//! (a descriptor and this reactor's channel each), and the queue of
//! completed `io_u`s that `getevents`/`event` hand to fio.
//!
//! The I/O path allocates nothing: `io_u` buffers are passed to the bdev as
//! a one-segment vector (copied into the pooled descriptor), the fio
//! `io_u` pointer rides as the completion tag, and completions land in an
//! array sized for the job's queue depth up front.
//!
//! As SPDK's plugin, the engine has no `commit`: `queue` submits to the
//! bdev at once, and only `getevents` polls the reactor. (fio calls
//! `commit` after each batch of queues *and* before each `getevents`; a
//! poll there found nothing new to do at QD 1 and cost one empty reactor
//! iteration per I/O.)

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use wc_bdev::{BdevChannel, Desc, Io, IoCompletion, IoVec};
use wc_reactor::{AttachedReactor, IdleMode};

/// What fio asks for, as the C shim passes it (`enum fio_ddir` mapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// DDIR_READ.
    Read,
    /// DDIR_WRITE.
    Write,
    /// DDIR_TRIM: unmap.
    Trim,
    /// DDIR_SYNC / DDIR_DATASYNC: flush the whole bdev.
    Flush,
}

impl Op {
    /// From the shim's code (0 read, 1 write, 2 trim, 3 flush).
    pub fn from_code(c: i32) -> Option<Op> {
        Some(match c {
            0 => Op::Read,
            1 => Op::Write,
            2 => Op::Trim,
            3 => Op::Flush,
            _ => return None,
        })
    }
}

/// Completed I/O waiting for fio: (`io_u` tag, errno) in completion
/// order; `event(i)` indexes it directly.
struct Completions {
    ready: RefCell<Vec<(u64, i32)>>,
    in_flight: Cell<u64>,
}

impl IoCompletion for Completions {
    fn io_done(&self, io: Io, tag: u64) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        self.ready.borrow_mut().push((tag, io.status().errno()));
    }
}

/// A bdev opened by the job.
struct Target {
    ch: Rc<BdevChannel>,
    block_size: u64,
    /// log2 of `block_size` when it is a power of two (every bdev we have):
    /// byte offsets become blocks by a shift, not two 64-bit divisions per
    /// I/O.
    block_shift: Option<u32>,
    num_blocks: u64,
    _desc: Desc,
}

impl Target {
    /// `bytes` in blocks; `None` unless it is a whole number of them.
    #[inline]
    fn blocks(&self, bytes: u64) -> Option<u64> {
        match self.block_shift {
            Some(s) => (bytes & (self.block_size - 1) == 0).then_some(bytes >> s),
            None => match bytes.checked_rem(self.block_size) {
                Some(0) => Some(bytes / self.block_size),
                _ => None,
            },
        }
    }
}

/// One fio job thread's state. Lives on (and only on) that thread.
pub struct Job {
    targets: Vec<Option<Target>>,
    done: Rc<Completions>,
    cb: Rc<dyn IoCompletion>,
    /// Completions handed to fio by the last `getevents` (consumed by the
    /// next one).
    delivered: usize,
    // Dropped last: the channels above go away while the reactor is still
    // this thread's.
    reactor: AttachedReactor,
}

/// How long `cleanup` waits for I/O still in flight.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

impl Job {
    /// Attaches fio job `index` to its hosted reactor.
    pub fn new(index: usize, iodepth: usize, idle: IdleMode) -> Result<Job, String> {
        let hosted = crate::env::hosted(index)?;
        let reactor = hosted
            .attach(idle)
            .map_err(|e| format!("job {index}: {e}"))?;
        let done = Rc::new(Completions {
            // Twice the depth: fio never has more than `iodepth` in flight,
            // so the array never grows on the I/O path.
            ready: RefCell::new(Vec::with_capacity(iodepth.max(1) * 2)),
            in_flight: Cell::new(0),
        });
        let cb: Rc<dyn IoCompletion> = done.clone();
        Ok(Job {
            targets: Vec::new(),
            done,
            cb,
            delivered: 0,
            reactor,
        })
    }

    /// Opens `bdev` for reading and writing on this job's reactor; returns
    /// its target index.
    pub fn open(&mut self, bdev: &str) -> Result<usize, String> {
        let desc = wc_bdev::open(bdev, true, None).map_err(|e| format!("bdev {bdev}: {e}"))?;
        let ch = desc
            .channel()
            .map_err(|e| format!("bdev {bdev}: cannot get an I/O channel: {e}"))?;
        let b = desc.bdev();
        let block_size = b.block_size() as u64;
        let t = Target {
            block_size,
            block_shift: block_size
                .is_power_of_two()
                .then(|| block_size.trailing_zeros()),
            num_blocks: b.num_blocks(),
            ch,
            _desc: desc,
        };
        if let Some(i) = self.targets.iter().position(Option::is_none) {
            self.targets[i] = Some(t);
            Ok(i)
        } else {
            self.targets.push(Some(t));
            Ok(self.targets.len() - 1)
        }
    }

    /// Closes a target (its I/O has completed: fio closes files after
    /// reaping them).
    pub fn close(&mut self, target: usize) {
        if let Some(t) = self.targets.get_mut(target) {
            *t = None;
        }
    }

    /// Submits one I/O; `Err(errno)` when it cannot even be submitted (fio
    /// completes it at once with that error).
    ///
    /// # Safety
    /// For reads and writes, `buf` must point to `len` bytes that stay
    /// valid (and, for writes, unchanged) until `tag` comes back from
    /// [`event`](Self::event).
    pub unsafe fn queue(
        &mut self,
        target: usize,
        op: Op,
        buf: *mut u8,
        len: u64,
        offset: u64,
        tag: u64,
    ) -> Result<(), i32> {
        let Some(Some(t)) = self.targets.get(target) else {
            return Err(libc::EBADF);
        };
        let (Some(first), Some(n)) = (t.blocks(offset), t.blocks(len)) else {
            return Err(libc::EINVAL);
        };
        let cb = &self.cb;
        match op {
            Op::Read | Op::Write => {
                if buf.is_null() || len == 0 {
                    return Err(libc::EINVAL);
                }
                let iov = [IoVec {
                    base: buf,
                    len: len as usize,
                }];
                if op == Op::Read {
                    // SAFETY: the caller keeps `buf` (len bytes, fio's
                    // io_u buffer) valid and unaliased until the tag is
                    // returned by `event`, which follows the completion.
                    unsafe { t.ch.readv(first, n, &iov, cb, tag) };
                } else {
                    // SAFETY: as above; fio does not touch the buffer of
                    // an io_u in flight.
                    unsafe { t.ch.writev(first, n, &iov, false, cb, tag) };
                }
            }
            Op::Trim => t.ch.unmap(first, n, cb, tag),
            Op::Flush => t.ch.flush(0, t.num_blocks, cb, tag),
        }
        self.done.in_flight.set(self.done.in_flight.get() + 1);
        Ok(())
    }

    /// Polls the reactor until at least `min` completions are ready or
    /// `timeout` passes; returns how many are ready, and fio takes them
    /// all.
    ///
    /// fio's `max` is not a bound here, as in SPDK's plugin (which returns
    /// whatever one poll completed): fio's `iodepth_batch_complete_max`
    /// defaults to its min, 1, so a bounded reap hands fio one completion
    /// per call at any depth, and fio pays its per-reap costs (a clock
    /// read, the reap bookkeeping) per I/O. fio takes any count getevents
    /// returns (`event(0..n)`).
    pub fn getevents(&mut self, min: usize, timeout: Option<Duration>) -> usize {
        let mut ready = {
            let mut q = self.done.ready.borrow_mut();
            // Those handed out by the last call are fio's now.
            let n = self.delivered.min(q.len());
            q.drain(..n);
            q.len()
        };
        self.delivered = 0;
        // Poll at least once, so min = 0 still reaps.
        if ready < min.max(1) {
            self.reactor.poll();
            ready = self.done.ready.borrow().len();
        }
        let mut deadline: Option<Instant> = None;
        while ready < min {
            if !self.reactor.poll() {
                if let Some(t) = timeout {
                    let d = *deadline.get_or_insert_with(|| Instant::now() + t);
                    if Instant::now() >= d {
                        break;
                    }
                }
                self.reactor.idle_wait();
            }
            ready = self.done.ready.borrow().len();
        }
        self.delivered = ready;
        ready
    }

    /// The `i`-th completion of the last `getevents`: (tag, errno).
    pub fn event(&self, i: usize) -> Option<(u64, i32)> {
        if i >= self.delivered {
            return None;
        }
        self.done.ready.borrow().get(i).copied()
    }

    /// I/O submitted and not yet completed.
    pub fn in_flight(&self) -> u64 {
        self.done.in_flight.get()
    }

    /// Waits (bounded) for I/O still in flight, then closes everything;
    /// the reactor goes back to its standby thread.
    pub fn finish(mut self) {
        let start = Instant::now();
        while self.in_flight() > 0 && start.elapsed() < DRAIN_LIMIT {
            if !self.reactor.poll() {
                self.reactor.idle_wait();
            }
        }
        if self.in_flight() > 0 {
            tracing::error!(
                "{} I/O still in flight after {DRAIN_LIMIT:?}; closing anyway",
                self.in_flight()
            );
        }
        self.targets.clear();
        // Let the channels' teardown messages run on this reactor.
        for _ in 0..64 {
            if !self.reactor.poll() {
                break;
            }
        }
    }
}

/// Block size and block count of `bdev`, or why it cannot be used.
pub fn geometry(bdev: &str) -> Result<(u32, u64), String> {
    let b = wc_bdev::lookup(bdev).ok_or_else(|| format!("bdev {bdev} does not exist"))?;
    if let Some(c) = b.claim_info() {
        return Err(format!(
            "bdev {bdev} is claimed by module {} (use the bdev built on it)",
            c.module
        ));
    }
    Ok((b.block_size(), b.num_blocks()))
}
