//! End-to-end tests of `writecache_tgt` through SPDK's own `spdk-rpc`
//! client and the raw JSON-RPC socket. See `harness.rs` for how a target is
//! started, driven and stopped; every test has its own socket, so they run
//! in parallel.

#[macro_use]
mod harness;

mod bdev;
mod bdevperf;
mod config;
mod errors;
mod fuzz;
mod hardening;
mod nbd;
mod nvme;
mod nvme_common;
mod nvmf;
mod perf_scripts;
mod plugin;
mod shutdown;
mod writecache;
