//! `pmem`: a bdev over a memory-mapped file or device-DAX node that also
//! gives load/store access to its media through
//! [`PersistentMemory`] ([`BdevOps::pmem`]); the writecache uses it as its
//! cache in pmem mode.
//!
//! The file is mapped `MAP_SHARED_VALIDATE | MAP_SYNC` where the file
//! system allows it (DAX), else with a plain shared mapping. How stores are
//! made durable (the *strategy*, reported in `driver_specific`) follows:
//!
//! * DAX map: non-temporal stores for the aligned middle of a write and
//!   ordinary stores plus the best cache-line write-back the CPU has
//!   (`clwb`, `clflushopt`, `clflush`) for unaligned edges, then `sfence`
//!   (`"movnt+sfence"`). `"clwb+sfence"` and `"clflushopt+sfence"` (stores
//!   followed by write-back of every touched line) exist as alternatives.
//! * Anything else (tmpfs, ext4 without DAX): ordinary stores, and `msync`
//!   of the dirty pages at fence time (`"msync"`): slower, but durable.
//!
//! Block I/O goes through the same mapping: a read copies out, a write
//! copies in with the strategy's stores and is fenced before it completes
//! (with `msync` only for FUA writes: others wait for FLUSH, and the bdev
//! reports a volatile write cache then).

#![warn(missing_docs)]

mod map;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use wc_bdev::{
    Bdev, BdevConfig, BdevError, BdevOps, Io, IoChannel, IoStatus, IoType, PersistentMemory,
};

use map::{MapRequest, PmemMap, Strategy};

/// Parameters of `bdev_pmem_create`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemOpts {
    /// Name of the bdev.
    pub name: String,
    /// Path of the file (created if `size` is given) or device-DAX node.
    pub filename: String,
    /// Block size: a power of two from 512 to 4096; 4096 when absent.
    #[serde(default)]
    pub block_size: Option<u32>,
    /// Size in bytes: the file is created or extended to it. Absent: the
    /// existing file's size.
    #[serde(default)]
    pub size: Option<u64>,
    /// UUID; random when absent (saved by save_config, so it survives a
    /// restart).
    #[serde(default)]
    pub uuid: Option<uuid::Uuid>,
}

impl PmemOpts {
    /// Options for bdev `name` over the existing file `filename`.
    pub fn new(name: &str, filename: &str) -> Self {
        PmemOpts {
            name: name.to_string(),
            filename: filename.to_string(),
            block_size: None,
            size: None,
            uuid: None,
        }
    }
}

/// Default block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

const MODULE: &str = "pmem";

/// Creates and registers a pmem bdev.
pub fn create(opts: PmemOpts) -> Result<Arc<Bdev>, BdevError> {
    create_with(opts, None)
}

/// [`create`] with a forced persistence strategy (tests).
pub(crate) fn create_with(
    opts: PmemOpts,
    strategy: Option<Strategy>,
) -> Result<Arc<Bdev>, BdevError> {
    if opts.name.is_empty() {
        return Err(BdevError::Invalid("bdev name must not be empty".into()));
    }
    let block_size = opts.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    if !block_size.is_power_of_two() || !(512..=4096).contains(&block_size) {
        return Err(BdevError::Invalid(format!(
            "block_size {block_size} must be a power of two from 512 to 4096"
        )));
    }
    if wc_bdev::lookup(&opts.name).is_some() {
        return Err(BdevError::Exists(opts.name));
    }
    let map = Arc::new(PmemMap::open(&MapRequest {
        filename: &opts.filename,
        size: opts.size,
        block_size,
        strategy,
    })?);
    let num_blocks = (map.len() / block_size as usize) as u64;
    tracing::info!(
        "pmem bdev {} over {}: {} bytes, strategy {}, map_sync {}",
        opts.name,
        opts.filename,
        map.len(),
        map.strategy(),
        map.map_sync()
    );
    let mut cfg = BdevConfig::new(opts.name.clone(), block_size, num_blocks);
    cfg.uuid = opts.uuid;
    wc_bdev::register(
        cfg,
        Arc::new(PmemBdev {
            map,
            filename: opts.filename,
        }),
    )
}

/// Deletes a pmem bdev; the file is unmapped when the last user of its
/// mapping (channel or [`PersistentMemory`] handle) lets go.
pub fn delete(name: &str) -> Result<(), BdevError> {
    let b = wc_bdev::lookup(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    if b.module_name() != MODULE {
        return Err(BdevError::NotFound(name.to_string()));
    }
    wc_bdev::unregister(b.name())
}

struct PmemBdev {
    map: Arc<PmemMap>,
    filename: String,
}

impl BdevOps for PmemBdev {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        "pmem disk"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(
            t,
            IoType::Read
                | IoType::Write
                | IoType::Flush
                | IoType::Unmap
                | IoType::WriteZeroes
                | IoType::Reset
        )
    }

    fn create_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(PmemChannel {
            map: self.map.clone(),
        }))
    }

    fn driver_info(&self) -> Value {
        json!({
            "pmem": {
                "filename": self.filename,
                "size": self.map.len(),
                "strategy": self.map.strategy(),
                "map_sync": self.map.map_sync(),
            }
        })
    }

    fn config_entry(&self, bdev: &Bdev) -> Option<Value> {
        Some(json!({
            "method": "bdev_pmem_create",
            "params": {
                "name": bdev.name(),
                "filename": self.filename,
                "block_size": bdev.block_size(),
                "uuid": bdev.uuid().to_string(),
            }
        }))
    }

    fn write_cache(&self) -> bool {
        // Only msync defers non-FUA writes to FLUSH.
        self.map.strategy_kind() == Strategy::Msync
    }

    fn pmem(&self) -> Option<Arc<dyn PersistentMemory>> {
        Some(self.map.clone())
    }
}

struct PmemChannel {
    map: Arc<PmemMap>,
}

impl PmemChannel {
    /// Makes earlier writes durable where the I/O requires it now.
    fn settle(&self, fua: bool) -> IoStatus {
        if self.map.strategy_kind() == Strategy::Msync && !fua {
            return IoStatus::Success;
        }
        match self.map.persist() {
            Ok(()) => IoStatus::Success,
            Err(e) => {
                tracing::error!("pmem: making a write durable failed: {e}");
                IoStatus::Failed(e.raw_os_error().unwrap_or(libc::EIO))
            }
        }
    }
}

impl IoChannel for PmemChannel {
    fn submit(&self, mut io: Io) {
        let map = &*self.map;
        let (Ok(off), Ok(len)) = (
            usize::try_from(io.offset_bytes()),
            usize::try_from(io.len_bytes()),
        ) else {
            io.complete(IoStatus::Failed(libc::EINVAL));
            return;
        };
        // The framework validated the range; re-check so that a bug
        // elsewhere cannot turn into an access outside the mapping.
        if off.checked_add(len).is_none_or(|e| e > map.len()) {
            io.complete(IoStatus::Failed(libc::EINVAL));
            return;
        }
        let status = match io.io_type() {
            IoType::Read => {
                io.for_each_segment_mut(|pos, seg| {
                    let n = seg.len().min(len.saturating_sub(pos as usize));
                    map.read(off + pos as usize, &mut seg[..n]);
                });
                IoStatus::Success
            }
            IoType::Write => {
                io.for_each_segment(|pos, seg| {
                    let n = seg.len().min(len.saturating_sub(pos as usize));
                    map.write_nt(off + pos as usize, &seg[..n]);
                });
                self.settle(io.fua())
            }
            IoType::Unmap | IoType::WriteZeroes => {
                map.zero(off, len);
                self.settle(false)
            }
            IoType::Flush => self.settle(true),
            IoType::Reset => IoStatus::Success,
        };
        io.complete(status);
    }
}

#[cfg(test)]
mod tests;

/// JSON-RPC methods of the module (ours; SPDK removed its pmem bdev).
pub mod rpc {
    use wc_rpc::{RegisterError, Registry};

    /// Registers `bdev_pmem_create` and `bdev_pmem_delete`.
    pub fn register(reg: &Registry) -> Result<(), RegisterError> {
        wc_bdev::rpc::register_create_delete(
            reg,
            "bdev_pmem",
            |o: super::PmemOpts| super::create(o),
            super::delete,
        )
    }
}
