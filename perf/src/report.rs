//! SPDK bdevperf's result table, latency summary and JSON results.

use serde_json::{json, Value};

use crate::job::{percentile_us, JobResult, HIST_BUCKETS};

struct Row {
    iops: f64,
    mibps: f64,
    fail_s: f64,
    avg: f64,
    min: f64,
    max: f64,
}

fn row(r: &JobResult) -> Row {
    let t = r.runtime.max(1e-9);
    let iops = r.ios as f64 / t;
    Row {
        iops,
        mibps: iops * r.spec.io_size as f64 / (1024.0 * 1024.0),
        fail_s: r.failed as f64 / t,
        avg: if r.ios > 0 {
            r.lat_sum_ns as f64 / r.ios as f64 / 1000.0
        } else {
            0.0
        },
        min: r.lat_min_ns as f64 / 1000.0,
        max: r.lat_max_ns as f64 / 1000.0,
    }
}

fn mask(core: u32) -> String {
    format!("0x{}", wc_reactor::CoreMask::from_cores([core]).to_hex())
}

/// Prints SPDK's table (and, with `-l`, a latency summary per job).
pub fn print_table(results: &[JobResult], latency: u8) {
    println!("{:>100}", "Latency(us)");
    println!(
        "{:<28}: {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
        " Device Information",
        "runtime(s)",
        "IOPS",
        "MiB/s",
        "Fail/s",
        "TO/s",
        "Average",
        "min",
        "max"
    );
    let (mut iops, mut mibps, mut fail) = (0.0, 0.0, 0.0);
    let (mut lat_sum, mut ios, mut min, mut max) = (0.0f64, 0u64, f64::MAX, 0.0f64);
    for r in results {
        let s = &r.spec;
        let pct = if s.workload.mixed() {
            format!(", percentage: {}", s.read_pct)
        } else {
            String::new()
        };
        println!(
            " Job: {} (Core Mask {}, workload: {}{}, depth: {}, IO size: {})",
            s.bdev,
            mask(s.core),
            s.workload.name(),
            pct,
            s.queue_depth,
            s.io_size
        );
        if let Some(e) = &r.error {
            println!(
                " Job: {} ended in about 0.00 seconds with error: {e}",
                s.bdev
            );
            continue;
        }
        if r.failed > 0 || r.miscompares > 0 {
            println!(
                " Job: {} ended in about {:.2} seconds with error",
                s.bdev, r.runtime
            );
        }
        if matches!(
            s.workload,
            crate::job::Workload::Verify | crate::job::Workload::Reset
        ) {
            println!(
                "\t Verification LBA range: start 0x{:x} length 0x{:x}",
                s.range_start, s.range_len
            );
        }
        let w = row(r);
        println!(
            "\t {:<20}: {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
            s.bdev, r.runtime, w.iops, w.mibps, w.fail_s, 0.0, w.avg, w.min, w.max
        );
        iops += w.iops;
        mibps += w.mibps;
        fail += w.fail_s;
        lat_sum += r.lat_sum_ns as f64;
        ios += r.ios;
        if r.ios > 0 {
            min = min.min(w.min);
            max = max.max(w.max);
        }
    }
    println!("{}", "=".repeat(115));
    let avg = if ios > 0 {
        lat_sum / ios as f64 / 1000.0
    } else {
        0.0
    };
    println!(
        "{:<28}: {:>10} {:>10.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
        " Total",
        "",
        iops,
        mibps,
        fail,
        0.0,
        avg,
        if min == f64::MAX { 0.0 } else { min },
        max
    );
    if latency > 0 {
        for r in results.iter().filter(|r| r.error.is_none()) {
            println!();
            println!(
                "Latency summary [us] for {} (core {}):",
                r.spec.bdev, r.spec.core
            );
            println!(
                "================================================================================="
            );
            for p in [1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 99.9, 99.99] {
                println!("{:>10.5}% : {:>12.3}us", p, percentile_us(&r.hist, p));
            }
            if latency > 1 {
                println!("Latency histogram [us]: bucket-floor -> count");
                for (b, n) in r.hist.iter().enumerate().take(HIST_BUCKETS) {
                    if *n > 0 {
                        println!(
                            "{:>12.3} : {n}",
                            crate::job::bucket_floor_ns(b) as f64 / 1000.0
                        );
                    }
                }
            }
        }
    }
}

/// The `perform_tests` reply / `--output-json` document.
pub fn results_json(results: &[JobResult], core_count: usize) -> Value {
    let list: Vec<Value> = results
        .iter()
        .map(|r| {
            let s = &r.spec;
            let w = row(r);
            let mut o = json!({
                "job": s.bdev,
                "core_mask": mask(s.core),
                "workload": s.workload.name(),
                "status": if r.error.is_some() || r.failed > 0 || r.miscompares > 0 { "failed" } else { "finished" },
                "queue_depth": s.queue_depth,
                "io_size": s.io_size,
                "runtime": r.runtime,
                "iops": w.iops,
                "mibps": w.mibps,
                "io_failed": r.failed,
                "io_timeout": 0,
                "avg_latency_us": w.avg,
                "min_latency_us": w.min,
                "max_latency_us": w.max,
                "miscompares": r.miscompares,
                "latency_percentiles_us": {
                    "p50": percentile_us(&r.hist, 50.0),
                    "p90": percentile_us(&r.hist, 90.0),
                    "p99": percentile_us(&r.hist, 99.0),
                    "p99_9": percentile_us(&r.hist, 99.9),
                },
            });
            if s.workload.mixed() {
                o["percentage"] = json!(s.read_pct);
            }
            if matches!(s.workload, crate::job::Workload::Verify | crate::job::Workload::Reset) {
                o["verify_range"] = json!({"start": s.range_start, "length": s.range_len});
            }
            if let Some(e) = &r.error {
                o["error"] = json!(e);
            }
            o
        })
        .collect();
    json!({ "results": list, "core_count": core_count })
}
