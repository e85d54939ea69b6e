//! `malloc`: a bdev backed by RAM, as SPDK's `bdev_malloc`. I/O completes
//! with a memcpy on the submitting reactor.

#![warn(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use wc_bdev::{Bdev, BdevConfig, BdevError, BdevOps, DmaBuf, Io, IoChannel, IoStatus, IoType};

/// Parameters of `bdev_malloc_create` (SPDK's names).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MallocOpts {
    /// Name; `Malloc<N>` when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Block size (a multiple of 512).
    pub block_size: u32,
    /// UUID.
    #[serde(default)]
    pub uuid: Option<uuid::Uuid>,
    /// Accepted for compatibility; ignored (no boundary splitting needed).
    #[serde(default)]
    pub optimal_io_boundary: Option<u32>,
    /// Metadata size: only 0 is supported.
    #[serde(default)]
    pub md_size: Option<u32>,
    /// Accepted for compatibility (must be false).
    #[serde(default)]
    pub md_interleave: Option<bool>,
    /// DIF type: only 0 is supported.
    #[serde(default)]
    pub dif_type: Option<u32>,
    /// Accepted for compatibility (must be false).
    #[serde(default)]
    pub dif_is_head_of_md: Option<bool>,
    /// Physical block size (informational).
    #[serde(default)]
    pub physical_block_size: Option<u32>,
    /// DIF PI format (ignored with dif_type 0).
    #[serde(default)]
    pub dif_pi_format: Option<u32>,
    /// NUMA node (ignored).
    #[serde(default)]
    pub numa_id: Option<i32>,
}

impl MallocOpts {
    /// Options for a named disk of `num_blocks` x `block_size`.
    pub fn new(name: &str, num_blocks: u64, block_size: u32) -> Self {
        MallocOpts {
            name: Some(name.to_string()),
            num_blocks,
            block_size,
            uuid: None,
            optimal_io_boundary: None,
            md_size: None,
            md_interleave: None,
            dif_type: None,
            dif_is_head_of_md: None,
            physical_block_size: None,
            dif_pi_format: None,
            numa_id: None,
        }
    }
}

struct Malloc {
    mem: DmaBuf,
    base: *mut u8,
    block_size: u32,
    num_blocks: u64,
    physical_block_size: u32,
    optimal_io_boundary: u32,
}

// SAFETY: `base` points into `mem`, which Malloc owns; all access goes
// through raw copies of validated ranges (see MallocChannel::submit).
unsafe impl Send for Malloc {}
// SAFETY: as above; concurrent overlapping I/O leaves undefined *contents*
// (as on a real disk) but never touches memory outside the buffer.
unsafe impl Sync for Malloc {}

static NEXT_INDEX: AtomicU64 = AtomicU64::new(0);

/// Creates and registers a malloc bdev.
pub fn create(opts: MallocOpts) -> Result<Arc<Bdev>, BdevError> {
    if opts.block_size == 0 || opts.block_size % 512 != 0 {
        return Err(BdevError::Invalid(format!(
            "block_size {} must be a multiple of 512",
            opts.block_size
        )));
    }
    if opts.num_blocks == 0 {
        return Err(BdevError::Invalid(
            "num_blocks must be greater than 0".into(),
        ));
    }
    if opts.md_size.unwrap_or(0) != 0 || opts.dif_type.unwrap_or(0) != 0 {
        return Err(BdevError::NotSupported(
            "metadata and DIF are not supported".into(),
        ));
    }
    let size = opts
        .num_blocks
        .checked_mul(opts.block_size as u64)
        .filter(|s| *s <= isize::MAX as u64)
        .ok_or_else(|| BdevError::Invalid("size overflows".into()))?;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| format!("Malloc{}", NEXT_INDEX.fetch_add(1, Ordering::Relaxed)));
    if wc_bdev::lookup(&name).is_some() {
        return Err(BdevError::Exists(name));
    }
    let mut mem = DmaBuf::try_new(size as usize).ok_or_else(|| {
        BdevError::os(
            format!("cannot allocate {size} bytes for malloc bdev '{name}'"),
            std::io::Error::from_raw_os_error(libc::ENOMEM),
        )
    })?;
    let base = mem.as_mut_ptr();
    let ops = Arc::new(Malloc {
        mem,
        base,
        block_size: opts.block_size,
        num_blocks: opts.num_blocks,
        physical_block_size: opts.physical_block_size.unwrap_or(opts.block_size),
        optimal_io_boundary: opts.optimal_io_boundary.unwrap_or(0),
    });
    let mut cfg = BdevConfig::new(name, opts.block_size, opts.num_blocks);
    cfg.uuid = opts.uuid;
    wc_bdev::register(cfg, ops)
}

/// Deletes a malloc bdev.
pub fn delete(name: &str) -> Result<(), BdevError> {
    let b = wc_bdev::lookup(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    if b.module_name() != "malloc" {
        return Err(BdevError::NotFound(name.to_string()));
    }
    wc_bdev::unregister(b.name())
}

impl BdevOps for Malloc {
    fn module_name(&self) -> &'static str {
        "malloc"
    }

    fn product_name(&self) -> &'static str {
        "Malloc disk"
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
        Ok(Box::new(MallocChannel {
            base: self.base,
            len: self.mem.len(),
        }))
    }

    fn config_entry(&self, bdev: &Bdev) -> Option<Value> {
        Some(json!({
            "method": "bdev_malloc_create",
            "params": {
                "name": bdev.name(),
                "num_blocks": self.num_blocks,
                "block_size": self.block_size,
                "physical_block_size": self.physical_block_size,
                "uuid": bdev.uuid().to_string(),
                "optimal_io_boundary": self.optimal_io_boundary,
                "md_size": 0,
                "dif_type": 0,
                "dif_is_head_of_md": false,
                "dif_pi_format": 0,
            }
        }))
    }
}

struct MallocChannel {
    base: *mut u8,
    len: usize,
}

impl IoChannel for MallocChannel {
    fn submit(&self, mut io: Io) {
        let off = io.offset_bytes() as usize;
        let len = io.len_bytes() as usize;
        // The framework validated the range; re-check cheaply so a bug
        // elsewhere cannot turn into an out-of-bounds copy.
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            io.complete(IoStatus::Failed(libc::EINVAL));
            return;
        }
        // SAFETY: [off, off+len) lies inside the malloc buffer (checked
        // above), which outlives every channel (the channel's bdev holds
        // the ops, and the ops own the buffer).
        let region = unsafe { std::slice::from_raw_parts_mut(self.base.add(off), len) };
        match io.io_type() {
            IoType::Read => io.copy_to_iovs(region),
            IoType::Write => io.copy_from_iovs(region),
            IoType::Unmap | IoType::WriteZeroes => region.fill(0),
            IoType::Flush | IoType::Reset => {}
        }
        io.complete(IoStatus::Success);
    }
}

/// JSON-RPC methods of the module.
pub mod rpc {
    use wc_rpc::{RegisterError, Registry};

    /// Registers `bdev_malloc_create` and `bdev_malloc_delete`.
    pub fn register(reg: &Registry) -> Result<(), RegisterError> {
        wc_bdev::rpc::register_create_delete(
            reg,
            "bdev_malloc",
            |o: super::MallocOpts| super::create(o),
            super::delete,
        )
    }
}
