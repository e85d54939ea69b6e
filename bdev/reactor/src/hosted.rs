//! Hosted reactors: members of a runtime that a thread the runtime did not
//! start (a fio job thread) polls itself, as SPDK's fio plugin polls an
//! `spdk_thread` from each fio thread.
//!
//! A hosted reactor is a full sibling of the runtime's reactors (dense
//! index, message inbox, per-core state), so code that visits every
//! reactor (`for_each_reactor`, a cache commit) reaches it too. It must
//! therefore always be polled: while no host holds it, a standby thread of
//! the runtime runs it in sleep mode; [`HostedReactor::attach`] takes it
//! over on the calling thread and [`AttachedReactor`]'s drop hands it back.
//!
//! Only the `Send` part of a reactor (its [`Shared`] state: inbox, task
//! queue, counters) changes threads. Each owner builds its own `Reactor`
//! (pollers, locals, channel caches), and drops it on its own thread before
//! the next owner starts, so nothing `!Send` ever crosses threads.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::reactor::{IdleMode, Reactor, ReactorHandle, Shared, CURRENT};

/// Hand-over state of one hosted reactor.
struct Slot {
    shared: Arc<Shared>,
    /// Asks the standby thread to let go.
    release: AtomicBool,
    /// The standby thread while it runs the reactor.
    standby: Mutex<Option<JoinHandle<()>>>,
    /// True while a host thread holds the reactor.
    attached: AtomicBool,
}

/// A runtime member that an outside thread may drive. `Send + Sync`.
#[derive(Clone)]
pub struct HostedReactor(Arc<Slot>);

impl std::fmt::Debug for HostedReactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hosted reactor[{}]", self.0.shared.index)
    }
}

/// Why [`HostedReactor::attach`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Another thread holds the reactor.
    #[error("hosted reactor {0} is already attached to a thread")]
    Busy(usize),
    /// The runtime is shutting down.
    #[error("the runtime is stopping")]
    Stopping,
    /// The calling thread already runs a reactor.
    #[error("this thread already runs a reactor")]
    NestedReactor,
}

impl HostedReactor {
    pub(crate) fn new(shared: Arc<Shared>) -> std::io::Result<HostedReactor> {
        let h = HostedReactor(Arc::new(Slot {
            shared,
            release: AtomicBool::new(false),
            standby: Mutex::new(None),
            attached: AtomicBool::new(false),
        }));
        h.start_standby()?;
        Ok(h)
    }

    /// The reactor's handle (send it messages like any reactor).
    pub fn handle(&self) -> ReactorHandle {
        ReactorHandle(self.0.shared.clone())
    }

    /// True while a host thread holds the reactor.
    pub fn is_attached(&self) -> bool {
        self.0.attached.load(Ordering::Acquire)
    }

    fn start_standby(&self) -> std::io::Result<()> {
        let slot = self.0.clone();
        slot.release.store(false, Ordering::Release);
        let t = std::thread::Builder::new()
            .name(format!("hosted_{}", slot.shared.index))
            .spawn(move || {
                let r = Reactor::with_shared(slot.shared.clone(), IdleMode::sleep());
                r.bind_thread();
                crate::reactor::enter(&r, || {
                    while !slot.release.load(Ordering::Acquire) && !r.should_stop() {
                        if r.poll_once() {
                            r.reset_idle_streak();
                        } else {
                            r.idle_wait();
                        }
                    }
                    // At runtime shutdown, run what was sent before the
                    // stop; at a hand-over the next owner runs it.
                    if r.should_stop() {
                        while r.has_pending_work() {
                            r.poll_once();
                        }
                    }
                });
            })?;
        *lock(&self.0.standby) = Some(t);
        Ok(())
    }

    fn stop_standby(&self) {
        self.0.release.store(true, Ordering::Release);
        // A message makes a sleeping standby wake and see the flag.
        self.handle().send(|| {});
        if let Some(t) = lock(&self.0.standby).take() {
            let _ = t.join();
        }
    }

    /// Takes the reactor over on the calling thread, which must then poll
    /// it ([`AttachedReactor::poll`]) until it drops the returned guard.
    /// `idle` is what [`AttachedReactor::idle_wait`] does.
    pub fn attach(&self, idle: IdleMode) -> Result<AttachedReactor, AttachError> {
        if CURRENT.with(|c| c.borrow().is_some()) {
            return Err(AttachError::NestedReactor);
        }
        if self.0.shared.stop.load(Ordering::Acquire) {
            return Err(AttachError::Stopping);
        }
        if self
            .0
            .attached
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(AttachError::Busy(self.0.shared.index));
        }
        self.stop_standby();
        let reactor = Reactor::with_shared(self.0.shared.clone(), idle);
        reactor.bind_thread();
        CURRENT.with(|c| *c.borrow_mut() = Some(reactor.clone()));
        Ok(AttachedReactor {
            reactor,
            slot: self.clone(),
            _not_send: std::marker::PhantomData,
        })
    }

    /// Stops the standby thread for good (runtime shutdown; the stop flag
    /// is already set).
    pub(crate) fn join_standby(&self) {
        self.handle().send(|| {});
        if let Some(t) = lock(&self.0.standby).take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A hosted reactor held by the current thread, which is its reactor
/// thread until this guard drops (`wc_reactor::current()` returns it).
pub struct AttachedReactor {
    reactor: Rc<Reactor>,
    slot: HostedReactor,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl AttachedReactor {
    /// One iteration (messages, tasks, pollers); true when it did work.
    #[inline]
    pub fn poll(&self) -> bool {
        let busy = self.reactor.poll_once();
        if busy {
            self.reactor.reset_idle_streak();
        }
        busy
    }

    /// What the reactor does after an iteration without work: nothing in
    /// busy mode; a short spin, then a bounded sleep in sleep mode.
    #[inline]
    pub fn idle_wait(&self) {
        self.reactor.idle_wait();
    }

    /// The reactor.
    pub fn reactor(&self) -> &Rc<Reactor> {
        &self.reactor
    }
}

impl Drop for AttachedReactor {
    fn drop(&mut self) {
        // Run what is queued, then drop this thread's pollers and locals
        // (channel caches, I/O pools) here, while it is still current:
        // their destructors may use the reactor.
        for _ in 0..1024 {
            if !self.reactor.has_pending_work() {
                break;
            }
            self.reactor.poll_once();
        }
        self.reactor.clear_thread_state();
        CURRENT.with(|c| *c.borrow_mut() = None);
        if self.slot.0.shared.stop.load(Ordering::Acquire) {
            while self.reactor.has_pending_work() {
                self.reactor.poll_once();
            }
        } else if let Err(e) = self.slot.start_standby() {
            tracing::error!(
                "cannot restart the standby thread of hosted reactor {}: {e}",
                self.slot.0.shared.index
            );
        }
        self.slot.0.attached.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CoreMask, Runtime, RuntimeConfig};
    use std::sync::atomic::AtomicUsize;

    fn runtime(hosted: usize) -> Runtime {
        let mut cfg = RuntimeConfig::new(CoreMask::from_cores([0]));
        cfg.pin = false;
        cfg.hosted = hosted;
        Runtime::start(cfg).expect("runtime starts")
    }

    #[test]
    fn hosted_reactors_are_siblings_served_by_standby_when_detached() {
        let rt = runtime(2);
        assert_eq!(rt.handles().len(), 3);
        let h = rt.hosted()[1].clone();
        assert_eq!(h.handle().index(), 2);
        // Unattached: the standby thread runs its messages.
        assert_eq!(
            h.handle().call_blocking(|| crate::current().index()),
            Some(2)
        );
        // for_each_reactor from the main reactor reaches all three.
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let done = rt.main().call_blocking(move || {
            let (tx, rx) = std::sync::mpsc::channel();
            crate::for_each_reactor(
                move || {
                    n2.fetch_add(1, Ordering::SeqCst);
                },
                move || {
                    let _ = tx.send(());
                },
            );
            rx
        });
        let rx = done.expect("main runs");
        assert!(rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok());
        assert_eq!(n.load(Ordering::SeqCst), 3);
        rt.shutdown();
    }

    #[test]
    fn attached_reactor_runs_on_the_host_thread_and_hands_back() {
        let rt = runtime(1);
        let h = rt.hosted()[0].clone();
        let a = h.attach(IdleMode::sleep()).expect("attach");
        assert!(h.is_attached());
        assert!(matches!(
            h.attach(IdleMode::sleep()),
            Err(AttachError::NestedReactor)
        ));
        let me = std::thread::current().id();
        let ran = Arc::new(Mutex::new(None));
        let r2 = ran.clone();
        h.handle()
            .send(move || *lock(&r2) = Some(std::thread::current().id()));
        while lock(&ran).is_none() {
            if !a.poll() {
                a.idle_wait();
            }
        }
        assert_eq!(*lock(&ran), Some(me));
        assert_eq!(crate::current().index(), 1);
        // A second thread cannot take it while held.
        let h2 = h.clone();
        let busy = std::thread::spawn(move || h2.attach(IdleMode::sleep()).err())
            .join()
            .expect("thread");
        assert!(matches!(busy, Some(AttachError::Busy(1))));
        drop(a);
        assert!(crate::try_current().is_none());
        assert!(!h.is_attached());
        // Back on a standby thread.
        let t = h.handle().call_blocking(|| std::thread::current().id());
        assert!(t.is_some() && t != Some(me));
        rt.shutdown();
    }
}
