//! # wc-reactor: the polled-mode runtime
//!
//! Every core in the core mask runs one **reactor** on its own pinned OS
//! thread (named `reactor_<core>`). A reactor owns everything it touches on
//! the I/O path — its pollers, its per-core channels, its I/O pools — so the
//! hot path needs neither locks nor atomic read-modify-writes.
//!
//! A reactor loops over three kinds of work, in this order:
//! 1. **messages**: closures other threads pushed on its lock-free inbox with
//!    [`ReactorHandle::send`]; this is the only way cores talk to each other;
//! 2. **tasks**: futures spawned with [`Reactor::spawn_local`]; their wakers
//!    may fire on any thread and re-queue the task on its own reactor;
//! 3. **pollers**: closures run every iteration (I/O completion polling) or
//!    at a period (timers, writeback).
//!
//! When an iteration finds no work, [`IdleMode::Busy`] spins (benchmarks) and
//! [`IdleMode::Sleep`] spins briefly, then parks the thread until a message
//! arrives or a timer is due (tests, CI on small machines).
//!
//! A runtime may also have **hosted** reactors ([`HostedReactor`]): full
//! members that a thread the runtime did not start (a fio job) attaches to
//! and polls itself; a standby thread runs them while nobody is attached.
//!
//! [`Harness`] builds N logical reactors on the calling thread and lets a
//! test choose which polls next: interleavings across "cores" become exact
//! schedules instead of sleeps.

#![warn(missing_docs)]

pub mod epoll;
mod hosted;
mod mask;
mod reactor;
mod runtime;
pub mod tick;
pub mod topology;

pub use hosted::{AttachError, AttachedReactor, HostedReactor};
pub use mask::{CoreMask, MaskError};
pub use reactor::{
    current, try_current, IdleMode, Message, PollStatus, PollerHandle, Reactor, ReactorHandle,
};
pub use runtime::{Harness, Runtime, RuntimeConfig, RuntimeError};

/// Runs `f` on every reactor of the current runtime (including this one, via
/// a message), then calls `done` on the calling reactor once all have run.
/// Like SPDK's `spdk_for_each_thread`; used for grace periods and stats.
pub fn for_each_reactor<F, D>(f: F, done: D)
where
    F: Fn() + Send + Sync + 'static,
    D: FnOnce() + Send + 'static,
{
    for_each_of(current().siblings(), f, done);
}

/// As [`for_each_reactor`], over the given reactors only (those that hold
/// the state `f` visits: a sleeping reactor that holds none is not woken
/// for nothing). With none, `done` still runs, via a message.
pub fn for_each_of<F, D>(reactors: Vec<ReactorHandle>, f: F, done: D)
where
    F: Fn() + Send + Sync + 'static,
    D: FnOnce() + Send + 'static,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let me = current().handle();
    if reactors.is_empty() {
        me.send(done);
        return;
    }
    let remaining = Arc::new(AtomicUsize::new(reactors.len()));
    let f = Arc::new(f);
    let done = Arc::new(Mutex::new(Some(done)));
    for h in reactors {
        let f = f.clone();
        let remaining = remaining.clone();
        let done = done.clone();
        let me = me.clone();
        h.send(move || {
            f();
            if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                let run_done = move || {
                    if let Some(d) = done.lock().ok().and_then(|mut d| d.take()) {
                        d();
                    }
                };
                // The last visit ran on the caller's reactor: done runs
                // right after it (still in a message, never inside f),
                // without a message to itself.
                if me.is_current() {
                    run_done();
                } else {
                    me.send(run_done);
                }
            }
        });
    }
}
