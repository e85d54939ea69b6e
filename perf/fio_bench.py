#!/usr/bin/env python3
"""fio (Debian's, ioengine=nbd) through writecache_tgt's NBD export: the
bdevperf suite's workload matrix (perf/bench.py) on a writecache and on a
malloc bdev exported side by side by one target, reported as ratios
measured in the same run.

Called by perf/fio.sh (which builds, makes the temp dirs and cleans up);
run that, not this. The job files are perf/fio/*.fio; this script sets
their variables (NBD_URI, QD, SIZE, RUNTIME, RAMP) per cell. Results go to
<out>/fio.md and <out>/fio.json.
"""

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (shared helpers: pmem_size, median_cell, formatting, machine_info)

HERE = os.path.dirname(os.path.abspath(__file__))
JOBS = os.path.join(HERE, "fio")
BS = 4096
DELAY_US = bench.DELAY_US

WORKLOADS = [
    # key, job file, title
    ("randwrite", "randwrite-4k.fio", "4 KiB random write"),
    ("randread_hit", "randread-4k.fio", "4 KiB random read, cache hits"),
    ("randread_miss", "randread-4k.fio", "4 KiB random read, cache misses"),
    ("write128k", "write-128k.fio", "128 KiB sequential write"),
    ("randrw", "randrw-4k-70.fio", "4 KiB random 70% read / 30% write"),
]
WL = {w[0]: w for w in WORKLOADS}
EXPORTS = [("malloc", "malloc"), ("wc", "writecache")]

MODES = {
    # runs, seconds per cell, ramp seconds, queue depths, MiB per export
    "full": (3, 3.0, 1.0, "1 8 32 128", 512),
    "quick": (1, 1.0, 0.25, "1 32", 128),
    "smoke": (1, 0.3, 0.0, "8", 32),
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] fio: {msg}", file=sys.stderr, flush=True)


def _die_with_parent():
    """preexec_fn: the target gets SIGKILL if this script dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Target(bench.RpcProcess):
    """A writecache_tgt process and a JSON-RPC client to it."""

    def __init__(self, binary, tmp, extra_args):
        sock = os.path.join(tmp, "spdk.sock")
        cmd = [binary, "-r", sock, "--log-level", "ERROR", *extra_args]
        super().__init__("writecache_tgt", cmd, sock, os.path.join(tmp, "tgt.log"), 60,
                         preexec_fn=_die_with_parent)

    def close(self):
        super().close(timeout=60)


def fio(a, export, job, qd, secs=None, ramp=None):
    """Runs one job file on one export; a cell (totals of reads and writes,
    the worse direction's latency percentiles) or None."""
    env = dict(os.environ,
               NBD_URI=f"nbd+unix:///{export}?socket={a.nbd_sock}",
               QD=str(qd), SIZE=f"{a.size_mib}m",
               RUNTIME=f"{int(round((secs if secs is not None else a.secs) * 1000))}ms",
               RAMP=f"{int(round((ramp if ramp is not None else a.ramp) * 1000))}ms")
    out = os.path.join(a.tmp, "fio.json")
    budget = (secs or a.secs) + (ramp or a.ramp) + 120
    try:
        p = subprocess.run(["fio", "--output-format=json", f"--output={out}",
                            os.path.join(JOBS, job)],
                           env=env, capture_output=True, text=True, timeout=budget)
        with open(out) as f:
            text = f.read()
        doc = json.loads(text[text.index("{"):])
    except (subprocess.SubprocessError, OSError, ValueError) as e:
        log(f"  {job} on {export} QD {qd}: {e}")
        return None
    if p.returncode != 0:
        log(f"  {job} on {export} QD {qd}: fio exited {p.returncode}: {p.stderr[-500:]}")
        return None
    j = doc["jobs"][0]
    if j.get("error"):
        log(f"  {job} on {export} QD {qd}: fio error {j['error']}")
        return None
    dirs = [j[d] for d in ("read", "write") if j[d]["total_ios"] > 0]
    if not dirs:
        return None

    def pct(d, k):
        return d["clat_ns"].get("percentile", {}).get(k, 0) / 1000.0

    return {
        "iops": sum(d["iops"] for d in dirs),
        "mibps": sum(d["bw"] for d in dirs) / 1024.0,
        "p50_us": max(pct(d, "50.000000") for d in dirs),
        "p99_us": max(pct(d, "99.000000") for d in dirs),
        "read_iops": j["read"]["iops"],
        "write_iops": j["write"]["iops"],
    }


def setup(t, a):
    nb = a.size_mib * (1 << 20) // BS
    t.call("bdev_malloc_create", {"name": "Malloc0", "num_blocks": nb, "block_size": BS})
    t.call("bdev_uring_create", {"name": "Origin0", "filename": a.origin_file, "block_size": BS})
    t.call("bdev_delay_create", {"name": "Delay0", "base_bdev_name": "Origin0",
                                 "avg_read_latency": DELAY_US[0], "p99_read_latency": DELAY_US[1],
                                 "avg_write_latency": DELAY_US[0],
                                 "p99_write_latency": DELAY_US[1]})
    # The cache holds the whole export plus room for superseded blocks;
    # watermarks at 100%: writeback never starts (writecache until it fills).
    t.call("bdev_pmem_create", {"name": "Cache0", "filename": a.cache_file,
                                "size": bench.pmem_size(nb + 16384)})
    t.call("bdev_writecache_create", {"name": "WC0", "base_bdev": "Delay0",
                                      "cache_bdev": "Cache0", "high_watermark": 100,
                                      "low_watermark": 100})
    t.call("nbd_server_start", {"listen": a.nbd_sock})
    t.call("nbd_export_create", {"bdev_name": "Malloc0", "export_name": "malloc"})
    t.call("nbd_export_create", {"bdev_name": "WC0", "export_name": "wc"})


def read_stats(t):
    s = t.call("bdev_writecache_get_stats", {"name": "WC0"})
    s = s[0] if isinstance(s, list) else s
    return s.get("read_blocks", 0), s.get("read_hits", 0)


def one_run(a, raw, run):
    if os.path.exists(a.cache_file):
        os.unlink(a.cache_file)
    t = Target(a.tgt, a.tmp, a.tgt_args)
    try:
        setup(t, a)

        def cell(exp, wkey, qd, also=()):
            c = fio(a, exp, WL[wkey][1], qd)
            for k in (wkey, *also):
                raw["matrix"].setdefault(f"{exp}|{k}|{qd}", []).append(c)
            if c:
                log(f"  {wkey:14} {exp:6} QD {qd:3}: {c['iops']:10,.0f} IOPS "
                    f"{c['mibps']:8,.1f} MiB/s p99 {c['p99_us']:.0f} us")
            else:
                log(f"  {wkey:14} {exp:6} QD {qd:3}: FAILED")

        def prewrite(exp):
            # Not time-based: the whole SIZE range once.
            if fio(a, exp, "prewrite.fio", 32) is None:
                raw["notes"].append(f"run {run + 1}: pre-write of {exp} failed")

        prewrite("malloc")  # fault the memory in first
        b0 = read_stats(t)
        for q in a.qds:  # nothing is cached yet: every read misses
            cell("wc", "randread_miss", q)
        b1 = read_stats(t)
        for wkey in ("randwrite", "write128k"):
            for q in a.qds:
                for exp, _ in EXPORTS:
                    cell(exp, wkey, q)
        prewrite("wc")  # now every block of the range is cached
        b2 = read_stats(t)
        for q in a.qds:
            cell("malloc", "randread_hit", q, also=("randread_miss",))
            cell("wc", "randread_hit", q)
        b3 = read_stats(t)
        for q in a.qds:
            for exp, _ in EXPORTS:
                cell(exp, "randrw", q)

        def hit_pct(x, y):
            blocks = y[0] - x[0]
            return 100.0 * (y[1] - x[1]) / blocks if blocks else None

        raw["hits"].append({"miss_phase_hit_pct": hit_pct(b0, b1),
                            "hit_phase_hit_pct": hit_pct(b2, b3)})
    finally:
        t.close()


def write_report(a, raw, med, path):
    info = raw["info"]
    L = []
    w = L.append

    def g(exp, wkey, q, k="iops"):
        c = med.get(f"{exp}|{wkey}|{q}")
        return c.get(k) if c else None

    hits = [h for h in raw["hits"] if h]
    miss_hit = [h["miss_phase_hit_pct"] for h in hits if h["miss_phase_hit_pct"] is not None]
    hit_hit = [h["hit_phase_hit_pct"] for h in hits if h["hit_phase_hit_pct"] is not None]
    w(f"# fio through the NBD export: writecache vs malloc ({a.mode} mode)")
    w("")
    w(f"Machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB RAM, "
      f"Linux {info['kernel']}. Date: {info['date']}. Commit: {info['commit']}. "
      f"{raw['fio_version']}. Time: {raw['elapsed_s'] / 60:.1f} min.")
    w("")
    w("## Method")
    w("")
    w(f"* `perf/fio.sh{'' if a.mode == 'full' else ' --' + a.mode}`: Debian's fio, "
      "`ioengine=nbd` (libnbd, one connection per job), job files `perf/fio/*.fio`, "
      f"against one `writecache_tgt` ({' '.join(a.tgt_args)}) that exports a **malloc** bdev "
      "and a **writecache** side by side over its NBD server (Unix socket); the two are "
      "measured alternately, cell by cell, so they share the machine's conditions.")
    w(f"* Each export: {a.size_mib} MiB, 4 KiB blocks; fio works on that whole range "
      f"(`size`), {a.secs:g} s per cell after {a.ramp:g} s of ramp; queue depths "
      f"{', '.join(map(str, a.qds))}; each cell is the median of {a.runs} run(s) "
      "(a fresh target and a fresh cache per run).")
    w("* writecache: pmem mode, cache = `bdev_pmem` on a file in "
      f"`{os.path.dirname(a.tmp)}` holding the whole export (high watermark 100%: "
      "writeback never starts, i.e. writecache until the cache fills), over an origin "
      f"= `bdev_uring` (O_DIRECT) on a written file in `{os.path.dirname(a.origin_dir)}`, "
      f"wrapped in `bdev_delay` (+{DELAY_US[0]} µs average / {DELAY_US[1]} µs p99), as "
      "perf/run.sh's writecache.")
    w("* Order in each run: malloc pre-write (faults its memory in); random reads on the "
      "empty cache = **misses** (served by the delayed origin); random writes; 128 KiB "
      "sequential writes; a sequential pre-write of the whole range; random reads = "
      "**hits**; the 70/30 mix (its reads hit). malloc has no cache: its random reads are "
      "measured once and shown in both read tables.")
    def span(v):
        if not v:
            return "–"
        lo, hi = bench.fmt_f(min(v)), bench.fmt_f(max(v))
        return lo if lo == hi else f"{lo}–{hi}"

    if miss_hit or hit_hit:
        w("* Checked with `bdev_writecache_get_stats` (read_hits / read_blocks of the "
          f"writecache): miss phase {span(miss_hit)}% hits, hit phase {span(hit_hit)}% hits.")
    w("* IOPS and MiB/s add reads and writes; p50/p99 are fio's completion latency (µs) "
      "of the worse direction. The NBD round trip (socket, one client thread) is in "
      "every figure: these are far below the in-process bdevperf numbers.")
    w("")
    w("## Headline: writecache/malloc (IOPS), same run")
    w("")
    w("| workload | " + " | ".join(f"QD {q}" for q in a.qds) + " |")
    w("|---|" + "---:|" * len(a.qds))
    for wkey, _, title in WORKLOADS:
        w(f"| {title} | " + " | ".join(
            bench.ratio(g("wc", wkey, q), g("malloc", wkey, q)) for q in a.qds) + " |")
    w("")
    for wkey, _, title in WORKLOADS:
        w(f"## {title}")
        w("")
        w("| QD | malloc IOPS | malloc MiB/s | malloc p50 µs | malloc p99 µs | writecache IOPS | "
          "writecache MiB/s | writecache p50 µs | writecache p99 µs | wc/malloc |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for q in a.qds:
            row = f"| {q} |"
            for exp, _ in EXPORTS:
                if med.get(f"{exp}|{wkey}|{q}"):
                    row += (f" {bench.fmt_i(g(exp, wkey, q))} | {bench.fmt_f(g(exp, wkey, q, 'mibps'))} |"
                            f" {bench.fmt_f(g(exp, wkey, q, 'p50_us'))} |"
                            f" {bench.fmt_f(g(exp, wkey, q, 'p99_us'))} |")
                else:
                    row += " fail | | | |"
            row += f" {bench.ratio(g('wc', wkey, q), g('malloc', wkey, q))} |"
            w(row)
        w("")
    bench.finish_report(L, raw["notes"], path)


def main():
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=sorted(MODES), default="full")
    ap.add_argument("--tgt", required=True, help="writecache_tgt binary")
    ap.add_argument("--tmp", required=True, help="temp dir in RAM (cache file, sockets)")
    ap.add_argument("--origin-dir", required=True, help="temp dir on disk (origin file)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    runs, secs, ramp, qds, size = MODES[a.mode]
    env = os.environ
    a.runs = int(env.get("RUNS", runs))
    a.secs = float(env.get("SECS", secs))
    a.ramp = float(env.get("RAMP", ramp))
    a.qds = [int(x) for x in env.get("QDS", qds).split()]
    a.size_mib = int(env.get("SIZE_MIB", size))
    a.tgt_args = env.get("TGT_ARGS", "-m 0x1" + (" --idle sleep" if a.mode == "smoke" else "")
                         ).split()
    a.origin_file = os.path.join(a.origin_dir, "origin.img")
    a.cache_file = os.path.join(a.tmp, "cache.pmem")
    a.nbd_sock = os.path.join(a.tmp, "nbd.sock")
    if a.runs < 1 or a.secs <= 0 or a.ramp < 0 or not a.qds or a.size_mib < 1:
        sys.exit("fio_bench: RUNS, SECS, QDS and SIZE_MIB must be positive (RAMP ≥ 0)")
    cells = (len(WORKLOADS) * 2 - 1) * len(a.qds)
    est = a.runs * (cells * (a.secs + a.ramp + 0.3) + 2 * a.size_mib / 200 + 3)
    log(f"{a.mode}: {len(WORKLOADS)} workloads x QD {a.qds} x 2 exports, {a.runs} run(s) of "
        f"{a.secs:g} s (+{a.ramp:g} s ramp) per cell; estimated {est / 60:.1f} min")
    t0 = time.time()
    raw = {"info": bench.machine_info(), "notes": [], "matrix": {}, "hits": [],
           "fio_version": subprocess.run(["fio", "--version"], capture_output=True,
                                         text=True).stdout.strip(),
           "settings": {"mode": a.mode, "runs": a.runs, "secs": a.secs, "ramp": a.ramp,
                        "qds": a.qds, "size_mib": a.size_mib, "delay_us": DELAY_US,
                        "tgt_args": a.tgt_args}}
    # Written end to end: O_DIRECT reads of unwritten extents never reach the disk.
    subprocess.run(["dd", "if=/dev/zero", f"of={a.origin_file}", "bs=1M",
                    f"count={a.size_mib}", "oflag=direct", "status=none"], check=True)
    for run in range(a.runs):
        log(f"run {run + 1}/{a.runs}")
        try:
            one_run(a, raw, run)
        except (RuntimeError, bench.RpcError, OSError) as e:
            log(f"run {run + 1} failed: {e}")
            raw["notes"].append(f"run {run + 1} failed: {e}")
    raw["elapsed_s"] = time.time() - t0
    med = {k: bench.median_cell(v) for k, v in raw["matrix"].items()}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "fio.json"), "w") as f:
        json.dump({"raw": raw, "median": med}, f, indent=1)
    write_report(a, raw, med, os.path.join(a.out, "fio.md"))
    log(f"done in {raw['elapsed_s'] / 60:.1f} min; report: {os.path.join(a.out, 'fio.md')}")
    failed = [k for k, v in med.items() if v is None]
    if failed or not med:
        log(f"cells without a result: {', '.join(sorted(failed)) or 'all'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
