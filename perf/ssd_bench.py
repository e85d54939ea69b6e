#!/usr/bin/env python3
"""ssd-mode benchmark (issue 13), with our bdevperf, one short run per cell.

4 KiB random writes at QD 1/32/128 on 1 and 2 reactors against:
  malloc        the cache bdev alone (RAM)
  shm           the cache bdev alone (uring over a file in /dev/shm)
  origin        the origin alone (uring, O_DIRECT, over a file on disk)
  ssd-malloc    writecache in ssd mode, cache on malloc, over the origin
  ssd-shm       writecache in ssd mode, cache on the /dev/shm file
Each writecache cell starts from a blank cache (burst: watermarks at 95/90,
so no writeback runs). Then the steady state (a small cache kept at the
high watermark while writeback runs; the second of two runs) against the
origin alone, and the recovery time of a 4 Mi-block ssd-mode cache
(wc_recovery). Writes a markdown report.

Usage: cargo build --release -p wc-perf
       perf/ssd_bench.py --bin target/release [--secs 1] [--cache-mib 2048] [--out FILE]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (Bdevperf, summarize)

BS = 4096


def sparse(path, mib):
    with open(path, "wb") as f:
        f.truncate(mib << 20)


def cfg_for(name, a, tmp, origin_file):
    origin = {"method": "bdev_uring_create",
              "params": {"name": "Origin0", "filename": origin_file, "block_size": BS}}
    shm = os.path.join(a.shm, "wc-ssd-bench-cache.img")
    malloc = {"method": "bdev_malloc_create",
              "params": {"name": "Cache0", "num_blocks": (a.cache_mib << 20) // BS,
                         "block_size": BS}}
    uring = {"method": "bdev_uring_create",
             "params": {"name": "Cache0", "filename": shm, "block_size": BS}}

    def wc(extra):
        p = {"name": "WC0", "base_bdev": "Origin0", "cache_bdev": "Cache0", "mode": "ssd"}
        p.update(extra)
        return {"method": "bdev_writecache_create", "params": p}

    burst = {"high_watermark": 95, "low_watermark": 90}
    if name in ("shm", "ssd-shm", "steady"):
        sparse(shm, a.steady_cache_mib if name == "steady" else a.cache_mib)
    return {
        "malloc": ([malloc], "Cache0"),
        "shm": ([uring], "Cache0"),
        "origin": ([origin], "Origin0"),
        "ssd-malloc": ([origin, malloc, wc(burst)], "WC0"),
        "ssd-shm": ([origin, uring, wc(burst)], "WC0"),
        "steady": ([origin, uring, wc({})], "WC0"),
    }[name]


def run(a, tmp, origin_file, name, reactors, qd, secs, repeat=1):
    config, target = cfg_for(name, a, tmp, origin_file)
    mode = ["-m", "0x1"] if reactors == 1 else ["-m", "0x3", "-C"]
    bp = bench.Bdevperf(os.path.join(a.bin, "bdevperf"), tmp, f"{name}-{reactors}-{qd}",
                        config, mode, target)
    try:
        cell = None
        for _ in range(repeat):
            cell = bench.summarize(bp.perform("randwrite", BS, qd, secs))
        return cell
    finally:
        bp.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--secs", type=int, default=1)
    ap.add_argument("--qds", default="1 32 128")
    ap.add_argument("--reactors", default="1 2")
    # The cache must outlast a run: at 500k IOPS a 1 s run writes 2 GiB;
    # a cache that fills mid-run measures the writeback, not the burst.
    ap.add_argument("--cache-mib", type=int, default=2048)
    ap.add_argument("--origin-mib", type=int, default=8192)
    ap.add_argument("--steady-cache-mib", type=int, default=64)
    ap.add_argument("--steady-secs", type=int, default=5)
    ap.add_argument("--shm", default="/dev/shm")
    ap.add_argument("--origin-dir", default="/var/tmp")
    ap.add_argument("--out", default="perf/results/ssd.md")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="wc-ssd-bench.", dir=a.shm)
    odir = tempfile.mkdtemp(prefix="wc-ssd-bench-origin.", dir=a.origin_dir)
    origin_file = os.path.join(odir, "origin.img")
    sparse(origin_file, a.origin_mib)
    qds = [int(q) for q in a.qds.split()]
    res = {}
    try:
        for r in [int(x) for x in a.reactors.split()]:
            for q in qds:
                for name in ("malloc", "shm", "origin", "ssd-malloc", "ssd-shm"):
                    cell = run(a, tmp, origin_file, name, r, q, a.secs)
                    res[(name, r, q)] = cell
                    bench.log(f"{name} reactors {r} qd {q}: "
                              f"{cell['iops'] if cell else 'failed'}")
        steady = {}
        for name in ("origin", "steady"):
            steady[name] = run(a, tmp, origin_file, name, 1, 32, a.steady_secs, repeat=2)
            bench.log(f"steady {name}: {steady[name]['iops'] if steady[name] else 'failed'}")
        rec = subprocess.run([os.path.join(a.bin, "wc_recovery"), str(4 << 20), "512", a.shm,
                              "ssd"], capture_output=True, text=True, timeout=600)
        recovery = rec.stdout.strip() or rec.stderr.strip()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(odir, ignore_errors=True)
        try:
            os.remove(os.path.join(a.shm, "wc-ssd-bench-cache.img"))
        except OSError:
            pass

    def iops(n, r, q):
        c = res.get((n, r, q))
        return c["iops"] if c else None

    def ratio(x, y):
        return f"{x / y:.2f}" if x and y else "-"

    lines = ["# ssd mode: 4 KiB random writes (bdevperf, one run of "
             f"{a.secs} s per cell)", "",
             f"Cache {a.cache_mib} MiB (malloc, or uring over a file in {a.shm}); "
             f"origin: uring O_DIRECT over a {a.origin_mib} MiB file in {a.origin_dir}. "
             "writecache cells start from a blank cache with watermarks 95/90 (burst: "
             "no writeback). Machine: " + bench.machine_info().get("cpu", "?") + ".", "",
             "| reactors | QD | malloc | ssd-malloc | x cache | shm | ssd-shm | x cache "
             "| origin | ssd-malloc x origin | ssd-shm x origin |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [int(x) for x in a.reactors.split()]:
        for q in qds:
            m, sm = iops("malloc", r, q), iops("ssd-malloc", r, q)
            s, ss = iops("shm", r, q), iops("ssd-shm", r, q)
            o = iops("origin", r, q)
            lines.append(f"| {r} | {q} | {bench.fmt_i(m)} | {bench.fmt_i(sm)} | {ratio(sm, m)} "
                         f"| {bench.fmt_i(s)} | {bench.fmt_i(ss)} | {ratio(ss, s)} "
                         f"| {bench.fmt_i(o)} | {ratio(sm, o)} | {ratio(ss, o)} |")
    so, ss = steady.get("origin"), steady.get("steady")
    lines += ["", f"Steady state (1 reactor, QD 32, {a.steady_cache_mib} MiB ssd-mode cache "
              f"on {a.shm}, default watermarks, second of two {a.steady_secs} s runs): "
              f"writecache {bench.fmt_i(ss and ss['iops'])} IOPS vs origin alone "
              f"{bench.fmt_i(so and so['iops'])} IOPS: "
              f"{ratio(ss and ss['iops'], so and so['iops'])}x.", "",
              f"Recovery: `wc_recovery {4 << 20} 512 {a.shm} ssd`: {recovery}", ""]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
