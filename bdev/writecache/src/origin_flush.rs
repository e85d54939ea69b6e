//! Group flushes of the origin after writeback without FUA (`nofua`, and
//! ssd mode by default, as dm-writecache): a written-back run is durable on
//! the origin, and its cache blocks may be freed, only after a FLUSH of the
//! origin sent after its write completed. One FLUSH per origin channel is
//! in flight at a time and covers every run that completed before it was
//! sent; runs completing meanwhile wait for the next one (dm's endio thread
//! flushes once per batch of completions the same way). A FLUSH per run
//! would cost the origin one cache flush per written-back I/O.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use wc_bdev::{BdevChannel, FnCompletion, Io, IoCompletion};

use crate::cache::Writecache;

/// A written-back run waiting for the origin FLUSH that makes it durable.
pub(crate) struct FlushedRun {
    pub(crate) wc: Arc<Writecache>,
    pub(crate) run: Vec<(u64, u32)>,
    pub(crate) attempt: u32,
}

thread_local! {
    /// Per origin channel of this reactor (keyed by its address, which the
    /// in-flight FLUSH keeps alive): the runs that completed while a FLUSH
    /// was in flight. An entry exists exactly while a FLUSH is in flight.
    static WAITING: RefCell<HashMap<usize, Vec<FlushedRun>>> = RefCell::new(HashMap::new());
}

/// Retires `run` (on this reactor) once an origin FLUSH sent after now has
/// completed: `retire(run, flush_ok)` for each run a FLUSH covered.
pub(crate) fn retire_after_flush(origin: &Rc<BdevChannel>, run: FlushedRun) {
    let key = Rc::as_ptr(origin) as usize;
    let start = WAITING.with(|w| {
        let mut w = w.borrow_mut();
        match w.get_mut(&key) {
            Some(waiting) => {
                waiting.push(run);
                None
            }
            None => {
                w.insert(key, Vec::new());
                Some(vec![run])
            }
        }
    });
    if let Some(covered) = start {
        send_flush(origin.clone(), covered);
    }
}

fn send_flush(origin: Rc<BdevChannel>, covered: Vec<FlushedRun>) {
    let key = Rc::as_ptr(&origin) as usize;
    let covered = RefCell::new(Some(covered));
    let o2 = origin.clone();
    let cb: Rc<dyn IoCompletion> = Rc::new(FnCompletion(move |io: Io, _| {
        let ok = io.status().is_success();
        drop(io);
        let Some(done) = covered.borrow_mut().take() else {
            return;
        };
        // The next FLUSH first, for the runs that completed meanwhile, so
        // the origin stays busy while these retire.
        let next = WAITING.with(|w| {
            let mut w = w.borrow_mut();
            match w.get_mut(&key) {
                Some(waiting) if !waiting.is_empty() => Some(std::mem::take(waiting)),
                _ => {
                    w.remove(&key);
                    None
                }
            }
        });
        if let Some(next) = next {
            send_flush(o2.clone(), next);
        }
        for r in done {
            r.wc.retire(&r.run, ok, r.attempt, &o2);
        }
    }));
    let n = origin.bdev().num_blocks();
    origin.flush(0, n, &cb, 0);
}
