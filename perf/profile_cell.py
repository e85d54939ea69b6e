#!/usr/bin/env python3
"""Profile one bdevperf cell (`perf record -g -e cpu-clock`) in the state
the matrix measures it in, and draw its flame graph.

Usage: perf/profile_cell.py WORKLOAD QD MODE OUT.svg [BIN]

  WORKLOAD  randwrite | randread_hit | write128k | randrw (perf/bench.py's)
  MODE      1r | 2r
  BIN       bdevperf binary (default target/release/bdevperf)
Environment: BDEV (wc | malloc, default wc), MIB (bdev size, default 256),
PRE (what runs before the cell: none | randwrite = 1 s of 4 KiB random
writes at QD 1, 32 and 128, the cells before write128k in the matrix, so
the cache holds every LBA and its free blocks are scattered | prewrite =
the whole range written sequentially; default: prewrite for read cells,
none otherwise), SECS (seconds recorded, default 2), NO_FLAME=1 (keep
the perf data, draw no flame graph).

Prints the cell's IOPS and the top symbols; keeps the perf data next to
OUT.svg (OUT.data). Needs `perf` and inferno (`inferno-collapse-perf`,
`inferno-flamegraph`: `cargo install inferno`).
"""

import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def main():
    if len(sys.argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    wk, qd, mode, svg = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binp = sys.argv[5] if len(sys.argv) > 5 else os.path.join(root, "target/release/bdevperf")
    bdev = os.environ.get("BDEV", "wc")
    mib = int(os.environ.get("MIB", 256))
    secs = float(os.environ.get("SECS", 2))
    pre = os.environ.get("PRE", "prewrite" if wk in ("randread_hit", "randrw") else "none")
    data = os.path.splitext(svg)[0] + ".data"
    a, tmp, od = bench.cell_scratch(mib, "wc-prof")
    cfgs = bench.configs(a)
    margs = dict((m[0], m[1]) for m in bench.MODES)[mode]
    target = {b[0]: b[1] for b in bench.BDEVS}[bdev]
    _, wl, size, mix, _ = bench.WL[wk]
    rec = None
    bp = bench.Bdevperf(binp, tmp, f"{bdev}-{mode}", cfgs[bdev], margs, target)
    try:
        if bdev == "malloc" or pre == "prewrite":
            bench.prewrite(bp, 1, mode, a.origin_blocks)
        if pre == "randwrite":
            for q in (1, 32, 128):
                bp.perform("randwrite", 4096, q, 1)
        bp.perform(wl, size, qd, 0.3, mix)  # warm: faults, first refills
        rec = subprocess.Popen(["perf", "record", "-g", "-e", "cpu-clock", "-F", "2999",
                                "-o", data, "-p", str(bp.proc.pid), "--",
                                "sleep", str(secs + 0.5)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.2)
        c = bench.summarize(bp.perform(wl, size, qd, secs, mix))
        rec.wait()
        rec = None
        print(f"{wk} qd{qd} {mode} {bdev} (pre {pre}): "
              f"{c['iops']:,.0f} IOPS" if c else "cell failed")
    finally:
        if rec is not None:
            rec.kill()
            rec.wait()
        bp.close()
        shutil.rmtree(tmp)
        shutil.rmtree(od)
    flame = not os.environ.get("NO_FLAME")
    if flame and not shutil.which("inferno-collapse-perf"):
        print("no flame graph: inferno is not installed (cargo install inferno); "
              f"the profile is in {data}", file=sys.stderr)
        flame = False
    if flame:
        script = subprocess.run(["perf", "script", "-i", data], capture_output=True, check=True)
        folded = subprocess.run(["inferno-collapse-perf"], input=script.stdout,
                                capture_output=True, check=True)
        with open(svg, "wb") as f:
            subprocess.run(["inferno-flamegraph", "--title", f"{wk} QD {qd} {mode} {bdev}"],
                           input=folded.stdout, stdout=f, check=True)
    top = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym",
                          "--stdio", "-g", "none"], capture_output=True, text=True)
    lines = [ln for ln in top.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    print("\n".join(lines[:15]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
