//! Helpers shared by the initiator's test binaries (against the mock
//! target, and against our target through the fault proxy).

#![allow(dead_code)]

use std::time::{Duration, Instant};

use wc_bdev::testing::run_on;
use wc_bdev_nvme::{attach, AttachOpts};
use wc_reactor::Runtime;

/// Attaches from the main reactor of `rt`.
pub fn attach_on(rt: &Runtime, o: AttachOpts) -> Result<Vec<String>, wc_bdev::BdevError> {
    run_on(rt.main(), move || async move { attach(o).await })
}

/// Waits until `f` holds, failing the test after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
