//! The base of a passthru vbdev (SPDK's vbdev pattern: delay, error): the
//! base bdev opened for writing and claimed by the module, the vbdev
//! hot-removed when the base goes away, and a vbdev configuration with the
//! base's geometry.

use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{Bdev, BdevChannel, BdevConfig, BdevError, BdevEvent, ClaimGuard, Desc};

/// A vbdev's hold on its base: the open descriptor and the claim, both
/// released by [`release`](Self::release) (the vbdev's destruct).
pub struct BaseLink {
    name: String,
    desc: Mutex<Option<Desc>>,
    claim: Mutex<Option<ClaimGuard>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BaseLink {
    /// Opens `base` for writing and claims it for `module`; when the base
    /// is removed, so is the vbdev `vbdev` (whatever its own claims).
    pub fn open(
        base: &str,
        module: &'static str,
        vbdev: &str,
    ) -> Result<(BaseLink, Arc<Bdev>), BdevError> {
        let vbdev = vbdev.to_string();
        let desc = crate::open(
            base,
            true,
            Some(Arc::new(move |ev| {
                if ev == BdevEvent::Remove {
                    let _ = crate::hot_remove(&vbdev);
                }
            })),
        )?;
        let bdev = desc.bdev().clone();
        let claim = bdev.claim(module)?;
        let link = BaseLink {
            name: bdev.name().to_string(),
            desc: Mutex::new(Some(desc)),
            claim: Mutex::new(Some(claim)),
        };
        Ok((link, bdev))
    }

    /// The base's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A channel to the base on this reactor (`NotFound` once released).
    pub fn channel(&self) -> Result<Rc<BdevChannel>, BdevError> {
        let desc = lock(&self.desc);
        let desc = desc
            .as_ref()
            .ok_or_else(|| BdevError::NotFound(self.name.clone()))?;
        desc.channel()
    }

    /// Drops the claim and closes the base.
    pub fn release(&self) {
        lock(&self.claim).take();
        lock(&self.desc).take();
    }

    /// A configuration for a vbdev named `name` with the base's geometry.
    pub fn vbdev_config(base: &Bdev, name: String) -> BdevConfig {
        let mut cfg = BdevConfig::new(name, base.block_size(), base.num_blocks());
        cfg.required_alignment = base.required_alignment();
        cfg.max_io_blocks = base.max_io_blocks();
        cfg
    }
}
