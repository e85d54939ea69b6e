//! The process-wide registry of bdevs: names, aliases, registration order,
//! examine hooks (deferred vbdev creation) and unregistration.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::bdev::{Bdev, BdevConfig, BdevEvent, BdevOps};
use crate::error::BdevError;
use crate::io::IoType;

/// Called for every newly registered bdev (SPDK's examine): vbdev modules
/// use it to create instances that were waiting for a base bdev.
pub type ExamineHook = Arc<dyn Fn(&Arc<Bdev>) + Send + Sync>;

#[derive(Default)]
struct Registry {
    /// Registration order matters for `save_config`.
    bdevs: Vec<Arc<Bdev>>,
    names: HashMap<String, Arc<Bdev>>,
    hooks: Vec<(String, ExamineHook)>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REG: OnceLock<Mutex<Registry>> = OnceLock::new();
    REG.get_or_init(|| Mutex::new(Registry::default()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Registers a bdev. Names and aliases share one namespace.
pub fn register(cfg: BdevConfig, ops: Arc<dyn BdevOps>) -> Result<Arc<Bdev>, BdevError> {
    validate_config(&cfg)?;
    let bdev = {
        let mut reg = registry();
        for n in std::iter::once(&cfg.name).chain(cfg.aliases.iter()) {
            if reg.names.contains_key(n) {
                return Err(BdevError::Exists(n.clone()));
            }
        }
        let uuid = cfg.uuid.unwrap_or_else(uuid::Uuid::new_v4);
        let bdev = Arc::new_cyclic(|weak| Bdev {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: cfg.name.clone(),
            aliases: Mutex::new(cfg.aliases.clone()),
            uuid,
            block_size: cfg.block_size,
            num_blocks: cfg.num_blocks,
            required_alignment: cfg.required_alignment.max(1),
            max_io_blocks: cfg.max_io_blocks,
            supported: IoType::ALL.map(|t| ops.io_type_supported(t)),
            ops,
            claim: Mutex::new(None),
            openers: Mutex::new(Vec::new()),
            stats: Mutex::new(Vec::new()),
            removed: AtomicBool::new(false),
            self_weak: weak.clone(),
        });
        for n in std::iter::once(&cfg.name).chain(cfg.aliases.iter()) {
            reg.names.insert(n.clone(), bdev.clone());
        }
        reg.bdevs.push(bdev.clone());
        bdev
    };
    tracing::info!(
        "registered bdev {} ({} blocks of {} bytes, module {})",
        bdev.name,
        bdev.num_blocks,
        bdev.block_size,
        bdev.module_name()
    );
    let hooks: Vec<ExamineHook> = registry().hooks.iter().map(|(_, h)| h.clone()).collect();
    for h in hooks {
        h(&bdev);
    }
    Ok(bdev)
}

fn validate_config(cfg: &BdevConfig) -> Result<(), BdevError> {
    if cfg.name.is_empty() {
        return Err(BdevError::Invalid("bdev name must not be empty".into()));
    }
    if cfg.block_size == 0 || !cfg.block_size.is_power_of_two() {
        return Err(BdevError::Invalid(format!(
            "block size {} is not a power of two",
            cfg.block_size
        )));
    }
    if cfg.num_blocks == 0 {
        return Err(BdevError::Invalid("bdev has no blocks".into()));
    }
    if cfg.num_blocks.checked_mul(cfg.block_size as u64).is_none() {
        return Err(BdevError::Invalid("bdev size overflows 64 bits".into()));
    }
    if !cfg.required_alignment.is_power_of_two() {
        return Err(BdevError::Invalid(
            "required alignment must be a power of two".into(),
        ));
    }
    Ok(())
}

/// Looks up a bdev by name or alias.
pub fn lookup(name: &str) -> Option<Arc<Bdev>> {
    registry().names.get(name).cloned()
}

/// All bdevs in registration order.
pub fn list() -> Vec<Arc<Bdev>> {
    registry().bdevs.clone()
}

/// Adds an alias to a bdev.
pub fn add_alias(name: &str, alias: &str) -> Result<(), BdevError> {
    let mut reg = registry();
    if reg.names.contains_key(alias) {
        return Err(BdevError::Exists(alias.to_string()));
    }
    let b = reg
        .names
        .get(name)
        .cloned()
        .ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    if let Ok(mut a) = b.aliases.lock() {
        a.push(alias.to_string());
    }
    reg.names.insert(alias.to_string(), b);
    Ok(())
}

/// Registers an examine hook under a key (one per key; re-adding replaces).
pub fn add_examine_hook(key: &str, hook: ExamineHook) {
    let mut reg = registry();
    reg.hooks.retain(|(k, _)| k != key);
    reg.hooks.push((key.to_string(), hook));
}

/// Unregisters a bdev on behalf of its module: refuses when another module
/// claimed it; sends `Remove` to every opener, then calls `destruct`.
pub fn unregister(name: &str) -> Result<(), BdevError> {
    let bdev = lookup(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    if let Some(c) = bdev.claim_info() {
        return Err(BdevError::Claimed {
            name: bdev.name.clone(),
            module: c.module,
        });
    }
    remove(&bdev);
    Ok(())
}

/// Removes a bdev whatever its claims (hot-remove: the device is gone).
pub fn hot_remove(name: &str) -> Result<(), BdevError> {
    let bdev = lookup(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    remove(&bdev);
    Ok(())
}

fn remove(bdev: &Arc<Bdev>) {
    {
        let mut reg = registry();
        reg.bdevs.retain(|b| !Arc::ptr_eq(b, bdev));
        reg.names.retain(|_, b| !Arc::ptr_eq(b, bdev));
    }
    bdev.removed.store(true, Ordering::Release);
    bdev.notify(BdevEvent::Remove);
    crate::channel::forget_channels(bdev.id);
    bdev.ops.destruct();
    tracing::info!("unregistered bdev {}", bdev.name);
}

/// An asynchronous module shutdown step: called on the main reactor before
/// bdevs are torn down; it calls `done` when finished (a cache commits or
/// writes back here).
pub type ShutdownHook = Arc<dyn Fn(Box<dyn FnOnce() + Send>) + Send + Sync>;

fn shutdown_hooks() -> MutexGuard<'static, Vec<(String, ShutdownHook)>> {
    static H: OnceLock<Mutex<Vec<(String, ShutdownHook)>>> = OnceLock::new();
    H.get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Registers a shutdown hook under a key (re-adding replaces).
pub fn add_shutdown_hook(key: &str, hook: ShutdownHook) {
    let mut h = shutdown_hooks();
    h.retain(|(k, _)| k != key);
    h.push((key.to_string(), hook));
}

/// Runs every shutdown hook (in registration order, each after the previous
/// one finished), then `done`.
pub fn run_shutdown_hooks(done: Box<dyn FnOnce() + Send>) {
    let hooks: Vec<ShutdownHook> = shutdown_hooks().iter().map(|(_, h)| h.clone()).collect();
    fn step(mut rest: std::collections::VecDeque<ShutdownHook>, done: Box<dyn FnOnce() + Send>) {
        match rest.pop_front() {
            None => done(),
            Some(h) => h(Box::new(move || step(rest, done))),
        }
    }
    step(hooks.into(), done);
}
