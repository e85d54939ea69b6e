//! # wc-writecache: the writecache vbdev
//!
//! A virtual bdev over an **origin** bdev (slow, large) and a **cache**
//! bdev (fast, persistent), with the semantics — and the on-media format —
//! of Linux dm-writecache. Writes land in the cache and complete; a commit
//! (FLUSH, FUA, or autocommit by count or time) makes them durable; the
//! writeback later copies the oldest committed blocks to the origin and
//! frees them. Reads are served from the cache when it holds the block.
//!
//! ## Threading
//! Writes and reads run on whichever reactor submits them. A write takes a
//! block from its core's free cache (refilled in batches from a lock-free
//! pool), copies the data with persistent stores, stamps the entry with the
//! current sequence and publishes the block in a sharded index; it logs the
//! block in its core's write-order log. Nothing global is locked.
//!
//! The commit coordinator and the writeback run on the instance's home
//! reactor. A commit bumps the stamp sequence, sends every reactor with a
//! channel a message that fences its stores and hands over its logs, then
//! writes the superblock's sequence count. An autocommit asked for by the
//! only core with a channel (pmem mode: fio's job thread, a lone bdevperf
//! job) runs there whole, with no message to home. Blocks leave the index only on home or by a
//! writer displacing them, and return to the free pool only after an epoch
//! grace period, so a reader copying a block never sees it reused.
//!
//! ## Persistence
//! An entry is committed iff its sequence is below the superblock's; a
//! committed block is never overwritten in place (an overwrite allocates a
//! new block and the old one is freed after the new one is committed); a
//! freed block's entry is cleared durably before the block is reused.

#![warn(missing_docs)]

mod cache;
mod channel;
mod fifo;
mod free_drip;
mod media;
mod meta;
mod options;
mod origin_flush;
pub mod rpc;
mod scratch;
mod ssd;
mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam::utils::CachePadded;
use serde_json::{json, Value};
use wc_bdev::{Bdev, BdevConfig, BdevError, BdevOps, ClaimGuard, IoChannel, IoType};

pub use cache::Writecache;
pub use media::AttachError;
pub use options::{CreateOpts, Mode, SetOpts};
pub use stats::Stats;

use cache::MAX_CORES;
use meta::{FreePool, Index, Meta, VALID};

pub(crate) fn ticks_to_ms(t: u64) -> u64 {
    wc_reactor::tick::ticks_to_duration(t).as_millis() as u64
}

/// Module name (claims, driver info).
pub const MODULE: &str = "writecache";

struct Instance {
    wc: Arc<Writecache>,
    opts: CreateOpts,
    _claims: Vec<ClaimGuard>,
}

fn instances() -> std::sync::MutexGuard<'static, HashMap<String, Instance>> {
    static I: OnceLock<Mutex<HashMap<String, Instance>>> = OnceLock::new();
    I.get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Errors of create and the control operations.
#[derive(Debug, thiserror::Error)]
pub enum WcError {
    /// A bdev-layer error (missing base, claimed, name in use...).
    #[error(transparent)]
    Bdev(#[from] BdevError),
    /// Formatting or recovery refused the cache.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// Bad parameter.
    #[error("{0}")]
    Invalid(String),
    /// The instance is in its error state.
    #[error("writecache '{0}' is in the error state (errno {1})")]
    ErrorState(String, i32),
}

impl WcError {
    /// errno for RPC replies.
    pub fn errno(&self) -> i32 {
        match self {
            WcError::Bdev(e) => e.errno(),
            WcError::Attach(e) => e.errno(),
            WcError::Invalid(_) => libc::EINVAL,
            WcError::ErrorState(_, e) => *e,
        }
    }
}

fn pending() -> std::sync::MutexGuard<'static, Vec<CreateOpts>> {
    static P: OnceLock<Mutex<Vec<CreateOpts>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// What a create request led to.
pub enum Created {
    /// The instance runs.
    Started(Arc<Bdev>),
    /// A base bdev does not exist yet: the instance starts when it appears.
    Pending {
        /// The missing bdevs.
        waiting_for: Vec<String>,
    },
}

/// Like [`create`], but when the origin or cache bdev does not exist yet the
/// request is remembered and the instance is created when they register
/// (as SPDK's passthru/OCF do). Parameters are validated either way.
pub fn create_or_wait(opts: CreateOpts) -> Result<Created, WcError> {
    validate_request(&opts)?;
    let missing: Vec<String> = [&opts.base_bdev, &opts.cache_bdev]
        .into_iter()
        .filter(|n| wc_bdev::lookup(n).is_none())
        .cloned()
        .collect();
    if missing.is_empty() {
        return create(opts).map(Created::Started);
    }
    install_examine_hook();
    tracing::info!(
        "writecache {}: waiting for base bdev(s) {}",
        opts.name,
        missing.join(", ")
    );
    pending().push(opts);
    Ok(Created::Pending {
        waiting_for: missing,
    })
}

/// [`create_or_wait`] for either mode: `done` runs on this reactor once
/// the instance runs, waits for its base bdevs, or was refused.
pub fn create_or_wait_async(opts: CreateOpts, done: Box<dyn FnOnce(Result<Created, WcError>)>) {
    if let Err(e) = validate_request(&opts) {
        return done(Err(e));
    }
    let bases_here = [&opts.base_bdev, &opts.cache_bdev]
        .into_iter()
        .all(|n| wc_bdev::lookup(n).is_some());
    if bases_here {
        return create_async(opts, Box::new(move |r| done(r.map(Created::Started))));
    }
    done(create_or_wait(opts))
}

/// Names of pending creations and what each waits for.
pub fn pending_creations() -> Vec<(String, Vec<String>)> {
    pending()
        .iter()
        .map(|o| {
            let w = [&o.base_bdev, &o.cache_bdev]
                .into_iter()
                .filter(|n| wc_bdev::lookup(n).is_none())
                .cloned()
                .collect();
            (o.name.clone(), w)
        })
        .collect()
}

/// Forgets a pending creation; true when there was one.
pub fn cancel_pending(name: &str) -> bool {
    let mut p = pending();
    let n = p.len();
    p.retain(|o| o.name != name);
    p.len() != n
}

fn install_examine_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        wc_bdev::add_examine_hook(
            MODULE,
            Arc::new(|_new: &Arc<Bdev>| {
                if wc_reactor::try_current().is_none() {
                    return;
                }
                let ready: Vec<CreateOpts> = {
                    let mut p = pending();
                    let (ready, wait): (Vec<CreateOpts>, Vec<CreateOpts>) =
                        p.drain(..).partition(|o| {
                            wc_bdev::lookup(&o.base_bdev).is_some()
                                && wc_bdev::lookup(&o.cache_bdev).is_some()
                        });
                    *p = wait;
                    ready
                };
                for o in ready {
                    let name = o.name.clone();
                    create_async(
                        o,
                        Box::new(move |r| match r {
                            Ok(_) => {
                                tracing::info!("writecache {name}: base bdevs arrived; started")
                            }
                            Err(e) => {
                                tracing::error!("writecache {name}: deferred creation failed: {e}")
                            }
                        }),
                    );
                }
            }),
        );
        wc_bdev::rpc::add_module_config_writer(
            MODULE,
            Arc::new(|| {
                pending()
                    .iter()
                    .filter_map(|o| {
                        let mut params = serde_json::to_value(o).ok()?;
                        if let Some(m) = params.as_object_mut() {
                            m.retain(|_, v| !v.is_null());
                        }
                        Some(json!({"method": "bdev_writecache_create", "params": params}))
                    })
                    .collect()
            }),
        );
    });
}

/// Checks what can be checked without the base bdevs.
fn validate_request(opts: &CreateOpts) -> Result<(), WcError> {
    if opts.name.is_empty() {
        return Err(WcError::Invalid("name must not be empty".into()));
    }
    if wc_bdev::lookup(&opts.name).is_some()
        || instances().contains_key(&opts.name)
        || pending().iter().any(|p| p.name == opts.name)
        || attaching().contains(&opts.name)
    {
        return Err(BdevError::Exists(opts.name.clone()).into());
    }
    if opts.base_bdev == opts.cache_bdev {
        return Err(WcError::Invalid(format!(
            "origin and cache must be different bdevs (both are '{}')",
            opts.base_bdev
        )));
    }
    let mode = opts.mode.unwrap_or(Mode::Pmem);
    wc_writecache_format::check_block_size(opts.block_size.unwrap_or(4096))
        .map_err(AttachError::Format)?;
    options::Tunables::from_create(opts, mode).map_err(WcError::Invalid)?;
    Ok(())
}

/// Names of instances whose cache is being attached (ssd mode reads it
/// asynchronously): taken, though not registered yet.
fn attaching() -> std::sync::MutexGuard<'static, std::collections::HashSet<String>> {
    static A: OnceLock<Mutex<std::collections::HashSet<String>>> = OnceLock::new();
    A.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// A validated request with both base bdevs opened and claimed.
struct Prepared {
    opts: CreateOpts,
    mode: Mode,
    bs: u32,
    num_blocks: u64,
    origin_ratio: u64,
    tunables: options::Tunables,
    origin_desc: wc_bdev::Desc,
    cache_desc: wc_bdev::Desc,
    claims: Vec<ClaimGuard>,
}

fn prepare(opts: CreateOpts) -> Result<Prepared, WcError> {
    validate_request(&opts)?;
    let mode = opts.mode.unwrap_or(Mode::Pmem);
    let bs = opts.block_size.unwrap_or(4096);
    let tunables = options::Tunables::from_create(&opts, mode).map_err(WcError::Invalid)?;
    let origin = wc_bdev::lookup(&opts.base_bdev)
        .ok_or_else(|| BdevError::NotFound(opts.base_bdev.clone()))?;
    let cache = wc_bdev::lookup(&opts.cache_bdev)
        .ok_or_else(|| BdevError::NotFound(opts.cache_bdev.clone()))?;
    if bs < origin.block_size() || bs % origin.block_size() != 0 {
        return Err(WcError::Invalid(format!(
            "block_size {bs} is not a multiple of the origin's block size {}",
            origin.block_size()
        )));
    }
    let num_blocks = origin.size_bytes() / bs as u64;
    if num_blocks == 0 {
        return Err(WcError::Invalid(
            "origin is smaller than one cache block".into(),
        ));
    }
    match mode {
        Mode::Pmem if cache.pmem().is_none() => {
            return Err(WcError::Invalid(format!(
                "cache bdev '{}' has no persistent memory mapping (pmem mode needs a pmem bdev)",
                cache.name()
            )));
        }
        Mode::Ssd if cache.block_size() > bs => {
            return Err(WcError::Invalid(format!(
                "cache bdev '{}' has {}-byte blocks, larger than block_size {bs}: \
                 ask for block_size {} or more",
                cache.name(),
                cache.block_size(),
                cache.block_size()
            )));
        }
        _ => {}
    }
    // Open and claim both before touching the media, so nobody else writes.
    let origin_desc = wc_bdev::open(origin.name(), true, None)?;
    let cache_desc = wc_bdev::open(cache.name(), true, None)?;
    let c1 = origin.claim(MODULE)?;
    let c2 = cache.claim(MODULE)?;
    Ok(Prepared {
        mode,
        bs,
        num_blocks,
        origin_ratio: bs as u64 / origin.block_size() as u64,
        tunables,
        origin_desc,
        cache_desc,
        claims: vec![c1, c2],
        opts,
    })
}

/// Creates (formatting a blank cache, or recovering an existing one) and
/// registers a writecache bdev in pmem mode. Runs on a reactor, which
/// becomes the instance's home. (ssd mode reads its cache through the bdev
/// layer, which completes asynchronously: use [`create_async`].)
pub fn create(opts: CreateOpts) -> Result<Arc<Bdev>, WcError> {
    if opts.mode == Some(Mode::Ssd) {
        return Err(WcError::Invalid(
            "ssd mode attaches its cache asynchronously (create_async)".into(),
        ));
    }
    let p = prepare(opts)?;
    let pmem = p
        .cache_desc
        .bdev()
        .pmem()
        .ok_or_else(|| WcError::Invalid("cache bdev lost its mapping".into()))?;
    let attached = media::attach(pmem, p.opts.start_sector.unwrap_or(0), p.bs, p.num_blocks)?;
    start(p, attached, None)
}

/// Creates a writecache bdev in either mode; `done` runs on this reactor
/// (the instance's home) once it is registered or refused.
pub fn create_async(opts: CreateOpts, done: Box<dyn FnOnce(Result<Arc<Bdev>, WcError>)>) {
    if opts.mode != Some(Mode::Ssd) {
        return done(create(opts));
    }
    let p = match prepare(opts) {
        Ok(p) => p,
        Err(e) => return done(Err(e)),
    };
    let ch = match p.cache_desc.channel() {
        Ok(c) => c,
        Err(e) => return done(Err(e.into())),
    };
    let name = p.opts.name.clone();
    attaching().insert(name.clone());
    let (start_sector, bs, n) = (p.opts.start_sector.unwrap_or(0), p.bs, p.num_blocks);
    ssd::attach(
        ch,
        start_sector,
        bs,
        n,
        Box::new(move |res| {
            attaching().remove(&name);
            done(match res {
                Ok(a) => start(p, a.attached, Some(a.ssd)),
                Err(e) => Err(e.into()),
            })
        }),
    );
}

/// Builds the instance over attached media and registers its bdev.
fn start(
    p: Prepared,
    attached: media::Attached,
    ssd: Option<Arc<ssd::Ssd>>,
) -> Result<Arc<Bdev>, WcError> {
    let Prepared {
        opts,
        mode,
        bs,
        num_blocks,
        origin_ratio,
        tunables,
        origin_desc,
        cache_desc,
        claims,
    } = p;
    let n = attached.media.geo.n_blocks() as usize;
    let wc = Arc::new(Writecache {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        name: opts.name.clone(),
        mode,
        block_size: bs,
        num_blocks,
        origin_ratio,
        meta: Meta::new(n),
        index: Index::new(n),
        // ssd mode hands out the lowest free block first (sequential cache
        // writes); pmem mode reuses the most recently freed.
        pool: if ssd.is_some() {
            FreePool::new_sorted(n)
        } else {
            FreePool::new(n)
        },
        seq: CachePadded::new(AtomicU64::new(attached.sb_seq)),
        sb_seq: CachePadded::new(AtomicU64::new(attached.sb_seq)),
        // One slot per reactor of the runtime (fixed for its life): the
        // commit and watermark checks sum over them on every round.
        stats: (0..wc_reactor::current().count().clamp(1, MAX_CORES))
            .map(|_| Default::default())
            .collect(),
        tunables,
        error: AtomicI32::new(0),
        home: wc_reactor::current().handle(),
        coord: CachePadded::new(std::sync::Mutex::new(cache::Coordinator::new(n))),
        wb: Default::default(),
        commit_requested: CachePadded::new(AtomicBool::new(false)),
        home_asked: Arc::new(CachePadded::new(AtomicBool::new(false))),
        retire_pending: Arc::new(CachePadded::new(AtomicBool::new(false))),
        channel_cores: AtomicU64::new(0),
        last_write_around: CachePadded::new(AtomicU64::new(0)),
        drip: Arc::new(CachePadded::new(Default::default())),
        round_logs: CachePadded::new(std::sync::Mutex::new(Default::default())),
        flush_on_suspend: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        suspended: AtomicBool::new(false),
        formatted: attached.formatted,
        started_ticks: wc_reactor::tick::ticks(),
        origin_desc,
        cache_desc,
        media: attached.media,
        ssd,
    });
    // The pool is a stack: push high blocks first so the lowest go out
    // first, as dm-writecache allocates a fresh cache.
    let mut free = attached.free;
    free.reverse();
    wc.pool.push_all(&free);
    {
        let now = wc.now_ms();
        let mut c = wc.coord.lock().unwrap_or_else(|p| p.into_inner());
        for r in &attached.committed {
            let m = wc.meta.get(r.block);
            m.lba.store(r.lba, Ordering::Relaxed);
            // In RAM only the lag behind the current sequence matters, and
            // only up to the window (see `Meta::rebase_seqs`).
            m.set_seq(r.seq.max(attached.sb_seq.saturating_sub(meta::SEQ_WINDOW)));
            m.set(1, VALID);
            wc.index.insert(&wc.meta, r.lba, r.block);
            c.fifo.push_back(r.block, now);
        }
    }
    let home_origin = wc.origin_desc.channel()?;
    wc.start_home_pollers(home_origin);
    wc.start_free_drip();
    let mut cfg = BdevConfig::new(opts.name.clone(), bs, num_blocks);
    cfg.required_alignment = 1;
    cfg.uuid = opts.uuid;
    let ops = Arc::new(WcBdev { wc: wc.clone() });
    let bdev = match wc_bdev::register(cfg, ops) {
        Ok(b) => b,
        Err(e) => {
            wc.release_home();
            return Err(e.into());
        }
    };
    let mut opts = opts;
    opts.uuid = Some(bdev.uuid());
    instances().insert(
        opts.name.clone(),
        Instance {
            wc,
            opts,
            _claims: claims,
        },
    );
    Ok(bdev)
}

/// The running instance called `name`.
pub fn get(name: &str) -> Option<Arc<Writecache>> {
    instances().get(name).map(|i| i.wc.clone())
}

/// Names of all instances.
pub fn names() -> Vec<String> {
    let mut v: Vec<String> = instances().keys().cloned().collect();
    v.sort();
    v
}

/// Deletes an instance: unregisters the bdev (new I/O fails), commits —
/// and with `flush` writes everything back first — then releases the base
/// bdevs. `done` runs on the home reactor with the outcome.
pub fn delete(name: &str, flush: bool, done: Box<dyn FnOnce(Result<(), WcError>) + Send>) {
    if cancel_pending(name) {
        return done(Ok(()));
    }
    let Some(wc) = get(name) else {
        return done(Err(BdevError::NotFound(name.to_string()).into()));
    };
    let flush = flush || wc.flush_on_suspend.load(Ordering::Relaxed);
    if wc.suspended.load(Ordering::Acquire) {
        return done(Err(WcError::Invalid(format!(
            "writecache '{name}' is suspended: resume it before deleting"
        ))));
    }
    if wc.closing.swap(true, Ordering::AcqRel) {
        return done(Err(BdevError::Busy(name.to_string()).into()));
    }
    let name = name.to_string();
    // Commit (and drain) while the channels still hold the per-core logs;
    // new I/O already fails. Then the bdev goes away and the bases are
    // released.
    let wc2 = wc.clone();
    let finish_now: cache::Waiter = Box::new(move |res| {
        if let Err(e) = wc_bdev::hot_remove(&name) {
            tracing::debug!("writecache delete {name}: {e}");
        }
        let inst = instances().remove(&name);
        if let Some(i) = &inst {
            i.wc.release_home();
        }
        drop(inst);
        // Without a drain, deleting an instance in the error state still
        // succeeds: its data stays committed on the cache for a re-attach.
        let res = if flush { res } else { Ok(()) };
        done(res.map_err(|e| WcError::ErrorState(name.clone(), e)));
    });
    // Writeback still in flight must land before the instance lets go of
    // its devices: a late completion would clear entries of the media.
    let finish: cache::Waiter = Box::new(move |res| {
        let w = wc2.clone();
        wc2.home
            .send(move || w.when_writeback_idle(Box::new(move |_| finish_now(res))));
    });
    if flush {
        wc.drain(finish);
    } else {
        wc.request_commit(Some(finish));
    }
}

/// Commits, writes back everything, and calls `done` when the cache holds
/// no dirty data (the RPC `bdev_writecache_flush`).
pub fn flush(name: &str, done: Box<dyn FnOnce(Result<(), WcError>) + Send>) {
    let Some(wc) = get(name) else {
        return done(Err(BdevError::NotFound(name.to_string()).into()));
    };
    if wc.error() != 0 {
        return done(Err(WcError::ErrorState(name.to_string(), wc.error())));
    }
    let n = name.to_string();
    wc.drain(Box::new(move |r| {
        done(r.map_err(|e| WcError::ErrorState(n, e)))
    }));
}

/// Suspends the instance: new I/O is held (not failed), I/O in flight
/// finishes, then everything is committed — and, with flush-on-suspend,
/// written back so the origin alone is complete. `done` runs on home.
pub fn suspend(name: &str, done: Box<dyn FnOnce(Result<(), WcError>) + Send>) {
    let Some(wc) = get(name) else {
        return done(Err(BdevError::NotFound(name.to_string()).into()));
    };
    if wc.suspended.swap(true, Ordering::AcqRel) {
        return done(Err(WcError::Invalid(format!(
            "writecache '{name}' is already suspended"
        ))));
    }
    let name = name.to_string();
    let home = wc.home.clone();
    home.send(move || {
        // Poll (on home, without blocking it) until no core has I/O in
        // flight or writers waiting for blocks.
        let mut done = Some(done);
        let handle = std::rc::Rc::new(std::cell::RefCell::new(None::<wc_reactor::PollerHandle>));
        let h2 = handle.clone();
        let p = wc_reactor::current().register_poller(
            "writecache_suspend",
            Some(std::time::Duration::from_micros(200)),
            move || {
                let busy: u64 = wc
                    .stats
                    .iter()
                    .map(|c| c.inflight.load(Ordering::Acquire) + c.waiting.load(Ordering::Acquire))
                    .sum();
                if busy > 0 {
                    return wc_reactor::PollStatus::Idle;
                }
                if let Some(h) = h2.borrow().as_ref() {
                    h.unregister();
                }
                if let Some(done) = done.take() {
                    let n = name.clone();
                    let finish: cache::Waiter =
                        Box::new(move |r| done(r.map_err(|e| WcError::ErrorState(n, e))));
                    if wc.flush_on_suspend.load(Ordering::Relaxed) {
                        wc.drain(finish);
                    } else {
                        wc.request_commit(Some(finish));
                    }
                }
                wc_reactor::PollStatus::Busy
            },
        );
        *handle.borrow_mut() = Some(p);
    });
}

/// Resumes a suspended instance: held I/O is resubmitted.
pub fn resume(name: &str) -> Result<(), WcError> {
    let wc = get(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    if !wc.suspended.swap(false, Ordering::AcqRel) {
        return Err(WcError::Invalid(format!(
            "writecache '{name}' is not suspended"
        )));
    }
    Ok(())
}

/// Whether the instance is suspended.
pub fn is_suspended(name: &str) -> Option<bool> {
    get(name).map(|w| w.suspended.load(Ordering::Acquire))
}

/// Commits without writing back; `done` runs when durable.
pub fn commit(name: &str, done: Box<dyn FnOnce(Result<(), WcError>) + Send>) {
    let Some(wc) = get(name) else {
        return done(Err(BdevError::NotFound(name.to_string()).into()));
    };
    let n = name.to_string();
    wc.request_commit(Some(Box::new(move |r| {
        done(r.map_err(|e| WcError::ErrorState(n, e)))
    })));
}

/// Current statistics.
pub fn stats(name: &str) -> Result<Stats, WcError> {
    get(name)
        .map(|w| w.stats())
        .ok_or_else(|| BdevError::NotFound(name.to_string()).into())
}

/// Zeroes the counters (each core clears its own).
pub fn clear_stats(name: &str) -> Result<(), WcError> {
    let wc = get(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    for h in wc.home.siblings() {
        let wc = wc.clone();
        h.send(move || {
            if let Some(r) = wc_reactor::try_current() {
                wc.core_stats(r.index()).clear();
            }
        });
    }
    Ok(())
}

/// Changes runtime tunables (validated as a whole; nothing changes on error).
pub fn set_options(o: &SetOpts) -> Result<(), WcError> {
    let wc = get(&o.name).ok_or_else(|| BdevError::NotFound(o.name.clone()))?;
    wc.tunables.apply(o).map_err(WcError::Invalid)?;
    if let Some(i) = instances().get_mut(&o.name) {
        macro_rules! copy {
            ($($f:ident),*) => { $( if o.$f.is_some() { i.opts.$f = o.$f; } )* };
        }
        copy!(
            high_watermark,
            low_watermark,
            writeback_jobs,
            autocommit_blocks,
            autocommit_time_ms,
            fua,
            cleaner,
            max_age_ms,
            pause_writeback_ms,
            writeback_retry_ms
        );
    }
    let w = wc.clone();
    wc.home.send(move || w.kick_writeback());
    Ok(())
}

/// Sets flush-on-suspend: the next suspend/delete/shutdown writes back all.
pub fn set_flush_on_suspend(name: &str, enable: bool) -> Result<(), WcError> {
    let wc = get(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    wc.flush_on_suspend.store(enable, Ordering::Relaxed);
    Ok(())
}

struct WcBdev {
    wc: Arc<Writecache>,
}

impl BdevOps for WcBdev {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        "writecache disk"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Write | IoType::Flush | IoType::WriteZeroes | IoType::Reset => {
                true
            }
            IoType::Unmap => true,
        }
    }

    fn create_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(channel::create_channel(&self.wc)?))
    }

    fn write_cache(&self) -> bool {
        true
    }

    fn driver_info(&self) -> Value {
        let wc = &self.wc;
        let s = wc.stats();
        json!({"writecache": {
            "mode": match wc.mode { Mode::Pmem => "pmem", Mode::Ssd => "ssd" },
            "origin": wc.origin_desc.bdev().name(),
            "cache": wc.cache_desc.bdev().name(),
            "block_size": wc.block_size,
            "blocks": s.blocks,
            "free_blocks": s.free_blocks,
            "dirty": s.dirty,
            "writeback_blocks": s.writeback_blocks,
            "error": s.error,
            "seq_count": s.seq_count,
            "flush_on_suspend": wc.flush_on_suspend.load(Ordering::Relaxed),
            "suspended": wc.suspended.load(Ordering::Relaxed),
            "formatted_on_create": wc.formatted_on_create(),
            "options": wc.tunables.to_json(),
        }})
    }

    fn config_entry(&self, bdev: &Bdev) -> Option<Value> {
        let inst = instances();
        let i = inst.get(bdev.name())?;
        let mut params = serde_json::to_value(&i.opts).ok()?;
        if let Some(o) = params.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        Some(json!({"method": "bdev_writecache_create", "params": params}))
    }
}
