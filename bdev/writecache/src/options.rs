//! Parameters of a writecache instance (dm-writecache's, in snake_case).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// Cache mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Byte-addressable cache (persistent memory); metadata on the media.
    Pmem,
    /// Block cache (SSD); metadata in RAM, written on commit.
    Ssd,
}

/// Declares an RPC parameter struct: its own fields, then the tunables that
/// `bdev_writecache_create` and `bdev_writecache_set_options` share. (A
/// macro, not `#[serde(flatten)]`: serde cannot combine flatten with
/// `deny_unknown_fields`, and unknown parameters must be refused.)
macro_rules! with_tunables {
    ($(#[$attr:meta])* pub struct $name:ident { $($own:tt)* }) => {
        $(#[$attr])*
        #[derive(Debug, Clone, Default, Deserialize, Serialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($own)*
            /// Writeback starts at this percentage of used blocks (default 50).
            #[serde(default)]
            pub high_watermark: Option<u32>,
            /// Writeback stops below this percentage (default 45).
            #[serde(default)]
            pub low_watermark: Option<u32>,
            /// Most blocks under writeback at once (default unlimited).
            #[serde(default)]
            pub writeback_jobs: Option<u64>,
            /// Commit after this many written blocks (default 64 pmem / 65536 ssd).
            #[serde(default)]
            pub autocommit_blocks: Option<u64>,
            /// Commit at least this often, ms (default 1000).
            #[serde(default)]
            pub autocommit_time_ms: Option<u64>,
            /// Write back with FUA (default true; false = write + flush).
            #[serde(default)]
            pub fua: Option<bool>,
            /// Stop caching new writes and drain everything.
            #[serde(default)]
            pub cleaner: Option<bool>,
            /// Write back blocks older than this, ms (0 = off).
            #[serde(default)]
            pub max_age_ms: Option<u64>,
            /// Pause writeback while writes went around the cache in the
            /// last N ms (default 3000).
            #[serde(default)]
            pub pause_writeback_ms: Option<u64>,
            /// Our extension: how long (ms of backoff in total) a writeback
            /// keeps retrying an origin error before the instance enters
            /// the error state. Steps double from 10 ms, capped at 1 s
            /// (default 310: five retries, 10 to 160 ms). An origin that
            /// may be away for a while (NVMe/TCP with
            /// `fast_io_fail_timeout_sec`) wants more than its outage.
            #[serde(default)]
            pub writeback_retry_ms: Option<u64>,
        }
    };
}

with_tunables! {
    /// `bdev_writecache_create` parameters.
    pub struct CreateOpts {
        /// Name of the writecache bdev.
        pub name: String,
        /// The origin (slow) bdev.
        pub base_bdev: String,
        /// The cache (fast) bdev.
        pub cache_bdev: String,
        /// pmem (default) or ssd.
        #[serde(default)]
        pub mode: Option<Mode>,
        /// Cache block size: 512..4096, power of two (default 4096).
        #[serde(default)]
        pub block_size: Option<u32>,
        /// Where the cache starts on the cache device, in 512-byte sectors.
        #[serde(default)]
        pub start_sector: Option<u64>,
        /// UUID of the writecache bdev; random when absent (saved by
        /// save_config so it survives restarts).
        #[serde(default)]
        pub uuid: Option<uuid::Uuid>,
    }
}

impl CreateOpts {
    /// Minimal options.
    pub fn new(name: &str, origin: &str, cache: &str) -> Self {
        CreateOpts {
            name: name.into(),
            base_bdev: origin.into(),
            cache_bdev: cache.into(),
            ..Default::default()
        }
    }
}

/// Runtime-tunable settings of a running instance.
#[derive(Debug)]
pub struct Tunables {
    pub(crate) high_watermark: AtomicU32,
    pub(crate) low_watermark: AtomicU32,
    pub(crate) writeback_jobs: AtomicU64,
    pub(crate) autocommit_blocks: AtomicU64,
    pub(crate) autocommit_time_ms: AtomicU64,
    pub(crate) fua: AtomicBool,
    pub(crate) cleaner: AtomicBool,
    pub(crate) max_age_ms: AtomicU64,
    pub(crate) pause_writeback_ms: AtomicU64,
    pub(crate) writeback_retry_ms: AtomicU64,
}

/// Default `writeback_retry_ms`: five retries (10+20+40+80+160 ms).
pub const DEFAULT_WRITEBACK_RETRY_MS: u64 = 310;
/// The first retry's backoff.
const RETRY_FIRST_MS: u64 = 10;
/// The longest one backoff step.
const RETRY_STEP_CAP_MS: u64 = 1000;

/// The backoff before retry `attempt` (1-based) of a failed writeback
/// when the steps so far, this one included, stay within `budget_ms`;
/// `None`: give up. Steps double from 10 ms and stop growing at 1 s.
pub(crate) fn writeback_retry_delay(attempt: u32, budget_ms: u64) -> Option<std::time::Duration> {
    let step = |k: u32| {
        RETRY_FIRST_MS
            .saturating_mul(1u64.checked_shl(k.saturating_sub(1)).unwrap_or(u64::MAX))
            .min(RETRY_STEP_CAP_MS)
    };
    let mut total = 0u64;
    for k in 1..=attempt {
        total = total.saturating_add(step(k));
        if total > budget_ms {
            return None;
        }
    }
    Some(std::time::Duration::from_millis(step(attempt.max(1))))
}

with_tunables! {
    /// `bdev_writecache_set_options` parameters (all optional).
    pub struct SetOpts {
        /// Instance name.
        pub name: String,
    }
}

/// "Unlimited" writeback jobs.
pub const UNLIMITED: u64 = u64::MAX;

impl Tunables {
    pub(crate) fn from_create(o: &CreateOpts, mode: Mode) -> Result<Tunables, String> {
        let t = Tunables {
            high_watermark: AtomicU32::new(o.high_watermark.unwrap_or(50)),
            low_watermark: AtomicU32::new(o.low_watermark.unwrap_or(45)),
            writeback_jobs: AtomicU64::new(o.writeback_jobs.unwrap_or(UNLIMITED)),
            autocommit_blocks: AtomicU64::new(o.autocommit_blocks.unwrap_or(match mode {
                Mode::Pmem => 64,
                Mode::Ssd => 65536,
            })),
            autocommit_time_ms: AtomicU64::new(o.autocommit_time_ms.unwrap_or(1000)),
            // dm-writecache: FUA writeback in pmem mode, write + FLUSH in ssd mode.
            fua: AtomicBool::new(o.fua.unwrap_or(mode == Mode::Pmem)),
            cleaner: AtomicBool::new(o.cleaner.unwrap_or(false)),
            max_age_ms: AtomicU64::new(o.max_age_ms.unwrap_or(0)),
            pause_writeback_ms: AtomicU64::new(o.pause_writeback_ms.unwrap_or(3000)),
            writeback_retry_ms: AtomicU64::new(
                o.writeback_retry_ms.unwrap_or(DEFAULT_WRITEBACK_RETRY_MS),
            ),
        };
        t.validate()?;
        Ok(t)
    }

    fn validate(&self) -> Result<(), String> {
        let hi = self.high_watermark.load(Relaxed);
        let lo = self.low_watermark.load(Relaxed);
        if hi > 100 {
            return Err(format!("high_watermark {hi} must be 0..100"));
        }
        if lo > 100 {
            return Err(format!("low_watermark {lo} must be 0..100"));
        }
        if lo > hi {
            return Err(format!("low_watermark {lo} is above high_watermark {hi}"));
        }
        if self.writeback_jobs.load(Relaxed) == 0 {
            return Err("writeback_jobs must be at least 1".into());
        }
        if self.autocommit_blocks.load(Relaxed) == 0 {
            return Err("autocommit_blocks must be at least 1".into());
        }
        if self.autocommit_time_ms.load(Relaxed) == 0 {
            return Err("autocommit_time_ms must be at least 1".into());
        }
        Ok(())
    }

    /// Applies a `set_options` request atomically: validated as a whole
    /// first, so a bad value changes nothing.
    pub(crate) fn apply(&self, s: &SetOpts) -> Result<(), String> {
        let hi = s
            .high_watermark
            .unwrap_or(self.high_watermark.load(Relaxed));
        let lo = s.low_watermark.unwrap_or(self.low_watermark.load(Relaxed));
        let probe = Tunables {
            high_watermark: AtomicU32::new(hi),
            low_watermark: AtomicU32::new(lo),
            writeback_jobs: AtomicU64::new(
                s.writeback_jobs
                    .unwrap_or(self.writeback_jobs.load(Relaxed)),
            ),
            autocommit_blocks: AtomicU64::new(
                s.autocommit_blocks
                    .unwrap_or(self.autocommit_blocks.load(Relaxed)),
            ),
            autocommit_time_ms: AtomicU64::new(
                s.autocommit_time_ms
                    .unwrap_or(self.autocommit_time_ms.load(Relaxed)),
            ),
            fua: AtomicBool::new(s.fua.unwrap_or(self.fua.load(Relaxed))),
            cleaner: AtomicBool::new(s.cleaner.unwrap_or(self.cleaner.load(Relaxed))),
            max_age_ms: AtomicU64::new(s.max_age_ms.unwrap_or(self.max_age_ms.load(Relaxed))),
            pause_writeback_ms: AtomicU64::new(
                s.pause_writeback_ms
                    .unwrap_or(self.pause_writeback_ms.load(Relaxed)),
            ),
            writeback_retry_ms: AtomicU64::new(
                s.writeback_retry_ms
                    .unwrap_or(self.writeback_retry_ms.load(Relaxed)),
            ),
        };
        probe.validate()?;
        self.high_watermark.store(hi, Relaxed);
        self.low_watermark.store(lo, Relaxed);
        self.writeback_jobs
            .store(probe.writeback_jobs.load(Relaxed), Relaxed);
        self.autocommit_blocks
            .store(probe.autocommit_blocks.load(Relaxed), Relaxed);
        self.autocommit_time_ms
            .store(probe.autocommit_time_ms.load(Relaxed), Relaxed);
        self.fua.store(probe.fua.load(Relaxed), Relaxed);
        self.cleaner.store(probe.cleaner.load(Relaxed), Relaxed);
        self.max_age_ms
            .store(probe.max_age_ms.load(Relaxed), Relaxed);
        self.pause_writeback_ms
            .store(probe.pause_writeback_ms.load(Relaxed), Relaxed);
        self.writeback_retry_ms
            .store(probe.writeback_retry_ms.load(Relaxed), Relaxed);
        Ok(())
    }

    /// The settings as JSON (for `bdev_get_bdevs` and `save_config`).
    pub fn to_json(&self) -> serde_json::Value {
        let jobs = self.writeback_jobs.load(Relaxed);
        serde_json::json!({
            "high_watermark": self.high_watermark.load(Relaxed),
            "low_watermark": self.low_watermark.load(Relaxed),
            "writeback_jobs": if jobs == UNLIMITED { serde_json::Value::Null } else { jobs.into() },
            "autocommit_blocks": self.autocommit_blocks.load(Relaxed),
            "autocommit_time_ms": self.autocommit_time_ms.load(Relaxed),
            "fua": self.fua.load(Relaxed),
            "cleaner": self.cleaner.load(Relaxed),
            "max_age_ms": self.max_age_ms.load(Relaxed),
            "pause_writeback_ms": self.pause_writeback_ms.load(Relaxed),
            "writeback_retry_ms": self.writeback_retry_ms.load(Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn default_retry_budget_is_five_retries_of_10_to_160_ms() {
        let ms = |a| writeback_retry_delay(a, DEFAULT_WRITEBACK_RETRY_MS);
        let got: Vec<_> = (1..=6).map(ms).collect();
        let want: Vec<Option<Duration>> = [10, 20, 40, 80, 160]
            .iter()
            .map(|&m| Some(Duration::from_millis(m)))
            .chain([None])
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn retry_steps_cap_at_one_second_and_the_budget_bounds_the_total() {
        // 10+20+...+640 = 1270 ms in 7 steps, then 1 s steps.
        assert_eq!(
            writeback_retry_delay(8, 10_000),
            Some(Duration::from_millis(1000))
        );
        assert_eq!(
            writeback_retry_delay(40, u64::MAX),
            Some(Duration::from_millis(1000))
        );
        let mut total = 0;
        let mut a = 1;
        while let Some(d) = writeback_retry_delay(a, 10_000) {
            total += d.as_millis() as u64;
            a += 1;
        }
        assert!(total <= 10_000 && total > 9_000, "{total}");
        assert_eq!(writeback_retry_delay(1, 0), None, "0: no retry");
    }
}
