//! Runtimes: reactor threads pinned to cores, and the deterministic
//! single-thread harness used by tests.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use crate::hosted::HostedReactor;
use crate::mask::CoreMask;
use crate::reactor::{enter, IdleMode, Reactor, ReactorHandle, RuntimeShared, Shared};
use crate::topology;

/// Options for [`Runtime::start`].
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Cores to run reactors on.
    pub cores: CoreMask,
    /// Core of the main reactor; defaults to the first core of the mask.
    pub main_core: Option<u32>,
    /// Busy polling or sleeping when idle.
    pub idle: IdleMode,
    /// Pin reactor threads to their core (off in unit tests that create many
    /// runtimes on a 2-core machine).
    pub pin: bool,
    /// Extra reactors, after those of the mask, that outside threads drive
    /// ([`Runtime::hosted`]); nominal cores follow the mask's last core.
    pub hosted: usize,
}

impl RuntimeConfig {
    /// A config for `cores` with sleep mode, pinned.
    pub fn new(cores: CoreMask) -> Self {
        RuntimeConfig {
            cores,
            main_core: None,
            idle: IdleMode::sleep(),
            pin: true,
            hosted: 0,
        }
    }
}

/// Error starting a runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The main core is not in the mask.
    #[error("main core {0} is not in the core mask")]
    MainCoreNotInMask(u32),
    /// A core in the mask does not exist on this machine.
    #[error("core {core} is not available on this machine (available: {available})")]
    CoreUnavailable {
        /// The missing core.
        core: u32,
        /// Cores the OS offers.
        available: String,
    },
    /// Spawning a thread failed.
    #[error("cannot start reactor thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// Reactor threads, one per core of the mask.
pub struct Runtime {
    handles: Vec<ReactorHandle>,
    main_index: usize,
    threads: Vec<JoinHandle<()>>,
    hosted: Vec<HostedReactor>,
}

impl Runtime {
    /// Starts one pinned reactor thread per core. Each thread is named
    /// `reactor_<core>`, as SPDK names them.
    pub fn start(cfg: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let main_core = cfg.main_core.unwrap_or(cfg.cores.cores()[0]);
        let main_index = cfg
            .cores
            .cores()
            .iter()
            .position(|&c| c == main_core)
            .ok_or(RuntimeError::MainCoreNotInMask(main_core))?;
        if cfg.pin {
            let available = topology::online_cpus();
            for &c in cfg.cores.cores() {
                if !available.contains(&c) {
                    return Err(RuntimeError::CoreUnavailable {
                        core: c,
                        available: format!("{available:?}"),
                    });
                }
            }
        }

        // Each thread builds its own Reactor (it is !Send) and reports its
        // handle back; the full handle list is then distributed.
        let (handle_tx, handle_rx) = mpsc::channel();
        let mut rt_txs = Vec::new();
        let mut threads = Vec::new();
        for (index, &core) in cfg.cores.cores().iter().enumerate() {
            let handle_tx = handle_tx.clone();
            let (rt_tx, rt_rx) = mpsc::channel::<Arc<RuntimeShared>>();
            rt_txs.push(rt_tx);
            let idle = cfg.idle;
            let pin = cfg.pin;
            let t = std::thread::Builder::new()
                .name(format!("reactor_{core}"))
                .spawn(move || {
                    if pin {
                        if let Err(e) = topology::pin_current_thread(core) {
                            tracing::warn!("cannot pin reactor_{core}: {e}");
                        }
                    }
                    let reactor = Reactor::new(index, core, idle);
                    reactor.bind_thread();
                    let _ = handle_tx.send((index, reactor.handle()));
                    let Ok(rt) = rt_rx.recv() else { return };
                    reactor.set_runtime(rt);
                    run_loop(&reactor);
                })?;
            threads.push(t);
        }
        drop(handle_tx);
        let mut handles: Vec<Option<ReactorHandle>> = vec![None; cfg.cores.len()];
        for (index, h) in handle_rx.iter().take(cfg.cores.len()) {
            handles[index] = Some(h);
        }
        let mut handles: Vec<ReactorHandle> = handles.into_iter().flatten().collect();
        let last_core = cfg.cores.cores().iter().copied().max().unwrap_or(0);
        let hosted_shared: Vec<_> = (0..cfg.hosted)
            .map(|i| Shared::new(handles.len() + i, last_core + 1 + i as u32))
            .collect();
        handles.extend(hosted_shared.iter().map(|s| ReactorHandle(s.clone())));
        let shared = Arc::new(RuntimeShared {
            handles: handles.clone(),
            main_index,
        });
        for h in &handles {
            let _ = h.0.runtime.set(shared.clone());
        }
        for tx in rt_txs {
            let _ = tx.send(shared.clone());
        }
        let mut hosted = Vec::with_capacity(hosted_shared.len());
        for s in hosted_shared {
            match HostedReactor::new(s) {
                Ok(h) => hosted.push(h),
                Err(e) => {
                    let mut rt = Runtime {
                        handles,
                        main_index,
                        threads,
                        hosted,
                    };
                    rt.stop_and_join();
                    return Err(RuntimeError::Spawn(e));
                }
            }
        }
        tracing::info!(
            "Total cores available: {}; main core {}",
            handles.len(),
            main_core
        );
        Ok(Runtime {
            handles,
            main_index,
            threads,
            hosted,
        })
    }

    /// Handles in index order.
    pub fn handles(&self) -> &[ReactorHandle] {
        &self.handles
    }

    /// The main reactor.
    pub fn main(&self) -> &ReactorHandle {
        &self.handles[self.main_index]
    }

    /// The hosted reactors (see [`RuntimeConfig::hosted`]), in index order.
    pub fn hosted(&self) -> &[HostedReactor] {
        &self.hosted
    }

    /// Asks every reactor to stop after its current iteration and joins them.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        for h in &self.handles {
            h.0.stop.store(true, Ordering::Release);
            h.send(|| {});
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for h in self.hosted.drain(..) {
            h.join_standby();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn run_loop(reactor: &Rc<Reactor>) {
    enter(reactor, || {
        while !reactor.should_stop() {
            if reactor.poll_once() {
                reactor.reset_idle_streak();
            } else {
                reactor.idle_wait();
            }
        }
        // Drain what was sent before the stop so no message is silently lost.
        while reactor.has_pending_work() {
            reactor.poll_once();
        }
    });
}

/// N logical reactors driven from the calling thread. The test decides which
/// reactor polls next, so interleavings are exact and reproducible.
pub struct Harness {
    reactors: Vec<Rc<Reactor>>,
}

impl Harness {
    /// Creates `n` logical reactors (cores 0..n, main = 0).
    pub fn new(n: usize) -> Harness {
        assert!(n > 0, "a harness needs at least one reactor");
        let reactors: Vec<Rc<Reactor>> = (0..n)
            .map(|i| Reactor::new(i, i as u32, IdleMode::Busy))
            .collect();
        let shared = Arc::new(RuntimeShared {
            handles: reactors.iter().map(|r| r.handle()).collect(),
            main_index: 0,
        });
        for r in &reactors {
            r.bind_thread();
            r.set_runtime(shared.clone());
        }
        Harness { reactors }
    }

    /// Number of logical reactors.
    pub fn len(&self) -> usize {
        self.reactors.len()
    }

    /// Always false: a harness has at least one reactor.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Handle of reactor `i`.
    pub fn handle(&self, i: usize) -> ReactorHandle {
        self.reactors[i].handle()
    }

    /// Runs `f` "on" reactor `i` (it becomes the current reactor).
    pub fn on<T>(&self, i: usize, f: impl FnOnce() -> T) -> T {
        enter(&self.reactors[i], f)
    }

    /// One iteration of reactor `i`; true when it did work.
    pub fn poll(&self, i: usize) -> bool {
        let r = &self.reactors[i];
        enter(r, || r.poll_once())
    }

    /// Polls every reactor round-robin until none does work (max `limit`
    /// rounds). Returns the number of rounds run.
    pub fn run_until_idle(&self, limit: usize) -> usize {
        for round in 0..limit {
            let mut busy = false;
            for i in 0..self.reactors.len() {
                busy |= self.poll(i);
            }
            if !busy {
                return round;
            }
        }
        limit
    }

    /// Polls round-robin until `cond` holds; false if `limit` rounds pass.
    pub fn run_until(&self, limit: usize, mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..limit {
            if cond() {
                return true;
            }
            for i in 0..self.reactors.len() {
                self.poll(i);
            }
        }
        cond()
    }

    /// True when the handle belongs to reactor `i`.
    pub fn is(&self, i: usize, h: &ReactorHandle) -> bool {
        self.reactors[i].handle().same(h)
    }
}
