#!/usr/bin/env python3
"""fio in-process (our writecache_bdev engine) vs bdevperf vs fio over NBD:
the same bdevs (malloc, and a writecache as perf/run.sh builds it), the
same workloads (4 KiB random writes, 4 KiB random reads after a full
pre-write) and queue depths; RUNS rounds of every method in turn, each
cell reported as its median.

Called by perf/fio_engine.sh (which builds, makes the temp dirs and cleans
up); run that, not this. Job files: perf/fio/engine/*.fio (in-process),
perf/fio/*.fio (NBD). Results go to <out>/fio_engine.md and
<out>/fio_engine.json.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (configs, Bdevperf, formatting, machine_info)
import fio_bench  # noqa: E402  (the NBD target and its fio runner)

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE_JOBS = os.path.join(HERE, "fio", "engine")
BS = 4096
WORKLOADS = [
    # key, bdevperf workload, engine job file, NBD job file, title
    ("randwrite", "randwrite", "randwrite-4k.fio", "randwrite-4k.fio", "4 KiB random write"),
    ("randread", "randread", "randread-4k.fio", "randread-4k.fio",
     "4 KiB random read (after a full pre-write: writecache hits)"),
]
BDEVS = [("malloc", "Malloc0", "malloc"), ("wc", "WC0", "writecache")]
NBD_EXPORT = {"malloc": "malloc", "wc": "wc"}
METHODS = [("bdevperf", "bdevperf"), ("inproc", "fio in-process"), ("nbd", "fio over NBD")]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] fio_engine: {msg}", file=sys.stderr, flush=True)


def fresh_cache(a):
    if os.path.exists(a.cache_file):
        os.unlink(a.cache_file)


def run_bdevperf(a, cfgs, raw):
    for bkey, target, label in BDEVS:
        fresh_cache(a)
        log(f"bdevperf: {label}")
        bp = bench.Bdevperf(a.bdevperf, a.tmp, f"bp-{bkey}", cfgs[bkey], ["-m", "0x1", "--no-pin"],
                            target)
        try:
            if not bench.prewrite(bp, a.secs, "1r", a.nblocks):
                raw["notes"].append(f"bdevperf: pre-write of {label} did not cover the range")
            for wkey, wl, _, _, _ in WORKLOADS:
                for q in a.qds:
                    try:
                        c = bench.summarize(bp.perform(wl, BS, q, a.secs))
                    except (bench.RpcError, OSError) as e:
                        log(f"  {wkey} QD {q}: {e}")
                        c = None
                    record(raw, "bdevperf", bkey, wkey, q, c)
        finally:
            bp.close()


def engine_fio(a, conf, bdev, job, qd):
    """One in-process fio run (pre-write job, then the measured job)."""
    env = dict(os.environ, LD_PRELOAD=a.engine, CONF=conf, BDEV=bdev, QD=str(qd),
               SIZE=f"{a.size_mib}m", RUNTIME=f"{int(a.secs * 1000)}ms",
               RAMP=f"{int(a.ramp * 1000)}ms")
    out = os.path.join(a.tmp, "engine.json")
    try:
        p = subprocess.run(["fio", "--output-format=json", f"--output={out}",
                            os.path.join(ENGINE_JOBS, job)],
                           env=env, capture_output=True, text=True, cwd=a.tmp,
                           timeout=a.secs + a.ramp + 120)
        with open(out) as f:
            text = f.read()
        doc = json.loads(text[text.index("{"):])
    except (subprocess.SubprocessError, OSError, ValueError) as e:
        log(f"  {job} on {bdev} QD {qd}: {e}")
        return None
    if p.returncode != 0:
        log(f"  {job} on {bdev} QD {qd}: fio exited {p.returncode}: {p.stderr[-500:]}")
        return None
    measured = job[:-len(".fio")]
    jobs = [j for j in doc["jobs"] if j["jobname"] == measured]
    if len(jobs) != 1 or jobs[0].get("error"):
        log(f"  {job} on {bdev} QD {qd}: no result or fio error")
        return None
    j = jobs[0]
    d = j["write"] if j["write"]["total_ios"] > 0 else j["read"]
    pct = d["clat_ns"].get("percentile", {})
    return {"iops": d["iops"], "p50_us": pct.get("50.000000", 0) / 1000.0,
            "p99_us": pct.get("99.000000", 0) / 1000.0}


def run_inproc(a, cfgs, raw):
    for bkey, target, label in BDEVS:
        fresh_cache(a)
        conf = os.path.join(a.tmp, f"engine-{bkey}.json")
        with open(conf, "w") as f:
            json.dump({"subsystems": [{"subsystem": "bdev", "config": cfgs[bkey]}]}, f)
        log(f"fio in-process: {label}")
        for wkey, _, job, _, _ in WORKLOADS:
            for q in a.qds:
                record(raw, "inproc", bkey, wkey, q, engine_fio(a, conf, target, job, q))


def run_nbd(a, raw):
    fresh_cache(a)
    log("fio over NBD: malloc and writecache exported by one writecache_tgt -m 0x1")
    t = fio_bench.Target(a.tgt, a.tmp, ["-m", "0x1", "--no-pin"])
    try:
        fio_bench.setup(t, a)
        for bkey, _, label in BDEVS:
            if fio_bench.fio(a, NBD_EXPORT[bkey], "prewrite.fio", 32) is None:
                raw["notes"].append(f"NBD: pre-write of {label} failed")
        for bkey, _, _ in BDEVS:
            for wkey, _, _, job, _ in WORKLOADS:
                for q in a.qds:
                    record(raw, "nbd", bkey, wkey, q, fio_bench.fio(a, NBD_EXPORT[bkey], job, q))
    finally:
        t.close()


def run_overhead(a, cfgs, raw):
    """Per-I/O costs at QD 1 on a null bdev (no data copied): fio alone
    (its null engine), fio in-process, bdevperf."""
    log("per-I/O cost at QD 1: fio's null engine, in-process and bdevperf on a null bdev")
    out = os.path.join(a.tmp, "null.json")
    try:
        subprocess.run(["fio", "--name=null", "--ioengine=null", "--thread=1", "--rw=randwrite",
                        "--bs=4k", f"--size={a.size_mib}m", "--iodepth=1", "--time_based=1",
                        f"--runtime={int(a.secs * 1000)}ms", "--norandommap=1",
                        "--output-format=json", f"--output={out}"],
                       capture_output=True, timeout=a.secs + 60, check=True, cwd=a.tmp)
        with open(out) as f:
            text = f.read()
        j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
        record(raw, "fio_null", "null", "randwrite", 1, {"iops": j["iops"], "p99_us": 0})
    except (subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
        log(f"  fio null engine: {e}")
    conf = os.path.join(a.tmp, "engine-null.json")
    with open(conf, "w") as f:
        json.dump({"subsystems": [{"subsystem": "bdev", "config": cfgs["null"]}]}, f)
    record(raw, "inproc", "null", "randwrite", 1,
           engine_fio(a, conf, "Null0", "randwrite-4k.fio", 1))
    bp = bench.Bdevperf(a.bdevperf, a.tmp, "bp-null", cfgs["null"], ["-m", "0x1", "--no-pin"],
                        "Null0")
    try:
        record(raw, "bdevperf", "null", "randwrite", 1,
               bench.summarize(bp.perform("randwrite", BS, 1, a.secs)))
    finally:
        bp.close()


def record(raw, method, bkey, wkey, q, cell):
    raw["samples"].setdefault(f"{method}|{bkey}|{wkey}|{q}", []).append(cell)
    if cell:
        log(f"  {method:8} {bkey:6} {wkey:9} QD {q:3}: {cell['iops']:12,.0f} IOPS "
            f"p99 {cell['p99_us']:.1f} us")
    else:
        log(f"  {method:8} {bkey:6} {wkey:9} QD {q:3}: FAILED")


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def medians(samples):
    """Each cell's median over the rounds that produced it (None if none
    did); a failed round is left out and noted."""
    cells, notes = {}, []
    for key, runs in samples.items():
        ok = [c for c in runs if c]
        if len(ok) < len(runs):
            notes.append(f"{key}: {len(runs) - len(ok)} of {len(runs)} rounds failed")
        cells[key] = {k: median([c[k] for c in ok]) for k in ok[0]} if ok else None
    return cells, notes


def write_report(a, raw, path):
    info = raw["info"]
    cells = raw["cells"]

    def g(m, b, w, q, k="iops"):
        c = cells.get(f"{m}|{b}|{w}|{q}")
        return c.get(k) if c else None

    L = []
    w = L.append
    w("# fio in-process vs bdevperf vs fio over NBD")
    w("")
    w(f"Machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB RAM, "
      f"Linux {info['kernel']}. Date: {info['date']}. Commit: {info['commit']}. "
      f"{raw['fio_version']}. Time: {raw['elapsed_s'] / 60:.1f} min.")
    w("")
    if a.runs == 1:
        w("**One run, on a shared and noisy machine** (other engineers compile on its cores "
          "at the same time): the ratios are indicative, single samples, not medians.")
    else:
        w(f"**Medians of {a.runs} rounds** (each round runs every method and cell in turn, "
          "so a slow spell of the machine hits all methods alike); every figure below is "
          "the median of its cell's rounds, ratios are ratios of those medians.")
    w("")
    w("## Method")
    w("")
    w("* `perf/fio_engine.sh`. Same bdevs for all three, from the same config entries as "
      f"perf/run.sh: **malloc** ({a.size_mib} MiB, 4 KiB blocks) and **writecache** (pmem "
      "cache file in RAM holding the whole range, watermarks 100%: no writeback; origin = "
      f"`bdev_uring` on a file + `bdev_delay` +{bench.DELAY_US[0]} µs). A fresh cache per "
      "method.")
    w("* Nothing is pinned (`--no-pin`; fio's threads float anyway): on this shared "
      "2-core machine a pinned reactor cannot leave a core someone's compile occupies.")
    w("* **bdevperf**: ours, `-m 0x1 --no-pin` (one busy-polling reactor), one job, "
      "`perform_tests` per cell, after a 128 KiB sequential pre-write of the whole range.")
    w("* **fio in-process**: Debian's fio with `LD_PRELOAD=target/fio/libwritecache_fio.so`, "
      "`ioengine=writecache_bdev`, `thread=1`, one job (`numjobs=1`) polling its own "
      "reactor (`interrupt_mode=0`: busy, as bdevperf); the framework's main reactor sleeps "
      "when idle. Job files `perf/fio/engine/*.fio`: each fio process first writes the "
      "whole range (128 KiB, QD 32), then runs the measured job (`stonewall`). One fio "
      "process per cell (a writecache recovers its cache file from the previous one).")
    w("* **fio over NBD**: Debian's fio, `ioengine=nbd` (libnbd), job files "
      "`perf/fio/*.fio` as perf/fio.sh, against `writecache_tgt -m 0x1 --no-pin` (busy) exporting "
      "both bdevs; pre-write of each export first.")
    w(f"* Each cell: {a.secs:g} s after {a.ramp:g} s of ramp (bdevperf: no ramp), queue "
      f"depths {', '.join(map(str, a.qds))}, `norandommap`. IOPS and fio's completion "
      "latency p99 (µs); bdevperf's p99 is from its histogram.")
    w("")
    w("## Headline: IOPS ratio to bdevperf (same bdev, same QD, same run)")
    w("")
    w("| bdev | workload | QD | in-process / bdevperf | NBD / bdevperf | in-process / NBD |")
    w("|---|---|---:|---:|---:|---:|")
    for b, _, bl in BDEVS:
        for wk, _, _, _, title in WORKLOADS:
            for q in a.qds:
                w(f"| {bl} | {title.split(' (')[0]} | {q} | "
                  f"{bench.ratio(g('inproc', b, wk, q), g('bdevperf', b, wk, q))} | "
                  f"{bench.ratio(g('nbd', b, wk, q), g('bdevperf', b, wk, q))} | "
                  f"{bench.ratio(g('inproc', b, wk, q), g('nbd', b, wk, q))} |")
    w("")
    w("Target (issue 16): fio in-process ≥ 0.7× bdevperf on the same bdev (SPDK's plugin: "
      "2.8 M vs 3.8 M IOPS on malloc, 0.74×).")
    w("")
    for wk, _, _, _, title in WORKLOADS:
        w(f"## {title}")
        w("")
        w("| bdev | QD | " + " | ".join(f"{ml} IOPS | {ml} p99 µs" for _, ml in METHODS) + " |")
        w("|---|---:|" + "---:|---:|" * len(METHODS))
        for b, _, bl in BDEVS:
            for q in a.qds:
                row = f"| {bl} | {q} |"
                for m, _ in METHODS:
                    if g(m, b, wk, q) is None:
                        row += " fail | |"
                    else:
                        row += f" {bench.fmt_i(g(m, b, wk, q))} | {bench.fmt_f(g(m, b, wk, q, 'p99_us'))} |"
                w(row)
        w("")
    fio_null = g("fio_null", "null", "randwrite", 1)
    inproc_null = g("inproc", "null", "randwrite", 1)
    bp_null = g("bdevperf", "null", "randwrite", 1)
    if fio_null and inproc_null and bp_null:
        def ns(iops):
            return 1e9 / iops
        w("## Where the time goes: QD 1, 4 KiB random writes on a null bdev (no data copied)")
        w("")
        w("| measured | IOPS | ns per I/O |")
        w("|---|---:|---:|")
        w(f"| fio alone (`ioengine=null`) | {bench.fmt_i(fio_null)} | {ns(fio_null):,.0f} |")
        w(f"| fio in-process on `Null0` | {bench.fmt_i(inproc_null)} | {ns(inproc_null):,.0f} |")
        w(f"| bdevperf on `Null0` | {bench.fmt_i(bp_null)} | {ns(bp_null):,.0f} |")
        w("")
        w(f"fio's own work per I/O (~{ns(fio_null):,.0f} ns: io_u handling, offsets, clocks, "
          f"statistics) plus the engine and the bdev layer (~{ns(inproc_null) - ns(fio_null):,.0f}"
          f" ns, of which bdevperf's whole loop is ~{ns(bp_null):,.0f} ns) is what the "
          "in-process column pays over bdevperf; on a bdev that copies 4 KiB (malloc) the "
          "fixed cost weighs less.")
        w("")
    bench.finish_report(L, raw["notes"], path)


def main():
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bin", required=True, help="directory with bdevperf and writecache_tgt")
    ap.add_argument("--engine", required=True, help="libwritecache_fio.so")
    ap.add_argument("--tmp", required=True, help="temp dir in RAM (cache file, sockets)")
    ap.add_argument("--origin-dir", required=True, help="temp dir on disk (origin file)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    env = os.environ
    a.secs = float(env.get("SECS", 2))
    a.ramp = float(env.get("RAMP", 0.5))
    a.qds = [int(x) for x in env.get("QDS", "1 32").split()]
    a.size_mib = int(env.get("SIZE_MIB", 128))
    a.runs = int(env.get("RUNS", 3))
    if a.secs <= 0 or a.ramp < 0 or not a.qds or a.size_mib < 1 or a.runs < 1:
        sys.exit("fio_engine_bench: SECS, QDS, SIZE_MIB and RUNS must be positive (RAMP ≥ 0)")
    a.bdevperf = os.path.join(a.bin, "bdevperf")
    a.tgt = os.path.join(a.bin, "writecache_tgt")
    a.nblocks = a.size_mib * (1 << 20) // BS
    a.origin_blocks = a.nblocks
    a.steady_blocks = a.nblocks
    a.origin_file = os.path.join(a.origin_dir, "origin.img")
    a.cache_file = os.path.join(a.tmp, "cache.pmem")
    a.nbd_sock = os.path.join(a.tmp, "nbd.sock")
    cfgs = bench.configs(a)
    t0 = time.time()
    raw = {"info": bench.machine_info(), "notes": [], "cells": {}, "samples": {},
           "fio_version": subprocess.run(["fio", "--version"], capture_output=True,
                                         text=True).stdout.strip(),
           "settings": {"secs": a.secs, "ramp": a.ramp, "qds": a.qds, "runs": a.runs,
                        "size_mib": a.size_mib, "delay_us": bench.DELAY_US}}
    subprocess.run(["dd", "if=/dev/zero", f"of={a.origin_file}", "bs=1M",
                    f"count={a.size_mib}", "oflag=direct", "status=none"], check=True)
    for r in range(a.runs):
        log(f"round {r + 1} of {a.runs}")
        for name, fn in (("bdevperf", lambda: run_bdevperf(a, cfgs, raw)),
                         ("in-process", lambda: run_inproc(a, cfgs, raw)),
                         ("NBD", lambda: run_nbd(a, raw)),
                         ("overhead", lambda: run_overhead(a, cfgs, raw))):
            try:
                fn()
            except (RuntimeError, bench.RpcError, OSError) as e:
                log(f"{name} failed: {e}")
                raw["notes"].append(f"round {r + 1}: {name} failed: {e}")
    raw["cells"], notes = medians(raw["samples"])
    raw["notes"].extend(notes)
    raw["elapsed_s"] = time.time() - t0
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "fio_engine.json"), "w") as f:
        json.dump(raw, f, indent=1)
    write_report(a, raw, os.path.join(a.out, "fio_engine.md"))
    log(f"done in {raw['elapsed_s'] / 60:.1f} min; report: {os.path.join(a.out, 'fio_engine.md')}")
    return 0 if raw["cells"] and all(raw["cells"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
