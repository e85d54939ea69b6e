//! # wc-vhost: vhost-user-blk controllers
//!
//! `vhost_create_blk_controller` creates a vhost-user socket
//! `<socket dir>/<ctrlr>` (mode 0600) for a bdev. The vhost-user protocol
//! (memory tables, vring setup, config space) is served by a
//! `vhost-user-backend` daemon thread per controller; the virtqueues are
//! *polled* by the reactors of the controller's cpumask (all reactors
//! without one): queue `i` by the `i % n`-th of its `n` reactors, each
//! submitting through its own bdev channel. A kick only wakes a sleeping
//! reactor. Requests are parsed and validated by [`blk`], and the bdev
//! reads and writes guest memory directly (zero copy; a segment that
//! crosses a guest memory region boundary is an I/O error).
//! When the frontend stops a ring (`GET_VRING_BASE`) its requests in flight
//! are waited for; when the VM disconnects, the daemon accepts the next
//! connection (a VM restart reconnects) and completions of requests of the
//! old connection are dropped.
//! Rings of every size virtio allows (powers of two up to 32768) are
//! accepted; a size it does not allow is refused with a log line naming
//! `SET_VRING_NUM` and the value, and that connection is closed.

#![warn(missing_docs)]

pub mod blk;
mod ctrl;
pub mod rpc;
mod vring;

pub use ctrl::{
    config_entries, controllers, create_controller, delete_controller, set_socket_dir, shutdown,
    socket_dir, ControllerSummary, CreateOpts, VhostError,
};

#[cfg(test)]
mod tests;
