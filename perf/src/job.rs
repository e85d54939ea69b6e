//! The I/O engine: one job drives one bdev from one reactor at a fixed
//! queue depth, resubmitting from its completion callback.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::mpsc::Sender;

use wc_bdev::{BdevChannel, DmaBuf, Io, IoCompletion, IoStatus, IoVec};
use wc_reactor::tick::{tick_rate, ticks};

/// Workload types, with SPDK bdevperf's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential mix (`-M` percent reads).
    Rw,
    /// Random mix.
    RandRw,
    /// Write a pattern, read it back, compare.
    Verify,
    /// Verify plus a bdev RESET every 10 s.
    Reset,
    /// FLUSH only.
    Flush,
    /// UNMAP only.
    Unmap,
    /// WRITE_ZEROES only.
    WriteZeroes,
}

impl Workload {
    /// Parses SPDK's workload name.
    pub fn parse(s: &str) -> Option<Workload> {
        Some(match s {
            "read" => Workload::Read,
            "write" => Workload::Write,
            "randread" => Workload::RandRead,
            "randwrite" => Workload::RandWrite,
            "rw" => Workload::Rw,
            "randrw" => Workload::RandRw,
            "verify" => Workload::Verify,
            "reset" => Workload::Reset,
            "flush" => Workload::Flush,
            "unmap" => Workload::Unmap,
            "write_zeroes" => Workload::WriteZeroes,
            _ => return None,
        })
    }

    /// SPDK's name.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
            Workload::RandRw => "randrw",
            Workload::Verify => "verify",
            Workload::Reset => "reset",
            Workload::Flush => "flush",
            Workload::Unmap => "unmap",
            Workload::WriteZeroes => "write_zeroes",
        }
    }

    fn random(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandWrite | Workload::RandRw
        )
    }

    /// True for verify and reset (write, read back, compare).
    pub fn verifies(self) -> bool {
        matches!(self, Workload::Verify | Workload::Reset)
    }

    /// True for the mixed workloads that take `-M`.
    pub fn mixed(self) -> bool {
        matches!(self, Workload::Rw | Workload::RandRw)
    }
}

/// What one job does.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Index of the job in its run (the report's order: bdev, then core).
    pub id: usize,
    /// Target bdev.
    pub bdev: String,
    /// Reactor index that runs it.
    pub reactor: usize,
    /// Core of that reactor (for the report).
    pub core: u32,
    /// Workload.
    pub workload: Workload,
    /// Read percentage for mixed workloads.
    pub read_pct: u32,
    /// Queue depth.
    pub queue_depth: u32,
    /// I/O size in bytes.
    pub io_size: u64,
    /// Run time in seconds.
    pub seconds: f64,
    /// First block of the job's range.
    pub range_start: u64,
    /// Blocks in the job's range.
    pub range_len: u64,
    /// Continue after failures.
    pub continue_on_error: bool,
    /// Seed for random offsets.
    pub seed: u64,
}

/// Number of histogram buckets (log2 major x 16 minor).
pub const HIST_BUCKETS: usize = 64 * 16;

/// Bucket of a latency in nanoseconds.
fn bucket(ns: u64) -> usize {
    if ns < 16 {
        return ns as usize;
    }
    let major = 63 - ns.leading_zeros() as usize; // >= 4
    let minor = ((ns >> (major - 4)) & 0xF) as usize;
    (major * 16 + minor).min(HIST_BUCKETS - 1)
}

/// Lower bound (ns) of a bucket.
pub fn bucket_floor_ns(b: usize) -> u64 {
    if b < 16 {
        return b as u64;
    }
    let major = b / 16;
    let minor = (b % 16) as u64;
    (1u64 << major) | (minor << (major - 4))
}

/// Outcome of one job.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// The spec it ran.
    pub spec: JobSpec,
    /// Completed I/Os.
    pub ios: u64,
    /// Failed I/Os.
    pub failed: u64,
    /// Data miscompares (verify).
    pub miscompares: u64,
    /// Seconds actually run.
    pub runtime: f64,
    /// Sum of latencies, ns.
    pub lat_sum_ns: u128,
    /// Minimum latency, ns.
    pub lat_min_ns: u64,
    /// Maximum latency, ns.
    pub lat_max_ns: u64,
    /// Latency histogram.
    pub hist: Vec<u64>,
    /// Set when the job could not start.
    pub error: Option<String>,
}

struct Slot {
    /// The slot's data buffer. It stays here for the life of the job: its
    /// I/O reaches it through a raw segment (as SPDK's bdevperf hands out
    /// its task buffers) instead of moving the buffer into the I/O and
    /// back, which cost two memory round trips per I/O.
    buf: DmaBuf,
    offset: u64,
    /// Verify: the generation stamped into the buffer; phase 0 = write.
    generation: u64,
    verifying: bool,
}

impl Slot {
    /// The buffer as the one segment of the slot's I/O.
    fn segment(&mut self) -> IoVec {
        IoVec {
            base: self.buf.as_mut_ptr(),
            len: self.buf.len(),
        }
    }
}

struct State {
    slots: Vec<Slot>,
    rng: u64,
    next_seq: u64,
    outstanding: u32,
    ios: u64,
    failed: u64,
    miscompares: u64,
    lat_sum: u128,
    lat_min: u64,
    lat_max: u64,
    hist: Vec<u64>,
    start: u64,
    end: u64,
    next_reset: u64,
    stopping: bool,
}

/// A running job (lives on its reactor).
pub struct Job {
    spec: JobSpec,
    ch: Rc<BdevChannel>,
    io_blocks: u64,
    /// I/O-sized units in the job's range (offsets are drawn from these;
    /// divided once here, not per I/O).
    units: u64,
    block_size: u64,
    state: RefCell<State>,
    me: RefCell<Option<Rc<dyn IoCompletion>>>,
    done: RefCell<Option<Sender<JobResult>>>,
    /// Nanoseconds per tick, as a 32.32 fixed-point number.
    ns_per_tick_q32: u64,
    _desc: wc_bdev::Desc,
}

/// Counters of a running job, sampled for the periodic output (`-S`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// The job's index in its run.
    pub id: usize,
    /// Completed I/Os so far.
    pub ios: u64,
    /// Failed I/Os so far.
    pub failed: u64,
    /// Sum of latencies so far, ns.
    pub lat_sum_ns: u128,
    /// Minimum latency so far, ns (0 before the first completion).
    pub lat_min_ns: u64,
    /// Maximum latency so far, ns.
    pub lat_max_ns: u64,
    /// Seconds since the job started.
    pub elapsed: f64,
}

impl JobResult {
    /// The final counters, as a progress sample.
    pub fn progress(&self) -> Progress {
        Progress {
            id: self.spec.id,
            ios: self.ios,
            failed: self.failed,
            lat_sum_ns: self.lat_sum_ns,
            lat_min_ns: self.lat_min_ns,
            lat_max_ns: self.lat_max_ns,
            elapsed: self.runtime,
        }
    }
}

thread_local! {
    /// Jobs running on this reactor (registered at start, removed when
    /// they finish), for [`progress_here`].
    static LIVE: RefCell<Vec<Weak<Job>>> = const { RefCell::new(Vec::new()) };
}

/// Samples every job running on the current reactor. Called from a reactor
/// message, like SPDK's per-thread performance dump: the I/O path pays
/// nothing for it.
pub fn progress_here() -> Vec<Progress> {
    let now = ticks();
    let rate = tick_rate() as f64;
    LIVE.with(|live| {
        let Ok(live) = live.try_borrow() else {
            return Vec::new();
        };
        live.iter()
            .filter_map(Weak::upgrade)
            .filter_map(|job| {
                let st = job.state.try_borrow().ok()?;
                Some(Progress {
                    id: job.spec.id,
                    ios: st.ios,
                    failed: st.failed,
                    lat_sum_ns: st.lat_sum,
                    lat_min_ns: if st.lat_min == u64::MAX {
                        0
                    } else {
                        st.lat_min
                    },
                    lat_max_ns: st.lat_max,
                    elapsed: now.saturating_sub(st.start) as f64 / rate,
                })
            })
            .collect()
    })
}

/// Stops every job running on the current reactor: no new I/O is
/// submitted, and each job reports once its I/O in flight completed.
pub fn stop_here() {
    LIVE.with(|live| {
        let Ok(live) = live.try_borrow() else { return };
        for job in live.iter().filter_map(Weak::upgrade) {
            if let Ok(mut st) = job.state.try_borrow_mut() {
                st.stopping = true;
            }
        }
    });
}

/// Starts `spec` on the current reactor; the result goes to `done`.
pub fn start(spec: JobSpec, done: Sender<JobResult>) {
    let fail = |spec: &JobSpec, done: &Sender<JobResult>, msg: String| {
        let _ = done.send(empty_result(spec.clone(), Some(msg)));
    };
    let desc = match wc_bdev::open(&spec.bdev, true, None) {
        Ok(d) => d,
        Err(e) => return fail(&spec, &done, e.to_string()),
    };
    let ch = match desc.channel() {
        Ok(c) => c,
        Err(e) => return fail(&spec, &done, e.to_string()),
    };
    let bs = desc.bdev().block_size() as u64;
    if spec.io_size == 0 || spec.io_size % bs != 0 {
        return fail(
            &spec,
            &done,
            format!(
                "IO size {} is not a multiple of the block size {bs}",
                spec.io_size
            ),
        );
    }
    let io_blocks = spec.io_size / bs;
    if spec.range_len < io_blocks {
        return fail(&spec, &done, "bdev range smaller than one I/O".into());
    }
    // Buffers are allocated per slot up front: refuse absurd totals rather
    // than abort on allocation.
    if (spec.queue_depth as u64).saturating_mul(spec.io_size) > 8 << 30 {
        return fail(
            &spec,
            &done,
            format!(
                "queue depth {} x IO size {} needs more than 8 GiB of buffers",
                spec.queue_depth, spec.io_size
            ),
        );
    }
    let now = ticks();
    let rate = tick_rate();
    let slots = (0..spec.queue_depth)
        .map(|i| Slot {
            buf: fill(DmaBuf::new(spec.io_size as usize), spec.seed ^ i as u64),
            offset: 0,
            generation: 0,
            verifying: false,
        })
        .collect();
    let job = Rc::new(Job {
        io_blocks,
        units: spec.range_len / io_blocks,
        block_size: bs,
        state: RefCell::new(State {
            slots,
            rng: spec.seed | 1,
            next_seq: 0,
            outstanding: 0,
            ios: 0,
            failed: 0,
            miscompares: 0,
            lat_sum: 0,
            lat_min: u64::MAX,
            lat_max: 0,
            hist: vec![0; HIST_BUCKETS],
            start: now,
            end: now + (spec.seconds * rate as f64) as u64,
            next_reset: now + 10 * rate,
            stopping: false,
        }),
        me: RefCell::new(None),
        done: RefCell::new(Some(done)),
        ns_per_tick_q32: ((1_000_000_000u128 << 32) / rate as u128) as u64,
        spec,
        ch,
        _desc: desc,
    });
    let cb: Rc<dyn IoCompletion> = job.clone();
    *job.me.borrow_mut() = Some(cb);
    LIVE.with(|live| {
        if let Ok(mut live) = live.try_borrow_mut() {
            live.retain(|w| w.strong_count() > 0);
            live.push(Rc::downgrade(&job));
        }
    });
    for slot in 0..job.spec.queue_depth as usize {
        job.submit(slot);
    }
}

fn empty_result(spec: JobSpec, error: Option<String>) -> JobResult {
    JobResult {
        spec,
        ios: 0,
        failed: 0,
        miscompares: 0,
        runtime: 0.0,
        lat_sum_ns: 0,
        lat_min_ns: 0,
        lat_max_ns: 0,
        hist: vec![0; HIST_BUCKETS],
        error,
    }
}

fn fill(mut b: DmaBuf, seed: u64) -> DmaBuf {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    b
}

/// Verify pattern: every 8 bytes hold (offset, generation, index) mixed.
fn stamp(b: &mut [u8], offset: u64, generation: u64) {
    for (i, c) in b.chunks_mut(8).enumerate() {
        let v = offset.wrapping_mul(0x100_0000_01B3)
            ^ generation.rotate_left(17)
            ^ (i as u64).wrapping_mul(0x9E37_79B9);
        c.copy_from_slice(&v.to_le_bytes()[..c.len()]);
    }
}

impl Job {
    fn next_offset(&self, st: &mut State) -> u64 {
        let units = self.units;
        let unit = if self.spec.workload.random() {
            st.rng ^= st.rng << 13;
            st.rng ^= st.rng >> 7;
            st.rng ^= st.rng << 17;
            // Lemire's multiply-shift range reduction: no division.
            ((st.rng as u128 * units as u128) >> 64) as u64
        } else {
            let u = st.next_seq % units;
            st.next_seq += 1;
            u
        };
        self.spec.range_start + unit * self.io_blocks
    }

    fn is_read(&self, st: &mut State) -> bool {
        match self.spec.workload {
            Workload::Read | Workload::RandRead => true,
            Workload::Rw | Workload::RandRw => {
                st.rng ^= st.rng << 13;
                st.rng ^= st.rng >> 7;
                st.rng ^= st.rng << 17;
                (st.rng % 100) < self.spec.read_pct as u64
            }
            _ => false,
        }
    }

    fn submit(&self, slot: usize) {
        // Borrowed for the call: completions are deferred, so nothing
        // re-enters `me` mutably while we submit.
        let me = self.me.borrow();
        let Some(cb) = me.as_ref() else { return };
        let mut st = self.state.borrow_mut();
        // Latency comes from the I/O's own timestamps (the channel's), so
        // only the reset schedule reads the clock here.
        if self.spec.workload == Workload::Reset {
            let now = ticks();
            if now >= st.next_reset {
                st.next_reset = now + 10 * tick_rate();
                st.outstanding += 1;
                drop(st);
                // Ctx with the top bit marks a reset (no slot buffer involved).
                self.ch.reset(cb, slot as u64 | 1 << 63);
                return;
            }
        }
        let offset = self.next_offset(&mut st);
        let read = self.is_read(&mut st);
        st.outstanding += 1;
        let s = &mut st.slots[slot];
        s.offset = offset;
        let n = self.io_blocks;
        match self.spec.workload {
            Workload::Flush => {
                drop(st);
                self.ch.flush(offset, n, cb, slot as u64)
            }
            Workload::Unmap => {
                drop(st);
                self.ch.unmap(offset, n, cb, slot as u64)
            }
            Workload::WriteZeroes => {
                drop(st);
                self.ch.write_zeroes(offset, n, cb, slot as u64)
            }
            Workload::Verify | Workload::Reset => {
                s.generation += 1;
                s.verifying = false;
                stamp(&mut s.buf, offset, s.generation);
                let seg = [s.segment()];
                drop(st);
                // A slot has one I/O at a time; its callback holds the job.
                // SAFETY: the segment is this slot's buffer, alive as long as
                // the job and untouched until this I/O completes.
                unsafe { self.ch.writev(offset, n, &seg, false, cb, slot as u64) }
            }
            _ => {
                let seg = [s.segment()];
                drop(st);
                if read {
                    // SAFETY: as for verify's write above.
                    unsafe { self.ch.readv(offset, n, &seg, cb, slot as u64) }
                } else {
                    // SAFETY: as for verify's write above.
                    unsafe { self.ch.writev(offset, n, &seg, false, cb, slot as u64) }
                }
            }
        }
    }

    fn finish(&self) {
        let st = self.state.borrow();
        let rate = tick_rate() as f64;
        let runtime = (ticks().saturating_sub(st.start)) as f64 / rate;
        let r = JobResult {
            spec: self.spec.clone(),
            ios: st.ios,
            failed: st.failed,
            miscompares: st.miscompares,
            runtime,
            lat_sum_ns: st.lat_sum,
            lat_min_ns: if st.lat_min == u64::MAX {
                0
            } else {
                st.lat_min
            },
            lat_max_ns: st.lat_max,
            hist: st.hist.clone(),
            error: None,
        };
        drop(st);
        // Off the live list before the result goes out: a sample never
        // sees a job of a run that is over.
        let me: *const Job = self;
        LIVE.with(|live| {
            if let Ok(mut live) = live.try_borrow_mut() {
                live.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), me));
            }
        });
        if let Some(tx) = self.done.borrow_mut().take() {
            let _ = tx.send(r);
        }
        // Break the self-reference so the job (and its channel) can drop.
        self.me.borrow_mut().take();
    }
}

impl IoCompletion for Job {
    fn io_done(&self, io: Io, ctx: u64) {
        // The channel stamped the submission and the completion: reading
        // the clock again here would double the per-I/O rdtsc cost (an
        // I/O the channel refused has no completion stamp).
        let now = match io.complete_ticks() {
            0 => ticks(),
            t => t,
        };
        let submitted = io.submit_ticks();
        let is_reset = ctx & (1 << 63) != 0;
        let slot = (ctx & !(1 << 63)) as usize;
        let status = io.status();
        drop(io);
        let mut st = self.state.borrow_mut();
        st.outstanding -= 1;
        // Fixed-point ticks -> ns (a u128 division per I/O is measurable).
        let lat_ns =
            (((now.saturating_sub(submitted)) as u128 * self.ns_per_tick_q32 as u128) >> 32) as u64;

        // Verify: a completed write is followed by a read of the same range.
        if !is_reset
            && self.spec.workload.verifies()
            && status == IoStatus::Success
            && !st.slots[slot].verifying
        {
            st.outstanding += 1;
            let s = &mut st.slots[slot];
            s.verifying = true;
            s.buf.fill(0);
            let offset = s.offset;
            let seg = [s.segment()];
            drop(st);
            if let Some(cb) = self.me.borrow().as_ref().cloned() {
                // SAFETY: as in `submit`: the slot's own buffer, untouched
                // until this read completes.
                unsafe {
                    self.ch
                        .readv(offset, self.io_blocks, &seg, &cb, slot as u64)
                };
            }
            return;
        }
        if status.is_success() {
            st.ios += 1;
            st.lat_sum += lat_ns as u128;
            st.lat_min = st.lat_min.min(lat_ns);
            st.lat_max = st.lat_max.max(lat_ns);
            st.hist[bucket(lat_ns)] += 1;
            if !is_reset && self.spec.workload.verifies() {
                let s = &st.slots[slot];
                let offset = s.offset;
                let mut want = vec![0u8; self.spec.io_size as usize];
                stamp(&mut want, offset, s.generation);
                if s.buf.as_slice() != want.as_slice() {
                    st.miscompares += 1;
                    eprintln!(
                        "bdevperf: data miscompare on {} at LBA {} ({} blocks of {} bytes)",
                        self.spec.bdev, offset, self.io_blocks, self.block_size
                    );
                    if !self.spec.continue_on_error {
                        st.stopping = true;
                    }
                }
            }
        } else {
            st.failed += 1;
            if !self.spec.continue_on_error {
                st.stopping = true;
            }
        }
        let stop = st.stopping || now >= st.end;
        if stop {
            st.stopping = true;
            let idle = st.outstanding == 0;
            drop(st);
            if idle {
                self.finish();
            }
        } else {
            drop(st);
            self.submit(slot);
        }
    }
}

/// Latency (µs) at percentile `p` (0..100) of a histogram.
pub fn percentile_us(hist: &[u64], p: f64) -> f64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let want = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
    let mut acc = 0;
    for (b, &n) in hist.iter().enumerate() {
        acc += n;
        if acc >= want {
            return bucket_floor_ns(b + 1) as f64 / 1000.0;
        }
    }
    0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in [0u64, 1, 15, 16, 17, 100, 1000, 4096, 1 << 20, u64::MAX / 2] {
            let b = bucket(ns);
            assert!(b >= last);
            last = b;
            assert!(bucket_floor_ns(b) <= ns, "{ns}");
            if ns >= 16 && b + 1 < HIST_BUCKETS {
                assert!(bucket_floor_ns(b + 1) > ns);
                // Relative error of a bucket is under 1/16.
                assert!((bucket_floor_ns(b + 1) - bucket_floor_ns(b)) as f64 <= ns as f64 / 15.0);
            }
        }
    }

    #[test]
    fn percentiles_from_histogram() {
        let mut h = vec![0u64; HIST_BUCKETS];
        for ns in 1..=1000u64 {
            h[bucket(ns * 1000)] += 1;
        }
        let p50 = percentile_us(&h, 50.0);
        let p99 = percentile_us(&h, 99.0);
        assert!((480.0..540.0).contains(&p50), "{p50}");
        assert!((960.0..1060.0).contains(&p99), "{p99}");
    }
}
