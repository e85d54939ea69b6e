//! A cheap monotonic tick counter (the TSC on x86_64) and its rate.
//!
//! Per-I/O latency accounting reads the clock twice per I/O, so it must cost
//! a few nanoseconds; `Instant::now()` costs ~20 ns through the vDSO.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Current tick count.
#[inline]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no preconditions; it is present on every x86_64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        epoch().elapsed().as_nanos() as u64
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Ticks per second, calibrated once (about 10 ms) on first use.
pub fn tick_rate() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let t0 = Instant::now();
            let c0 = ticks();
            std::thread::sleep(Duration::from_millis(10));
            let c1 = ticks();
            let ns = t0.elapsed().as_nanos().max(1) as u64;
            let rate = (c1.wrapping_sub(c0) as u128 * 1_000_000_000 / ns as u128) as u64;
            rate.max(1)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            1_000_000_000
        }
    })
}

/// Converts a tick delta to a duration.
pub fn ticks_to_duration(delta: u64) -> Duration {
    Duration::from_nanos((delta as u128 * 1_000_000_000 / tick_rate() as u128) as u64)
}

/// Converts a duration to ticks.
pub fn duration_to_ticks(d: Duration) -> u64 {
    (d.as_nanos() * tick_rate() as u128 / 1_000_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_advance_and_convert() {
        let a = ticks();
        std::thread::sleep(Duration::from_millis(2));
        let b = ticks();
        assert!(b > a);
        let d = ticks_to_duration(b - a);
        assert!(d >= Duration::from_millis(1), "{d:?}");
        let back = duration_to_ticks(Duration::from_millis(5));
        let again = ticks_to_duration(back);
        assert!((again.as_micros() as i64 - 5000).abs() < 50, "{again:?}");
    }
}
