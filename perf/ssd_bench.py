#!/usr/bin/env python3
"""ssd-mode benchmark (issue 13), with our bdevperf, short runs per cell.

4 KiB random writes at QD 1/32/128 on 1 and 2 reactors against:
  malloc        the cache bdev alone (RAM)
  shm           the cache bdev alone (uring over a file in /dev/shm)
  origin        the origin alone (uring, O_DIRECT, over a file on disk)
  ssd-malloc    writecache in ssd mode, cache on malloc, over the origin
  ssd-shm       writecache in ssd mode, cache on the /dev/shm file
Each cell is the median of --rounds rounds (a round runs every bdev in
turn, so a slow spell of the shared machine hits them alike). The origin
file is written once before the cells (--no-precondition: left as
fallocated). Each writecache cell starts from a blank cache
(burst: watermarks at 95/90, so no writeback runs). Then the steady
state (a small cache, on the /dev/shm file and on malloc, kept at the
high watermark while writeback runs; the second of two runs; medians of
--steady-rounds rounds) against the origin alone, on 1 and 2 reactors at
QD 32 and 128, and the recovery time of a 4 Mi-block ssd-mode cache
(wc_recovery). Writes a markdown report that ends with issue 13's
targets table (measured, met or not).

--ab BASE_BDEVPERF instead compares two builds in one run: the
ssd-malloc cells (and malloc alone) with BASE_BDEVPERF and with --bin's,
alternating process by process, median of --runs; prints the ratios.
With --steady-only, the steady-state cells (cache on malloc, and the
origin alone) instead.

Usage: cargo build --release -p wc-perf
       perf/ssd_bench.py --bin target/release [--secs 0.5] [--cache-mib 4096] [--out FILE]
       perf/ssd_bench.py --bin target/release --ab /tmp/bdevperf.base [--runs 3]
       perf/ssd_bench.py --bin target/release --steady-only   (the steady cells alone)
       perf/ssd_bench.py --bin target/release --ab /tmp/bdevperf.base --steady-only
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (Bdevperf, summarize)

BS = 4096


def sparse(path, mib):
    """A cache file of `mib` MiB with its tmpfs pages allocated up front, so
    ssd mode's first-pass writes into it pay no page allocation that the
    cache bdev alone (measured in its second pass) does not pay either."""
    with open(path, "wb") as f:
        f.truncate(mib << 20)
        os.posix_fallocate(f.fileno(), 0, mib << 20)


def precondition(path, mib):
    """Writes the whole origin file once (1 MiB O_DIRECT writes), as a disk
    is preconditioned before it is measured: a file that is only
    fallocated has unwritten extents, whose first write costs ext4 a
    conversion, so a cell's rate otherwise depends on how much of the file
    the cells before it happened to write (origin 1r QD 128 moved from
    ~125 k to ~111 k IOPS as the file filled)."""
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}",
                    "oflag=direct", "conv=notrunc", "status=none"], check=True)


def cfg_for(name, a, tmp, origin_file):
    origin = {"method": "bdev_uring_create",
              "params": {"name": "Origin0", "filename": origin_file, "block_size": BS}}
    shm = os.path.join(a.shm, "wc-ssd-bench-cache.img")
    def malloc_of(mib):
        return {"method": "bdev_malloc_create",
                "params": {"name": "Cache0", "num_blocks": (mib << 20) // BS, "block_size": BS}}
    malloc = malloc_of(a.cache_mib)
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
        "steady-malloc": ([origin, malloc_of(a.steady_cache_mib), wc({})], "WC0"),
    }[name]


# The cache bdevs alone are measured in their second pass, with their
# memory faulted in (as SPDK's hugepage-backed malloc always is): a first
# pass over a fresh 4 GiB malloc bdev spends most of a short cell clearing
# pages. ssd mode is measured in one pass on a fresh cache (it writes
# fresh blocks, so it pays those faults as it goes: conservative).
ALONE_PASSES = {"malloc": 2, "shm": 2}


def run(a, tmp, origin_file, name, reactors, qd, secs, repeat=1, binary=None):
    config, target = cfg_for(name, a, tmp, origin_file)
    mode = ["-m", "0x1"] if reactors == 1 else ["-m", "0x3", "-C"]
    bp = bench.Bdevperf(binary or os.path.join(a.bin, "bdevperf"), tmp,
                        f"{name}-{reactors}-{qd}", config, mode, target)
    try:
        cell = None
        for _ in range(repeat):
            cell = bench.summarize(bp.perform("randwrite", BS, qd, secs))
        return cell
    finally:
        bp.close()


# Issue 13's targets: (what, measured ratio or seconds, goal, met).
def targets(res, iops, steady, recovery_s, reactors, qds):
    def worst(num, den):
        r = [iops(num, x, q) / iops(den, x, q) for x in reactors for q in qds
             if iops(num, x, q) and iops(den, x, q)]
        return min(r) if r else None

    def steady_worst(name):
        r = [steady[(name, x, q)]["iops"] / steady[("origin", x, q)]["iops"]
             for (n, x, q) in steady if n == name
             if steady[(n, x, q)] and steady.get(("origin", x, q))]
        return min(r) if r else None

    rows = [
        ("ssd mode on malloc vs malloc alone (worst cell)", worst("ssd-malloc", "malloc"), 0.7),
        ("ssd mode on /dev/shm uring vs that bdev alone (worst cell)",
         worst("ssd-shm", "shm"), 0.7),
        ("burst, ssd mode on malloc vs origin (worst cell)", worst("ssd-malloc", "origin"), 5.0),
        ("burst, ssd mode on /dev/shm uring vs origin (worst cell)",
         worst("ssd-shm", "origin"), 5.0),
        ("steady state with writeback vs origin, cache on /dev/shm uring (worst cell)",
         steady_worst("steady"), 1.0),
        ("steady state with writeback vs origin, cache on malloc (worst cell)",
         steady_worst("steady-malloc"), 1.0),
    ]
    out = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for what, v, goal in rows:
        met = "–" if v is None else ("yes" if v >= goal else "**no**")
        out.append(f"| {what} | {'–' if v is None else f'{v:.2f}x'} | >= {goal}x | {met} |")
    met = "–" if recovery_s is None else ("yes" if recovery_s < 2.0 else "**no**")
    out.append(f"| recovery of a 4 Mi-block ssd cache | "
               f"{'–' if recovery_s is None else f'{recovery_s:.3f} s'} | < 2 s | {met} |")
    return out


def rounds_of(a, tmp, origin_file, rounds, qds, names, secs, repeat, label=""):
    """Runs every (reactors, QD, bdev) cell once per round, the bdevs in
    turn, and returns each cell's medians (`bench.median_cell`)."""
    runs = {}
    for _ in range(rounds):
        for r in [int(x) for x in a.reactors.split()]:
            for q in qds:
                for name in names:
                    cell = run(a, tmp, origin_file, name, r, q, secs, repeat=repeat(name))
                    runs.setdefault((name, r, q), []).append(cell)
                    bench.log(f"{label}{name} reactors {r} qd {q}: "
                              f"{cell['iops'] if cell else 'failed'}")
    return {k: bench.median_cell(v) for k, v in runs.items()}


# Queue depths of the steady-state cells.
STEADY_QDS = (32, 128)


def steady_table(a, steady):
    """The steady-state cells: writecache (ssd mode, cache on the /dev/shm
    file and on malloc) vs the origin alone, IOPS, foreground p99, ratio."""
    def c(n, r, q, k="iops"):
        x = steady.get((n, r, q))
        return x[k] if x else None
    out = [f"Steady state ({a.steady_cache_mib} MiB ssd-mode cache, default watermarks; "
           f"each cell the second of two {a.steady_secs} s runs, median of "
           f"{a.steady_rounds} rounds that run the three in turn; origin file "
           f"{'as fallocated' if a.no_precondition else 'preconditioned (written once)'}; "
           "p99 of the foreground writes):", "",
           "| reactors | QD | origin | wc, cache on shm | x origin | p99 µs | "
           "wc, cache on malloc | x origin | p99 µs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in [int(x) for x in a.reactors.split()]:
        for q in STEADY_QDS:
            o, s, m = c("origin", r, q), c("steady", r, q), c("steady-malloc", r, q)

            def x(n):
                return f"{n / o:.2f}" if n and o else "-"

            def p(n):
                v = c(n, r, q, "p99_us")
                return f"{v:,.0f}" if v else "-"
            out.append(f"| {r} | {q} | {bench.fmt_i(o)} | {bench.fmt_i(s)} | {x(s)} | {p('steady')} "
                       f"| {bench.fmt_i(m)} | {x(m)} | {p('steady-malloc')} |")
    return out


def recovery_seconds(text):
    """The recovery time wc_recovery prints ("recovery of N committed blocks: 0.525s")."""
    m = re.search(r"recovery of \d+ committed blocks: ([0-9.]+)s", text)
    return float(m.group(1)) if m else None


def ab(a, tmp, origin_file):
    """Base build vs this build, alternating process by process: the
    ssd-malloc burst cells against malloc alone, or (--steady-only) the
    steady-state cells (cache on malloc) against the origin alone."""
    base, new = a.ab, os.path.join(a.bin, "bdevperf")
    if a.steady_only:
        ref, name, qds, secs, repeat = "origin", "steady-malloc", STEADY_QDS, a.steady_secs, 2
    else:
        ref, name, secs = "malloc", "ssd-malloc", a.secs
        qds, repeat = [int(q) for q in a.qds.split()], None
    lines = [f"| reactors | QD | {ref} | {name} base | {name} new | base x {ref} "
             f"| new x {ref} | new x base |", "|---|---|---|---|---|---|---|---|"]
    for r in [int(x) for x in a.reactors.split()]:
        for q in qds:
            got = {"ref": [], "base": [], "new": []}
            for _ in range(a.runs):
                for key, cell_name, binary in (("ref", ref, new), ("base", name, base),
                                               ("new", name, new)):
                    cell = run(a, tmp, origin_file, cell_name, r, q, secs, binary=binary,
                               repeat=repeat or ALONE_PASSES.get(cell_name, 1))
                    if cell:
                        got[key].append(cell["iops"])
            med = {k: statistics.median(v) if v else None for k, v in got.items()}
            bench.log(f"ab reactors {r} qd {q}: {got}")

            def x(n, d):
                return f"{n / d:.2f}" if n and d else "-"
            lines.append(f"| {r} | {q} | {bench.fmt_i(med['ref'])} | {bench.fmt_i(med['base'])} "
                         f"| {bench.fmt_i(med['new'])} | {x(med['base'], med['ref'])} "
                         f"| {x(med['new'], med['ref'])} | {x(med['new'], med['base'])} |")
    print(f"A/B, 4 KiB randwrite, medians of {a.runs} runs of {secs} s, base {base} "
          f"vs new {new}:\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--secs", type=float, default=0.5)
    ap.add_argument("--qds", default="1 32 128")
    ap.add_argument("--reactors", default="1 2")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the burst cells (each round runs every bdev in turn; "
                         "the table gives each cell's median)")
    # The cache must outlast a run: at 1M IOPS a 0.5 s run writes 2 GiB
    # (most of it new blocks: the origin has 2 Mi of them); a cache that
    # reaches its high watermark mid-run measures the writeback, not the
    # burst (a 2 GiB cache capped ssd mode near 600k IOPS).
    ap.add_argument("--cache-mib", type=int, default=4096)
    ap.add_argument("--origin-mib", type=int, default=8192)
    ap.add_argument("--steady-cache-mib", type=int, default=64)
    ap.add_argument("--steady-secs", type=int, default=5)
    ap.add_argument("--steady-rounds", type=int, default=3,
                    help="rounds of the steady cells (each round runs origin and both "
                         "caches in turn; the table gives each cell's median)")
    ap.add_argument("--no-precondition", action="store_true",
                    help="measure on the origin file as fallocated (unwritten extents)")
    ap.add_argument("--shm", default="/dev/shm")
    ap.add_argument("--origin-dir", default="/var/tmp")
    ap.add_argument("--out", default="perf/results/ssd.md")
    ap.add_argument("--ab", metavar="BASE_BDEVPERF",
                    help="compare the ssd-malloc cells of this bdevperf binary with --bin's")
    ap.add_argument("--runs", type=int, default=3, help="runs per A/B cell (median)")
    ap.add_argument("--steady-only", action="store_true", help="run the steady-state cells alone")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="wc-ssd-bench.", dir=a.shm)
    odir = tempfile.mkdtemp(prefix="wc-ssd-bench-origin.", dir=a.origin_dir)
    origin_file = os.path.join(odir, "origin.img")
    sparse(origin_file, a.origin_mib)
    if not a.no_precondition and (a.steady_only or not a.ab):
        bench.log(f"preconditioning the origin file ({a.origin_mib} MiB)")
        precondition(origin_file, a.origin_mib)
    qds = [int(q) for q in a.qds.split()]
    res = {}
    if a.ab:
        try:
            return ab(a, tmp, origin_file)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(odir, ignore_errors=True)
    try:
        res = rounds_of(a, tmp, origin_file, 0 if a.steady_only else a.rounds, qds,
                        ("malloc", "shm", "origin", "ssd-malloc", "ssd-shm"), a.secs,
                        lambda name: ALONE_PASSES.get(name, 1))
        steady = rounds_of(a, tmp, origin_file, a.steady_rounds, STEADY_QDS,
                           ("origin", "steady", "steady-malloc"), a.steady_secs,
                           lambda _: 2, "steady ")
        if a.steady_only:
            print("\n".join(steady_table(a, steady)))
            return
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

    lines = ["# ssd mode: 4 KiB random writes (bdevperf, median of "
             f"{a.rounds} rounds of {a.secs:g} s per cell)", "",
             f"Cache {a.cache_mib} MiB (malloc, or uring over a file in {a.shm}); "
             f"origin: uring O_DIRECT over a {a.origin_mib} MiB file in {a.origin_dir} "
             f"({'as fallocated' if a.no_precondition else 'written once before the cells'}). "
             "writecache cells start from a blank cache with watermarks 95/90 (burst: "
             "no writeback); the cache bdevs alone are measured in a second pass (memory "
             "faulted in). Machine: " + bench.machine_info().get("cpu", "?") + ".", "",
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
    lines += [""] + steady_table(a, steady)
    lines += ["", f"Recovery: `wc_recovery {4 << 20} 512 {a.shm} ssd`: {recovery}", "",
              "## Targets (issue 13)", ""]
    lines += targets(res, iops, steady, recovery_seconds(recovery),
                     [int(x) for x in a.reactors.split()], qds)
    lines += ["", "Burst on /dev/shm is bounded by that bdev alone: its ratio to the origin "
              "is the shm column over the origin column.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
