#!/usr/bin/env python3
"""NVMe/TCP over loopback vs in-process: one driver of the target/initiator
pair, called by perf/nvme_tcp.sh (issue 15) and perf/nvmf.sh (issue 14).

The remote side is always `writecache_tgt -m 0x1` pinned to core 0
exporting the bdev over loopback NVMe/TCP. The initiator (core 1) is one
of (--initiator):
  * bdevperf: our bdevperf (`-z -m 0x2`, driven by perform_tests) on the
    namespace bdev Nv0n1 that our initiator's bdev_nvme_attach_controller
    made (one I/O queue pair);
  * nvmf_perf: perf/src/bin/nvmf_perf.rs (one thread busy-polling one
    queue pair), the small initiator of the target issue.

Parts (--parts):
  ratios  4 KiB randwrite then randread at each QD on malloc and on
          writecache (pmem cache file in RAM over a malloc origin):
          bdevperf -m 0x1 on the bdev itself (in-process) and the same
          bdev over NVMe/TCP. Writes run before reads in both, so the reads
          find the same state.
  origin  (bdevperf only) randwrite on a writecache stacked on an NVMe/TCP
          origin: the origin alone, a cache that never writes back (burst)
          and a small cache at its watermarks (steady state, measured after
          a warm-up that fills it).

--rounds N repeats the NVMe/TCP cells (and in-process ones) N times and
reports medians. --base-bin DIR is an A/B run: each round runs the pair
from DIR and the pair from --bin back to back (order alternating), and
the report has both and their ratio. Results: <name>.json and <name>.md in
--out (name: nvme_tcp or nvmf by default).

On a shared machine other processes' time slices stall a two-process
pipeline (target and initiator) far more than one spinning bdevperf: every
stall of either side stops both. NICE="nice -n -20" runs both sides (and
bdevperf in-process) at that priority; RT=1 (root) gives the target's
reactor threads and nvmf_perf SCHED_FIFO 1 (the kernel's RT throttling
still leaves 5% to others), for quiet, dedicated machines only.
PORTS="47300-47399" keeps the listeners in that range.
"""

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Bdevperf, RpcProcess, log, median_cell, pmem_size, summarize  # noqa: E402

NQN = "nqn.2016-06.io.spdk:bench"
BS = 4096
WORKLOADS = ["randwrite", "randread"]
NICE = os.environ.get("NICE", "").split()
RT = os.environ.get("RT") == "1"


def free_port():
    """A free loopback port: from PORTS ("first-last") when set (parallel
    runs on a shared machine keep to their own ranges), else any."""
    lo, _, hi = os.environ.get("PORTS", "0-0").partition("-")
    for port in range(int(lo), int(hi or lo) + 1):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return s.getsockname()[1]
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError(f"no free port in {os.environ.get('PORTS')}")


def malloc(name, blocks):
    return {"method": "bdev_malloc_create",
            "params": {"name": name, "num_blocks": blocks, "block_size": BS}}


def pmem(path, blocks):
    return {"method": "bdev_pmem_create",
            "params": {"name": "Cache0", "filename": path, "size": pmem_size(blocks)}}


def writecache(base, extra):
    return {"method": "bdev_writecache_create",
            "params": {"name": "WC0", "base_bdev": base, "cache_bdev": "Cache0", **extra}}


def attach(port):
    return {"method": "bdev_nvme_attach_controller",
            "params": {"name": "Nv0", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                       "trsvcid": str(port), "subnqn": NQN}}


def nvmf_config(bdev, port):
    return [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": {"bdev_name": bdev}}},
        {"method": "nvmf_subsystem_add_listener",
         "params": {"nqn": NQN, "listen_address": {"trtype": "TCP", "traddr": "127.0.0.1",
                                                   "trsvcid": str(port)}}},
    ]


def rm(path):
    if os.path.exists(path):
        os.unlink(path)


def renice(pid):
    if NICE:
        subprocess.run(["renice", "-n", NICE[-1], "-p", str(pid)], capture_output=True)


def realtime_reactors(pid):
    """SCHED_FIFO 1 for the reactor threads of `pid` (RT=1 only): the
    process's other threads (config replay, RPC) stay as they are."""
    if not RT:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().startswith("reactor_"):
                    subprocess.run(["chrt", "-f", "-p", "1", tid], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            log(f"cannot raise the priority of thread {tid}: {e}")


class RemoteTarget:
    """writecache_tgt from `bin_dir` on core 0 exporting `bdev` built by `cfg`."""

    def __init__(self, a, bin_dir, name, cfg, bdev):
        self.port = free_port()
        path = os.path.join(a.tmp, f"tgt_{name}.json")
        with open(path, "w") as f:
            json.dump({"subsystems": [{"subsystem": "bdev", "config": cfg},
                                      {"subsystem": "nvmf",
                                       "config": nvmf_config(bdev, self.port)}]}, f)
        sock = os.path.join(a.tmp, f"tgt_{name}.sock")
        self.proc = RpcProcess("writecache_tgt",
                               [*NICE, "taskset", "-c", "0", os.path.join(bin_dir, "writecache_tgt"),
                                "-m", "0x1", "-r", sock, "--json", path, "--log-level", "ERROR"],
                               sock, os.path.join(a.tmp, f"tgt_{name}.log"), 120)
        realtime_reactors(self.proc.proc.pid)

    def close(self):
        self.proc.close()


def bdevperf(bin_dir, a, name, cfg, mask, bdev):
    bp = Bdevperf(os.path.join(bin_dir, "bdevperf"), a.tmp, name, cfg, ["-m", mask], bdev)
    renice(bp.proc.pid)
    return bp


def run_cells(bp, label, cells, secs):
    out = {}
    for wl, qd in cells:
        try:
            cell = summarize(bp.perform(wl, BS, qd, secs))
        except Exception as e:  # a failed cell is reported, the rest go on
            log(f"{label} {wl} qd {qd}: {e}")
            cell = None
        out[f"{wl}/{qd}"] = cell
        log(f"{label:32} {wl:9} qd {qd:3}: {cell['iops'] if cell else 0:12,.0f} IOPS")
    return out


def nvmf_perf_cells(a, bin_dir, port, label, cells):
    """The cells driven by nvmf_perf (one process per cell) against `port`."""
    out = {}
    for wl, qd in cells:
        prio = ["chrt", "-f", "1"] if RT else NICE
        cmd = [*prio, "taskset", "-c", "1", os.path.join(bin_dir, "nvmf_perf"),
               "--addr", f"127.0.0.1:{port}", "--nqn", NQN, "--rw", wl,
               "--qd", str(qd), "--time", str(a.secs), "--poll"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.secs + 60)
        cell = None
        if r.returncode != 0:
            log(f"nvmf_perf failed: {r.stderr.strip()}")
        else:
            cell = json.loads(r.stdout)
        out[f"{wl}/{qd}"] = cell
        log(f"{label:32} {wl:9} qd {qd:3}: {cell['iops'] if cell else 0:12,.0f} IOPS")
    return out


def bdev_configs(a):
    blocks = a.mib * 256
    cache = os.path.join(a.tmp, "cache.pmem")
    return {
        "malloc": ([malloc("Malloc0", blocks)], "Malloc0"),
        "writecache": ([malloc("Origin0", blocks), pmem(cache, blocks // 2),
                        writecache("Origin0", {})], "WC0"),
    }


def in_process(a, name, cfg, bdev, cells):
    rm(os.path.join(a.tmp, "cache.pmem"))
    bp = bdevperf(a.bin, a, f"inproc_{name}", cfg, "0x1", bdev)
    try:
        return run_cells(bp, f"in-process {name}", cells, a.secs)
    finally:
        bp.close()


def over_tcp(a, bin_dir, tag, name, cfg, bdev, cells):
    """The cells over NVMe/TCP with the target and initiator from `bin_dir`."""
    rm(os.path.join(a.tmp, "cache.pmem"))
    label = f"nvme/tcp {tag} {name}".replace("  ", " ")
    tgt = RemoteTarget(a, bin_dir, name, cfg, bdev)
    try:
        if a.initiator == "nvmf_perf":
            return nvmf_perf_cells(a, bin_dir, tgt.port, label, cells)
        bp = bdevperf(bin_dir, a, f"host_{name}", [attach(tgt.port)], "0x2", "Nv0n1")
        try:
            return run_cells(bp, label, cells, a.secs)
        finally:
            bp.close()
    finally:
        tgt.close()


def medians(runs):
    keys = runs[0].keys() if runs else []
    return {k: median_cell([r.get(k) for r in runs]) for k in keys}


def part_ratios(a):
    cells = [(wl, q) for wl in WORKLOADS for q in a.qds]
    sides = [("", a.bin)] + ([("base", a.base_bin)] if a.base_bin else [])
    res = {}
    for name, (cfg, bdev) in bdev_configs(a).items():
        runs = {"in_process": [], "nvme_tcp": [], "base": []}
        for r in range(a.rounds):
            runs["in_process"].append(in_process(a, name, cfg, bdev, cells))
            # Alternate which build goes first, so a drift in the machine's
            # load does not favour one.
            order = sides if r % 2 == 0 else sides[::-1]
            for tag, bin_dir in order:
                key = "base" if tag == "base" else "nvme_tcp"
                label = (tag or "new") if a.base_bin else ""
                runs[key].append(over_tcp(a, bin_dir, label, name, cfg, bdev, cells))
        res[name] = {k: medians(v) for k, v in runs.items() if v}
    return res


def part_origin(a):
    blocks = a.mib * 256
    cache = os.path.join(a.tmp, "wc_cache.pmem")
    res = {}
    tgt = RemoteTarget(a, a.bin, "origin", [malloc("Origin0", blocks)], "Origin0")
    try:
        cells = [("randwrite", q) for q in a.qds]
        bp = bdevperf(a.bin, a, "origin_alone", [attach(tgt.port)], "0x2", "Nv0n1")
        try:
            res["origin"] = run_cells(bp, "origin alone (nvme/tcp)", cells, a.secs)
        finally:
            bp.close()
        # Burst: the cache holds the whole origin and never writes back.
        rm(cache)
        cfg = [attach(tgt.port), pmem(cache, blocks + 16384),
               writecache("Nv0n1", {"high_watermark": 100, "low_watermark": 100})]
        bp = bdevperf(a.bin, a, "wc_burst", cfg, "0x2", "WC0")
        try:
            res["wc_burst"] = run_cells(bp, "writecache burst", cells, a.secs)
        finally:
            bp.close()
        # Steady state: a small cache at its watermarks (default 50/45), the
        # writeback to the remote origin running.
        rm(cache)
        cfg = [attach(tgt.port), pmem(cache, a.steady_mib * 256), writecache("Nv0n1", {})]
        bp = bdevperf(a.bin, a, "wc_steady", cfg, "0x2", "WC0")
        try:
            bp.perform("randwrite", BS, 32, a.warm)
            res["wc_steady"] = run_cells(bp, "writecache steady", cells, a.secs)
        finally:
            bp.close()
        rm(cache)
    finally:
        tgt.close()
    return res


def fmt(v):
    return f"{v:,.0f}" if v else "-"


def ratio(num, den):
    return f"{num / den:.2f}x" if num and den else "-"


def report(a, r1, r2):
    who = {"bdevperf": "`bdevperf -m 0x2` (core 1) attaches it with our initiator's "
                       "`bdev_nvme_attach_controller` (one I/O queue pair)",
           "nvmf_perf": "`nvmf_perf --poll` (core 1, one thread busy-polling one queue pair) "
                        "drives it"}[a.initiator]
    prio = ("SCHED_FIFO 1 for the target reactor and nvmf_perf" if RT
            else " ".join(NICE) or "default")
    L = [f"# NVMe/TCP over loopback ({a.initiator} initiator) vs in-process", "",
         f"{datetime.datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} CPUs, "
         f"{a.secs:g} s per cell, median of {a.rounds} round(s), 4 KiB I/O, priority: {prio}. "
         "Remote: `writecache_tgt -m 0x1` (core 0) exports the bdev over NVMe/TCP; "
         f"{who}. In-process: `bdevperf -m 0x1` on the bdev itself. Writes run before reads.",
         ""]
    if r1:
        L += ["## NVMe/TCP vs the same bdev in-process", ""]
        if a.base_bin:
            L += [f"A/B: base = binaries in `{a.base_bin}`, new = `{a.bin}`, run back to back "
                  "in each round (order alternating).", "",
                  "| bdev | workload | QD | in-process IOPS | base IOPS | base ratio | new IOPS "
                  "| new ratio | new/base | new p50 us |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        else:
            L += ["| bdev | workload | QD | in-process IOPS | NVMe/TCP IOPS | ratio | "
                  "NVMe/TCP p50 us | NVMe/TCP p99 us |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, v in r1.items():
            for wl in WORKLOADS:
                for q in a.qds:
                    k = f"{wl}/{q}"
                    ii = (v["in_process"].get(k) or {}).get("iops")
                    t = v["nvme_tcp"].get(k) or {}
                    ti = t.get("iops")
                    if a.base_bin:
                        bi = (v["base"].get(k) or {}).get("iops")
                        L.append(f"| {name} | {wl} | {q} | {fmt(ii)} | {fmt(bi)} | "
                                 f"{ratio(bi, ii)} | {fmt(ti)} | {ratio(ti, ii)} | "
                                 f"{ratio(ti, bi)} | {t.get('p50_us', '-')} |")
                    else:
                        L.append(f"| {name} | {wl} | {q} | {fmt(ii)} | {fmt(ti)} | "
                                 f"{ratio(ti, ii)} | {t.get('p50_us', '-')} | "
                                 f"{t.get('p99_us', '-')} |")
        L += ["", "Target of issue 14: NVMe/TCP >= 0.5x the in-process IOPS on 1 reactor "
              "each side.", ""]
    if r2:
        L += ["## Writecache over an NVMe/TCP origin vs that origin alone (randwrite)", "",
              f"Origin: malloc ({a.mib} MiB) in the remote target. Burst: cache as big as the "
              f"origin, no writeback. Steady: {a.steady_mib} MiB cache at its watermarks after "
              f"{a.warm:g} s of random writes, writeback to the remote origin running.", "",
              "| QD | origin alone IOPS | wc burst IOPS | burst/origin | wc steady IOPS | "
              "steady/origin | steady p99 us |",
              "|---|---|---|---|---|---|---|"]
        for q in a.qds:
            k = f"randwrite/{q}"
            o = (r2.get("origin", {}).get(k) or {}).get("iops")
            b = (r2.get("wc_burst", {}).get(k) or {}).get("iops")
            s = r2.get("wc_steady", {}).get(k) or {}
            si = s.get("iops")
            L.append(f"| {q} | {fmt(o)} | {fmt(b)} | {ratio(b, o)} | {fmt(si)} | "
                     f"{ratio(si, o)} | {s.get('p99_us', '-')} |")
        L.append("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--initiator", choices=["bdevperf", "nvmf_perf"], default="bdevperf")
    ap.add_argument("--parts", default="ratios,origin")
    ap.add_argument("--name", help="result file name (default: nvme_tcp, nvmf for nvmf_perf)")
    ap.add_argument("--base-bin", help="A/B: the base build's binaries")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--secs", type=float, default=3)
    ap.add_argument("--qds", default="1,32,128")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--steady-mib", type=int, default=32)
    ap.add_argument("--warm", type=float, default=3)
    a = ap.parse_args()
    a.qds = [int(q) for q in a.qds.split(",")]
    parts = set(a.parts.split(","))
    if parts - {"ratios", "origin"}:
        ap.error(f"unknown part(s): {', '.join(sorted(parts - {'ratios', 'origin'}))}")
    if "origin" in parts and a.initiator != "bdevperf":
        parts.discard("origin")
        log("the origin part needs the bdevperf initiator: skipped")
    name = a.name or ("nvmf" if a.initiator == "nvmf_perf" else "nvme_tcp")
    r1 = part_ratios(a) if "ratios" in parts else {}
    r2 = part_origin(a) if "origin" in parts else {}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump({"initiator": a.initiator, "initiator_vs_in_process": r1,
                   "writecache_over_nvme_tcp": r2}, f, indent=1)
    md = report(a, r1, r2)
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
