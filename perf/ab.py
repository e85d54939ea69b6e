#!/usr/bin/env python3
"""A/B of one matrix cell: the same bdevperf cell on several bdevs or
binaries, alternating process by process, median of the runs — ratios in
one run, which is what a shared, noisy machine allows.

Usage: perf/ab.py WORKLOAD QD MODE [RUNS] [SECS] [BDEVS]

  WORKLOAD  randwrite | randread_hit | randread_miss | write128k | randrw
            | steady (4 KiB random writes into a 64 MiB cache first filled
            to its watermark, writeback running; default BDEVS
            delay,wc_steady: ratios to the origin+delay)
  MODE      1r | 2r
  BDEVS     comma-separated, default malloc,wc; `wc:PATH` runs the wc
            cell with the bdevperf binary at PATH (e.g. a copy of the base
            build), so `malloc,wc:/tmp/bdevperf.base,wc` compares two builds
Environment: MIB (bdev size, default 256), BIN (default target/release/bdevperf),
STEADY_WARM (s of QD 32 writes filling the steady-state cache, default 2),
PRE_RANDWRITE (s of 4 KiB random writes at QD 32 on every bdev before the
cell, default 0: the matrix's state for write128k, whose cells follow the
random-write cells — with MIB=1024 3 s caches every LBA in blocks spread
over the whole cache, so the free blocks left are scattered).

Read cells pre-write the whole range first (hits); malloc is always
pre-written (faulted in). Prints the medians and every wc*/malloc ratio.
"""

import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def main():
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    wk, qd, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    secs = float(sys.argv[5]) if len(sys.argv) > 5 else 1
    steady = wk == "steady"
    base = "delay" if steady else "malloc"
    default = ["delay", "wc_steady"] if steady else ["malloc", "wc"]
    bdevs = sys.argv[6].split(",") if len(sys.argv) > 6 else default
    warm = float(os.environ.get("STEADY_WARM", 2))
    pre_rand = float(os.environ.get("PRE_RANDWRITE", 0))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binp = os.environ.get("BIN", os.path.join(root, "target/release/bdevperf"))
    mib = int(os.environ.get("MIB", 256))
    a, tmp, od = bench.cell_scratch(mib, "wc-ab", full_origin=steady)
    cfgs = bench.configs(a)
    margs = dict((m[0], m[1]) for m in bench.MODES)[mode]
    target = {b[0]: b[1] for b in bench.BDEVS}
    target["wc_steady"] = "WC0"
    _, wl, size, mix, _ = bench.WL["randwrite" if steady else wk]
    res = {b: [] for b in bdevs}
    p99 = {b: [] for b in bdevs}
    try:
        for r in range(runs):
            for b in bdevs:
                bd, _, exe = b.partition(":")
                if os.path.exists(a.cache_file):
                    os.unlink(a.cache_file)
                bp = bench.Bdevperf(exe or binp, tmp, f"{bd}-{mode}", cfgs[bd], margs,
                                    target[bd])
                try:
                    if bd == "malloc" or (bd == "wc" and wk in ("randread_hit", "randrw")):
                        bench.prewrite(bp, 1, mode, a.origin_blocks)
                    if pre_rand > 0 and bd != "wc_steady":
                        bp.perform("randwrite", 4096, 32, pre_rand)
                    if bd == "wc_steady":
                        bp.perform("randwrite", 4096, 32, warm)  # fill to the watermark
                    c = bench.summarize(bp.perform(wl, size, qd, secs, mix))
                    res[b].append(c["iops"] if c else 0)
                    p99[b].append(c["p99_us"] if c else 0)
                    if c:
                        bench.log(f"{b} run {r + 1}: {c['iops']:,.0f} IOPS, p50 "
                                  f"{c['p50_us']} us, p99 {c['p99_us']} us")
                finally:
                    bp.close()
    finally:
        shutil.rmtree(tmp)
        shutil.rmtree(od)
    med = {b: statistics.median(v) for b, v in res.items()}
    out = " ".join(f"{b}={med[b]:,.0f}" for b in bdevs)
    for k in bdevs:
        if k.startswith("wc") and med.get(base):
            out += f" {k}/{base}={med[k] / med[base]:.3f}"
    for k in bdevs:
        out += f" {k}.p99={statistics.median(p99[k]):.1f}us"
    print(f"{wk} qd{qd} {mode}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
