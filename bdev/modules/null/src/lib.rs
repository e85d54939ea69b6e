//! `null`: a bdev that stores nothing, as SPDK's `bdev_null`. Writes are
//! dropped, reads complete without touching the buffer (contents undefined,
//! as SPDK documents). It measures the framework's own per-I/O cost.

#![warn(missing_docs)]

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use wc_bdev::{Bdev, BdevConfig, BdevError, BdevOps, Io, IoChannel, IoStatus, IoType};

/// Parameters of `bdev_null_create` (SPDK's names; metadata must be 0).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullOpts {
    /// Name (required).
    pub name: String,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Block size; 512 by default.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// UUID.
    #[serde(default)]
    pub uuid: Option<uuid::Uuid>,
    /// Physical block size (informational).
    #[serde(default)]
    pub physical_block_size: Option<u32>,
    /// Metadata size: only 0.
    #[serde(default)]
    pub md_size: Option<u32>,
    /// DIF type: only 0.
    #[serde(default)]
    pub dif_type: Option<u32>,
    /// Ignored.
    #[serde(default)]
    pub dif_pi_format: Option<u32>,
    /// Ignored.
    #[serde(default)]
    pub dif_is_head_of_md: Option<bool>,
    /// Ignored hints.
    #[serde(default)]
    pub preferred_write_granularity: Option<u32>,
    /// Ignored hints.
    #[serde(default)]
    pub preferred_write_alignment: Option<u32>,
    /// Ignored hints.
    #[serde(default)]
    pub optimal_write_size: Option<u32>,
    /// Ignored hints.
    #[serde(default)]
    pub preferred_unmap_granularity: Option<u32>,
    /// Ignored hints.
    #[serde(default)]
    pub preferred_unmap_alignment: Option<u32>,
}

fn default_block_size() -> u32 {
    512
}

impl NullOpts {
    /// Options for a named null bdev.
    pub fn new(name: &str, num_blocks: u64, block_size: u32) -> Self {
        NullOpts {
            name: name.to_string(),
            num_blocks,
            block_size,
            uuid: None,
            physical_block_size: None,
            md_size: None,
            dif_type: None,
            dif_pi_format: None,
            dif_is_head_of_md: None,
            preferred_write_granularity: None,
            preferred_write_alignment: None,
            optimal_write_size: None,
            preferred_unmap_granularity: None,
            preferred_unmap_alignment: None,
        }
    }
}

struct Null {
    block_size: u32,
    num_blocks: u64,
}

/// Creates and registers a null bdev.
pub fn create(opts: NullOpts) -> Result<Arc<Bdev>, BdevError> {
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
    let mut cfg = BdevConfig::new(opts.name.clone(), opts.block_size, opts.num_blocks);
    cfg.uuid = opts.uuid;
    wc_bdev::register(
        cfg,
        Arc::new(Null {
            block_size: opts.block_size,
            num_blocks: opts.num_blocks,
        }),
    )
}

/// Deletes a null bdev.
pub fn delete(name: &str) -> Result<(), BdevError> {
    let b = wc_bdev::lookup(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    if b.module_name() != "null" {
        return Err(BdevError::NotFound(name.to_string()));
    }
    wc_bdev::unregister(b.name())
}

impl BdevOps for Null {
    fn module_name(&self) -> &'static str {
        "null"
    }

    fn product_name(&self) -> &'static str {
        "Null disk"
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
        Ok(Box::new(NullChannel))
    }

    fn config_entry(&self, bdev: &Bdev) -> Option<Value> {
        Some(json!({
            "method": "bdev_null_create",
            "params": {
                "name": bdev.name(),
                "num_blocks": self.num_blocks,
                "block_size": self.block_size,
                "uuid": bdev.uuid().to_string(),
                "md_size": 0,
                "dif_type": 0,
                "dif_is_head_of_md": false,
                "dif_pi_format": 0,
            }
        }))
    }
}

struct NullChannel;

impl IoChannel for NullChannel {
    fn submit(&self, io: Io) {
        io.complete(IoStatus::Success);
    }
}

/// JSON-RPC methods of the module.
pub mod rpc {
    use wc_rpc::{RegisterError, Registry};

    /// Registers `bdev_null_create` and `bdev_null_delete`.
    pub fn register(reg: &Registry) -> Result<(), RegisterError> {
        wc_bdev::rpc::register_create_delete(
            reg,
            "bdev_null",
            |o: super::NullOpts| super::create(o),
            super::delete,
        )
    }
}
