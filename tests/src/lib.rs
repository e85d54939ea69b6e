//! # wc-integration: end-to-end tests of `writecache_tgt`
//!
//! Nothing lives here: the tests are in `tests/integration/` and start the
//! real `writecache_tgt` binary, drive it with SPDK's own Python client
//! (`spdk-rpc`, PyPI `spdk` 26.9, plus our plugin `scripts/writecache_rpc.py`)
//! and with raw bytes on its Unix socket.
//!
//! Running them needs the binary built first:
//!
//! ```text
//! cargo build -p writecache-tgt && cargo test -p wc-integration
//! ```
//!
//! The binary is found through `$WRITECACHE_TGT`, else next to the test
//! executable (`<target>/<profile>/writecache_tgt`); when it is missing the
//! harness runs `cargo build -p writecache-tgt` once. An existing binary is
//! used as is: rebuild it after changing the target (`scripts/test.sh` builds
//! every binary before testing). Without `spdk-rpc` on `PATH` the tests that
//! need it print `SKIP` and pass, unless `WC_REQUIRE_SPDK_RPC=1`.
//!
//! Each target gets its own directory `$TMPDIR/wcit-<pid>-<n>-…` (socket,
//! lock, log, configs), removed when the test passes and kept, with the
//! target's log printed, when it fails. The fuzz test prints its seed;
//! `WC_FUZZ_SEED` replays a run and `WC_FUZZ_SECS` lengthens it.

#![warn(missing_docs)]
