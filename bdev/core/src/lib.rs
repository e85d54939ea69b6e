//! # wc-bdev: the block device layer
//!
//! A **bdev** is a named block device registered in a process-wide
//! registry. Modules (malloc, uring, pmem, the writecache vbdev...)
//! implement [`BdevOps`] and hand it to [`register`]. Users [`open`] a bdev
//! and get a [`Desc`]; on each reactor, [`Desc::channel`] gives that
//! reactor's [`BdevChannel`], through which I/O is submitted.
//!
//! ## Threading
//! I/O is submitted and completed on the same reactor. A channel wraps the
//! module's per-reactor [`IoChannel`], so a module's hot path touches only
//! state of the reactor it runs on. Descriptors ([`Io`]) come from a
//! per-reactor pool; when it runs dry the request waits for a free one
//! (SPDK's io_wait) instead of failing. A module completes an I/O with
//! [`Io::complete`]; the submitter's [`IoCompletion`] callback then runs
//! from the reactor's completion poller, never inside `submit`, so
//! resubmitting from a callback cannot recurse.
//!
//! Control operations (register, claim, open, unregister) take locks and may
//! run on any thread; statistics are per channel with a single writer and
//! are summed on demand.

#![warn(missing_docs)]

mod bdev;
mod buf;
mod channel;
pub mod channels;
mod error;
mod io;
pub mod passthru;
mod pmem;
mod registry;
pub mod rpc;
mod stats;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use bdev::{
    Bdev, BdevConfig, BdevEvent, BdevOps, ClaimGuard, ClaimInfo, EventCallback, IoChannel,
};
pub use buf::{DmaBuf, BUF_ALIGN};
pub use channel::{open, BdevChannel, Desc};
pub use error::BdevError;
pub use io::{FnCompletion, Io, IoCompletion, IoStatus, IoType, IoVec, IO_POOL_SIZE};
pub use pmem::PersistentMemory;
pub use registry::{
    add_alias, add_examine_hook, add_shutdown_hook, hot_remove, list, lookup, register,
    run_shutdown_hooks, unregister, ExamineHook, ShutdownHook,
};
pub use stats::{IoStatSnapshot, IoStats};
