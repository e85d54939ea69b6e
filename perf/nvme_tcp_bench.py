#!/usr/bin/env python3
"""NVMe/TCP initiator benchmark (issue 15), called by perf/nvme_tcp.sh.

All runs use our bdevperf (`-z`, driven by perform_tests) and, for the
remote cases, a `writecache_tgt -m 0x1` pinned to core 0 exporting the
bdev over loopback NVMe/TCP; bdevperf then runs on core 1 (`-m 0x2`) and
reaches it through `bdev_nvme_attach_controller` (bdev Nv0n1).

1. Initiator -> target vs in-process, for malloc and writecache (pmem
   cache file in RAM over a malloc origin): 4 KiB randwrite then randread
   at each QD, bdevperf on the bdev itself (in-process, -m 0x1) and on
   Nv0n1 (the same bdev exported by the target).
2. Writecache over an NVMe/TCP origin vs that origin alone: the target
   exports a malloc origin; bdevperf runs randwrite on Nv0n1 (origin
   alone), on a writecache (pmem cache in RAM) stacked on Nv0n1 with a
   cache big enough never to write back (burst), and on one with a small
   cache at its watermarks, writeback to the remote origin running
   (steady state, measured after a warm-up that fills it).
One run per cell. Results: nvme_tcp.json and nvme_tcp.md in --out.
"""

import argparse
import datetime
import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Bdevperf, RpcProcess, log, pmem_size, summarize  # noqa: E402

NQN = "nqn.2016-06.io.spdk:bench"
BS = 4096
WORKLOADS = ["randwrite", "randread"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


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


class RemoteTarget:
    """writecache_tgt on core 0 exporting `bdev` built by `cfg`."""

    def __init__(self, a, name, cfg, bdev):
        self.port = free_port()
        path = os.path.join(a.tmp, f"tgt_{name}.json")
        with open(path, "w") as f:
            json.dump({"subsystems": [{"subsystem": "bdev", "config": cfg},
                                      {"subsystem": "nvmf",
                                       "config": nvmf_config(bdev, self.port)}]}, f)
        sock = os.path.join(a.tmp, f"tgt_{name}.sock")
        self.proc = RpcProcess("writecache_tgt",
                               ["taskset", "-c", "0", os.path.join(a.bin, "writecache_tgt"),
                                "-m", "0x1", "-r", sock, "--json", path, "--log-level", "ERROR"],
                               sock, os.path.join(a.tmp, f"tgt_{name}.log"), 120)

    def close(self):
        self.proc.close()


def run_cells(bp, label, cells, secs):
    out = {}
    for wl, qd in cells:
        try:
            cell = summarize(bp.perform(wl, BS, qd, secs))
        except Exception as e:  # a failed cell is reported, the rest go on
            log(f"{label} {wl} qd {qd}: {e}")
            cell = None
        out[f"{wl}/{qd}"] = cell
        log(f"{label:28} {wl:9} qd {qd:3}: {cell['iops'] if cell else 0:12,.0f} IOPS")
    return out


def part1(a):
    blocks = a.mib * 256
    cache = os.path.join(a.tmp, "cache.pmem")
    cfgs = {
        "malloc": ([malloc("Malloc0", blocks)], "Malloc0"),
        "writecache": ([malloc("Origin0", blocks), pmem(cache, blocks // 2),
                        writecache("Origin0", {})], "WC0"),
    }
    cells = [(wl, q) for wl in WORKLOADS for q in a.qds]
    res = {}
    for name, (cfg, bdev) in cfgs.items():
        rm(cache)
        bp = Bdevperf(os.path.join(a.bin, "bdevperf"), a.tmp, f"inproc_{name}", cfg,
                      ["-m", "0x1"], bdev)
        try:
            inproc = run_cells(bp, f"in-process {name}", cells, a.secs)
        finally:
            bp.close()
        rm(cache)
        tgt = RemoteTarget(a, name, cfg, bdev)
        try:
            bp = Bdevperf(os.path.join(a.bin, "bdevperf"), a.tmp, f"host_{name}",
                          [attach(tgt.port)], ["-m", "0x2"], "Nv0n1")
            try:
                remote = run_cells(bp, f"nvme/tcp {name}", cells, a.secs)
            finally:
                bp.close()
        finally:
            tgt.close()
        res[name] = {"in_process": inproc, "nvme_tcp": remote}
    return res


def part2(a):
    blocks = a.mib * 256
    cache = os.path.join(a.tmp, "wc_cache.pmem")
    res = {}
    tgt = RemoteTarget(a, "origin", [malloc("Origin0", blocks)], "Origin0")
    try:
        bdevperf = os.path.join(a.bin, "bdevperf")
        cells = [("randwrite", q) for q in a.qds]
        bp = Bdevperf(bdevperf, a.tmp, "origin_alone", [attach(tgt.port)], ["-m", "0x2"], "Nv0n1")
        try:
            res["origin"] = run_cells(bp, "origin alone (nvme/tcp)", cells, a.secs)
        finally:
            bp.close()
        # Burst: the cache holds the whole origin and never writes back.
        rm(cache)
        cfg = [attach(tgt.port), pmem(cache, blocks + 16384),
               writecache("Nv0n1", {"high_watermark": 100, "low_watermark": 100})]
        bp = Bdevperf(bdevperf, a.tmp, "wc_burst", cfg, ["-m", "0x2"], "WC0")
        try:
            res["wc_burst"] = run_cells(bp, "writecache burst", cells, a.secs)
        finally:
            bp.close()
        # Steady state: a small cache at its watermarks (default 50/45), the
        # writeback to the remote origin running.
        rm(cache)
        cfg = [attach(tgt.port), pmem(cache, a.steady_mib * 256), writecache("Nv0n1", {})]
        bp = Bdevperf(bdevperf, a.tmp, "wc_steady", cfg, ["-m", "0x2"], "WC0")
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


def report(a, r1, r2):
    L = ["# NVMe/TCP initiator (bdev_nvme_attach_controller) over loopback", "",
         f"{datetime.datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} CPUs, "
         f"{a.secs:g} s per cell, one run each, 4 KiB I/O. Remote: `writecache_tgt -m 0x1` "
         "(core 0) exports the bdev over NVMe/TCP; `bdevperf -m 0x2` (core 1) attaches it "
         "with `bdev_nvme_attach_controller` (one I/O queue pair). In-process: `bdevperf -m 0x1` "
         "on the bdev itself.", "",
         "## Initiator -> target vs the same bdev in-process", "",
         "| bdev | workload | QD | in-process IOPS | NVMe/TCP IOPS | ratio | NVMe/TCP p50 us | NVMe/TCP p99 us |",
         "|---|---|---|---|---|---|---|---|"]
    for name, v in r1.items():
        for wl in WORKLOADS:
            for q in a.qds:
                k = f"{wl}/{q}"
                i, t = v["in_process"].get(k), v["nvme_tcp"].get(k)
                ii, ti = (i or {}).get("iops"), (t or {}).get("iops")
                ratio = f"{ti / ii:.2f}x" if ii and ti else "-"
                L.append(f"| {name} | {wl} | {q} | {fmt(ii)} | {fmt(ti)} | {ratio} | "
                         f"{(t or {}).get('p50_us', '-')} | {(t or {}).get('p99_us', '-')} |")
    L += ["", "## Writecache over an NVMe/TCP origin vs that origin alone (randwrite)", "",
          f"Origin: malloc ({a.mib} MiB) in the remote target. Burst: cache as big as the origin, "
          f"no writeback. Steady: {a.steady_mib} MiB cache at its watermarks after {a.warm:g} s "
          "of random writes, writeback to the remote origin running.", "",
          "| QD | origin alone IOPS | wc burst IOPS | burst/origin | wc steady IOPS | steady/origin | steady p99 us |",
          "|---|---|---|---|---|---|---|"]
    for q in a.qds:
        k = f"randwrite/{q}"
        o = (r2.get("origin", {}).get(k) or {}).get("iops")
        b = (r2.get("wc_burst", {}).get(k) or {}).get("iops")
        s = r2.get("wc_steady", {}).get(k) or {}
        si = s.get("iops")
        L.append(f"| {q} | {fmt(o)} | {fmt(b)} | {f'{b / o:.2f}x' if o and b else '-'} | "
                 f"{fmt(si)} | {f'{si / o:.2f}x' if o and si else '-'} | {s.get('p99_us', '-')} |")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--secs", type=float, default=3)
    ap.add_argument("--qds", default="1,32,128")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--steady-mib", type=int, default=32)
    ap.add_argument("--warm", type=float, default=3)
    a = ap.parse_args()
    a.qds = [int(q) for q in a.qds.split(",")]
    r1 = part1(a)
    r2 = part2(a)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "nvme_tcp.json"), "w") as f:
        json.dump({"initiator_vs_in_process": r1, "writecache_over_nvme_tcp": r2}, f, indent=1)
    md = report(a, r1, r2)
    with open(os.path.join(a.out, "nvme_tcp.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
