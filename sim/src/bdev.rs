//! The simulators as bdevs: block I/O (so the conformance suite runs on
//! them) and, for pmem, the load/store capability.

use std::sync::Arc;

use serde_json::{json, Value};
use wc_bdev::{
    Bdev, BdevConfig, BdevError, BdevOps, Io, IoChannel, IoStatus, IoType, PersistentMemory,
};

use crate::{SimDisk, SimPmem};

/// Module name of simulated pmem bdevs.
pub const SIM_PMEM_MODULE: &str = "sim_pmem";
/// Module name of simulated disk bdevs.
pub const SIM_DISK_MODULE: &str = "sim_disk";

fn geometry(size: usize, block_size: u32) -> Result<u64, BdevError> {
    if block_size == 0 || !block_size.is_power_of_two() {
        return Err(BdevError::Invalid(format!(
            "block size {block_size} is not a power of two"
        )));
    }
    if size == 0 || size % block_size as usize != 0 {
        return Err(BdevError::Invalid(format!(
            "size {size} is not a non-zero multiple of the block size {block_size}"
        )));
    }
    Ok((size / block_size as usize) as u64)
}

/// Byte range of an I/O, re-checked against the media so a framework bug
/// fails the I/O instead of tripping the simulator's assertions.
fn io_range(io: &Io, len: usize) -> Option<(usize, usize)> {
    let off = usize::try_from(io.offset_bytes()).ok()?;
    let n = usize::try_from(io.len_bytes()).ok()?;
    (off.checked_add(n)? <= len).then_some((off, n))
}

/// Creates `SimPmem` media of `size` bytes and registers it as bdev `name`
/// with `block_size`-byte blocks.
pub fn sim_pmem_bdev(
    name: &str,
    size: usize,
    block_size: u32,
) -> Result<(Arc<Bdev>, Arc<SimPmem>), BdevError> {
    geometry(size, block_size)?;
    let pmem = Arc::new(SimPmem::new(size));
    let bdev = register_pmem_bdev(name, pmem.clone(), block_size)?;
    Ok((bdev, pmem))
}

/// Registers existing media (e.g. `SimPmem::from_image`) as bdev `name`.
pub fn register_pmem_bdev(
    name: &str,
    pmem: Arc<SimPmem>,
    block_size: u32,
) -> Result<Arc<Bdev>, BdevError> {
    let blocks = geometry(pmem.len(), block_size)?;
    let cfg = BdevConfig::new(name, block_size, blocks);
    wc_bdev::register(cfg, Arc::new(PmemBdev { pmem }))
}

/// Creates a zeroed `SimDisk` of `num_blocks` x `block_size` and registers
/// it as bdev `name`.
pub fn sim_disk_bdev(
    name: &str,
    num_blocks: u64,
    block_size: u32,
) -> Result<(Arc<Bdev>, Arc<SimDisk>), BdevError> {
    let size = num_blocks
        .checked_mul(block_size as u64)
        .and_then(|s| usize::try_from(s).ok())
        .filter(|s| *s <= isize::MAX as usize)
        .ok_or_else(|| BdevError::Invalid("size overflows".into()))?;
    geometry(size, block_size)?;
    let disk = Arc::new(SimDisk::new(size));
    let bdev = register_disk_bdev(name, disk.clone(), block_size)?;
    Ok((bdev, disk))
}

/// Registers an existing disk (e.g. `SimDisk::from_image`) as bdev `name`.
pub fn register_disk_bdev(
    name: &str,
    disk: Arc<SimDisk>,
    block_size: u32,
) -> Result<Arc<Bdev>, BdevError> {
    let blocks = geometry(disk.len(), block_size)?;
    let cfg = BdevConfig::new(name, block_size, blocks);
    wc_bdev::register(cfg, Arc::new(DiskBdev { disk }))
}

/// Unregisters a simulator bdev (either kind). The media object stays
/// usable (take crash images after deleting the bdev).
pub fn delete(name: &str) -> Result<(), BdevError> {
    let b = wc_bdev::lookup(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    if b.module_name() != SIM_PMEM_MODULE && b.module_name() != SIM_DISK_MODULE {
        return Err(BdevError::NotFound(name.to_string()));
    }
    wc_bdev::unregister(b.name())
}

fn supported(t: IoType) -> bool {
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

struct PmemBdev {
    pmem: Arc<SimPmem>,
}

impl BdevOps for PmemBdev {
    fn module_name(&self) -> &'static str {
        SIM_PMEM_MODULE
    }

    fn product_name(&self) -> &'static str {
        "Simulated pmem disk"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        supported(t)
    }

    fn create_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(PmemChannel {
            pmem: self.pmem.clone(),
        }))
    }

    fn driver_info(&self) -> Value {
        json!({"sim_pmem": {"size": self.pmem.len(), "strategy": self.pmem.strategy()}})
    }

    fn pmem(&self) -> Option<Arc<dyn PersistentMemory>> {
        Some(self.pmem.clone())
    }
}

struct PmemChannel {
    pmem: Arc<SimPmem>,
}

/// Zeroes written by UNMAP / WRITE_ZEROES, a page at a time.
static ZEROES: [u8; 4096] = [0; 4096];

impl IoChannel for PmemChannel {
    /// Block I/O on pmem: stores plus a fence, so a write is durable when
    /// it completes (no volatile cache).
    fn submit(&self, mut io: Io) {
        let t = io.io_type();
        if matches!(t, IoType::Flush | IoType::Reset) {
            self.pmem.fence();
            return io.complete(IoStatus::Success);
        }
        let Some((off, len)) = io_range(&io, self.pmem.len()) else {
            return io.complete(IoStatus::Failed(libc::EINVAL));
        };
        match t {
            IoType::Read => {
                let pmem = &self.pmem;
                io.for_each_segment_mut(|o, seg| pmem.read(off + o as usize, seg));
            }
            IoType::Write => {
                io.for_each_segment(|o, seg| self.pmem.write_nt(off + o as usize, seg));
                self.pmem.fence();
            }
            IoType::Unmap | IoType::WriteZeroes => {
                let mut pos = 0;
                while pos < len {
                    let n = ZEROES.len().min(len - pos);
                    self.pmem.write_nt(off + pos, &ZEROES[..n]);
                    pos += n;
                }
                self.pmem.fence();
            }
            IoType::Flush | IoType::Reset => {}
        }
        io.complete(IoStatus::Success);
    }
}

struct DiskBdev {
    disk: Arc<SimDisk>,
}

impl BdevOps for DiskBdev {
    fn module_name(&self) -> &'static str {
        SIM_DISK_MODULE
    }

    fn product_name(&self) -> &'static str {
        "Simulated disk"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        supported(t)
    }

    fn create_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(DiskChannel {
            disk: self.disk.clone(),
        }))
    }

    fn driver_info(&self) -> Value {
        json!({"sim_disk": {"size": self.disk.len(), "write_cache": true}})
    }

    fn write_cache(&self) -> bool {
        true
    }
}

struct DiskChannel {
    disk: Arc<SimDisk>,
}

impl IoChannel for DiskChannel {
    fn submit(&self, mut io: Io) {
        let t = io.io_type();
        match t {
            IoType::Flush => {
                self.disk.flush();
                return io.complete(IoStatus::Success);
            }
            IoType::Reset => return io.complete(IoStatus::Success),
            _ => {}
        }
        let Some((off, len)) = io_range(&io, self.disk.len()) else {
            return io.complete(IoStatus::Failed(libc::EINVAL));
        };
        match t {
            IoType::Read => self.disk.read_with(off, len, |src| io.copy_to_iovs(src)),
            IoType::Write => {
                let fua = io.fua();
                self.disk
                    .write_with(off, len, fua, |dst| io.copy_from_iovs(dst));
            }
            IoType::Unmap | IoType::WriteZeroes => self.disk.zero_at(off, len),
            IoType::Flush | IoType::Reset => {}
        }
        io.complete(IoStatus::Success);
    }
}
