//! The bdev itself: what a module implements ([`BdevOps`], [`IoChannel`])
//! and what the framework keeps about it ([`Bdev`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::error::BdevError;
use crate::io::{Io, IoType};
use crate::pmem::PersistentMemory;
use crate::stats::{IoStatSnapshot, IoStats};

/// Per-reactor I/O path of a bdev, created on the reactor that uses it.
/// `submit` runs on that reactor only, so implementations need no locks.
pub trait IoChannel {
    /// Starts an I/O; the module later calls [`Io::complete`]. The I/O was
    /// validated (range, sizes, alignment, supported type) by the framework.
    fn submit(&self, io: Io);
}

/// What a bdev module implements for each bdev it registers.
pub trait BdevOps: Send + Sync + 'static {
    /// Module name (`malloc`, `null`, `uring`...), as in SPDK's module list.
    fn module_name(&self) -> &'static str;

    /// `product_name` of `bdev_get_bdevs`.
    fn product_name(&self) -> &'static str;

    /// Whether the bdev handles this I/O type.
    fn io_type_supported(&self, t: IoType) -> bool;

    /// Creates the calling reactor's channel.
    fn create_channel(&self) -> Result<Box<dyn IoChannel>, BdevError>;

    /// The `driver_specific` object of `bdev_get_bdevs` (one named object).
    fn driver_info(&self) -> Value {
        json!({})
    }

    /// The `{method, params}` entry that recreates this bdev, for
    /// `save_config`; `None` for bdevs created implicitly.
    fn config_entry(&self, _bdev: &Bdev) -> Option<Value> {
        None
    }

    /// True when the device has a volatile write cache (FLUSH matters).
    fn write_cache(&self) -> bool {
        false
    }

    /// Load/store access for pmem-style media.
    fn pmem(&self) -> Option<Arc<dyn PersistentMemory>> {
        None
    }

    /// Called once the bdev is unregistered, after its channels are gone or
    /// going; release resources here (close files, drop claims).
    fn destruct(&self) {}
}

/// Geometry and identity of a bdev to register.
#[derive(Debug, Clone)]
pub struct BdevConfig {
    /// Unique name.
    pub name: String,
    /// Extra names.
    pub aliases: Vec<String>,
    /// UUID; random when `None`.
    pub uuid: Option<Uuid>,
    /// Block size in bytes (a multiple of 512... or any power of two >= 1).
    pub block_size: u32,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Alignment data buffers need, in bytes (1 = none; 512 for O_DIRECT).
    pub required_alignment: u32,
    /// Largest I/O in blocks the module takes in one piece (0 = no limit).
    pub max_io_blocks: u64,
}

impl BdevConfig {
    /// A config with defaults for everything but name and geometry.
    pub fn new(name: impl Into<String>, block_size: u32, num_blocks: u64) -> Self {
        BdevConfig {
            name: name.into(),
            aliases: Vec::new(),
            uuid: None,
            block_size,
            num_blocks,
            required_alignment: 1,
            max_io_blocks: 0,
        }
    }
}

/// Kinds of events sent to openers of a bdev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BdevEvent {
    /// The bdev is being removed: close descriptors, stop using it.
    Remove,
    /// The block count changed.
    Resize,
}

/// Callback for events, run on the reactor that opened the descriptor.
pub type EventCallback = Arc<dyn Fn(BdevEvent) + Send + Sync>;

pub(crate) struct Opener {
    pub(crate) id: u64,
    pub(crate) reactor: Option<wc_reactor::ReactorHandle>,
    pub(crate) cb: Option<EventCallback>,
}

/// A claim held on a bdev by a module (exclusive write).
#[derive(Debug, Clone)]
pub struct ClaimInfo {
    /// Claiming module.
    pub module: String,
}

/// A registered block device.
pub struct Bdev {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) aliases: Mutex<Vec<String>>,
    pub(crate) uuid: Uuid,
    pub(crate) block_size: u32,
    pub(crate) num_blocks: u64,
    pub(crate) required_alignment: u32,
    pub(crate) max_io_blocks: u64,
    pub(crate) ops: Arc<dyn BdevOps>,
    /// `io_type_supported` per [`IoType::ALL`] index, asked once at
    /// registration (the answer is fixed for a bdev's life).
    pub(crate) supported: [bool; 6],
    pub(crate) claim: Mutex<Option<ClaimInfo>>,
    pub(crate) openers: Mutex<Vec<Opener>>,
    pub(crate) stats: Mutex<Vec<Arc<IoStats>>>,
    pub(crate) removed: AtomicBool,
    pub(crate) self_weak: Weak<Bdev>,
}

impl std::fmt::Debug for Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bdev({} {}x{} {})",
            self.name,
            self.num_blocks,
            self.block_size,
            self.ops.module_name()
        )
    }
}

impl Bdev {
    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Aliases.
    pub fn aliases(&self) -> Vec<String> {
        self.aliases.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// UUID.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }

    /// Required buffer alignment in bytes.
    pub fn required_alignment(&self) -> u32 {
        self.required_alignment
    }

    /// Largest I/O the module takes in one piece, in blocks (0 = any).
    pub fn max_io_blocks(&self) -> u64 {
        self.max_io_blocks
    }

    /// Module operations.
    pub fn ops(&self) -> &Arc<dyn BdevOps> {
        &self.ops
    }

    /// Module name.
    pub fn module_name(&self) -> &'static str {
        self.ops.module_name()
    }

    /// Whether an I/O type is supported.
    #[inline]
    pub fn io_type_supported(&self, t: IoType) -> bool {
        self.supported[t as usize]
    }

    /// Load/store media of the bdev, if it has one.
    pub fn pmem(&self) -> Option<Arc<dyn PersistentMemory>> {
        self.ops.pmem()
    }

    /// True once unregistered (or hot-removed).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Current claim.
    pub fn claim_info(&self) -> Option<ClaimInfo> {
        self.claim.lock().ok().and_then(|c| c.clone())
    }

    /// Claims the bdev exclusively for `module` (a vbdev stacking on it).
    /// The claim is released when the returned guard drops.
    pub fn claim(&self, module: &str) -> Result<ClaimGuard, BdevError> {
        let mut c = self
            .claim
            .lock()
            .map_err(|_| BdevError::Internal("claim lock".into()))?;
        if let Some(existing) = c.as_ref() {
            return Err(BdevError::Claimed {
                name: self.name.clone(),
                module: existing.module.clone(),
            });
        }
        if self.is_removed() {
            return Err(BdevError::NotFound(self.name.clone()));
        }
        *c = Some(ClaimInfo {
            module: module.to_string(),
        });
        Ok(ClaimGuard {
            bdev: self.self_weak.upgrade(),
        })
    }

    /// Summed I/O statistics over every channel.
    pub fn io_stats(&self) -> IoStatSnapshot {
        let mut total = IoStatSnapshot::default();
        if let Ok(s) = self.stats.lock() {
            for c in s.iter() {
                c.add_to(&mut total);
            }
        }
        total.finish()
    }

    /// Zeroes the statistics of every channel.
    pub fn reset_io_stats(&self) {
        if let Ok(s) = self.stats.lock() {
            for c in s.iter() {
                c.reset();
            }
        }
    }

    /// The object `bdev_get_bdevs` reports, in SPDK's key order.
    pub fn info_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("name".into(), json!(self.name));
        m.insert("aliases".into(), json!(self.aliases()));
        m.insert("product_name".into(), json!(self.ops.product_name()));
        m.insert("block_size".into(), json!(self.block_size));
        m.insert("num_blocks".into(), json!(self.num_blocks));
        m.insert("preferred_write_alignment".into(), json!(0));
        m.insert("preferred_write_granularity".into(), json!(0));
        m.insert("optimal_write_size".into(), json!(0));
        m.insert("preferred_unmap_alignment".into(), json!(0));
        m.insert("preferred_unmap_granularity".into(), json!(0));
        m.insert("uuid".into(), json!(self.uuid.to_string()));
        m.insert(
            "assigned_rate_limits".into(),
            json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0}),
        );
        let claim = self.claim_info();
        m.insert("claimed".into(), json!(claim.is_some()));
        if claim.is_some() {
            m.insert("claim_type".into(), json!("exclusive_write"));
        }
        m.insert("zoned".into(), json!(false));
        let mut types = serde_json::Map::new();
        for name in [
            "read",
            "write",
            "unmap",
            "flush",
            "reset",
            "nvme_admin",
            "nvme_io",
            "nvme_io_md",
            "write_zeroes",
            "zcopy",
            "get_zone_info",
            "zone_management",
            "zone_append",
            "compare",
            "compare_and_write",
            "abort",
            "seek_hole",
            "seek_data",
            "copy",
            "nvme_iov_md",
            "nvme_nssr",
            "write_uncorrectable",
        ] {
            let supported = IoType::ALL
                .iter()
                .find(|t| t.name() == name)
                .is_some_and(|t| self.ops.io_type_supported(*t));
            types.insert(name.into(), json!(supported));
        }
        m.insert("supported_io_types".into(), Value::Object(types));
        m.insert("driver_specific".into(), self.ops.driver_info());
        Value::Object(m)
    }

    pub(crate) fn add_opener(&self, o: Opener) {
        if let Ok(mut v) = self.openers.lock() {
            v.push(o);
        }
    }

    pub(crate) fn remove_opener(&self, id: u64) {
        if let Ok(mut v) = self.openers.lock() {
            v.retain(|o| o.id != id);
        }
    }

    /// Number of open descriptors.
    pub fn open_count(&self) -> usize {
        self.openers.lock().map(|v| v.len()).unwrap_or(0)
    }

    pub(crate) fn notify(&self, ev: BdevEvent) {
        let openers: Vec<(Option<wc_reactor::ReactorHandle>, EventCallback)> = self
            .openers
            .lock()
            .map(|v| {
                v.iter()
                    .filter_map(|o| o.cb.clone().map(|cb| (o.reactor.clone(), cb)))
                    .collect()
            })
            .unwrap_or_default();
        for (reactor, cb) in openers {
            match reactor {
                Some(r) => r.send(move || cb(ev)),
                None => cb(ev),
            }
        }
    }
}

/// Releases a claim on drop.
pub struct ClaimGuard {
    bdev: Option<Arc<Bdev>>,
}

impl ClaimGuard {
    /// The claimed bdev.
    pub fn bdev(&self) -> Option<&Arc<Bdev>> {
        self.bdev.as_ref()
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(b) = self.bdev.take() {
            if let Ok(mut c) = b.claim.lock() {
                *c = None;
            }
        }
    }
}
