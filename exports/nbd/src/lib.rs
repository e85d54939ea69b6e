//! # wc-nbd: serving bdevs over the NBD protocol
//!
//! An NBD server inside the target: `nbd_server_start` listens on a Unix
//! socket or a TCP address, `nbd_export_create` makes a bdev available
//! under an export name, and any NBD client (qemu, libnbd's `nbdinfo` /
//! `nbdcopy`, fio's `nbd` engine, the kernel's `nbd-client`) can use it.
//! No kernel module is involved.
//!
//! ## Protocol
//! Fixed newstyle negotiation only (clients must set
//! `NBD_FLAG_C_FIXED_NEWSTYLE`), with `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`
//! and `NBD_OPT_INFO` (`NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE`: minimum =
//! the bdev's block size, preferred = max(4096, block), maximum 32 MiB),
//! `NBD_OPT_LIST` and `NBD_OPT_ABORT`; every other option gets
//! `NBD_REP_ERR_UNSUP` (structured replies and TLS included). Simple
//! replies; READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES (FUA adds a
//! flush) and DISC, with `NBD_FLAG_CAN_MULTI_CONN` (all connections share
//! the bdev). Parsing ([`Negotiator`], [`Decoder`]) is pure and checked
//! against the export before anything is allocated.
//!
//! ## Threading model
//! Control (the RPCs, listeners, the export table) lives on the main
//! reactor; a non-blocking listener is polled there by an `nbd_accept`
//! poller. Each accepted socket is handed, by message, to a reactor chosen
//! round-robin, which owns the connection from then on: it is never touched
//! by another thread. Every reactor with connections runs one epoll
//! instance, polled with timeout 0 by an active poller, plus a 100 ms sweep
//! poller. A connection parses requests as they arrive and submits each to
//! that reactor's channel of the bdev, so many requests are in flight at
//! once (bounded: 128 requests, 64 MiB of buffers, after which it stops
//! reading); replies leave in completion order, each with its handle. A
//! client that disconnects mid-request only loses its replies: I/O in
//! flight completes and is dropped. Deleting an export (or its bdev) or
//! stopping a server closes its connections.

#![warn(missing_docs)]

mod conn;
pub mod decode;
pub mod negotiate;
pub mod proto;
pub mod rpc;
mod server;
mod stream;

pub use decode::{Command, Decoder, Event};
pub use negotiate::{Catalog, HsEvent, Negotiator};
pub use proto::Geometry;
pub use server::{
    config_entries, create_export, delete_export, exports, parse_listen, servers, shutdown,
    start_server, stop_server, ExportSummary, ListenAddr, NbdError, ServerSummary,
};
pub use stream::NbdStream;

/// Serves an already connected client socket on `reactor` (the greeting
/// is sent and the handshake starts there), as if a listener had accepted
/// it. Used by tests with socket pairs; works from any thread.
pub fn serve_on(reactor: &wc_reactor::ReactorHandle, stream: NbdStream) {
    conn::serve_on(reactor, stream, None);
}

#[cfg(test)]
mod tests;
