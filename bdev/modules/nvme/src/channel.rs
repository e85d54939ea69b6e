//! The I/O path on one reactor: one queue pair per (controller, reactor),
//! shared by the channels of every namespace bdev of that controller on
//! that reactor (SPDK's model), polled by a poller of that reactor.
//!
//! While the controller resets, I/O waits in the path's queue (in-flight
//! commands of a dropped connection are put back at its head and sent
//! again after the reconnect); once the controller fails I/O
//! (`fast_io_fail_timeout_sec`, no reconnect, deleted) the queue drains
//! with errors.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use wc_bdev::{BdevError, Io, IoChannel, IoStatus};
use wc_reactor::{PollStatus, PollerHandle};

use crate::ctrlr::{io_timeout, phase, Ctrlr};
use crate::qpair::{Phase, Qpair};

/// One controller's queue pair on this reactor.
pub(crate) struct IoPath {
    ctrlr: Arc<Ctrlr>,
    qid: u16,
    qp: RefCell<Qpair>,
    queued: RefCell<VecDeque<Io>>,
    /// Controller generation the queue pair connected under.
    generation: Cell<u64>,
    poller: RefCell<Option<PollerHandle>>,
    last_timeout_check: Cell<u64>,
}

#[derive(Default)]
struct PathMap {
    paths: RefCell<HashMap<u64, Weak<IoPath>>>,
}

/// The current reactor's path to `ctrlr`, created on first use.
pub(crate) fn path_for(ctrlr: &Arc<Ctrlr>) -> Result<Rc<IoPath>, BdevError> {
    let r = wc_reactor::current();
    let map = r.local(PathMap::default);
    if let Some(p) = map.paths.borrow().get(&ctrlr.id).and_then(Weak::upgrade) {
        return Ok(p);
    }
    let qid = ctrlr.alloc_qid().ok_or_else(|| BdevError::Os {
        context: format!("nvme {}: no I/O queue for this reactor", ctrlr.params.name),
        source_msg: "the controller granted fewer I/O queues than reactors use it \
                         (num_io_queues)"
            .into(),
        errno: libc::ENOMEM,
    })?;
    let path = Rc::new(IoPath {
        qp: RefCell::new(Qpair::new(ctrlr.io_qp_config(qid))),
        ctrlr: ctrlr.clone(),
        qid,
        queued: RefCell::new(VecDeque::with_capacity(256)),
        generation: Cell::new(0),
        poller: RefCell::new(None),
        last_timeout_check: Cell::new(0),
    });
    let weak = Rc::downgrade(&path);
    let h = r.register_poller("nvme_io_qpair", None, move || match weak.upgrade() {
        Some(p) => p.poll(),
        None => PollStatus::Idle,
    });
    *path.poller.borrow_mut() = Some(h);
    map.paths
        .borrow_mut()
        .insert(ctrlr.id, Rc::downgrade(&path));
    Ok(path)
}

impl IoPath {
    /// Starts or queues `io` (its namespace and command size limit in
    /// `driver_ctx[0..2]`).
    pub(crate) fn submit(&self, mut io: Io) {
        match self.ctrlr.phase() {
            phase::ENABLED => {
                let mut qp = self.qp.borrow_mut();
                if qp.is_ready()
                    && self.generation.get() == self.ctrlr.generation()
                    && self.queued.borrow().is_empty()
                {
                    let (nsid, maxb) = io_target(&mut io);
                    if let Err(io) = qp.submit_io(io, nsid, maxb) {
                        self.queued.borrow_mut().push_back(io);
                    }
                } else {
                    self.queued.borrow_mut().push_back(io);
                }
            }
            phase::FAILING_IO | phase::FAILED => io.complete(IoStatus::Failed(libc::EIO)),
            phase::DELETED => io.complete(IoStatus::Failed(libc::ENODEV)),
            _ => self.queued.borrow_mut().push_back(io),
        }
    }

    /// Takes the in-flight I/O back (connection gone) ahead of the queue.
    fn requeue_in_flight(&self) {
        let mut back = VecDeque::new();
        self.qp.borrow_mut().take_unfinished(&mut back);
        if back.is_empty() {
            return;
        }
        let mut q = self.queued.borrow_mut();
        back.append(&mut q);
        *q = back;
    }

    fn fail_queued(&self, errno: i32) {
        let drained: Vec<Io> = self.queued.borrow_mut().drain(..).collect();
        for io in drained {
            io.complete(IoStatus::Failed(errno));
        }
    }

    fn poll(&self) -> PollStatus {
        let ph = self.ctrlr.phase();
        let mut busy = false;
        match ph {
            phase::ENABLED => {
                let gen = self.ctrlr.generation();
                let qp_phase = self.qp.borrow().phase();
                if gen != self.generation.get() || qp_phase == Phase::Down {
                    if qp_phase != Phase::Down {
                        // Connected under an older generation: the target
                        // forgot that association.
                        self.requeue_in_flight();
                    }
                    if gen != self.generation.get() || !self.queued.borrow().is_empty() {
                        self.generation.set(gen);
                        let cfg = self.ctrlr.io_qp_config(self.qid);
                        let mut qp = self.qp.borrow_mut();
                        *qp = Qpair::new(cfg);
                        if let Err(e) = qp.start() {
                            drop(qp);
                            self.ctrlr
                                .request_reset(&format!("I/O queue {}: {e}", self.qid));
                        }
                        busy = true;
                    }
                }
            }
            phase::RESETTING | phase::CONNECTING => {
                if self.qp.borrow().phase() != Phase::Down {
                    self.requeue_in_flight();
                    busy = true;
                }
                return PollStatus::from(busy);
            }
            phase::FAILING_IO | phase::FAILED | phase::DELETED => {
                if self.qp.borrow().phase() != Phase::Down {
                    self.requeue_in_flight();
                }
                if !self.queued.borrow().is_empty() {
                    let errno = if ph == phase::DELETED {
                        libc::ENODEV
                    } else {
                        libc::EIO
                    };
                    self.fail_queued(errno);
                    busy = true;
                }
                return PollStatus::from(busy);
            }
            _ => {}
        }
        // Enabled: send what waits, then drive the socket.
        {
            let mut qp = self.qp.borrow_mut();
            if qp.is_ready() {
                let mut q = self.queued.borrow_mut();
                while let Some(mut io) = q.pop_front() {
                    let (nsid, maxb) = io_target(&mut io);
                    if let Err(io) = qp.submit_io(io, nsid, maxb) {
                        q.push_front(io);
                        break;
                    }
                    busy = true;
                }
            }
        }
        let r = self.qp.borrow_mut().poll();
        match r {
            Ok(b) => busy |= b,
            Err(e) => {
                self.requeue_in_flight();
                self.ctrlr
                    .request_reset(&format!("I/O queue {}: {e}", self.qid));
                return PollStatus::Busy;
            }
        }
        self.check_timeout();
        PollStatus::from(busy)
    }

    fn check_timeout(&self) {
        let now = wc_reactor::tick::ticks();
        let every = wc_reactor::tick::duration_to_ticks(std::time::Duration::from_millis(100));
        if now.wrapping_sub(self.last_timeout_check.get()) < every {
            return;
        }
        self.last_timeout_check.set(now);
        let limit = io_timeout();
        if limit.is_zero() {
            return;
        }
        let oldest = self.qp.borrow().oldest_started();
        if let Some(t0) = oldest {
            if now.saturating_sub(t0) > wc_reactor::tick::duration_to_ticks(limit) {
                self.qp
                    .borrow_mut()
                    .fail(crate::qpair::QpError::Timeout("I/O command"));
                self.requeue_in_flight();
                self.ctrlr.request_reset(&format!(
                    "I/O queue {}: a command got no answer in {:?}",
                    self.qid,
                    io_timeout()
                ));
            }
        }
    }
}

impl Drop for IoPath {
    fn drop(&mut self) {
        if let Some(p) = self.poller.borrow_mut().take() {
            p.unregister();
        }
        self.requeue_in_flight();
        for io in self.queued.borrow_mut().drain(..) {
            io.complete(IoStatus::Aborted);
        }
        self.ctrlr.free_qid(self.qid);
        if let Some(r) = wc_reactor::try_current() {
            let map = r.local(PathMap::default);
            let cleaned = map
                .paths
                .try_borrow_mut()
                .map(|mut m| m.retain(|_, w| w.strong_count() > 0));
            drop(cleaned);
        }
    }
}

/// Namespace and command size limit the namespace channel stored in the
/// I/O's driver context.
fn io_target(io: &mut Io) -> (u32, u64) {
    let c = io.driver_ctx();
    (c[0] as u32, c[1])
}

/// A namespace bdev's channel on this reactor.
pub(crate) struct NsChannel {
    pub path: Rc<IoPath>,
    pub nsid: u32,
    pub max_blocks: u64,
}

impl IoChannel for NsChannel {
    fn submit(&self, mut io: Io) {
        let c = io.driver_ctx();
        c[0] = self.nsid as u64;
        c[1] = self.max_blocks;
        self.path.submit(io);
    }
}
