//! `uring`: a bdev over a file or a block device, driven by io_uring, as
//! SPDK's `bdev_uring` (and `bdev_aio`, whose parameters it also accepts).
//!
//! The file is opened with `O_DIRECT`; where the file system refuses it
//! (`EINVAL`) the bdev falls back to buffered I/O, makes FLUSH an
//! `fdatasync` and says so in its driver info (`"direct_io": false`).
//!
//! Each reactor that opens a channel gets its own ring and a poller that
//! reaps completions. In-flight I/O lives in a per-channel slab indexed by
//! the SQE's `user_data`, so the hot path does not allocate; requests beyond
//! the ring's depth wait in a local overflow queue. Scatter-gather lists
//! the kernel would refuse for direct I/O (segments not aligned to the file
//! system's direct-I/O granularity) go through a per-slot bounce buffer.
//!
//! A file on a memory file system (tmpfs, ramfs) is opened buffered and
//! served inline instead: one `preadv`/`pwritev` on the submitting reactor
//! per request (io_uring would hand every tmpfs write to a worker thread);
//! the driver info says `"inline_io": true`.

#![warn(missing_docs)]

mod channel;
mod file;
mod inline;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;
use wc_bdev::{Bdev, BdevConfig, BdevError, BdevOps, IoChannel, IoType};

pub(crate) use file::FileState;

/// Parameters of `bdev_uring_create`, also accepting every key of
/// `bdev_aio_create` (SPDK's names; `rpc.py` sends the booleans as explicit
/// `false`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UringOpts {
    /// Name of the bdev.
    pub name: String,
    /// Path of the file or block device.
    pub filename: String,
    /// Block size in bytes (a power of two, at least the device's logical
    /// block size). Absent or 0: the logical block size of a block device,
    /// 512 (or the file system's direct-I/O granularity) for a file.
    #[serde(default)]
    pub block_size: Option<u32>,
    /// UUID; random when absent.
    #[serde(default)]
    pub uuid: Option<Uuid>,
    /// Open read-only: WRITE, UNMAP and WRITE_ZEROES are unsupported.
    #[serde(default)]
    pub readonly: Option<bool>,
    /// Enables UNMAP / WRITE_ZEROES through `fallocate` on a block device.
    /// Regular files get them whenever their file system can punch holes.
    #[serde(default)]
    pub fallocate: Option<bool>,
    /// Accepted for compatibility; io_uring already tries every request
    /// without blocking before it hands it to a worker.
    #[serde(default)]
    pub nowait: Option<bool>,
}

impl UringOpts {
    /// Options for bdev `name` over `filename`, everything else default.
    pub fn new(name: &str, filename: &str) -> Self {
        UringOpts {
            name: name.to_string(),
            filename: filename.to_string(),
            block_size: None,
            uuid: None,
            readonly: None,
            fallocate: None,
            nowait: None,
        }
    }
}

/// Name of this module in `bdev_get_bdevs`.
const MODULE: &str = "uring";

/// Creates and registers a uring bdev over `opts.filename`.
pub fn create(opts: UringOpts) -> Result<Arc<Bdev>, BdevError> {
    create_with(opts, false)
}

/// [`create`], optionally skipping `O_DIRECT` (tests of the fallback path).
pub(crate) fn create_with(opts: UringOpts, force_buffered: bool) -> Result<Arc<Bdev>, BdevError> {
    if opts.name.is_empty() {
        return Err(BdevError::Invalid("bdev name must not be empty".into()));
    }
    if wc_bdev::lookup(&opts.name).is_some() {
        return Err(BdevError::Exists(opts.name));
    }
    if opts.nowait == Some(true) {
        tracing::debug!("{}: 'nowait' has no effect with io_uring", opts.name);
    }
    let state = Arc::new(file::open(&opts, force_buffered)?);
    // Fail at creation, not at the first channel, where rings are refused.
    channel::probe_ring()?;
    let mut cfg = BdevConfig::new(opts.name.clone(), state.block_size, state.num_blocks);
    cfg.uuid = opts.uuid;
    cfg.required_alignment = state.required_alignment;
    tracing::info!(
        "uring bdev {} over {}: {} blocks of {} bytes, direct_io {}",
        opts.name,
        state.filename,
        state.num_blocks,
        state.block_size,
        state.direct_io
    );
    wc_bdev::register(cfg, Arc::new(UringBdev { state }))
}

/// Deletes a uring bdev. Its file is closed once every channel is gone.
pub fn delete(name: &str) -> Result<(), BdevError> {
    let b = wc_bdev::lookup(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    if b.module_name() != MODULE {
        return Err(BdevError::NotFound(name.to_string()));
    }
    wc_bdev::unregister(b.name())
}

struct UringBdev {
    state: Arc<FileState>,
}

impl BdevOps for UringBdev {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        "URING bdev"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        let s = &self.state;
        match t {
            IoType::Read | IoType::Flush | IoType::Reset => true,
            IoType::Write => !s.readonly,
            IoType::Unmap | IoType::WriteZeroes => !s.readonly && s.can_fallocate,
        }
    }

    fn create_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        channel::create(self.state.clone())
    }

    fn driver_info(&self) -> Value {
        json!({
            "uring": {
                "filename": self.state.filename,
                "direct_io": self.state.direct_io,
                "inline_io": self.state.inline_io,
            }
        })
    }

    fn config_entry(&self, bdev: &Bdev) -> Option<Value> {
        Some(json!({
            "method": "bdev_uring_create",
            "params": {
                "name": bdev.name(),
                "filename": self.state.filename,
                "block_size": bdev.block_size(),
                "uuid": bdev.uuid().to_string(),
            }
        }))
    }

    fn write_cache(&self) -> bool {
        // Direct I/O still lands in the device's volatile cache, and the
        // buffered fallback in the page cache: FLUSH matters either way.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wc_bdev::testing::{conformance, run_on, test_runtime, Expect};

    fn temp_file(tag: &str, len: u64) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!(
            "wc-uring-unit-{tag}-{}-{}",
            std::process::id(),
            Uuid::new_v4()
        ));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    #[test]
    fn buffered_fallback_passes_conformance_and_reports_it() {
        let rt = test_runtime(2);
        let path = temp_file("buffered", 8 << 20);
        let mut opts = UringOpts::new("UringBuffered", path.to_str().unwrap());
        opts.block_size = Some(4096);
        let b = create_with(opts, true).unwrap();
        assert_eq!(b.required_alignment(), 1);
        assert_eq!(
            b.info_json()["driver_specific"]["uring"]["direct_io"],
            json!(false)
        );
        conformance(
            &rt,
            "UringBuffered",
            Expect {
                stores_data: true,
                unmap_zeroes: true,
            },
        );
        run_on(rt.main(), || async { delete("UringBuffered") }).unwrap();
        let _ = std::fs::remove_file(path);
    }
}

/// JSON-RPC methods of the module: `bdev_uring_*`, and `bdev_aio_*` (same
/// engine: the aio bdev's users get io_uring underneath).
pub mod rpc {
    use wc_rpc::{RegisterError, Registry};

    /// Registers the create/delete methods under both names.
    pub fn register(reg: &Registry) -> Result<(), RegisterError> {
        for prefix in ["bdev_uring", "bdev_aio"] {
            wc_bdev::rpc::register_create_delete(
                reg,
                prefix,
                |o: super::UringOpts| super::create(o),
                super::delete,
            )?;
        }
        Ok(())
    }
}
