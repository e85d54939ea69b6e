//! Per-reactor channel states of a vbdev instance, and running code on
//! every reactor that holds one (SPDK's `spdk_for_each_channel`): what a
//! vbdev needs for a RESET or teardown that must visit all its channels.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use wc_reactor::ReactorHandle;

/// This reactor's registry of `T` states, keyed by instance id.
struct LocalStates<T>(RefCell<Vec<(u64, Weak<T>)>>);

impl<T> Default for LocalStates<T> {
    fn default() -> Self {
        LocalStates(RefCell::new(Vec::new()))
    }
}

/// Remembers `state` as instance `id`'s channel state on the current
/// reactor (weakly: it goes away with the channel).
pub fn register_local<T: 'static>(id: u64, state: &Rc<T>) {
    let r = wc_reactor::current();
    let reg = r.local(LocalStates::<T>::default);
    let mut v = reg.0.borrow_mut();
    v.retain(|(_, w)| w.strong_count() > 0);
    v.push((id, Rc::downgrade(state)));
}

/// Instance `id`'s live channel states on the current reactor.
pub fn local<T: 'static>(id: u64) -> Vec<Rc<T>> {
    let Some(r) = wc_reactor::try_current() else {
        return Vec::new();
    };
    let reg = r.local(LocalStates::<T>::default);
    let v = reg.0.borrow();
    v.iter()
        .filter(|(i, _)| *i == id)
        .filter_map(|(_, w)| w.upgrade())
        .collect()
}

/// The reactors holding a channel of one instance, by channel id.
#[derive(Default)]
pub struct ChannelReactors(Mutex<Vec<(u64, ReactorHandle)>>);

impl ChannelReactors {
    fn lock(&self) -> MutexGuard<'_, Vec<(u64, ReactorHandle)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Channel `chan` lives on the current reactor.
    pub fn add(&self, chan: u64) {
        self.lock().push((chan, wc_reactor::current().handle()));
    }

    /// Channel `chan` is gone.
    pub fn remove(&self, chan: u64) {
        self.lock().retain(|(c, _)| *c != chan);
    }

    /// Calls `f` with the reactor of every live channel.
    pub fn for_each(&self, f: impl Fn(&ReactorHandle)) {
        let handles: Vec<ReactorHandle> = self.lock().iter().map(|(_, h)| h.clone()).collect();
        for h in &handles {
            f(h);
        }
    }

    /// Runs `f` on the reactor of every live channel, then `done` on the
    /// calling reactor once all have run.
    pub fn for_each_then<F, D>(&self, f: F, done: D)
    where
        F: Fn() + Send + Sync + 'static,
        D: FnOnce() + Send + 'static,
    {
        let origin = wc_reactor::current().handle();
        let handles: Vec<ReactorHandle> = self.lock().iter().map(|(_, h)| h.clone()).collect();
        if handles.is_empty() {
            origin.send(done);
            return;
        }
        let left = Arc::new(AtomicUsize::new(handles.len()));
        let f = Arc::new(f);
        let done = Arc::new(Mutex::new(Some(done)));
        for h in handles {
            let (left, f, done, origin) = (left.clone(), f.clone(), done.clone(), origin.clone());
            h.send(move || {
                f();
                if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    if let Some(d) = done.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        origin.send(d);
                    }
                }
            });
        }
    }
}
