//! A controller: what every reactor shares about it ([`Ctrlr`]: phase,
//! generation, identify data, queue IDs), and its admin queue, which lives
//! on the home reactor (the one that attached it) with the keep-alive
//! timer and the reset loop.
//!
//! Failure handling follows SPDK's bdev_nvme: a failed queue (any reactor)
//! asks the home reactor for a reset; the reset closes every queue pair
//! (their I/O waits, queued), reconnects the admin queue, re-enables and
//! re-identifies the controller, then bumps the generation so each I/O
//! queue pair reconnects on its own reactor. A failed attempt is retried
//! every `reconnect_delay_sec`; once `fast_io_fail_timeout_sec` has passed
//! queued and new I/O fail; once `ctrlr_loss_timeout_sec` has passed the
//! controller is deleted and its bdevs hot-removed. With
//! `reconnect_delay_sec` 0 one attempt is made and the controller then
//! stays failed (SPDK's behaviour).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use serde_json::{json, Value};
use wc_bdev::BdevError;
use wc_nvme_wire::fabrics::property;
use wc_nvme_wire::identify::{self, IdentifyController, IdentifyNamespace, IDENTIFY_LEN};
use wc_nvme_wire::{Cqe, Sqe, Status};
use wc_reactor::{PollStatus, PollerHandle, ReactorHandle};

use crate::cmd;
use crate::opts::CtrlrParams;
use crate::qpair::{Phase, QpConfig, QpError, Qpair, ADMIN_ICD, MAX_XFER};

/// Phases of a controller, as one byte every reactor reads.
pub(crate) mod phase {
    /// First connect in progress (attach).
    pub const CONNECTING: u8 = 0;
    /// I/O flows.
    pub const ENABLED: u8 = 1;
    /// Reconnecting; I/O waits.
    pub const RESETTING: u8 = 2;
    /// Reconnecting, and `fast_io_fail_timeout_sec` passed: I/O fails.
    pub const FAILING_IO: u8 = 3;
    /// No more reconnects (`reconnect_delay_sec` 0): I/O fails.
    pub const FAILED: u8 = 4;
    /// Detached or lost: I/O fails with ENODEV.
    pub const DELETED: u8 = 5;
}

/// Admin commands outstanding at once (the admin SQ has one entry more).
const ADMIN_DEPTH: u16 = 31;
/// I/O commands outstanding per queue pair (SPDK's default queue size is
/// 128 entries).
const IO_DEPTH: u16 = 127;

/// Sets the keep-alive timeout asked of controllers attached from now on
/// (`bdev_nvme_set_options`' `keep_alive_timeout_ms`, default 10 s; 0:
/// none), whether or not controllers exist (tests). A controller that
/// leaves a Keep Alive unanswered that long is reset.
pub fn set_keep_alive_timeout_ms(ms: u32) {
    crate::options::update(|o| o.keep_alive_timeout_ms = ms);
}

/// Sets how long an I/O command may stay unanswered before its queue pair
/// is declared dead and reconnected (`timeout_us` in ms, default 30 s;
/// 0: no limit), whether or not controllers exist (tests).
pub fn set_io_timeout_ms(ms: u64) {
    crate::options::update(|o| o.timeout_us = ms.saturating_mul(1000));
}

/// The I/O command timeout; zero: none.
pub(crate) fn io_timeout() -> Duration {
    Duration::from_micros(crate::options::current().timeout_us)
}

/// A namespace as identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NsInfo {
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: u64,
    pub nguid: [u8; 16],
}

/// What Identify told us about the controller.
#[derive(Debug, Clone, Default)]
pub(crate) struct CtrlrInfo {
    pub cntlid: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// In-capsule data an I/O queue takes (bytes).
    pub icd: u32,
    /// Largest data of one command (bytes).
    pub max_xfer: u32,
    pub vwc: bool,
    pub oncs: u16,
    /// I/O queues the controller granted.
    pub io_queues: u32,
    /// Queue entries the controller takes (CAP.MQES + 1).
    pub mqes: u32,
    /// Number of namespaces (Identify Controller NN).
    pub nn: u32,
    pub namespaces: Vec<NsInfo>,
    /// The controller took namespace attribute notices (Set Features,
    /// asynchronous event configuration) before its namespaces were read.
    pub ns_notices: bool,
}

/// Shared state of one attached controller.
pub(crate) struct Ctrlr {
    pub id: u64,
    pub params: CtrlrParams,
    pub kato_ms: u32,
    pub home: ReactorHandle,
    phase: AtomicU8,
    generation: AtomicU64,
    /// A reconnect is waiting for its delay (state "reconnect_is_delayed").
    delayed: AtomicBool,
    pub info: Mutex<CtrlrInfo>,
    qids: Mutex<Vec<bool>>,
    pub bdevs: Mutex<Vec<String>>,
    /// Resets done (diagnostics, tests).
    pub resets: AtomicU64,
    /// Who waits for the running reset to end (`bdev_nvme_reset_controller`).
    reset_waiters: Mutex<Vec<oneshot::Sender<Result<(), String>>>>,
    /// Namespace attribute notices handled (diagnostics, tests).
    pub ns_notices: AtomicU64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Ctrlr {
    pub(crate) fn phase(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }

    fn set_phase(&self, p: u8) {
        self.phase.store(p, Ordering::Release);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// SPDK's state names of `bdev_nvme_get_controllers`.
    pub(crate) fn state_name(&self) -> &'static str {
        match self.phase() {
            phase::ENABLED => "enabled",
            phase::CONNECTING => "resetting",
            phase::RESETTING | phase::FAILING_IO => {
                if self.delayed.load(Ordering::Relaxed) {
                    "reconnect_is_delayed"
                } else {
                    "resetting"
                }
            }
            phase::FAILED => "failed",
            _ => "deleting",
        }
    }

    /// Takes a free I/O queue ID.
    pub(crate) fn alloc_qid(&self) -> Option<u16> {
        let mut q = self.qids.lock().unwrap_or_else(|p| p.into_inner());
        let i = q.iter().position(|used| !used)?;
        q[i] = true;
        Some(i as u16 + 1)
    }

    pub(crate) fn free_qid(&self, qid: u16) {
        let mut q = self.qids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = q.get_mut(qid as usize - 1) {
            *slot = false;
        }
    }

    /// The queue-pair configuration of I/O queue `qid`.
    pub(crate) fn io_qp_config(&self, qid: u16) -> QpConfig {
        let info = self.info.lock().unwrap_or_else(|p| p.into_inner());
        QpConfig {
            addr: self.params.addr,
            qid,
            depth: IO_DEPTH.min(info.mqes.saturating_sub(1).max(1) as u16),
            hdgst: self.params.hdgst,
            ddgst: self.params.ddgst,
            connect_timeout: self.params.connect_timeout,
            hostnqn: self.params.hostnqn.clone(),
            subnqn: self.params.subnqn.clone(),
            hostid: self.params.hostid,
            cntlid: info.cntlid,
            kato_ms: 0,
            sq_flow_control: self.params.sq_flow_control,
            icd: info.icd,
        }
    }

    /// Asks the home reactor to reset the controller (from any reactor).
    pub(crate) fn request_reset(self: &Arc<Self>, why: &str) {
        if self.phase() != phase::ENABLED {
            return;
        }
        tracing::warn!("nvme {}: {why}; resetting the controller", self.params.name);
        let me = self.clone();
        self.home.send(move || start_reset(&me));
    }

    /// The `bdev_nvme_attach_controller` entry `save_config` writes.
    pub(crate) fn config_entry(&self) -> Value {
        let p = &self.params;
        json!({
            "method": "bdev_nvme_attach_controller",
            "params": {
                "name": p.name,
                "trtype": "TCP",
                "adrfam": p.adrfam.canonical(),
                "traddr": p.traddr,
                "trsvcid": p.trsvcid,
                "subnqn": p.subnqn,
                "hostnqn": p.hostnqn,
                "prchk_reftag": false,
                "prchk_guard": false,
                "hdgst": p.hdgst,
                "ddgst": p.ddgst,
                "num_io_queues": p.num_io_queues,
                "ctrlr_loss_timeout_sec": p.ctrlr_loss_timeout_sec,
                "reconnect_delay_sec": p.reconnect_delay_sec,
                "fast_io_fail_timeout_sec": p.fast_io_fail_timeout_sec,
            }
        })
    }

    fn finish_reset(&self, r: Result<(), String>) {
        let waiters =
            std::mem::take(&mut *self.reset_waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for w in waiters {
            let _ = w.send(r.clone());
        }
    }

    /// `bdev_nvme_get_controllers` entry.
    pub(crate) fn info_json(&self) -> Value {
        let cntlid = self.info.lock().map(|i| i.cntlid).unwrap_or_default();
        let p = &self.params;
        json!({
            "name": p.name,
            "ctrlrs": [{
                "state": self.state_name(),
                "cntlid": cntlid,
                "trid": {
                    "trtype": "TCP",
                    "adrfam": p.adrfam.canonical(),
                    "traddr": p.traddr,
                    "trsvcid": p.trsvcid,
                    "subnqn": p.subnqn,
                },
                "host": {"nqn": p.hostnqn, "addr": "", "svcid": ""},
            }]
        })
    }
}

/// Errors of the controller's setup and reset.
#[derive(Debug)]
pub(crate) enum CtrlrError {
    Qp(QpError),
    Status(&'static str, Status),
    Bad(String),
}

impl std::fmt::Display for CtrlrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CtrlrError::Qp(e) => write!(f, "{e}"),
            CtrlrError::Status(what, s) => write!(f, "{what} failed with status {:#06x}", s.0),
            CtrlrError::Bad(s) => write!(f, "{s}"),
        }
    }
}

impl CtrlrError {
    pub(crate) fn to_bdev_error(&self, name: &str) -> BdevError {
        let (errno, msg) = match self {
            CtrlrError::Qp(QpError::Io(s)) => {
                let errno = if s.contains("refused") {
                    libc::ECONNREFUSED
                } else {
                    libc::EIO
                };
                (errno, s.clone())
            }
            CtrlrError::Qp(QpError::Timeout(s)) => (libc::ETIMEDOUT, format!("{s} timed out")),
            other => (libc::EIO, other.to_string()),
        };
        BdevError::Os {
            context: format!("cannot attach NVMe/TCP controller {name}"),
            source_msg: msg,
            errno,
        }
    }
}

/// The admin queue and its pollers, on the home reactor.
pub(crate) struct AdminPath {
    pub ctrlr: Arc<Ctrlr>,
    qp: RefCell<Qpair>,
    poller: RefCell<Option<PollerHandle>>,
    last_keep_alive: Cell<u64>,
}

#[derive(Default)]
struct HomeMap {
    admins: RefCell<HashMap<u64, Rc<AdminPath>>>,
}

fn home_map() -> Rc<HomeMap> {
    wc_reactor::current().local(HomeMap::default)
}

/// Sleeps on the current reactor.
pub(crate) async fn sleep(d: Duration) {
    let (tx, rx) = oneshot::channel::<()>();
    let _t = wc_reactor::current().schedule_timer(d, move || {
        let _ = tx.send(());
    });
    let _ = rx.await;
}

impl AdminPath {
    fn poll(&self) -> PollStatus {
        let mut qp = self.qp.borrow_mut();
        let before = qp.phase();
        let r = qp.poll();
        let mut busy = matches!(r, Ok(true));
        if let Err(e) = r {
            drop(qp);
            self.on_failure(&format!("admin queue: {e}"));
            return PollStatus::Busy;
        }
        if qp.is_ready() && self.ctrlr.phase() == phase::ENABLED {
            let now = wc_reactor::tick::ticks();
            let kato = Duration::from_millis(self.ctrlr.kato_ms as u64);
            let every = wc_reactor::tick::duration_to_ticks(kato / 2);
            if self.ctrlr.kato_ms > 0 && now.wrapping_sub(self.last_keep_alive.get()) >= every {
                self.last_keep_alive.set(now);
                if let Err(e) = qp.keep_alive() {
                    drop(qp);
                    self.on_failure(&format!("keep alive: {e}"));
                    return PollStatus::Busy;
                }
                busy = true;
            }
            // Without keep-alive (timeout 0) admin commands get the
            // connect timeout.
            let limit = if self.ctrlr.kato_ms > 0 {
                kato
            } else {
                self.ctrlr.params.connect_timeout
            };
            if let Some(t0) = qp.oldest_started() {
                if now.saturating_sub(t0) > wc_reactor::tick::duration_to_ticks(limit) {
                    qp.fail(QpError::Timeout("admin command (keep alive)"));
                    drop(qp);
                    self.on_failure("the controller stopped answering admin commands");
                    return PollStatus::Busy;
                }
            }
        } else if qp.outstanding() > 0 {
            // During setup commands time out after the connect timeout.
            if let Some(t0) = qp.oldest_started() {
                let limit = wc_reactor::tick::duration_to_ticks(self.ctrlr.params.connect_timeout);
                if wc_reactor::tick::ticks().saturating_sub(t0) > limit {
                    qp.fail(QpError::Timeout("admin command"));
                    let mut sink = VecDeque::new();
                    qp.take_unfinished(&mut sink);
                }
            }
        }
        busy |= before != qp.phase();
        PollStatus::from(busy)
    }

    fn on_failure(&self, why: &str) {
        let mut sink = VecDeque::new();
        self.qp.borrow_mut().take_unfinished(&mut sink);
        if self.ctrlr.phase() == phase::ENABLED {
            tracing::warn!("nvme {}: {why}", self.ctrlr.params.name);
            start_reset(&self.ctrlr);
        }
    }

    async fn command(
        &self,
        what: &'static str,
        sqe: Sqe,
        data: Vec<u8>,
        write: bool,
    ) -> Result<(Cqe, Vec<u8>), CtrlrError> {
        let rx = self
            .qp
            .borrow_mut()
            .submit_admin(sqe, data, write)
            .map_err(CtrlrError::Qp)?;
        let (cqe, data) = rx
            .await
            .map_err(|_| CtrlrError::Qp(self.lost()))?
            .map_err(CtrlrError::Qp)?;
        if cqe.status != Status::SUCCESS {
            return Err(CtrlrError::Status(what, cqe.status));
        }
        Ok((cqe, data))
    }

    fn lost(&self) -> QpError {
        self.qp
            .borrow()
            .last_error()
            .cloned()
            .unwrap_or(QpError::Closed)
    }

    async fn prop_get(&self, what: &'static str, off: u32, size8: bool) -> Result<u64, CtrlrError> {
        let (cqe, _) = self
            .command(what, cmd::property_get(off, size8), Vec::new(), false)
            .await?;
        Ok(cqe.result_u64())
    }

    async fn identify(
        &self,
        what: &'static str,
        cns: u8,
        nsid: u32,
    ) -> Result<Vec<u8>, CtrlrError> {
        let (_, data) = self
            .command(what, cmd::identify(cns, nsid), vec![0; IDENTIFY_LEN], false)
            .await?;
        Ok(data)
    }

    /// The active namespaces with a usable geometry.
    async fn identify_namespaces(&self) -> Result<Vec<NsInfo>, CtrlrError> {
        let nn = self.ctrlr.info.lock().map(|i| i.nn).unwrap_or_default();
        self.identify_namespaces_up_to(nn).await
    }

    async fn identify_namespaces_up_to(&self, nn: u32) -> Result<Vec<NsInfo>, CtrlrError> {
        let list = self
            .identify(
                "Identify active namespace list",
                identify::cns::ACTIVE_NS_LIST,
                0,
            )
            .await;
        let nsids: Vec<u32> = match &list {
            Ok(b) => identify::active_ns_list(b).collect(),
            // NVMe 1.0 controllers: every namespace up to NN.
            Err(CtrlrError::Status(..)) => (1..=nn.min(1024)).collect(),
            Err(e) => return Err(CtrlrError::Bad(e.to_string())),
        };
        let mut found = Vec::new();
        for nsid in nsids {
            let b = self
                .identify("Identify Namespace", identify::cns::NAMESPACE, nsid)
                .await?;
            let ns = IdentifyNamespace::decode(&b)
                .map_err(|e| CtrlrError::Bad(format!("Identify Namespace {nsid}: {e}")))?;
            if ns.nsze == 0 {
                continue;
            }
            let Some(bs) = ns.block_size() else {
                tracing::warn!(
                    "nvme {}: namespace {nsid} has an unusable block size (LBADS {}); skipped",
                    self.ctrlr.params.name,
                    ns.lbads
                );
                continue;
            };
            found.push(NsInfo {
                nsid,
                block_size: bs,
                num_blocks: ns.nsze,
                nguid: ns.nguid,
            });
        }
        Ok(found)
    }

    /// Connects the admin queue and brings the controller up: enable,
    /// identify controller and namespaces, number of queues.
    async fn connect_and_init(&self) -> Result<CtrlrInfo, CtrlrError> {
        {
            let mut qp = self.qp.borrow_mut();
            let mut sink = VecDeque::new();
            qp.take_unfinished(&mut sink);
            qp.start().map_err(CtrlrError::Qp)?;
        }
        loop {
            let ph = self.qp.borrow().phase();
            match ph {
                Phase::Ready => break,
                Phase::Down => return Err(CtrlrError::Qp(self.lost())),
                _ => sleep(Duration::from_millis(1)).await,
            }
        }
        let cap = self
            .prop_get("Property Get CAP", property::CAP, true)
            .await?;
        let caps = wc_nvme_wire::fabrics::Capabilities::from_u64(cap);
        let cc =
            property::cc::EN | 6 << property::cc::IOSQES_SHIFT | 4 << property::cc::IOCQES_SHIFT;
        self.command(
            "Property Set CC",
            cmd::property_set(property::CC, cc),
            Vec::new(),
            false,
        )
        .await?;
        let ready_limit = Duration::from_millis(500 * (caps.timeout_500ms.max(1) as u64));
        let t0 = Instant::now();
        loop {
            let csts = self
                .prop_get("Property Get CSTS", property::CSTS, false)
                .await? as u32;
            if csts & property::csts::CFS != 0 {
                return Err(CtrlrError::Bad(
                    "controller reports a fatal status (CSTS.CFS)".into(),
                ));
            }
            if csts & property::csts::RDY != 0 {
                break;
            }
            if t0.elapsed() > ready_limit {
                return Err(CtrlrError::Bad(
                    "controller did not become ready (CSTS.RDY)".into(),
                ));
            }
            sleep(Duration::from_millis(10)).await;
        }
        let idc = self
            .identify("Identify Controller", identify::cns::CONTROLLER, 0)
            .await?;
        let id = IdentifyController::decode(&idc)
            .map_err(|e| CtrlrError::Bad(format!("Identify Controller data: {e}")))?;
        let mut info = CtrlrInfo {
            cntlid: self.qp.borrow().cntlid(),
            serial: id.serial.trim().to_string(),
            model: id.model.trim().to_string(),
            firmware: id.firmware.trim().to_string(),
            // IOCCSZ counts 16-byte units of the whole capsule (SQE
            // included); fall back to none in capsule when absent.
            icd: (id.ioccsz.saturating_mul(16)).saturating_sub(64),
            max_xfer: MAX_XFER,
            vwc: id.vwc & 1 != 0,
            oncs: id.oncs,
            io_queues: 0,
            mqes: caps.mqes,
            nn: 0,
            namespaces: Vec::new(),
            ns_notices: false,
        };
        if id.mdts != 0 {
            let mps_min = 1u64 << (12 + caps.mpsmin as u32);
            let mdts = mps_min.saturating_mul(1u64 << id.mdts.min(20));
            info.max_xfer = info.max_xfer.min(mdts.min(u32::MAX as u64) as u32);
        }
        info.nn = id.nn;
        // Notices go on before the namespaces are read, so a namespace
        // added or removed after that read raises one (the target holds it
        // until an Asynchronous Event Request comes); turned on after, a
        // change in between would go unnoticed.
        info.ns_notices = match self
            .command(
                "Set Features (async event configuration)",
                cmd::enable_ns_notices(),
                Vec::new(),
                false,
            )
            .await
        {
            Ok(_) => true,
            Err(CtrlrError::Status(..)) => false,
            Err(e) => return Err(e),
        };
        if !info.ns_notices {
            tracing::warn!(
                "nvme {}: the controller refused namespace change notices",
                self.ctrlr.params.name
            );
        }
        info.namespaces = self.identify_namespaces_up_to(id.nn).await?;
        let want = self.ctrlr.params.num_io_queues.min(65535) as u16;
        let (cqe, _) = self
            .command(
                "Set Features (number of queues)",
                cmd::set_num_queues(want),
                Vec::new(),
                false,
            )
            .await?;
        let (nsq, ncq) = wc_nvme_wire::command::feature::num_queues_parse(cqe.dw0);
        info.io_queues = nsq.min(ncq).min(want as u32).max(1);
        Ok(info)
    }
}

/// Registry of controllers by name.
fn ctrlrs() -> std::sync::MutexGuard<'static, HashMap<String, Arc<Ctrlr>>> {
    static M: std::sync::OnceLock<Mutex<HashMap<String, Arc<Ctrlr>>>> = std::sync::OnceLock::new();
    M.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Looks up a controller.
pub(crate) fn lookup(name: &str) -> Option<Arc<Ctrlr>> {
    ctrlrs().get(name).cloned()
}

/// Every controller, by name.
pub(crate) fn all() -> Vec<Arc<Ctrlr>> {
    let mut v: Vec<Arc<Ctrlr>> = ctrlrs().values().cloned().collect();
    v.sort_by(|a, b| a.params.name.cmp(&b.params.name));
    v
}

/// Connects a new controller from the current reactor (its home) and
/// resolves with it and what Identify found. Nothing is registered yet
/// when this fails.
pub(crate) async fn connect(params: CtrlrParams) -> Result<(Arc<Ctrlr>, CtrlrInfo), BdevError> {
    let name = params.name.clone();
    let kato_ms = crate::options::current().keep_alive_timeout_ms;
    let r = wc_reactor::current();
    let ctrlr = Arc::new(Ctrlr {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        kato_ms,
        home: r.handle(),
        phase: AtomicU8::new(phase::CONNECTING),
        generation: AtomicU64::new(1),
        delayed: AtomicBool::new(false),
        info: Mutex::new(CtrlrInfo::default()),
        qids: Mutex::new(Vec::new()),
        bdevs: Mutex::new(Vec::new()),
        resets: AtomicU64::new(0),
        reset_waiters: Mutex::new(Vec::new()),
        ns_notices: AtomicU64::new(0),
        params,
    });
    {
        let mut m = ctrlrs();
        if m.contains_key(&name) {
            return Err(BdevError::Exists(name));
        }
        m.insert(name.clone(), ctrlr.clone());
    }
    let admin = Rc::new(AdminPath {
        qp: RefCell::new(Qpair::new(admin_config(&ctrlr))),
        ctrlr: ctrlr.clone(),
        poller: RefCell::new(None),
        last_keep_alive: Cell::new(wc_reactor::tick::ticks()),
    });
    let weak = Rc::downgrade(&admin);
    let poller = r.register_poller("nvme_admin", None, move || match weak.upgrade() {
        Some(a) => a.poll(),
        None => PollStatus::Idle,
    });
    *admin.poller.borrow_mut() = Some(poller);
    home_map()
        .admins
        .borrow_mut()
        .insert(ctrlr.id, admin.clone());
    match admin.connect_and_init().await {
        Ok(info) => {
            apply_info(&ctrlr, &info);
            ctrlr.set_phase(phase::ENABLED);
            start_events(&admin, info.ns_notices);
            Ok((ctrlr, info))
        }
        Err(e) => {
            tracing::error!("nvme {name}: attach failed: {e}");
            ctrlr.set_phase(phase::DELETED);
            drop_admin(&ctrlr);
            ctrlrs().remove(&name);
            Err(e.to_bdev_error(&name))
        }
    }
}

fn admin_config(c: &Ctrlr) -> QpConfig {
    QpConfig {
        addr: c.params.addr,
        qid: 0,
        depth: ADMIN_DEPTH,
        hdgst: c.params.hdgst,
        ddgst: c.params.ddgst,
        connect_timeout: c.params.connect_timeout,
        hostnqn: c.params.hostnqn.clone(),
        subnqn: c.params.subnqn.clone(),
        hostid: c.params.hostid,
        cntlid: wc_nvme_wire::fabrics::CNTLID_DYNAMIC,
        kato_ms: c.kato_ms,
        sq_flow_control: c.params.sq_flow_control,
        icd: ADMIN_ICD,
    }
}

fn apply_info(ctrlr: &Ctrlr, info: &CtrlrInfo) {
    let mut q = ctrlr.qids.lock().unwrap_or_else(|p| p.into_inner());
    let n = info.io_queues as usize;
    if q.len() < n {
        q.resize(n, false);
    }
    drop(q);
    // The namespaces stay those with a bdev: `ns::sync_namespaces` moves
    // them to what the target reports.
    let mut i = ctrlr.info.lock().unwrap_or_else(|p| p.into_inner());
    let registered = std::mem::take(&mut i.namespaces);
    *i = info.clone();
    i.namespaces = registered;
}

fn drop_admin(ctrlr: &Ctrlr) {
    if let Some(a) = home_map().admins.borrow_mut().remove(&ctrlr.id) {
        let mut sink = VecDeque::new();
        a.qp.borrow_mut().take_unfinished(&mut sink);
        if let Some(p) = a.poller.borrow_mut().take() {
            p.unregister();
        }
    }
}

/// Starts the reset loop on the home reactor unless one runs.
fn start_reset(ctrlr: &Arc<Ctrlr>) {
    if ctrlr.phase() != phase::ENABLED {
        return;
    }
    let Some(admin) = home_map().admins.borrow().get(&ctrlr.id).cloned() else {
        return;
    };
    begin_reset(ctrlr, admin);
}

/// `bdev_nvme_reset_controller`: disconnects the admin queue and every
/// I/O queue pair and reconnects them (I/O waits meanwhile and is sent
/// again); resolves when the reset ends. Allowed when enabled or failed
/// (the way out of a failed controller); a reset already running is
/// EBUSY, a controller being deleted ENXIO (SPDK's answers). Runs on the
/// home reactor.
pub(crate) fn user_reset(
    ctrlr: &Arc<Ctrlr>,
) -> Result<oneshot::Receiver<Result<(), String>>, BdevError> {
    let busy = |what: &str| BdevError::Os {
        context: format!("cannot reset NVMe controller {}", ctrlr.params.name),
        source_msg: what.to_string(),
        errno: libc::EBUSY,
    };
    match ctrlr.phase() {
        phase::ENABLED | phase::FAILED => {}
        phase::DELETED => {
            return Err(BdevError::Os {
                context: format!("cannot reset NVMe controller {}", ctrlr.params.name),
                source_msg: "it is being deleted".into(),
                errno: libc::ENXIO,
            })
        }
        _ => return Err(busy("a reset is already in progress")),
    }
    let Some(admin) = home_map().admins.borrow().get(&ctrlr.id).cloned() else {
        return Err(busy("its admin queue is not on this reactor"));
    };
    let (tx, rx) = oneshot::channel();
    ctrlr
        .reset_waiters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(tx);
    tracing::info!("nvme {}: reset requested", ctrlr.params.name);
    begin_reset(ctrlr, admin);
    Ok(rx)
}

fn begin_reset(ctrlr: &Arc<Ctrlr>, admin: Rc<AdminPath>) {
    ctrlr.set_phase(phase::RESETTING);
    ctrlr.resets.fetch_add(1, Ordering::Relaxed);
    wc_reactor::current()
        .spawn_local(reset_loop(admin))
        .detach();
}

async fn reset_loop(admin: Rc<AdminPath>) {
    let ctrlr = admin.ctrlr.clone();
    let name = ctrlr.params.name.clone();
    let p = &ctrlr.params;
    let start = Instant::now();
    loop {
        if ctrlr.phase() == phase::DELETED {
            return;
        }
        match admin.connect_and_init().await {
            Ok(info) => {
                if ctrlr.phase() == phase::DELETED {
                    let mut sink = VecDeque::new();
                    admin.qp.borrow_mut().take_unfinished(&mut sink);
                    return;
                }
                apply_info(&ctrlr, &info);
                admin.last_keep_alive.set(wc_reactor::tick::ticks());
                ctrlr.generation.fetch_add(1, Ordering::AcqRel);
                ctrlr.set_phase(phase::ENABLED);
                tracing::info!("nvme {name}: reconnected after {:?}", start.elapsed());
                // Namespaces may have come or gone while we were away.
                if let Err(e) = crate::ns::sync_namespaces(&ctrlr, &info.namespaces) {
                    tracing::error!("nvme {name}: namespaces after the reconnect: {e}");
                }
                start_events(&admin, info.ns_notices);
                ctrlr.finish_reset(Ok(()));
                return;
            }
            Err(e) => {
                tracing::warn!("nvme {name}: reconnect failed: {e}");
                let mut sink = VecDeque::new();
                admin.qp.borrow_mut().take_unfinished(&mut sink);
                if ctrlr.phase() == phase::DELETED {
                    return;
                }
                if p.reconnect_delay_sec == 0 {
                    tracing::error!(
                        "nvme {name}: no reconnect delay set; the controller stays failed"
                    );
                    ctrlr.set_phase(phase::FAILED);
                    ctrlr.finish_reset(Err(format!("reconnect failed: {e}")));
                    return;
                }
                let elapsed = start.elapsed();
                if p.ctrlr_loss_timeout_sec > 0
                    && elapsed >= Duration::from_secs(p.ctrlr_loss_timeout_sec as u64)
                {
                    tracing::error!(
                        "nvme {name}: controller lost for {elapsed:?} (ctrlr_loss_timeout_sec \
                         {}); deleting it",
                        p.ctrlr_loss_timeout_sec
                    );
                    delete(&ctrlr);
                    return;
                }
                if p.fast_io_fail_timeout_sec > 0
                    && elapsed >= Duration::from_secs(p.fast_io_fail_timeout_sec)
                    && ctrlr.phase() == phase::RESETTING
                {
                    tracing::warn!("nvme {name}: fast_io_fail_timeout_sec passed; failing I/O");
                    ctrlr.set_phase(phase::FAILING_IO);
                }
                ctrlr.delayed.store(true, Ordering::Relaxed);
                sleep(Duration::from_secs(p.reconnect_delay_sec)).await;
                ctrlr.delayed.store(false, Ordering::Relaxed);
            }
        }
    }
}

/// Deletes a controller (detach, or lost): I/O fails with ENODEV, the
/// bdevs are hot-removed, the admin queue closes. Runs on the home
/// reactor.
pub(crate) fn delete(ctrlr: &Arc<Ctrlr>) {
    ctrlr.set_phase(phase::DELETED);
    ctrlr.finish_reset(Err("the controller was deleted".into()));
    ctrlrs().retain(|_, c| !Arc::ptr_eq(c, ctrlr));
    let bdevs: Vec<String> = ctrlr.bdevs.lock().map(|b| b.clone()).unwrap_or_default();
    for b in bdevs.iter().rev() {
        let _ = wc_bdev::hot_remove(b);
    }
    drop_admin(ctrlr);
}

/// Keeps one Asynchronous Event Request outstanding on the admin queue
/// (notices were turned on by `connect_and_init`); a notice reads the
/// Changed Namespace List (which re-arms the target's notice) and brings
/// the bdevs in line with the active namespace list. The loop ends with the
/// admin connection (a reset starts a new one). A target that refused the
/// notices gets no requests: its namespaces are then only looked at again
/// on a reconnect.
fn start_events(admin: &Rc<AdminPath>, notices: bool) {
    if !notices {
        return;
    }
    let admin = admin.clone();
    wc_reactor::current()
        .spawn_local(async move {
            let name = admin.ctrlr.params.name.clone();
            loop {
                let rx = match admin.qp.borrow_mut().submit_aer() {
                    Ok(rx) => rx,
                    Err(_) => return,
                };
                let cqe = match rx.await {
                    Ok(Ok((cqe, _))) if cqe.status == Status::SUCCESS => cqe,
                    Ok(Ok((cqe, _))) => {
                        tracing::warn!(
                            "nvme {name}: Asynchronous Event Request failed with status {:#06x}",
                            cqe.status.0
                        );
                        return;
                    }
                    // The connection went: the next reset starts over.
                    _ => return,
                };
                let ev = wc_nvme_wire::command::AsyncEvent::from_dw0(cqe.dw0);
                if ev.event_type == wc_nvme_wire::command::async_event::TYPE_NOTICE
                    && ev.info == wc_nvme_wire::command::async_event::NOTICE_NS_ATTRIBUTE_CHANGED
                {
                    if let Err(e) = admin.namespaces_changed().await {
                        tracing::warn!("nvme {name}: namespace change: {e}");
                        return;
                    }
                } else {
                    tracing::info!(
                        "nvme {name}: asynchronous event type {} info {:#x} (log {:#x}) ignored",
                        ev.event_type,
                        ev.info,
                        ev.log_page
                    );
                }
            }
        })
        .detach();
}

impl AdminPath {
    /// A namespace attribute notice: clear the changed list, read the
    /// active namespaces and sync the bdevs.
    async fn namespaces_changed(&self) -> Result<(), CtrlrError> {
        self.command(
            "Get Log Page (changed namespace list)",
            cmd::changed_ns_list(),
            vec![0; wc_nvme_wire::log::CHANGED_NS_LIST_LEN],
            false,
        )
        .await?;
        let found = self.identify_namespaces().await?;
        if self.ctrlr.phase() != phase::ENABLED {
            return Ok(());
        }
        self.ctrlr.ns_notices.fetch_add(1, Ordering::Relaxed);
        crate::ns::sync_namespaces(&self.ctrlr, &found)
            .map_err(|e| CtrlrError::Bad(e.to_string()))?;
        Ok(())
    }
}
