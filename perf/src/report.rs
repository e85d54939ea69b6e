//! SPDK bdevperf's output: the result table (final, and every `-S` period),
//! the running total line, the latency summary and the JSON results.
//!
//! Output goes to a `Write` and write errors are ignored (a closed stdout
//! must not take the benchmark down).

use std::collections::BTreeSet;
use std::io::Write;

use serde_json::{json, Value};

use crate::job::{bucket_floor_ns, percentile_us, JobResult, JobSpec, Progress, Workload};

/// SPDK's latency summary cutoffs (fractions).
const CUTOFFS: [f64; 15] = [
    0.01, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 0.99999, 0.999999,
    0.9999999,
];

/// One row of the table.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Row {
    pub runtime: f64,
    pub iops: f64,
    pub mibps: f64,
    pub fail_s: f64,
    pub avg: f64,
    pub min: f64,
    pub max: f64,
}

impl Row {
    /// The row of a job from its counters; `iops` replaces the average
    /// since the start (the `-P` moving average).
    pub fn from_progress(p: &Progress, io_size: u64, iops: Option<f64>) -> Row {
        let t = p.elapsed.max(1e-9);
        let iops = iops.unwrap_or(p.ios as f64 / t);
        Row {
            runtime: p.elapsed,
            iops,
            mibps: iops * io_size as f64 / (1024.0 * 1024.0),
            fail_s: p.failed as f64 / t,
            avg: if p.ios > 0 {
                p.lat_sum_ns as f64 / p.ios as f64 / 1000.0
            } else {
                0.0
            },
            min: p.lat_min_ns as f64 / 1000.0,
            max: p.lat_max_ns as f64 / 1000.0,
        }
    }
}

/// The `Total` line: rates add up over jobs, the average latency is
/// weighted by I/Os, min and max are over all jobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Total {
    pub iops: f64,
    pub mibps: f64,
    pub fail_s: f64,
    lat_sum_ns: f64,
    ios: u64,
    min: f64,
    max: f64,
}

impl Default for Total {
    fn default() -> Self {
        Total {
            iops: 0.0,
            mibps: 0.0,
            fail_s: 0.0,
            lat_sum_ns: 0.0,
            ios: 0,
            min: f64::MAX,
            max: 0.0,
        }
    }
}

impl Total {
    /// Adds a job's row (and its counters, for the latency average).
    pub fn add(&mut self, row: &Row, p: &Progress) {
        self.iops += row.iops;
        self.mibps += row.mibps;
        self.fail_s += row.fail_s;
        self.lat_sum_ns += p.lat_sum_ns as f64;
        self.ios += p.ios;
        if p.ios > 0 {
            self.min = self.min.min(row.min);
            self.max = self.max.max(row.max);
        }
    }

    /// Average latency over every completed I/O, µs.
    pub fn avg(&self) -> f64 {
        if self.ios > 0 {
            self.lat_sum_ns / self.ios as f64 / 1000.0
        } else {
            0.0
        }
    }

    /// Lowest job minimum, µs (0 without completions).
    pub fn min(&self) -> f64 {
        if self.min == f64::MAX {
            0.0
        } else {
            self.min
        }
    }

    /// Highest job maximum, µs.
    pub fn max(&self) -> f64 {
        self.max
    }
}

fn mask(core: u32) -> String {
    format!("0x{}", wc_reactor::CoreMask::from_cores([core]).to_hex())
}

/// `Latency(us)` over the columns, then the column names.
pub fn header(out: &mut dyn Write) {
    let _ = writeln!(out, "{:>107}", "Latency(us)");
    let _ = writeln!(
        out,
        " {:<28}: {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "Device Information",
        "runtime(s)",
        "IOPS",
        "MiB/s",
        "Fail/s",
        "TO/s",
        "Average",
        "min",
        "max"
    );
}

/// The `Job:` line of a job.
pub fn job_line(out: &mut dyn Write, s: &JobSpec) {
    let pct = if s.workload.mixed() {
        format!(", percentage: {}", s.read_pct)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        " Job: {} (Core Mask {}, workload: {}{}, depth: {}, IO size: {})",
        s.bdev,
        mask(s.core),
        s.workload.name(),
        pct,
        s.queue_depth,
        s.io_size
    );
}

/// The numbers row of a job.
pub fn row_line(out: &mut dyn Write, name: &str, w: &Row) {
    let _ = writeln!(
        out,
        "\t {:<20}: {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
        name, w.runtime, w.iops, w.mibps, w.fail_s, 0.0, w.avg, w.min, w.max
    );
}

/// The `=` rule and the `Total` line.
pub fn total_lines(out: &mut dyn Write, t: &Total) {
    let _ = writeln!(out, " {}", "=".repeat(115));
    let _ = writeln!(
        out,
        " {:<28}: {:>10} {:>10.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
        "Total",
        "",
        t.iops,
        t.mibps,
        t.fail_s,
        0.0,
        t.avg(),
        t.min(),
        t.max()
    );
}

/// The running total line printed every second without `-S` (ends in a
/// carriage return, so a terminal shows it in place, as SPDK's does).
pub fn running_total(out: &mut dyn Write, t: &Total) {
    let _ = write!(out, "{:12.2} IOPS, {:8.2} MiB/s\r", t.iops, t.mibps);
    let _ = out.flush();
}

/// Whether a job counts as failed (SPDK's `status: failed`).
/// The banner above one job's latency summary or histogram.
fn latency_job_header(out: &mut dyn Write, r: &JobResult) {
    let _ = writeln!(out, " =============================================");
    let _ = writeln!(
        out,
        " Job: {} (Core Mask {})",
        r.spec.bdev,
        mask(r.spec.core)
    );
}

pub fn failed(r: &JobResult) -> bool {
    r.error.is_some() || r.miscompares > 0 || (r.failed > 0 && !r.spec.continue_on_error)
}

/// The final table (and, with `-l`, a latency summary per job; `-ll` adds
/// the histogram). Returns the totals.
pub fn print_table(out: &mut dyn Write, results: &[JobResult], latency: u8) -> Total {
    let _ = writeln!(out);
    header(out);
    let mut total = Total::default();
    for r in results {
        let s = &r.spec;
        job_line(out, s);
        if let Some(e) = &r.error {
            let _ = writeln!(
                out,
                " Job: {} ended in about 0.00 seconds with error: {e}",
                s.bdev
            );
            continue;
        }
        if (r.failed > 0 && !s.continue_on_error) || r.miscompares > 0 {
            let _ = writeln!(
                out,
                " Job: {} ended in about {:.2} seconds with error",
                s.bdev, r.runtime
            );
        }
        if s.workload.verifies() {
            let _ = writeln!(
                out,
                "\t Verification LBA range: start 0x{:x} length 0x{:x}",
                s.range_start, s.range_len
            );
        }
        let p = r.progress();
        let w = Row::from_progress(&p, s.io_size, None);
        row_line(out, &s.bdev, &w);
        total.add(&w, &p);
    }
    total_lines(out, &total);
    if latency > 0 && total.ios > 0 {
        let _ = writeln!(out, "\n Latency summary");
        for r in results.iter().filter(|r| r.error.is_none()) {
            latency_job_header(out, r);
            if r.ios > 0 {
                for c in CUTOFFS {
                    let _ = writeln!(
                        out,
                        "{:9.5}% : {:9.3}us",
                        c * 100.0,
                        percentile_us(&r.hist, c * 100.0)
                    );
                }
            }
            let _ = writeln!(out);
        }
        if latency > 1 {
            let _ = writeln!(out, " Latency histogram");
            for r in results.iter().filter(|r| r.error.is_none()) {
                latency_job_header(out, r);
                let n: u64 = r.hist.iter().sum();
                let mut so_far = 0u64;
                for (b, &c) in r.hist.iter().enumerate() {
                    if c == 0 {
                        continue;
                    }
                    so_far += c;
                    let _ = writeln!(
                        out,
                        "{:9.3} - {:9.3}: {:9.4}%  ({:9})",
                        bucket_floor_ns(b) as f64 / 1000.0,
                        bucket_floor_ns(b + 1) as f64 / 1000.0,
                        so_far as f64 * 100.0 / n.max(1) as f64,
                        c
                    );
                }
                let _ = writeln!(out);
            }
        }
    }
    let _ = out.flush();
    total
}

/// The `perform_tests` reply / `--output-json` document. `core_count` is
/// the number of distinct cores the jobs ran on (SPDK's); `terminated`: a
/// shutdown signal stopped the run (every job's status says so, as SPDK's).
pub fn results_json(results: &[JobResult], terminated: bool) -> Value {
    let list: Vec<Value> = results
        .iter()
        .map(|r| {
            let s = &r.spec;
            let w = Row::from_progress(&r.progress(), s.io_size, None);
            let mut o = json!({
                "job": s.bdev,
                "core_mask": mask(s.core),
                "workload": s.workload.name(),
                "status": if terminated { "terminated" } else if failed(r) { "failed" } else { "finished" },
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
            if matches!(s.workload, Workload::Verify | Workload::Reset) {
                o["verify_range"] = json!({"start": s.range_start, "length": s.range_len});
            }
            if let Some(e) = &r.error {
                o["error"] = json!(e);
            }
            o
        })
        .collect();
    let cores: BTreeSet<u32> = results.iter().map(|r| r.spec.core).collect();
    json!({ "results": list, "core_count": cores.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: usize, core: u32) -> JobSpec {
        JobSpec {
            id,
            bdev: format!("Malloc{}", id / 2),
            reactor: core as usize,
            core,
            workload: Workload::RandWrite,
            read_pct: 0,
            queue_depth: 4,
            io_size: 4096,
            seconds: 1.0,
            range_start: 0,
            range_len: 1024,
            continue_on_error: false,
            seed: 1,
        }
    }

    fn result(id: usize, core: u32, ios: u64, lat_ns: u64, min: u64, max: u64) -> JobResult {
        JobResult {
            spec: spec(id, core),
            ios,
            failed: 0,
            miscompares: 0,
            runtime: 2.0,
            lat_sum_ns: ios as u128 * lat_ns as u128,
            lat_min_ns: min,
            lat_max_ns: max,
            hist: vec![0; crate::job::HIST_BUCKETS],
            error: None,
        }
    }

    #[test]
    fn totals_add_rates_and_weight_latency_by_ios() {
        // -C on two cores and two bdevs: four jobs.
        let rs = vec![
            result(0, 0, 2000, 1000, 500, 3000),
            result(1, 1, 6000, 3000, 700, 9000),
            result(2, 0, 0, 0, 0, 0),
            result(3, 1, 2000, 2000, 400, 2500),
        ];
        let mut out = Vec::new();
        let t = print_table(&mut out, &rs, 0);
        assert_eq!(t.iops, (2000.0 + 6000.0 + 0.0 + 2000.0) / 2.0);
        assert_eq!(t.mibps, t.iops * 4096.0 / 1048576.0);
        // (2000*1 + 6000*3 + 2000*2) / 10000 µs
        assert!((t.avg() - 2.4).abs() < 1e-9, "{}", t.avg());
        assert_eq!(t.min(), 0.4);
        assert_eq!(t.max(), 9.0);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches(" Job: Malloc").count(), 4);
        let total = text.lines().find(|l| l.starts_with(" Total")).unwrap();
        assert!(total.contains("5000.00"), "{total}");
        let j = results_json(&rs, false);
        assert_eq!(j["core_count"], 2);
        assert_eq!(j["results"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn running_total_line_is_spdks() {
        let mut t = Total::default();
        let p = Progress {
            ios: 1500,
            elapsed: 1.0,
            ..Progress::default()
        };
        t.add(&Row::from_progress(&p, 4096, None), &p);
        let mut out = Vec::new();
        running_total(&mut out, &t);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "     1500.00 IOPS,     5.86 MiB/s\r"
        );
    }
}
