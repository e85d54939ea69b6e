//! The virtio-blk request engine: parses descriptor chains against guest
//! memory, validates them, and submits them to a bdev channel with the
//! data segments pointing straight into guest memory (zero copy).
//!
//! It is independent of vhost-user: a [`QueueOps`] gives it chains and
//! takes used entries, so the unit tests drive it with virtio-queue's mock
//! queue, and the vhost backend with the vrings of a connection.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use slab::Slab;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use wc_bdev::{BdevChannel, Io, IoCompletion, IoType, IoVec};

/// Guest memory as the engine sees it.
pub type Mem = GuestMemoryMmap<()>;

/// `VIRTIO_BLK_T_IN`.
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`.
pub const T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`.
pub const T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const T_WRITE_ZEROES: u32 = 13;
/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = 2;
/// Length of `VIRTIO_BLK_T_GET_ID` answers.
pub const ID_BYTES: usize = 20;
/// Most data segments per request (advertised as `seg_max`).
pub const SEG_MAX: u32 = 126;
/// Largest segment (advertised as `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest request payload.
pub const MAX_IO_BYTES: u64 = 4 << 20;
/// Largest discard / write-zeroes request, in 512-byte sectors.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most descriptors a chain may have (data + header + status).
const MAX_CHAIN: usize = SEG_MAX as usize + 2;

/// What a device exports.
#[derive(Debug, Clone)]
pub struct Geometry {
    /// Bdev block size in bytes (a multiple of 512).
    pub block_size: u32,
    /// Bdev size in blocks.
    pub num_blocks: u64,
    /// Writes refused.
    pub readonly: bool,
    /// The GET_ID string (bdev name, truncated to 20 bytes).
    pub id: Vec<u8>,
}

impl Geometry {
    fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size / 512).max(1)
    }
}

/// A parsed, validated request.
#[derive(Debug)]
enum Kind {
    Read { lba: u64, blocks: u64 },
    Write { lba: u64, blocks: u64 },
    Flush,
    GetId,
    Unmap { lba: u64, blocks: u64 },
    Zeroes { lba: u64, blocks: u64 },
}

/// One request in flight.
struct Req {
    head: u16,
    status: GuestAddress,
    /// Bytes the device writes into the chain on success (data + status).
    used_len: u32,
    segs: Vec<IoVec>,
    kind: Kind,
    /// Keeps the guest mapping alive until the request completes.
    mem: Arc<Mem>,
    generation: u64,
    /// The queue's epoch when the chain was popped.
    epoch: u64,
}

/// A chain the engine could not accept: its head and, where the status
/// descriptor is usable, where to write `VIRTIO_BLK_S_*`.
#[derive(Debug)]
pub struct Rejected {
    /// Head index.
    pub head: u16,
    /// Status byte address, if valid.
    pub status: Option<GuestAddress>,
    /// The status to report.
    pub code: u8,
}

/// Host pointer to `[addr, addr+len)`, which must lie in one region.
fn host_ptr(mem: &Mem, addr: GuestAddress, len: usize) -> Option<*mut u8> {
    if len == 0 {
        return None;
    }
    let s = mem.get_slice(addr, len).ok()?;
    Some(s.ptr_guard_mut().as_ptr())
}

/// Parses a chain (as a list of descriptors) into a request, checking every
/// address and length. `Err` carries the status to report, with the status
/// address where one was found.
fn parse(
    head: u16,
    descs: &[Descriptor],
    mem: &Arc<Mem>,
    g: &Geometry,
) -> Result<(Kind, Vec<IoVec>, GuestAddress, u32), Rejected> {
    let reject = |status: Option<GuestAddress>, code| Rejected { head, status, code };
    if descs.len() < 2 || descs.len() > MAX_CHAIN {
        // A chain with no room for a status, or too long: the status (if
        // the last descriptor looks like one) gets IOERR.
        let st = descs
            .last()
            .filter(|d| d.is_write_only() && d.len() >= 1 && descs.len() > 1)
            .and_then(|d| status_addr(mem, d));
        return Err(reject(st, S_IOERR));
    }
    let last = descs[descs.len() - 1];
    let status = if last.is_write_only() && last.len() >= 1 {
        status_addr(mem, &last)
    } else {
        None
    };
    let Some(status) = status else {
        return Err(reject(None, S_IOERR));
    };
    let hdr = descs[0];
    if hdr.is_write_only() || hdr.len() < 16 {
        return Err(reject(Some(status), S_IOERR));
    }
    let Ok(req_type) = mem.read_obj::<u32>(hdr.addr()) else {
        return Err(reject(Some(status), S_IOERR));
    };
    let Some(sector_addr) = hdr.addr().checked_add(8) else {
        return Err(reject(Some(status), S_IOERR));
    };
    let Ok(sector) = mem.read_obj::<u64>(sector_addr) else {
        return Err(reject(Some(status), S_IOERR));
    };
    let req_type = u32::from_le(req_type);
    let sector = u64::from_le(sector);
    let data = &descs[1..descs.len() - 1];
    if data.len() > SEG_MAX as usize {
        return Err(reject(Some(status), S_IOERR));
    }
    let spb = g.sectors_per_block();
    let mut segs = Vec::with_capacity(data.len());
    let mut total: u64 = 0;
    let want_write_only = matches!(req_type, T_IN | T_GET_ID);
    for d in data {
        if d.is_write_only() != want_write_only || d.len() == 0 || d.len() > SIZE_MAX {
            return Err(reject(Some(status), S_IOERR));
        }
        let Some(p) = host_ptr(mem, d.addr(), d.len() as usize) else {
            return Err(reject(Some(status), S_IOERR));
        };
        segs.push(IoVec {
            base: p,
            len: d.len() as usize,
        });
        total += u64::from(d.len());
    }
    let range = |sector: u64, bytes: u64| -> Option<(u64, u64)> {
        let bs = u64::from(g.block_size);
        if sector % spb != 0 || bytes % bs != 0 || bytes == 0 {
            return None;
        }
        let lba = sector / spb;
        let blocks = bytes / bs;
        (lba.checked_add(blocks)? <= g.num_blocks).then_some((lba, blocks))
    };
    let kind = match req_type {
        T_IN | T_OUT => {
            if total > MAX_IO_BYTES {
                return Err(reject(Some(status), S_IOERR));
            }
            if req_type == T_OUT && g.readonly {
                return Err(reject(Some(status), S_IOERR));
            }
            let Some((lba, blocks)) = range(sector, total) else {
                return Err(reject(Some(status), S_IOERR));
            };
            if req_type == T_IN {
                Kind::Read { lba, blocks }
            } else {
                Kind::Write { lba, blocks }
            }
        }
        T_FLUSH => Kind::Flush,
        T_GET_ID => {
            if total < ID_BYTES as u64 {
                // The spec wants 20 bytes; shorter buffers are an error.
                return Err(reject(Some(status), S_IOERR));
            }
            Kind::GetId
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if g.readonly {
                return Err(reject(Some(status), S_IOERR));
            }
            // One 16-byte virtio_blk_discard_write_zeroes segment.
            if data.len() != 1 || data[0].len() != 16 {
                return Err(reject(Some(status), S_UNSUPP));
            }
            let a = data[0].addr();
            let (Ok(s), Some(na)) = (mem.read_obj::<u64>(a), a.checked_add(8)) else {
                return Err(reject(Some(status), S_IOERR));
            };
            let Ok(n) = mem.read_obj::<u32>(na) else {
                return Err(reject(Some(status), S_IOERR));
            };
            let (s, n) = (u64::from_le(s), u32::from_le(n));
            if n > MAX_DISCARD_SECTORS {
                return Err(reject(Some(status), S_IOERR));
            }
            let Some((lba, blocks)) = range(s, u64::from(n) * 512) else {
                return Err(reject(Some(status), S_IOERR));
            };
            segs.clear();
            if req_type == T_DISCARD {
                Kind::Unmap { lba, blocks }
            } else {
                Kind::Zeroes { lba, blocks }
            }
        }
        _ => return Err(reject(Some(status), S_UNSUPP)),
    };
    let used = match kind {
        Kind::Read { .. } => total as u32 + 1,
        Kind::GetId => ID_BYTES as u32 + 1,
        _ => 1,
    };
    Ok((kind, segs, status, used))
}

fn status_addr(mem: &Mem, d: &Descriptor) -> Option<GuestAddress> {
    // The status byte is the last byte of the last descriptor.
    let a = d.addr().checked_add(u64::from(d.len()) - 1)?;
    mem.address_in_range(a).then_some(a)
}

/// Chains popped from a queue: (head index, descriptors).
pub type Chains = Vec<(u16, Vec<Descriptor>)>;

/// Access to a virtqueue: popping chains and adding used entries.
pub trait QueueOps {
    /// Pops up to `max` available chains as (head, descriptors), with the
    /// queue's epoch read at the same time (under the queue's lock); a
    /// chain whose descriptors could not be read comes back truncated (and
    /// is rejected by the parser). `None` when the queue is not usable.
    fn pop(&self, mem: &Mem, max: usize) -> Option<(u64, Chains)>;
    /// Completes a chain popped in `epoch`: adds its used entry, unless the
    /// ring was stopped since (the epoch moved on). Returns whether it was
    /// added. The driver is not notified here: see [`signal`](Self::signal).
    fn push_used(&self, mem: &Mem, head: u16, len: u32, epoch: u64) -> bool;
    /// Notifies the driver of the used entries added since the last call,
    /// if it asked for it: with `VIRTIO_RING_F_EVENT_IDX`, only when its
    /// `used_event` lies in the entries just added; without, unless it set
    /// `VRING_AVAIL_F_NO_INTERRUPT`. Returns whether it notified.
    fn signal(&self, mem: &Mem) -> bool;
    /// Asks the driver for kicks (`enable`) or not: with EVENT_IDX by
    /// `avail_event` (the next chain kicks), without it by
    /// `VRING_USED_F_NO_NOTIFY`. On enabling, returns true when chains are
    /// already available (they would not kick).
    fn set_notification(&self, mem: &Mem, enable: bool) -> bool;
    /// Forgets a popped chain without a used entry (its connection ended).
    fn discard(&self) {}
    /// True once after the driver kicked the queue.
    fn take_kick(&self) -> bool {
        false
    }
    /// Runs `f` holding the queue's lock (serialised with `pop` and
    /// `push_used`).
    fn with_lock(&self, f: &mut dyn FnMut()) {
        f()
    }
}

impl<T: QueueOps + ?Sized> QueueOps for Arc<T> {
    fn pop(&self, mem: &Mem, max: usize) -> Option<(u64, Chains)> {
        (**self).pop(mem, max)
    }
    fn push_used(&self, mem: &Mem, head: u16, len: u32, epoch: u64) -> bool {
        (**self).push_used(mem, head, len, epoch)
    }
    fn signal(&self, mem: &Mem) -> bool {
        (**self).signal(mem)
    }
    fn set_notification(&self, mem: &Mem, enable: bool) -> bool {
        (**self).set_notification(mem, enable)
    }
    fn discard(&self) {
        (**self).discard()
    }
    fn take_kick(&self) -> bool {
        (**self).take_kick()
    }
    fn with_lock(&self, f: &mut dyn FnMut()) {
        (**self).with_lock(f)
    }
}

/// Chains taken from a queue per poll.
const BATCH: usize = 32;
/// Polls skipped after finding a queue unusable (not set up by the
/// driver), unless it is kicked meanwhile.
const IDLE_SKIP: u32 = 256;

/// One virtqueue served on one reactor, with that reactor's bdev channel.
pub struct QueueEngine<Q: QueueOps> {
    q: Q,
    /// The calling reactor's channel; `None` once the bdev is gone (every
    /// request then fails with `VIRTIO_BLK_S_IOERR`).
    chan: RefCell<Option<Rc<BdevChannel>>>,
    geom: Geometry,
    inflight: RefCell<Slab<Req>>,
    generation: Cell<u64>,
    skip: Cell<u32>,
    /// The queue's epoch at the last pop (a new one means a re-initialised
    /// ring, whose notification state is unknown).
    epoch: Cell<u64>,
    /// What was last asked of the driver: kicks on (`Some(true)`), off, or
    /// unknown.
    notify: Cell<Option<bool>>,
    /// Kicks wanted when the queue runs dry: `None` follows the reactor
    /// (sleeping reactors want them, busy-polling ones do not).
    kicks: Cell<Option<bool>>,
    reactor: Option<wc_reactor::ReactorHandle>,
    /// Used entries added since the driver was last considered for a
    /// notification.
    unsignalled: Cell<u32>,
    /// Requests seen, for tests and stats.
    pub completed: Cell<u64>,
    /// Notifications sent to the driver, for tests and stats.
    pub signals: Cell<u64>,
}

impl<Q: QueueOps + 'static> QueueEngine<Q> {
    /// An engine for `q` on the calling reactor's channel `chan` (`None`:
    /// the bdev is gone).
    pub fn new(q: Q, chan: Option<Rc<BdevChannel>>, geom: Geometry) -> Rc<Self> {
        Rc::new(QueueEngine {
            q,
            chan: RefCell::new(chan),
            geom,
            inflight: RefCell::new(Slab::new()),
            generation: Cell::new(0),
            skip: Cell::new(0),
            epoch: Cell::new(u64::MAX),
            notify: Cell::new(None),
            kicks: Cell::new(None),
            reactor: wc_reactor::try_current().map(|r| r.handle()),
            unsignalled: Cell::new(0),
            completed: Cell::new(0),
            signals: Cell::new(0),
        })
    }

    /// The queue.
    pub fn queue(&self) -> &Q {
        &self.q
    }

    /// Requests in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.borrow().len()
    }

    /// Forgets the queue's requests in flight (the driver went away):
    /// their completions are dropped instead of touching the ring.
    pub fn reset(&self) {
        self.generation.set(self.generation.get() + 1);
    }

    /// Forces whether the driver is asked for kicks when the queue runs dry
    /// (`None`: sleeping reactors ask, busy-polling ones do not).
    pub fn set_kicks(&self, kicks: Option<bool>) {
        self.kicks.set(kicks);
    }

    fn wants_kicks(&self) -> bool {
        self.kicks
            .get()
            .unwrap_or_else(|| self.reactor.as_ref().is_some_and(|h| h.in_interrupt()))
    }

    /// Drops the bdev channel (the bdev was removed): requests in flight
    /// complete as the bdev completes them, new ones fail with
    /// `VIRTIO_BLK_S_IOERR` without reaching the bdev.
    pub fn detach(&self) {
        self.chan.borrow_mut().take();
    }

    /// Processes what the driver made available. Returns the number of
    /// chains taken.
    pub fn poll(self: &Rc<Self>, mem: &Arc<Mem>) -> usize {
        let skip = self.skip.get();
        if skip > 0 && !self.q.take_kick() {
            self.skip.set(skip - 1);
            return 0;
        }
        let Some((epoch, chains)) = self.q.pop(mem, BATCH) else {
            self.skip.set(IDLE_SKIP);
            return 0;
        };
        self.skip.set(0);
        if epoch != self.epoch.get() {
            self.epoch.set(epoch);
            self.notify.set(None);
        }
        let n = chains.len();
        for (head, descs) in chains {
            match parse(head, &descs, mem, &self.geom) {
                Err(r) => self.finish_rejected(mem, r, epoch),
                Ok((kind, segs, status, used_len)) => {
                    let req = Req {
                        head,
                        status,
                        used_len,
                        segs,
                        kind,
                        mem: mem.clone(),
                        generation: self.generation.get(),
                        epoch,
                    };
                    self.submit(req);
                }
            }
        }
        // Kicks: a busy-polling reactor never needs them (switched off once
        // per ring); a sleeping one wants one for the next chain once the
        // queue is drained (re-armed after every batch: with EVENT_IDX the
        // armed position moves with the ring).
        let mut more = false;
        if self.wants_kicks() && n < BATCH {
            if n > 0 || self.notify.get() != Some(true) {
                self.notify.set(Some(true));
                more = self.q.set_notification(mem, true);
            }
        } else if self.notify.get() != Some(false) {
            self.notify.set(Some(false));
            self.q.set_notification(mem, false);
        }
        self.flush_signal(mem);
        if more {
            n.max(1)
        } else {
            n
        }
    }

    /// Considers notifying the driver of the used entries added since the
    /// last time (once per poll: completions are batched).
    fn flush_signal(&self, mem: &Mem) {
        if self.unsignalled.get() == 0 {
            return;
        }
        self.unsignalled.set(0);
        if self.q.signal(mem) {
            self.signals.set(self.signals.get() + 1);
        }
    }

    fn finish_rejected(&self, mem: &Mem, r: Rejected, epoch: u64) {
        if let Some(st) = r.status {
            let _ = mem.write_obj(r.code, st);
        }
        self.completed.set(self.completed.get() + 1);
        if self
            .q
            .push_used(mem, r.head, u32::from(r.status.is_some()), epoch)
        {
            self.unsignalled.set(self.unsignalled.get() + 1);
        }
    }

    fn submit(self: &Rc<Self>, req: Req) {
        let Some(chan) = self.chan.borrow().clone() else {
            return self.complete(req, S_IOERR);
        };
        let cb: Rc<dyn IoCompletion> = self.clone();
        let (t, lba, n) = match req.kind {
            Kind::Read { lba, blocks } => (IoType::Read, lba, blocks),
            Kind::Write { lba, blocks } => (IoType::Write, lba, blocks),
            Kind::Flush => (IoType::Flush, 0, self.geom.num_blocks),
            Kind::Unmap { lba, blocks } => (IoType::Unmap, lba, blocks),
            Kind::Zeroes { lba, blocks } => (IoType::WriteZeroes, lba, blocks),
            Kind::GetId => {
                self.write_id(&req);
                return self.complete(req, S_OK);
            }
        };
        // Segments live in guest memory kept mapped by `req.mem`; the slab
        // keeps them in place until the completion.
        let segs = req.segs.clone();
        let key = self.inflight.borrow_mut().insert(req) as u64;
        match t {
            // SAFETY: each segment is a write-only guest buffer inside a
            // mapped region held alive by the request's `mem` until io_done;
            // the guest gave it to the device for this request only.
            IoType::Read => unsafe { chan.readv(lba, n, &segs, &cb, key) },
            // SAFETY: readable guest buffers inside a mapped region held
            // alive by the request until io_done.
            IoType::Write => unsafe { chan.writev(lba, n, &segs, false, &cb, key) },
            IoType::Flush => chan.flush(lba, n, &cb, key),
            IoType::Unmap => chan.unmap(lba, n, &cb, key),
            _ => chan.write_zeroes(lba, n, &cb, key),
        }
    }

    /// Answers `VIRTIO_BLK_T_GET_ID` into the request's segments.
    fn write_id(&self, req: &Req) {
        let mut id = [0u8; ID_BYTES];
        let n = self.geom.id.len().min(ID_BYTES);
        id[..n].copy_from_slice(&self.geom.id[..n]);
        let mut off = 0;
        for s in &req.segs {
            let take = s.len.min(ID_BYTES - off);
            // SAFETY: the segment was resolved from a write-only guest
            // descriptor inside a mapped region of `req.mem`, which is
            // alive here; `take <= s.len`.
            unsafe { std::ptr::copy_nonoverlapping(id[off..].as_ptr(), s.base, take) };
            off += take;
            if off == ID_BYTES {
                break;
            }
        }
    }

    fn complete(&self, req: Req, status: u8) {
        self.completed.set(self.completed.get() + 1);
        if req.generation != self.generation.get() {
            self.q.discard();
            return;
        }
        let _ = req.mem.write_obj(status, req.status);
        let len = if status == S_OK { req.used_len } else { 1 };
        if self.q.push_used(&req.mem, req.head, len, req.epoch) {
            self.unsignalled.set(self.unsignalled.get() + 1);
        }
    }
}

impl<Q: QueueOps + 'static> IoCompletion for QueueEngine<Q> {
    fn io_done(&self, io: Io, ctx: u64) {
        let ok = io.status().is_success();
        drop(io);
        let req = {
            let mut s = self.inflight.borrow_mut();
            if !s.contains(ctx as usize) {
                return;
            }
            s.remove(ctx as usize)
        };
        self.complete(req, if ok { S_OK } else { S_IOERR });
    }
}

/// The `virtio_blk_config` bytes (60 bytes, little endian).
pub fn config_space(g: &Geometry, num_queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    let put32 =
        |c: &mut Vec<u8>, off: usize, v: u32| c[off..off + 4].copy_from_slice(&v.to_le_bytes());
    let sectors = g.num_blocks * g.sectors_per_block();
    c[0..8].copy_from_slice(&sectors.to_le_bytes());
    put32(&mut c, 8, SIZE_MAX);
    put32(&mut c, 12, SEG_MAX);
    put32(&mut c, 20, g.block_size);
    // topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    c[24] = 0;
    c[26..28].copy_from_slice(&1u16.to_le_bytes());
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    put32(&mut c, 36, MAX_DISCARD_SECTORS);
    put32(&mut c, 40, 1);
    put32(&mut c, 44, g.block_size / 512);
    put32(&mut c, 48, MAX_DISCARD_SECTORS);
    put32(&mut c, 52, 1);
    c[56] = 1;
    c
}
