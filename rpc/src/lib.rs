//! `wc-rpc`: a JSON-RPC 2.0 server on a Unix socket, wire-compatible with SPDK, so that
//! SPDK's own client (`spdk-rpc` / `rpc.py`, PyPI `spdk` 26.9) can drive the target.
//!
//! The wire rules follow `shared/reference/spdk-conventions.md` §1: a stream of JSON values
//! with no delimiter, SPDK's envelope validation and error codes, id echoed verbatim, no
//! reply to a successful notification, compact replies ending in `"\n"`, 26.05-style batches
//! (array in, array out, in request order), `-32700` then close on malformed JSON, a
//! `<socket>.lock` flock, a 0600 socket, at most 64 connections and 256 KiB per request.
//!
//! # Pieces
//! - [`RpcError`] and its constructors: the codes and messages SPDK sends.
//! - [`decode`] / [`no_params`]: SPDK-strict parameter decoding (use
//!   `#[serde(deny_unknown_fields)]` on parameter structs).
//! - [`Registry`]: methods with STARTUP/RUNTIME masks, deprecated aliases, the current
//!   [`RpcState`], an optional allow-list. [`register_builtin`] adds `rpc_get_methods`,
//!   `spdk_get_version` and `framework_wait_init`. A process-wide instance is [`registry()`].
//! - [`RpcServer`]: the socket server; [`client::Client`]: a small blocking client.
//!
//! # Threading model
//! One event loop (epoll through `mio`, on one thread of its own) serves the listener and
//! every connection, as SPDK's single `spdk_rpc_accept` poller does: no thread per
//! connection. It reads, frames and validates requests, sends replies, and reaps a
//! connection in the same loop iteration that sees it finish (EOF with nothing
//! outstanding, peer gone, or a parse error answered), so a burst of short-lived clients
//! never keeps a later one out of the 64 slots. Handlers do **not** run on the loop unless
//! you ask for it: every validated request becomes a job handed to the [`Dispatcher`] given
//! to [`RpcServer::start`]. The target's dispatcher sends the job to the main reactor, so,
//! as in SPDK, all handlers run on the app thread and never need locks against each other;
//! tests use [`inline_dispatcher`], which runs the job on the loop thread. A handler answers
//! through its [`Responder`], at once or later from any thread: the reply is queued for the
//! loop, which wakes and sends it, so a slow handler never blocks other connections. A
//! `Responder` dropped without answering replies `-32603 "Internal error"`. While the
//! server is paused ([`RpcServer::pause`], [`PauseHandle`]) jobs are held in arrival order
//! and dispatched on resume.

#![warn(missing_docs)]

mod builtin;
pub mod client;
mod envelope;
mod error;
mod params;
mod registry;
mod server;

pub use builtin::{
    register_builtin, version_info, SPDK_VERSION_MAJOR, SPDK_VERSION_MINOR, SPDK_VERSION_PATCH,
    SPDK_VERSION_SUFFIX,
};
pub use error::{
    strerror, RpcError, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, INVALID_STATE,
    INVALID_STATE_RUNTIME_MSG, INVALID_STATE_STARTUP_MSG, METHOD_NOT_FOUND, PARSE_ERROR,
};
pub use params::{decode, no_params};
pub use registry::{registry, Handler, RegisterError, Registry, Responder, RpcState, StateMask};
pub use server::{
    inline_dispatcher, Dispatcher, Job, PauseHandle, RpcServer, ServerOptions, DEFAULT_SOCKET_MODE,
    MAX_CONNECTIONS, MAX_REQUEST_BYTES,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn thread_safety_of_public_types() {
        assert_send::<Responder>();
        assert_send::<RpcServer>();
        assert_send_sync::<Registry>();
        assert_send_sync::<PauseHandle>();
        assert_send_sync::<RpcError>();
        assert_send::<client::Client>();
    }
}
