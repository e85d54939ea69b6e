#!/usr/bin/env python3
"""The benchmark matrix of issue 6, driven through bdevperf's `perform_tests`.

Called by perf/run.sh (which builds, makes the temp dirs and cleans up);
run that, not this. One bdevperf process (`-z`) per bdev configuration,
reactor layout and run: it creates the bdevs from a `--json` config, then
this script sends it one `perform_tests` per workload and queue depth, in an
order that sets the state each test needs (for instance: random reads that
miss the cache before anything is written, reads that hit after a
sequential pre-write of the whole range). Every cell is the median of the
runs. Results go to results.json (raw and medians) and report.md; plot.py
draws the PNGs from results.json.
"""

import atexit
import argparse
import datetime
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

# ---------------------------------------------------------------- settings

BS = 4096
WORKLOADS = [
    # key, bdevperf workload, io size, -M, title
    ("randwrite", "randwrite", 4096, None, "4 KiB random write"),
    ("randread_hit", "randread", 4096, None, "4 KiB random read, cache hits"),
    ("randread_miss", "randread", 4096, None, "4 KiB random read, cache misses"),
    ("write128k", "write", 131072, None, "128 KiB sequential write"),
    ("randrw", "randrw", 4096, 70, "4 KiB random 70% read / 30% write"),
]
WL = {w[0]: w for w in WORKLOADS}
BDEVS = [
    # key, target bdev, label
    ("null", "Null0", "null"),
    ("malloc", "Malloc0", "malloc"),
    ("uring", "Origin0", "origin (uring)"),
    ("delay", "Delay0", "origin+delay"),
    ("wc", "WC0", "writecache"),
]
LABEL = {b[0]: b[2] for b in BDEVS}
LABEL["wc_steady"] = "writecache steady state"
MODES = [
    # key, bdevperf args, label
    ("1r", ["-m", "0x1"], "1 reactor"),
    ("2r", ["-m", "0x3", "-C"], "2 reactors (-C)"),
]
MODE_LABEL = {m[0]: m[2] for m in MODES}
DELAY_US = (40, 80)  # avg, p99 for reads and writes


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- bdevperf


class RpcError(Exception):
    pass


class RpcProcess:
    """A process serving SPDK's JSON-RPC on a Unix socket, and a client to
    it (bdevperf -z here, writecache_tgt in fio_bench.py)."""

    def __init__(self, what, cmd, sock, logpath, start_timeout, preexec_fn=None):
        self.what, self.sock, self.logpath = what, sock, logpath
        if os.path.exists(sock):
            os.unlink(sock)
        self.logf = open(logpath, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     preexec_fn=preexec_fn)
        self.next_id = 1
        deadline = time.time() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RpcError(f"{what} exited at start (rc {self.proc.returncode}): "
                               + self.tail())
            if os.path.exists(sock):
                try:
                    self.call("rpc_get_methods", timeout=10)
                    break
                except (OSError, RpcError):
                    pass
            if time.time() > deadline:
                self.close()
                raise RpcError(f"{what} did not open its RPC socket in {start_timeout} s")
            time.sleep(0.05)

    def tail(self):
        try:
            with open(self.logpath) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def call(self, method, params=None, timeout=60):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.sock)
            req = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
            self.next_id += 1
            if params is not None:
                req["params"] = params
            s.sendall(json.dumps(req).encode())
            buf = b""
            dec = json.JSONDecoder()
            while True:
                d = s.recv(1 << 16)
                if not d:
                    raise RpcError(f"{method}: connection closed")
                buf += d
                try:
                    resp, _ = dec.raw_decode(buf.decode())
                    break
                except ValueError:
                    continue
        finally:
            s.close()
        if "error" in resp:
            raise RpcError(f"{method}: {resp['error']}")
        return resp.get("result")

    def close(self, timeout=90):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()


class Bdevperf(RpcProcess):
    """A `bdevperf -z` process and a JSON-RPC client to it."""

    def __init__(self, binary, tmp, name, config, mode_args, target):
        cfg = os.path.join(tmp, f"{name}.json")
        with open(cfg, "w") as f:
            json.dump({"subsystems": [{"subsystem": "bdev", "config": config}]}, f)
        sock = os.path.join(tmp, f"{name}.sock")
        cmd = [binary, "-z", "-r", sock, "--json", cfg, *mode_args,
               "-T", target, "--log-level", "ERROR"]
        super().__init__("bdevperf", cmd, sock, os.path.join(tmp, f"{name}.log"), 120)

    def perform(self, workload, io_size, qd, secs, mix=None):
        p = {"queue_depth": qd, "io_size": str(io_size), "time_in_sec": secs,
             "workload_type": workload}
        if mix is not None:
            p["rw_percentage"] = mix
        return self.call("perform_tests", p, timeout=secs + 120)


def summarize(res):
    """perform_tests result -> one cell: totals over jobs, worst job latency."""
    jobs = res.get("results", []) if res else []
    if not jobs or any(j.get("status") != "finished" for j in jobs):
        return None
    return {
        "iops": sum(j["iops"] for j in jobs),
        "mibps": sum(j["mibps"] for j in jobs),
        "avg_us": max(j["avg_latency_us"] for j in jobs),
        "p50_us": max(j["latency_percentiles_us"]["p50"] for j in jobs),
        "p99_us": max(j["latency_percentiles_us"]["p99"] for j in jobs),
        "p99_9_us": max(j["latency_percentiles_us"]["p99_9"] for j in jobs),
        "jobs": len(jobs),
    }


# ---------------------------------------------------------------- configs


def pmem_size(blocks):
    """Bytes of a pmem cache with `blocks` data blocks of 4 KiB (+ metadata)."""
    meta = -(-(64 + 16 * blocks) // BS) * BS
    return meta + blocks * BS


class CellArgs:
    """What `configs` reads: bdev sizes and the files behind them."""


_HUGE_MNT = []


def ram_parent():
    """Where cache files go: a tmpfs mounted with huge=always under
    /dev/shm (once per process, unmounted at exit), so the pmem cache file
    is mapped with 2 MiB pages as DAX pmem is (and as malloc's memory is);
    /dev/shm itself (4 KiB pages) when that is not possible or
    CACHE_PAGES=4k. CACHE_DIR overrides both (perf/common.sh's `ram_tmp`
    is the shell side)."""
    if os.environ.get("CACHE_DIR"):
        return os.environ["CACHE_DIR"]
    if _HUGE_MNT:
        return _HUGE_MNT[0]
    if os.environ.get("CACHE_PAGES", "huge") == "4k":
        return "/dev/shm"
    shmem = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
    if os.geteuid() == 0 and os.path.exists(shmem) and "[deny]" not in open(shmem).read():
        mnt = tempfile.mkdtemp(dir="/dev/shm", prefix="wc-huge.")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "huge=always,mode=0700", "tmpfs", mnt],
                           capture_output=True)
        if r.returncode == 0:
            _HUGE_MNT.append(mnt)
            atexit.register(_unmount_huge, mnt)
            return mnt
        os.rmdir(mnt)
    log("warning: no tmpfs with huge pages (needs root and THP): cache files on /dev/shm, "
        "4 KiB pages")
    return "/dev/shm"


def _unmount_huge(mnt):
    if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    try:
        os.rmdir(mnt)
    except OSError:
        pass


def cache_pages(path):
    """The page size a file under `path` is mapped with: '2 MiB' on a tmpfs
    mounted huge=always, else '4 KiB'."""
    path = os.path.realpath(path)
    best, opts = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mp = parts[1].replace("\\040", " ")
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, opts = mp, parts[3]
    return "2 MiB" if "huge=always" in opts.split(",") else "4 KiB"


def cell_scratch(mib, prefix, full_origin=False):
    """Scratch dirs (cache in RAM: `ram_parent`, origin in /var/tmp) and the
    `configs` arguments of one A/B or profile run over a `mib` MiB bdev.
    The origin file is sparse unless `full_origin` (written end to end, as
    perf/run.sh's origin: writes into holes would allocate extents and
    make the first cells slower). Returns (args, tmp, origin_dir)."""
    tmp = tempfile.mkdtemp(dir=ram_parent(), prefix=prefix + "-")
    od = tempfile.mkdtemp(dir="/var/tmp", prefix=prefix + "-o-")
    a = CellArgs()
    a.origin_blocks = mib * 256
    a.origin_file = os.path.join(od, "origin.img")
    a.cache_file = os.path.join(tmp, "cache.pmem")
    a.steady_blocks = 64 * 256
    with open(a.origin_file, "wb") as f:
        if full_origin:
            chunk = b"\0" * (1 << 20)
            for _ in range(mib):
                f.write(chunk)
        else:
            f.truncate(mib << 20)
    return a, tmp, od


def configs(a):
    nb = a.origin_blocks
    origin = {"method": "bdev_uring_create",
              "params": {"name": "Origin0", "filename": a.origin_file, "block_size": BS}}
    delay = {"method": "bdev_delay_create",
             "params": {"name": "Delay0", "base_bdev_name": "Origin0",
                        "avg_read_latency": DELAY_US[0], "p99_read_latency": DELAY_US[1],
                        "avg_write_latency": DELAY_US[0], "p99_write_latency": DELAY_US[1]}}

    def wc(cache_blocks, extra):
        return [origin, delay,
                {"method": "bdev_pmem_create",
                 "params": {"name": "Cache0", "filename": a.cache_file,
                            "size": pmem_size(cache_blocks)}},
                {"method": "bdev_writecache_create",
                 "params": {"name": "WC0", "base_bdev": "Delay0", "cache_bdev": "Cache0",
                            **extra}}]

    return {
        "null": [{"method": "bdev_null_create",
                  "params": {"name": "Null0", "num_blocks": nb, "block_size": BS}}],
        "malloc": [{"method": "bdev_malloc_create",
                    "params": {"name": "Malloc0", "num_blocks": nb, "block_size": BS}}],
        "uring": [origin],
        "delay": [origin, delay],
        # The cache holds the whole origin (+ slack for superseded blocks
        # awaiting commit) and writeback never starts: the write path alone,
        # i.e. writecache "until the cache fills".
        "wc": wc(nb + 16384, {"high_watermark": 100, "low_watermark": 100}),
        # Small cache, default watermarks (50/45): writes wait for writeback.
        # nofua: the origin is a file on a virtio disk without FUA, where a
        # FUA write is a write plus a cache flush; write + one FLUSH per
        # group of completed writebacks is cheaper ("some devices perform
        # better with fua, some with nofua": dm-writecache's docs).
        "wc_steady": wc(a.steady_blocks, {"fua": False}),
    }


# ---------------------------------------------------------------- matrix


def sequence(bdev, qds):
    """(workload key, qd) in run order for one process; 'prewrite' covers
    the whole range with 128 KiB sequential writes."""
    seq = []
    if bdev == "wc":
        seq += [("randread_miss", q) for q in qds]  # nothing cached yet
    elif bdev == "malloc":
        seq.append(("prewrite", 32))  # fault in the memory (SPDK's is pinned)
    seq += [("randwrite", q) for q in qds]
    seq += [("write128k", q) for q in qds]
    if bdev == "wc":
        seq.append(("prewrite", 32))  # every block cached: reads hit
    seq += [("randread_hit", q) for q in qds]
    seq += [("randrw", q) for q in qds]
    return seq


def prewrite(bp, secs, mode, nblocks):
    """Sequential 128 KiB writes until every job covered its slice."""
    jobs = 2 if mode == "2r" else 1
    slice_bytes = nblocks // jobs * BS
    t = secs
    for _ in range(4):
        res = bp.perform("write", 131072, 32, t)
        ok = all(j["status"] == "finished"
                 and j["iops"] * j["runtime"] * 131072 >= slice_bytes
                 for j in res["results"])
        if ok:
            return True
        t *= 3
    return False


def run_matrix(a, cfgs, raw):
    for run in range(a.runs):
        for mkey, margs, mlabel in MODES:
            for bkey, target, blabel in BDEVS:
                log(f"run {run + 1}/{a.runs} {mlabel}: {blabel}")
                if os.path.exists(a.cache_file):
                    os.unlink(a.cache_file)
                bp = Bdevperf(a.bdevperf, a.tmp, f"{bkey}-{mkey}", cfgs[bkey], margs, target)
                try:
                    if bkey == "wc" and "pmem_strategy" not in raw["info"]:
                        raw["info"]["pmem_strategy"] = pmem_strategy(bp)
                    for wkey, qd in sequence(bkey, a.qds):
                        if wkey == "prewrite":
                            if not prewrite(bp, a.secs, mkey, a.origin_blocks):
                                log(f"  pre-write of {blabel} did not cover the range")
                                raw["notes"].append(f"pre-write of {blabel} ({mlabel}) "
                                                    "did not cover the whole range")
                            continue
                        _, wl, size, mix, _ = WL[wkey]
                        try:
                            cell = summarize(bp.perform(wl, size, qd, a.secs, mix))
                        except (RpcError, OSError) as e:
                            log(f"  {wkey} qd {qd}: {e}")
                            cell = None
                        keys = [wkey]
                        if bkey != "wc" and wkey == "randread_hit":
                            keys.append("randread_miss")  # no cache: one measurement
                        for k in keys:
                            raw["matrix"].setdefault(f"{bkey}|{mkey}|{k}|{qd}", []).append(cell)
                        if cell:
                            log(f"  {wkey:14} qd {qd:3}: {cell['iops']:12,.0f} IOPS "
                                f"p99 {cell['p99_us']:.1f} us")
                        else:
                            log(f"  {wkey:14} qd {qd:3}: FAILED")
                finally:
                    bp.close()


def pmem_strategy(bp):
    try:
        for b in bp.call("bdev_get_bdevs", {"name": "Cache0"}) or []:
            ds = b.get("driver_specific", {})
            for v in ds.values():
                if isinstance(v, dict) and "strategy" in v:
                    return v["strategy"]
            if "strategy" in ds:
                return ds["strategy"]
    except (RpcError, OSError):
        pass
    return "unknown"


def wc_stats(bp):
    s = bp.call("bdev_writecache_get_stats", {"name": "WC0"})
    return s[0] if isinstance(s, list) else s


def run_steady(a, cfgs, raw):
    """Writecache with a small cache kept at the high watermark: fill it,
    then measure random writes while writeback runs."""
    for run in range(a.runs):
        for mkey, margs, mlabel in MODES:
            log(f"run {run + 1}/{a.runs} {mlabel}: writecache steady state")
            if os.path.exists(a.cache_file):
                os.unlink(a.cache_file)
            bp = Bdevperf(a.bdevperf, a.tmp, f"steady-{mkey}", cfgs["wc_steady"], margs, "WC0")
            try:
                bp.perform("randwrite", 4096, 32, a.steady_warm)  # fill to the watermark
                for qd in a.qds:
                    try:
                        s0 = wc_stats(bp)
                        t0 = time.time()
                        cell = summarize(bp.perform("randwrite", 4096, qd, a.steady_secs))
                        s1 = wc_stats(bp)
                        dt = time.time() - t0
                        if cell:
                            cell["writeback_blocks_per_s"] = (
                                s1["writeback_completed_blocks"]
                                - s0["writeback_completed_blocks"]) / dt
                            cell["writeback_ios_per_s"] = (
                                s1["writeback_ios"] - s0["writeback_ios"]) / dt
                            cell["used_pct"] = 100.0 * (s1["blocks"] - s1["free_blocks"]) \
                                / max(1, s1["blocks"])
                            cell["blocked_writes"] = (s1["writes_blocked_on_freelist"]
                                                      - s0["writes_blocked_on_freelist"])
                    except (RpcError, OSError, KeyError) as e:
                        log(f"  steady qd {qd}: {e}")
                        cell = None
                    raw["matrix"].setdefault(f"wc_steady|{mkey}|randwrite|{qd}", []).append(cell)
                    if cell:
                        log(f"  steady randwrite qd {qd:3}: {cell['iops']:12,.0f} IOPS, "
                            f"writeback {cell['writeback_blocks_per_s']:,.0f} blocks/s")
            finally:
                bp.close()


# ---------------------------------------------------------------- raw-copy limit

# The copy each workload's I/O does, as copy_limit measures it alone.
LIMIT_SIZES = (4096, 131072)


def run_limit(a, raw):
    """copy_limit: 4 KiB (and 128 KiB) non-temporal stores, memcpy in and
    memcpy out at random block offsets of a mapping of the cache's size (a
    file in the same tmpfs), one core, no framework."""
    mib = -(-pmem_size(a.origin_blocks + 16384) // (1 << 20))
    # The cache's mapping (a tmpfs file, 4 KiB pages), and for reference
    # anonymous memory in transparent huge pages (a malloc bdev's kind).
    kinds = [(size, []) for size in LIMIT_SIZES] + [(4096, ["--anon-huge"])]
    for run in range(a.runs):
        for size, extra in kinds:
            log(f"run {run + 1}/{a.runs} raw-copy limit, {size // 1024} KiB copies "
                f"{' '.join(extra)}")
            try:
                out = subprocess.run([a.copy_limit, "--dir", a.tmp, "--mib", str(mib),
                                      "--secs", f"{a.secs:g}", "--io-size", str(size),
                                      *extra],
                                     capture_output=True, text=True, timeout=120,
                                     check=True).stdout
            except (subprocess.SubprocessError, OSError) as e:
                log(f"  copy_limit failed: {e}")
                continue
            for m in re.finditer(r"copy_limit (\w+) (\d+): ([\d.]+) ops/s, ([\d.]+) GiB/s", out):
                mode, ops = m.group(1), float(m.group(3))
                cell = {"iops": ops, "mibps": ops * size / (1 << 20)}
                raw["matrix"].setdefault(f"limit|1r|{mode}|{size}", []).append(cell)
                log(f"  {mode:13} {size // 1024:4} KiB: {ops:12,.0f} copies/s")


def limit_iops(med, wkey, mkey):
    """The raw-copy limit of workload `wkey` in I/Os per second: the copy
    its I/O does (non-temporal stores for writes, memcpy out of the mapping
    for read hits; the 70/30 mix weighs the two), one core's rate times the
    reactors. None for workloads that do not end in the cache (misses)."""
    def g(mode, size):
        c = med.get(f"limit|1r|{mode}|{size}")
        return c.get("iops") if c else None

    w4, r4, w128 = g("nt_write", 4096), g("memcpy_read", 4096), g("nt_write", 131072)
    cores = 2 if mkey == "2r" else 1
    one = None
    if wkey == "randwrite":
        one = w4
    elif wkey == "randread_hit":
        one = r4
    elif wkey == "write128k":
        one = w128
    elif wkey == "randrw" and w4 and r4:
        one = 1.0 / (0.7 / r4 + 0.3 / w4)
    return one * cores if one else None


# ---------------------------------------------------------------- recovery


def shm_free():
    st = os.statvfs(a_tmp_dir())
    return st.f_bavail * st.f_frsize


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


_TMP = None


def a_tmp_dir():
    return _TMP


def run_recovery(a, raw):
    for blocks in a.recovery_sizes:
        need = blocks * 512 + 16 * blocks + (64 << 20)
        ram = need + 200 * blocks  # the file lives in RAM too, plus the index
        if shm_free() < need * 1.05 or mem_available() < ram * 1.1:
            msg = (f"recovery with {blocks >> 20} Mi blocks skipped: needs "
                   f"{need / 2**30:.1f} GiB in {a.tmp} and ~{ram / 2**30:.1f} GiB RAM; "
                   f"free {shm_free() / 2**30:.1f} GiB, available "
                   f"{mem_available() / 2**30:.1f} GiB")
            log(msg)
            raw["notes"].append(msg)
            continue
        for run in range(a.runs):
            log(f"run {run + 1}/{a.runs} recovery: {blocks >> 20} Mi blocks of 512 B")
            try:
                out = subprocess.run([a.wc_recovery, str(blocks), "512", a.tmp],
                                     capture_output=True, text=True, timeout=900).stdout
                m1 = re.search(r"filled in ([\d.]+)s; recovery of (\d+) committed blocks: "
                               r"([\d.]+)s", out)
                m2 = re.search(r"([\d.]+) bytes when empty, ([\d.]+) bytes when full", out)
                m3 = re.search(r"([\d.]+) bytes after recovery \(resident\); ([\d.]+) bytes "
                               r"in the instance's structures", out)
                cell = {"fill_s": float(m1.group(1)), "recovered_blocks": int(m1.group(2)),
                        "recovery_s": float(m1.group(3)),
                        "ram_empty_b": float(m2.group(1)), "ram_full_b": float(m2.group(2))}
                if m3:
                    cell["ram_recovered_b"] = float(m3.group(1))
                    cell["ram_structures_b"] = float(m3.group(2))
                log(f"  recovery {cell['recovery_s']:.3f} s, RAM/block "
                    f"{cell['ram_empty_b']:.1f}/{cell['ram_full_b']:.1f} B")
            except (subprocess.SubprocessError, AttributeError, ValueError) as e:
                log(f"  wc_recovery failed: {e}")
                cell = None
            raw["recovery"].setdefault(str(blocks), []).append(cell)


# ---------------------------------------------------------------- report


def median_cell(cells):
    cells = [c for c in cells if c]
    if not cells:
        return None
    out = {}
    for k in cells[0]:
        vals = [c[k] for c in cells if k in c and c[k] is not None]
        if vals and all(isinstance(v, (int, float)) for v in vals):
            out[k] = statistics.median(vals)
    out["n"] = len(cells)
    return out


def fmt_i(v):
    return "–" if v is None else f"{v:,.0f}"


def fmt_f(v, d=1):
    return "–" if v is None else f"{v:,.{d}f}"


def ratio(a, b):
    if a is None or not b:
        return "–"
    r = a / b
    return f"{r:.2f}" if r < 10 else f"{r:.1f}"


def machine_info():
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        if dirty:
            commit += " (with uncommitted changes)"
    except OSError:
        commit = "unknown"
    return {"cpu": model, "cores": os.cpu_count(), "mem_gib": round(mem / 2**30, 1),
            "kernel": platform.release(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit}


def write_report(a, raw, med, path):
    info = raw["info"]
    qds = a.qds
    L = []
    w = L.append
    w(f"# writecache benchmark report ({'quick' if a.quick else 'full'} mode)")
    w("")
    w(f"Machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB RAM, "
      f"Linux {info['kernel']}. Date: {info['date']}. Commit: {info['commit']}. "
      f"Suite time: {raw['elapsed_s'] / 60:.1f} min.")
    w("")
    w("## Method")
    w("")
    w(f"* `perf/run.sh{' --quick' if a.quick else ''}`: our SPDK-compatible `bdevperf` "
      "(busy-polling reactors), one `bdevperf -z` process per bdev, reactor layout and run, "
      "driven with `perform_tests` over RPC. "
      f"Each test runs {a.secs:g} s; each cell is the median of {a.runs} run(s) "
      "(fresh process and fresh cache per run).")
    w(f"* Reactors: `-m 0x1` (1 reactor) and `-m 0x3 -C` (2 reactors, each drives its own "
      "half of the bdev; IOPS and MiB/s are the sum, latencies the worse of the two jobs).")
    w(f"* Queue depths {', '.join(map(str, qds))}; latency percentiles p50/p99 in µs "
      "(from bdevperf's log-linear histogram, bucket upper bounds).")
    w(f"* Bdevs, {a.origin_blocks * BS >> 20} MiB each, 4 KiB blocks: **null**; **malloc** "
      "(faulted in by a sequential pre-write first); **origin (uring)**: `bdev_uring` "
      "(O_DIRECT) on a fully written file in "
      f"`{a.origin_parent}` (virtual disk); **origin+delay**: the same origin "
      f"wrapped in `bdev_delay` adding {DELAY_US[0]} µs average / {DELAY_US[1]} µs p99 to "
      "reads and writes (added to the disk's own latency), a stand-in for an NVMe drive; "
      "**writecache**: `bdev_writecache` in pmem mode, cache = `bdev_pmem` on a file in "
      f"`{a.tmp_parent}` (tmpfs, {cache_pages(a.tmp)} pages, persistence strategy "
      f"`{info.get('pmem_strategy', 'unknown')}`), over origin+delay. Its cache holds the "
      "whole origin and the high watermark is 100%, so writeback never starts: this is "
      "writecache *until the cache fills*.")
    w("* Order inside each process: (writecache) random reads on the empty cache = "
      "**misses**, served by origin+delay; random writes; 128 KiB sequential writes; a "
      "sequential pre-write of the whole range; random reads = **hits**; 70/30 mix (its "
      "reads hit). Bdevs without a cache are measured once for random reads, shown in both "
      "the hit and the miss tables.")
    w(f"* **Steady state**: writecache with a {a.steady_blocks * BS >> 20} MiB cache "
      "(default watermarks 50%/45%) over the same origin+delay, filled by "
      f"{a.steady_warm:g} s of random writes, then random writes for {a.steady_secs:g} s "
      "per queue depth while writeback runs; writeback rate from "
      "`bdev_writecache_get_stats` before/after.")
    w("* Ratios are computed from the medians of this one run of the suite.")
    w("")

    def cell(b, m, wk, q):
        return med.get(f"{b}|{m}|{wk}|{q}")

    def g(b, m, wk, q, k="iops"):
        c = cell(b, m, wk, q)
        return c.get(k) if c else None

    # Headline.
    w("## Headline: 4 KiB random write, 1 reactor")
    w("")
    w(headline_table(a, med))
    w("")
    if any(cell("wc", "1r", "randwrite", q) for q in qds):
        q1 = cell("wc", "1r", "randwrite", qds[0])
        if q1:
            w(f"writecache QD{qds[0]} write latency: p50 {q1['p50_us']:.1f} µs, "
              f"p99 {q1['p99_us']:.1f} µs (target p99 ≤ 5 µs).")
            w("")

    w("## Targets (issue 17)")
    w("")
    w(targets17_table(a, med))
    w("")
    w("## Targets (issue 6)")
    w("")
    w(targets_table(a, med))
    w("")
    w("## Raw-copy limit")
    w("")
    w("`copy_limit`: the copy alone, one core, no framework: copies to (or from) random "
      "block-aligned offsets of a file mapping of the cache's size in the same tmpfs, "
      "sources/destinations rotating through 32 buffers. `nt_write`: 16-byte non-temporal "
      "stores (the pmem cache's write), one `sfence` per 64 copies; `memcpy_write`/"
      "`memcpy_read`: plain `memcpy` into / out of the mapping (a read hit's copy). The "
      "workload tables' *limit* is the copy their I/O does (writes: `nt_write`; read hits: "
      "`memcpy_read`; the 70/30 mix: both, weighted) at one core's rate, times the reactors.")
    w("")
    w("`_anon_thp`: the same copies into anonymous memory with transparent huge pages "
      "(what a malloc bdev's buffer gets): no TLB miss per block.")
    w("")
    w("| copy | size | copies/s | MiB/s |")
    w("|---|---:|---:|---:|")
    for size in LIMIT_SIZES:
        for mode in ("nt_write", "memcpy_write", "memcpy_read", "nt_write_anon_thp",
                     "memcpy_write_anon_thp", "memcpy_read_anon_thp"):
            c = med.get(f"limit|1r|{mode}|{size}")
            if c:
                w(f"| {mode} | {size // 1024} KiB | {fmt_i(c['iops'])} | {fmt_f(c['mibps'])} |")
    w("")

    for wkey, _, _, _, title in WORKLOADS:
        w(f"## {title}")
        w("")
        w(f"![{wkey}]({'iops_' + wkey}.png)")
        w("")
        hdr = "| bdev | QD |"
        sep = "|---|---:|"
        for m in MODES:
            hdr += f" {m[0]} IOPS | {m[0]} MiB/s | {m[0]} p50 µs | {m[0]} p99 µs |"
            sep += "---:|---:|---:|---:|"
        w(hdr)
        w(sep)
        for bkey, _, blabel in BDEVS:
            for q in qds:
                row = f"| {blabel} | {q} |"
                for mkey, _, _ in MODES:
                    c = cell(bkey, mkey, wkey, q)
                    if c:
                        row += (f" {fmt_i(c['iops'])} | {fmt_f(c['mibps'])} | "
                                f"{fmt_f(c['p50_us'])} | {fmt_f(c['p99_us'])} |")
                    else:
                        row += " fail | | | |"
                w(row)
        w("")
        w("Ratios (IOPS):")
        w("")
        hdr = "| QD |"
        sep = "|---:|"
        for m in MODES:
            hdr += (f" {m[0]} wc/malloc | {m[0]} wc/limit | {m[0]} malloc/limit |"
                    f" {m[0]} wc/origin+delay | {m[0]} wc/origin (uring) |")
            sep += "---:|---:|---:|---:|---:|"
        w(hdr)
        w(sep)
        for q in qds:
            row = f"| {q} |"
            for mkey, _, _ in MODES:
                wc = g("wc", mkey, wkey, q)
                lim = limit_iops(med, wkey, mkey)
                row += (f" {ratio(wc, g('malloc', mkey, wkey, q))} |"
                        f" {ratio(wc, lim)} | {ratio(g('malloc', mkey, wkey, q), lim)} |"
                        f" {ratio(wc, g('delay', mkey, wkey, q))} |"
                        f" {ratio(wc, g('uring', mkey, wkey, q))} |")
            w(row)
        w("")

    w("## Writecache steady state (cache full, writeback running)")
    w("")
    w("![steady](iops_randwrite.png)")
    w("")
    w("| reactors | QD | IOPS | p50 µs | p99 µs | writeback blocks/s | writeback I/Os/s | "
      "used % | writes that waited | origin+delay IOPS | origin (uring) IOPS | steady/origin+delay | "
      "steady/origin |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mkey, _, mlabel in MODES:
        for q in qds:
            c = cell("wc_steady", mkey, "randwrite", q)
            d = g("delay", mkey, "randwrite", q)
            u = g("uring", mkey, "randwrite", q)
            if c:
                w(f"| {mlabel} | {q} | {fmt_i(c['iops'])} | {fmt_f(c['p50_us'])} | "
                  f"{fmt_f(c['p99_us'])} | {fmt_i(c.get('writeback_blocks_per_s'))} | "
                  f"{fmt_i(c.get('writeback_ios_per_s'))} | {fmt_f(c.get('used_pct'))} | "
                  f"{fmt_i(c.get('blocked_writes'))} | "
                  f"{fmt_i(d)} | {fmt_i(u)} | {ratio(c['iops'], d)} | {ratio(c['iops'], u)} |")
            else:
                w(f"| {mlabel} | {q} | fail | | | | | | | {fmt_i(d)} | {fmt_i(u)} | | |")
    w("")

    w("## Recovery time and RAM per cache block")
    w("")
    w("![recovery](recovery.png)")
    w("")
    w("`wc_recovery N 512`: fills a pmem-mode cache of N blocks of 512 B (file in "
      f"`{a.tmp_parent}`) through the writecache, deletes it (commit only), times "
      "re-creating it (the recovery scan), and reports the anonymous memory per block "
      "(resident, after handing freed heap back): fresh, after the fill (with the "
      "write logs of a cache that never committed on its own), after recovery; and "
      "the bytes the instance's structures hold (block state, index, free pool, "
      "writeback queue: `metadata_ram_bytes` of `bdev_writecache_get_stats`).")
    w("")
    w("| cache blocks | cache size | fill s | recovery s | RAM/block empty (B) | "
      "RAM/block full (B) | RAM/block recovered (B) | structures/block (B) |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for blocks in a.recovery_sizes:
        c = med.get(f"recovery|{blocks}")
        size = f"{blocks * 512 / 2**30:g} GiB" if blocks * 512 >= 2**30 else \
            f"{blocks * 512 >> 20} MiB"
        if c:
            extra = " | ".join(f"{c[k]:.1f}" if k in c else "n/a"
                               for k in ("ram_recovered_b", "ram_structures_b"))
            w(f"| {blocks >> 20} Mi | {size} | {c['fill_s']:.2f} | {c['recovery_s']:.3f} | "
              f"{c['ram_empty_b']:.1f} | {c['ram_full_b']:.1f} | {extra} |")
        else:
            w(f"| {blocks >> 20} Mi | {size} | skipped or failed | | | | | |")
    w("")
    finish_report(L, raw["notes"], path)


def finish_report(lines, notes, path):
    """Appends the notes (if any) to a report's lines and writes it."""
    if notes:
        lines += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def headline_table(a, med):
    def g(b, wk, q, k="iops"):
        c = med.get(f"{b}|1r|{wk}|{q}")
        return c.get(k) if c else None

    L = ["| QD | null IOPS | malloc IOPS | origin (uring) IOPS | origin+delay IOPS | "
         "writecache IOPS | wc steady IOPS | wc/malloc | wc/origin+delay | wc/origin (uring) | "
         "wc p50 µs | wc p99 µs |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for q in a.qds:
        wc = g("wc", "randwrite", q)
        L.append(f"| {q} | {fmt_i(g('null', 'randwrite', q))} | "
                 f"{fmt_i(g('malloc', 'randwrite', q))} | {fmt_i(g('uring', 'randwrite', q))} | "
                 f"{fmt_i(g('delay', 'randwrite', q))} | {fmt_i(wc)} | "
                 f"{fmt_i(g('wc_steady', 'randwrite', q))} | "
                 f"{ratio(wc, g('malloc', 'randwrite', q))} | "
                 f"{ratio(wc, g('delay', 'randwrite', q))} | "
                 f"{ratio(wc, g('uring', 'randwrite', q))} | "
                 f"{fmt_f(g('wc', 'randwrite', q, 'p50_us'))} | "
                 f"{fmt_f(g('wc', 'randwrite', q, 'p99_us'))} |")
    return "\n".join(L)


def targets_table(a, med):
    def g(b, m, q, k="iops"):
        c = med.get(f"{b}|{m}|randwrite|{q}")
        return c.get(k) if c else None

    L = ["| target | measured | met |", "|---|---|---|"]
    best = max((g("wc", "1r", q) or 0 for q in a.qds), default=0)
    L.append(f"| writecache 4 KiB randwrite ≥ 2 M IOPS per reactor | {best:,.0f} (best QD, "
             f"1 reactor) | {'yes' if best >= 2e6 else 'no'} |")
    rs = [(q, g("wc", "1r", q), g("malloc", "1r", q)) for q in a.qds]
    rs = [(q, w / m) for q, w, m in rs if w and m]
    if rs:
        lo = min(r for _, r in rs)
        L.append(f"| ≥ 0.8× malloc (same run) | "
                 f"{', '.join(f'QD{q} {r:.2f}×' for q, r in rs)} | "
                 f"{'yes' if lo >= 0.8 else 'no'} |")
    rs = [(q, g("wc", "1r", q), g("uring", "1r", q)) for q in a.qds]
    rs = [(q, w / o) for q, w, o in rs if w and o]
    if rs:
        lo = min(r for _, r in rs)
        L.append(f"| ≥ 10× the origin alone (uring O_DIRECT) until the cache fills | "
                 f"{', '.join(f'QD{q} {r:.1f}×' for q, r in rs)} | "
                 f"{'yes' if lo >= 10 else 'no'} |")
    p99 = g("wc", "1r", a.qds[0], "p99_us") if a.qds[0] == 1 else None
    if p99 is not None:
        L.append(f"| QD1 write latency p99 ≤ 5 µs | {p99:.1f} µs | "
                 f"{'yes' if p99 <= 5 else 'no'} |")
    rs = [(q, g("wc_steady", "1r", q), g("delay", "1r", q)) for q in a.qds]
    rs = [(q, s / d) for q, s, d in rs if s and d]
    if rs:
        lo = min(r for _, r in rs)
        L.append(f"| steady state with writeback ≥ the origin's own random write rate "
                 f"(origin+delay, the origin it writes back to) | "
                 f"{', '.join(f'QD{q} {r:.2f}×' for q, r in rs)} | "
                 f"{'yes' if lo >= 1 else 'no'} |")
    return "\n".join(L)


def targets17_table(a, med):
    """Issue 17's targets, measured in this run: met / not met."""
    def g(b, m, wk, q, k="iops"):
        c = med.get(f"{b}|{m}|{wk}|{q}")
        return c.get(k) if c else None

    def ratios(num, den, modes, wk, qds=None):
        out = []
        for m in modes:
            for q in qds or a.qds:
                n, d = g(num, m, wk, q), g(den, m, wk, q)
                if n and d:
                    out.append((m, q, n / d))
        return out

    def row(label, rs, goal, fmt="{:.2f}"):
        if not rs:
            return f"| {label} | not measured | – |"
        txt = ", ".join(f"{m} QD{q} {fmt.format(r)}" for m, q, r in rs)
        met = all(r >= goal for _, _, r in rs)
        return f"| {label} | {txt} | {'yes' if met else '**no**'} |"

    L = ["| target | measured | met |", "|---|---|---|"]
    L.append(row("4 KiB randwrite, 1 reactor, wc/malloc ≥ 0.95",
                 ratios("wc", "malloc", ["1r"], "randwrite"), 0.95))
    L.append(row("4 KiB randwrite, 2 reactors, wc/malloc ≥ 0.9",
                 ratios("wc", "malloc", ["2r"], "randwrite"), 0.9))
    L.append(row("4 KiB read hits, 1 and 2 reactors, wc/malloc ≥ 0.9",
                 ratios("wc", "malloc", ["1r", "2r"], "randread_hit"), 0.9))
    L.append(row("128 KiB sequential write, wc/malloc ≥ 0.9",
                 ratios("wc", "malloc", ["1r", "2r"], "write128k"), 0.9))
    L.append(row("70/30 mix (all hits), wc/malloc ≥ 0.9",
                 ratios("wc", "malloc", ["1r", "2r"], "randrw"), 0.9))
    L.append(row("read misses, wc/origin+delay ≥ 0.97",
                 ratios("wc", "delay", ["1r", "2r"], "randread_miss"), 0.97))
    st = []
    for m in ("1r", "2r"):
        for q in a.qds:
            n, d = g("wc_steady", m, "randwrite", q), g("delay", m, "randwrite", q)
            if n and d:
                st.append((m, q, n / d))
    L.append(row("steady state with writeback, wc/origin+delay ≥ 1.0 everywhere", st, 1.0))
    # Writeback must not starve foreground I/O: the writes' p99 in the
    # steady state, next to the origin's own p99 at the same QD.
    lat = []
    for m in ("1r", "2r"):
        for q in a.qds:
            n, d = g("wc_steady", m, "randwrite", q, "p99_us"), g("delay", m, "randwrite", q,
                                                                  "p99_us")
            if n and d:
                lat.append((m, q, n, d))
    if lat:
        txt = ", ".join(f"{m} QD{q} {n:,.0f}/{d:,.0f} µs" for m, q, n, d in lat)
        met = all(n <= d for _, _, n, d in lat)
        L.append(f"| steady state foreground write p99 ≤ origin+delay's p99 (wc/origin, "
                 f"reported) | {txt} | {'yes' if met else '**no**'} |")
    else:
        L.append("| steady state foreground write p99 (reported) | not measured | – |")
    for q, goal in ((32, 12), (128, 9)):
        rs = ratios("wc", "uring", ["1r"], "randwrite", [q]) if q in a.qds else []
        L.append(row(f"burst (cache not full), wc/origin (uring) QD {q} ≥ {goal}×", rs, goal,
                     "{:.1f}×"))
    L.append("| null bdev, ours/SPDK v25.09 ≥ 1.0 | measured by `perf/spdk_null.sh` (needs a "
             "local SPDK build): `spdk_null.md` | – |")
    p99 = g("wc", "1r", "randwrite", 1, "p99_us") if 1 in a.qds else None
    if p99 is None:
        L.append("| QD1 write latency p99 ≤ 3 µs | not measured | – |")
    else:
        L.append(f"| QD1 write latency p99 ≤ 3 µs (bdevperf, in process) | {p99:.1f} µs | "
                 f"{'yes' if p99 <= 3 else '**no**'} |")
    return "\n".join(L)


# ---------------------------------------------------------------- main


def estimate(a):
    per_proc = 1.5
    tests = 0
    procs = 0
    for bkey, _, _ in BDEVS:
        n = sum(1 for wk, _ in sequence(bkey, a.qds) if wk != "prewrite")
        tests += n
        procs += 1
    main = a.runs * len(MODES) * (tests * (a.secs + 0.25) + procs * per_proc + 2 * a.secs)
    steady = a.runs * len(MODES) * (a.steady_warm + len(a.qds) * (a.steady_secs + 0.2)
                                    + per_proc)
    rec = 0.0
    for b in a.recovery_sizes:
        rec += a.runs * (3.5 * b / (1 << 20))  # ~3.3 s per Mi blocks (fill + recovery)
    limit = a.runs * (len(LIMIT_SIZES) + 1) * (3 * a.secs + 1.5)
    return main + steady + rec + limit


def _on_term(signum, _frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main():
    global _TMP
    # Run as a background job of run.sh, SIGINT arrives ignored: take both
    # signals so bdevperf processes are shut down (and children get the
    # default dispositions back).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_term)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tmp", required=True, help="temp dir in RAM (cache files, sockets)")
    ap.add_argument("--origin-dir", required=True, help="temp dir on disk (origin file)")
    ap.add_argument("--bin", required=True, help="directory with bdevperf and wc_recovery")
    ap.add_argument("--out", required=True)
    ap.add_argument("--estimate-only", action="store_true")
    a = ap.parse_args()
    env = os.environ
    a.runs = int(env.get("RUNS", 1 if a.quick else 3))
    a.secs = float(env.get("SECS", 1 if a.quick else 2))
    a.qds = [int(x) for x in env.get("QDS", "1 32" if a.quick else "1 8 32 128").split()]
    a.origin_blocks = int(env.get("ORIGIN_MIB", 1024)) * 1024 * 1024 // BS
    a.steady_blocks = int(env.get("STEADY_CACHE_MIB", 64)) * 1024 * 1024 // BS
    a.steady_warm = float(env.get("STEADY_WARM", 2 if a.quick else 3))
    a.steady_secs = float(env.get("STEADY_SECS", 2 if a.quick else 4))
    a.recovery_sizes = [int(x) << 20 for x in env.get("RECOVERY_MI", "1 4 16").split()]
    a.bdevperf = os.path.join(a.bin, "bdevperf")
    a.wc_recovery = os.path.join(a.bin, "wc_recovery")
    a.copy_limit = os.path.join(a.bin, "copy_limit")
    a.origin_file = os.path.join(a.origin_dir, "origin.img")
    a.cache_file = os.path.join(a.tmp, "cache.pmem")
    a.tmp_parent = os.path.dirname(os.path.abspath(a.tmp))
    a.origin_parent = os.path.dirname(os.path.abspath(a.origin_dir))
    _TMP = a.tmp

    est = estimate(a)
    if a.estimate_only:
        print(int(est))
        return 0
    log(f"matrix: {len(WORKLOADS)} workloads x QD {a.qds} x {len(MODES)} reactor layouts x "
        f"{len(BDEVS)} bdevs + steady state + recovery {[b >> 20 for b in a.recovery_sizes]} Mi;"
        f" {a.runs} run(s) of {a.secs:g} s; estimated {est / 60:.1f} min")
    t0 = time.time()
    raw = {"info": machine_info(), "notes": [], "matrix": {}, "recovery": {},
           "settings": {"quick": a.quick, "runs": a.runs, "secs": a.secs, "qds": a.qds,
                        "origin_mib": a.origin_blocks * BS >> 20,
                        "steady_cache_mib": a.steady_blocks * BS >> 20,
                        "delay_us": DELAY_US,
                        "recovery_blocks": a.recovery_sizes,
                        "workloads": [[w[0], w[4]] for w in WORKLOADS],
                        "bdevs": [[b[0], b[2]] for b in BDEVS] + [["wc_steady",
                                                                   LABEL["wc_steady"]]],
                        "modes": [[m[0], m[2]] for m in MODES]}}

    # The origin: a file written end to end (no unwritten extents, which
    # O_DIRECT reads would return as zeroes without touching the disk).
    log(f"writing the origin file ({a.origin_blocks * BS >> 20} MiB)")
    subprocess.run(["dd", "if=/dev/zero", f"of={a.origin_file}", "bs=1M",
                    f"count={a.origin_blocks * BS >> 20}", "oflag=direct", "status=none"],
                   check=True)
    cfgs = configs(a)
    run_limit(a, raw)
    run_matrix(a, cfgs, raw)
    run_steady(a, cfgs, raw)
    run_recovery(a, raw)
    raw["elapsed_s"] = time.time() - t0
    raw["estimate_s"] = est

    med = {k: median_cell(v) for k, v in raw["matrix"].items()}
    for b, v in raw["recovery"].items():
        med[f"recovery|{b}"] = median_cell(v)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"raw": raw, "median": med}, f, indent=1)
    write_report(a, raw, med, os.path.join(a.out, "report.md"))
    with open(os.path.join(a.out, "headline.md"), "w") as f:
        f.write(headline_table(a, med) + "\n\nTargets (issue 17):\n\n"
                + targets17_table(a, med) + "\n")
    log(f"done in {raw['elapsed_s'] / 60:.1f} min (estimated {est / 60:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
