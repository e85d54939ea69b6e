//! `error`: an error-injection vbdev, as SPDK's `bdev_error`.
//!
//! [`create`] stacks `EE_<base>` on a base bdev (opened and claimed, same
//! geometry) and forwards I/O to it. [`inject_error`] arms failures per I/O
//! type (READ, WRITE, UNMAP, FLUSH; other types are never injected):
//!
//! - `failure`: the I/O completes failed (`EIO`) without reaching the base;
//! - `nvme_failure`: the same (our I/O status has no NVMe status code; the
//!   `nvme_sct`/`nvme_sc` pair is validated and recorded only);
//! - `nomem`: the bdev layer's NOMEM retry, emulated: the I/O is parked on
//!   its channel and resubmitted (through injection again) on the next
//!   reactor iteration, so the submitter sees a delay, never an error;
//! - `pending`: the I/O is held until [`resume_pending`] or a RESET (which
//!   completes every held I/O on every channel as aborted);
//! - `corrupt_data`: the I/O is forwarded, with byte `corrupt_offset` of the
//!   payload XORed with `corrupt_value` (writes: on a bounce copy before the
//!   base sees it; reads: after the base completes).
//!
//! Counters follow SPDK: each injected I/O decrements `num` (shared by every
//! reactor), 0 disables, `clear` zeroes them all; with `queue_depth` set an
//! error fires only once the channel has that many I/O in flight.
//! As in SPDK, creating on a missing base succeeds and the vbdev appears
//! when the base is registered.

#![warn(missing_docs)]

use slab::Slab;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock};

use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;
use wc_bdev::{
    passthru::BaseLink, Bdev, BdevChannel, BdevError, BdevOps, DmaBuf, Io, IoChannel, IoCompletion,
    IoStatus, IoType,
};
use wc_reactor::{PollStatus, PollerHandle, ReactorHandle};

/// Module name (also the claim holder on the base).
pub const MODULE: &str = "error";

/// Prefix of every error vbdev's name.
pub const NAME_PREFIX: &str = "EE_";

/// Message of SPDK's NVMe status check.
pub const NVME_STATUS_MSG: &str =
    "nvme_sct or nvme_sc should be specified for NVMe error injection";

/// Message of SPDK's corrupt_value check.
pub const CORRUPT_VALUE_MSG: &str = "corrupt_value should be non-zero";

/// `io_type` of `bdev_error_inject_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectIoType {
    /// Disarm every injection (zero every counter).
    Clear,
    /// READ.
    Read,
    /// WRITE.
    Write,
    /// UNMAP.
    Unmap,
    /// FLUSH.
    Flush,
    /// Every type.
    All,
}

/// `error_type` of `bdev_error_inject_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// Complete failed.
    Failure,
    /// Complete with an NVMe status (here: failed with EIO).
    NvmeFailure,
    /// Hold until resumed or reset.
    Pending,
    /// XOR a payload byte.
    CorruptData,
    /// NOMEM: retried by the bdev layer later.
    Nomem,
}

impl ErrorType {
    fn code(self) -> u8 {
        match self {
            ErrorType::Failure => 1,
            ErrorType::NvmeFailure => 2,
            ErrorType::Pending => 3,
            ErrorType::CorruptData => 4,
            ErrorType::Nomem => 5,
        }
    }

    fn from_code(c: u8) -> Option<ErrorType> {
        Some(match c {
            1 => ErrorType::Failure,
            2 => ErrorType::NvmeFailure,
            3 => ErrorType::Pending,
            4 => ErrorType::CorruptData,
            5 => ErrorType::Nomem,
            _ => return None,
        })
    }
}

/// Parameters of `bdev_error_create` (SPDK's names).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    /// The base bdev; the vbdev is named `EE_<base_name>`.
    pub base_name: String,
    /// UUID of the vbdev; random when absent.
    #[serde(default)]
    pub uuid: Option<Uuid>,
}

/// Parameters of `bdev_error_delete` and `bdev_error_resume_pending`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    /// The `EE_` bdev.
    pub name: String,
}

/// Parameters of `bdev_error_inject_error` (SPDK's names and defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectParams {
    /// The `EE_` bdev (name or alias).
    pub name: String,
    /// Which I/O type, or `clear` / `all`.
    pub io_type: InjectIoType,
    /// What to do to the I/O.
    pub error_type: ErrorType,
    /// How many I/O to hit (default 1; 0 disables).
    #[serde(default)]
    pub num: Option<u32>,
    /// Inject only once the channel has this many I/O in flight.
    #[serde(default)]
    pub queue_depth: Option<u64>,
    /// Payload byte to corrupt (`corrupt_data`).
    #[serde(default)]
    pub corrupt_offset: Option<u64>,
    /// XOR mask (`corrupt_data`; must be non-zero).
    #[serde(default)]
    pub corrupt_value: Option<u8>,
    /// NVMe status code type (`nvme_failure` only).
    #[serde(default)]
    pub nvme_sct: Option<u32>,
    /// NVMe status code (`nvme_failure` only).
    #[serde(default)]
    pub nvme_sc: Option<u32>,
}

impl InjectParams {
    /// Parameters hitting `num` I/O of `io_type` with `error_type`.
    pub fn new(name: &str, io_type: InjectIoType, error_type: ErrorType, num: u32) -> Self {
        InjectParams {
            name: name.to_string(),
            io_type,
            error_type,
            num: Some(num),
            queue_depth: None,
            corrupt_offset: None,
            corrupt_value: None,
            nvme_sct: None,
            nvme_sc: None,
        }
    }
}

/// One armed injection (SPDK's `vbdev_error_info`). Fields are atomics so
/// every reactor reads the same counters; `num` is decremented with CAS.
#[derive(Default)]
struct InjectInfo {
    error_type: AtomicU8,
    num: AtomicU32,
    queue_depth: AtomicU64,
    corrupt_offset: AtomicU64,
    corrupt_value: AtomicU8,
    nvme_sct: AtomicU32,
    nvme_sc: AtomicU32,
}

/// What the submit path must do to one I/O.
#[derive(Debug, Clone, Copy)]
enum Action {
    Forward,
    Fail,
    Hold,
    Retry,
    Corrupt { offset: u64, value: u8 },
}

/// State shared by every reactor for one error vbdev.
struct Shared {
    id: u64,
    name: String,
    base: BaseLink,
    /// The uuid given at creation (saved in the config only when given).
    config_uuid: Option<Uuid>,
    /// READ, WRITE, UNMAP, FLUSH.
    vector: [InjectInfo; 4],
    /// Reactors of the live channels.
    reactors: wc_bdev::channels::ChannelReactors,
}

fn vector_index(t: IoType) -> Option<usize> {
    match t {
        IoType::Read => Some(0),
        IoType::Write => Some(1),
        IoType::Unmap => Some(2),
        IoType::Flush => Some(3),
        IoType::Reset | IoType::WriteZeroes => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// SPDK's `vbdev_error_get_error_type`: decide, and consume one count.
    fn action(&self, t: IoType, inflight: u64) -> Action {
        let Some(i) = vector_index(t) else {
            return Action::Forward;
        };
        let info = &self.vector[i];
        if inflight < info.queue_depth.load(Ordering::Relaxed) {
            return Action::Forward;
        }
        let took = info
            .num
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if took.is_err() {
            return Action::Forward;
        }
        match ErrorType::from_code(info.error_type.load(Ordering::Acquire)) {
            Some(ErrorType::Failure) | Some(ErrorType::NvmeFailure) => Action::Fail,
            Some(ErrorType::Pending) => Action::Hold,
            Some(ErrorType::Nomem) => Action::Retry,
            Some(ErrorType::CorruptData) => Action::Corrupt {
                offset: info.corrupt_offset.load(Ordering::Relaxed),
                value: info.corrupt_value.load(Ordering::Relaxed),
            },
            None => Action::Forward,
        }
    }

    /// Runs `f` on every reactor that has a channel of this bdev.
    fn for_each_channel_reactor(&self, f: impl Fn(&ReactorHandle)) {
        self.reactors.for_each(f);
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Remembered creations (SPDK's `g_error_config`), by base name.
fn configs() -> MutexGuard<'static, Vec<CreateParams>> {
    static C: OnceLock<Mutex<Vec<CreateParams>>> = OnceLock::new();
    lock(C.get_or_init(|| Mutex::new(Vec::new())))
}

/// Live error vbdevs, by vbdev name.
fn disks() -> MutexGuard<'static, Vec<Arc<Shared>>> {
    static D: OnceLock<Mutex<Vec<Arc<Shared>>>> = OnceLock::new();
    lock(D.get_or_init(|| Mutex::new(Vec::new())))
}

fn install_examine_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        wc_bdev::add_examine_hook(
            MODULE,
            Arc::new(|bdev: &Arc<Bdev>| {
                let cfg = configs()
                    .iter()
                    .find(|c| c.base_name == bdev.name())
                    .cloned();
                if let Some(cfg) = cfg {
                    // Failures are reported by create(); here the vbdev
                    // simply does not appear.
                    let _ = construct(&cfg);
                }
            }),
        );
    });
}

/// `bdev_error_create`: creates `EE_<base_name>` on `base_name`. If the
/// base does not exist yet, succeeds and creates it when the base appears.
pub fn create(base_name: &str, uuid: Option<Uuid>) -> Result<(), BdevError> {
    create_with(CreateParams {
        base_name: base_name.to_string(),
        uuid,
    })
}

/// [`create`] from RPC parameters.
pub fn create_with(params: CreateParams) -> Result<(), BdevError> {
    if params.base_name.is_empty() {
        return Err(BdevError::Invalid("base_name must not be empty".into()));
    }
    install_examine_hook();
    {
        let mut c = configs();
        if c.iter().any(|x| x.base_name == params.base_name) {
            return Err(BdevError::Exists(format!(
                "{NAME_PREFIX}{}",
                params.base_name
            )));
        }
        c.push(params.clone());
    }
    match construct(&params) {
        Ok(()) => Ok(()),
        Err(BdevError::NotFound(_)) if wc_bdev::lookup(&params.base_name).is_none() => Ok(()),
        Err(e) => {
            forget_config(&params.base_name);
            Err(e)
        }
    }
}

fn forget_config(base_name: &str) {
    configs().retain(|c| c.base_name != base_name);
}

/// Opens, claims and registers the vbdev for one remembered creation.
fn construct(cfg: &CreateParams) -> Result<(), BdevError> {
    let ee_name = format!("{NAME_PREFIX}{}", cfg.base_name);
    let (link, base) = BaseLink::open(&cfg.base_name, MODULE, &ee_name)?;
    let shared = Arc::new(Shared {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        name: ee_name.clone(),
        base: link,
        config_uuid: cfg.uuid,
        vector: Default::default(),
        reactors: Default::default(),
    });
    let mut bc = BaseLink::vbdev_config(&base, ee_name);
    bc.uuid = cfg.uuid;
    let ops = Arc::new(ErrorBdev {
        shared: shared.clone(),
        base: base.clone(),
    });
    disks().push(shared.clone());
    match wc_bdev::register(bc, ops) {
        Ok(_) => Ok(()),
        Err(e) => {
            disks().retain(|d| !Arc::ptr_eq(d, &shared));
            shared.base.release();
            Err(e)
        }
    }
}

fn find(name: &str) -> Result<Arc<Shared>, BdevError> {
    let not_found = || BdevError::NotFound(name.to_string());
    let bdev = wc_bdev::lookup(name).ok_or_else(not_found)?;
    disks()
        .iter()
        .find(|d| d.name == bdev.name())
        .cloned()
        .ok_or_else(not_found)
}

/// `bdev_error_delete`: unregisters an `EE_` bdev (which releases its claim
/// on the base and closes it) and forgets its creation.
pub fn delete(name: &str) -> Result<(), BdevError> {
    let b = wc_bdev::lookup(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    if b.module_name() != MODULE {
        return Err(BdevError::NotFound(name.to_string()));
    }
    wc_bdev::unregister(b.name())
}

/// `bdev_error_inject_error`, with SPDK's validation.
pub fn inject_error(p: &InjectParams) -> Result<(), BdevError> {
    let sct = p.nvme_sct.unwrap_or(0);
    let sc = p.nvme_sc.unwrap_or(0);
    let nvme = p.error_type == ErrorType::NvmeFailure;
    if (nvme && sct == 0 && sc == 0) || (!nvme && (sct != 0 || sc != 0)) {
        return Err(BdevError::Invalid(NVME_STATUS_MSG.into()));
    }
    if p.error_type == ErrorType::CorruptData && p.corrupt_value.unwrap_or(0) == 0 {
        return Err(BdevError::Invalid(CORRUPT_VALUE_MSG.into()));
    }
    let d = find(&p.name)?;
    let set = |info: &InjectInfo| {
        info.error_type
            .store(p.error_type.code(), Ordering::Release);
        info.queue_depth
            .store(p.queue_depth.unwrap_or(0), Ordering::Relaxed);
        info.corrupt_offset
            .store(p.corrupt_offset.unwrap_or(0), Ordering::Relaxed);
        info.corrupt_value
            .store(p.corrupt_value.unwrap_or(0), Ordering::Relaxed);
        info.nvme_sct.store(sct, Ordering::Relaxed);
        info.nvme_sc.store(sc, Ordering::Relaxed);
        info.num.store(p.num.unwrap_or(1), Ordering::Release);
    };
    match p.io_type {
        InjectIoType::Clear => d
            .vector
            .iter()
            .for_each(|i| i.num.store(0, Ordering::Release)),
        InjectIoType::All => d.vector.iter().for_each(set),
        InjectIoType::Read => set(&d.vector[0]),
        InjectIoType::Write => set(&d.vector[1]),
        InjectIoType::Unmap => set(&d.vector[2]),
        InjectIoType::Flush => set(&d.vector[3]),
    }
    Ok(())
}

/// Shorthand for [`inject_error`] without the optional knobs.
pub fn inject(
    name: &str,
    io_type: InjectIoType,
    error_type: ErrorType,
    num: u32,
) -> Result<(), BdevError> {
    inject_error(&InjectParams::new(name, io_type, error_type, num))
}

/// Disarms every injection of `name` (`io_type: clear`).
pub fn clear(name: &str) -> Result<(), BdevError> {
    inject(name, InjectIoType::Clear, ErrorType::Failure, 0)
}

/// How many injections remain armed for `t` (0 for types never injected).
pub fn remaining(name: &str, t: IoType) -> Result<u32, BdevError> {
    let d = find(name)?;
    Ok(vector_index(t)
        .map(|i| d.vector[i].num.load(Ordering::Acquire))
        .unwrap_or(0))
}

/// `bdev_error_resume_pending`: disarms `pending` injections and resubmits
/// every held I/O on its own reactor (asynchronously, by message).
pub fn resume_pending(name: &str) -> Result<(), BdevError> {
    let d = find(name)?;
    for info in &d.vector {
        if info.error_type.load(Ordering::Acquire) == ErrorType::Pending.code() {
            info.num.store(0, Ordering::Release);
        }
    }
    let id = d.id;
    d.for_each_channel_reactor(|h| {
        h.send(move || {
            for ch in local_channels(id) {
                let held: Vec<Io> = ch.pending.borrow_mut().drain(..).collect();
                for io in held {
                    ch.submit(io);
                }
            }
        })
    });
    Ok(())
}

struct ErrorBdev {
    shared: Arc<Shared>,
    base: Arc<Bdev>,
}

impl BdevOps for ErrorBdev {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        "Error Injection Disk"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        self.base.io_type_supported(t)
    }

    fn create_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        let base = self.shared.base.channel()?;
        let r = wc_reactor::current();
        let st = Rc::new_cyclic(|me| ChanState {
            shared: self.shared.clone(),
            chan_id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            base,
            me: me.clone(),
            slab: RefCell::new(Slab::new()),
            inflight: Cell::new(0),
            pending: RefCell::new(VecDeque::new()),
            retry: RefCell::new(VecDeque::new()),
            resets: RefCell::new(Vec::new()),
            next_token: Cell::new(0),
        });
        wc_bdev::channels::register_local(self.shared.id, &st);
        self.shared.reactors.add(st.chan_id);
        let weak = Rc::downgrade(&st);
        let poller = r.register_poller("bdev_error_retry", None, move || match weak.upgrade() {
            Some(st) => st.retry_parked(),
            None => PollStatus::Idle,
        });
        Ok(Box::new(ErrorChannel { st, poller }))
    }

    fn driver_info(&self) -> Value {
        json!({"error_disk": {"base_bdev": self.shared.base.name()}})
    }

    fn config_entry(&self, _bdev: &Bdev) -> Option<Value> {
        let mut params = json!({"base_name": self.shared.base.name()});
        if let Some(u) = self.shared.config_uuid {
            params["uuid"] = json!(u.to_string());
        }
        Some(json!({"method": "bdev_error_create", "params": params}))
    }

    fn write_cache(&self) -> bool {
        self.base.ops().write_cache()
    }

    fn destruct(&self) {
        let s = &self.shared;
        disks().retain(|d| !Arc::ptr_eq(d, s));
        forget_config(s.base.name());
        // Held and parked I/O would otherwise never complete.
        let id = s.id;
        s.for_each_channel_reactor(|h| h.send(move || abort_held(id)));
        s.base.release();
    }
}

/// The error channels living on the current reactor.
fn local_channels(id: u64) -> Vec<Rc<ChanState>> {
    wc_bdev::channels::local(id)
}

/// Completes every held (pending) and parked (nomem) I/O of bdev `id` on
/// this reactor as aborted.
fn abort_held(id: u64) {
    for ch in local_channels(id) {
        let held: Vec<Io> = ch.pending.borrow_mut().drain(..).collect();
        let parked: Vec<Io> = ch.retry.borrow_mut().drain(..).collect();
        for io in held.into_iter().chain(parked) {
            io.complete(IoStatus::Aborted);
        }
    }
}

/// A parent I/O waiting for its child on the base.
struct Inflight {
    io: Io,
    /// Corruption to apply to a READ's data once it completes.
    corrupt_read: Option<(u64, u8)>,
}

/// One reactor's state of one error vbdev.
struct ChanState {
    shared: Arc<Shared>,
    chan_id: u64,
    base: Rc<BdevChannel>,
    /// Itself, to hand out as the completion of forwarded I/O.
    me: Weak<ChanState>,
    /// I/O in flight to the base, keyed by the child's ctx.
    slab: RefCell<Slab<Inflight>>,
    inflight: Cell<u64>,
    /// Held by `pending` injections.
    pending: RefCell<VecDeque<Io>>,
    /// Parked by `nomem` injections, resubmitted by the poller.
    retry: RefCell<VecDeque<Io>>,
    /// RESETs waiting for every channel to drop its held I/O.
    resets: RefCell<Vec<(u64, Io)>>,
    next_token: Cell<u64>,
}

/// The channel the framework holds; unregisters the retry poller on drop.
struct ErrorChannel {
    st: Rc<ChanState>,
    poller: PollerHandle,
}

impl Drop for ErrorChannel {
    fn drop(&mut self) {
        self.poller.unregister();
    }
}

impl IoChannel for ErrorChannel {
    fn submit(&self, io: Io) {
        self.st.submit(io);
    }
}

/// XORs payload byte `offset` of `io` with `value` (no-op past the end).
fn corrupt_segments(io: &mut Io, offset: u64, value: u8) {
    let mut done = false;
    io.for_each_segment_mut(|start, seg| {
        if !done && offset >= start && offset - start < seg.len() as u64 {
            seg[(offset - start) as usize] ^= value;
            done = true;
        }
    });
}

impl ChanState {
    fn completion(&self) -> Option<Rc<dyn IoCompletion>> {
        let me = self.me.upgrade()?;
        Some(me)
    }

    fn submit(&self, io: Io) {
        let t = io.io_type();
        if t == IoType::Reset {
            return self.reset(io);
        }
        match self.shared.action(t, self.inflight.get()) {
            Action::Forward => self.forward(io, None),
            Action::Fail => io.complete(IoStatus::Failed(libc::EIO)),
            Action::Hold => self.pending.borrow_mut().push_back(io),
            Action::Retry => self.retry.borrow_mut().push_back(io),
            Action::Corrupt { offset, value } => match t {
                IoType::Write => self.forward_corrupt_write(io, offset, value),
                IoType::Read => self.forward(io, Some((offset, value))),
                _ => self.forward(io, None),
            },
        }
    }

    /// Resubmits the I/O parked by `nomem` before this run.
    fn retry_parked(&self) -> PollStatus {
        let n = self.retry.borrow().len();
        for _ in 0..n {
            let Some(io) = self.retry.borrow_mut().pop_front() else {
                break;
            };
            self.submit(io);
        }
        PollStatus::from(n > 0)
    }

    fn forward(&self, io: Io, corrupt_read: Option<(u64, u8)>) {
        let Some(cb) = self.completion() else {
            return io.complete(IoStatus::Failed(libc::ENODEV));
        };
        let slot = self.slab.borrow_mut().insert(Inflight { io, corrupt_read });
        self.inflight.set(self.inflight.get() + 1);
        let slab = self.slab.borrow();
        let parent = &slab[slot].io;
        // SAFETY: the parent stays in the slab until this child completes
        // (completions are deferred, so this borrow ends before then).
        unsafe { self.base.submit_like(parent, &cb, slot as u64) };
    }

    /// Injected corruption of a WRITE: the base gets a corrupted copy, the
    /// submitter's buffer stays intact.
    fn forward_corrupt_write(&self, io: Io, offset: u64, value: u8) {
        let Some(cb) = self.completion() else {
            return io.complete(IoStatus::Failed(libc::ENODEV));
        };
        let mut bounce = DmaBuf::new(io.len_bytes() as usize);
        io.copy_from_iovs(&mut bounce);
        if let Some(b) = usize::try_from(offset).ok().and_then(|o| bounce.get_mut(o)) {
            *b ^= value;
        }
        let (off, fua) = (io.offset_blocks(), io.fua());
        let slot = self.slab.borrow_mut().insert(Inflight {
            io,
            corrupt_read: None,
        }) as u64;
        self.inflight.set(self.inflight.get() + 1);
        self.base.write(off, bounce, fua, &cb, slot);
    }

    /// RESET is not forwarded: every channel drops its held I/O (aborted),
    /// then the reset succeeds on this reactor.
    fn reset(&self, io: Io) {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        self.resets.borrow_mut().push((token, io));
        let id = self.shared.id;
        self.shared.reactors.for_each_then(
            move || abort_held(id),
            move || {
                for ch in local_channels(id) {
                    let mut rs = ch.resets.borrow_mut();
                    if let Some(i) = rs.iter().position(|(t, _)| *t == token) {
                        let (_, io) = rs.swap_remove(i);
                        io.complete(IoStatus::Success);
                    }
                }
            },
        );
    }
}

impl Drop for ChanState {
    fn drop(&mut self) {
        self.shared.reactors.remove(self.chan_id);
    }
}

impl IoCompletion for ChanState {
    fn io_done(&self, child: Io, ctx: u64) {
        let status = child.status();
        drop(child);
        let Some(mut p) = self.slab.borrow_mut().try_remove(ctx as usize) else {
            return;
        };
        self.inflight.set(self.inflight.get().saturating_sub(1));
        if let (true, Some((offset, value))) = (status.is_success(), p.corrupt_read) {
            corrupt_segments(&mut p.io, offset, value);
        }
        p.io.complete(status);
    }
}

/// JSON-RPC methods of the module.
pub mod rpc {
    use serde_json::Value;
    use wc_bdev::rpc::handle;
    use wc_rpc::{RegisterError, Registry, StateMask};

    use super::{CreateParams, InjectParams, NameParams};

    /// Registers `bdev_error_create`, `bdev_error_delete`,
    /// `bdev_error_inject_error` and `bdev_error_resume_pending` (each
    /// answers `true`, as SPDK's).
    pub fn register(reg: &Registry) -> Result<(), RegisterError> {
        reg.register_fn("bdev_error_create", StateMask::RUNTIME, |p, r| {
            handle(p, r, |c: CreateParams| {
                super::create_with(c).map(|_| Value::Bool(true))
            })
        })?;
        reg.register_fn("bdev_error_delete", StateMask::RUNTIME, |p, r| {
            handle(p, r, |d: NameParams| {
                super::delete(&d.name).map(|_| Value::Bool(true))
            })
        })?;
        reg.register_fn("bdev_error_inject_error", StateMask::RUNTIME, |p, r| {
            handle(p, r, |i: InjectParams| {
                super::inject_error(&i).map(|_| Value::Bool(true))
            })
        })?;
        reg.register_fn("bdev_error_resume_pending", StateMask::RUNTIME, |p, r| {
            handle(p, r, |d: NameParams| {
                super::resume_pending(&d.name).map(|_| Value::Bool(true))
            })
        })
    }
}
