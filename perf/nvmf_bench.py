#!/usr/bin/env python3
"""NVMe/TCP target benchmark: 4 KiB random read / write at QD 1, 32, 128
through our target over loopback TCP, as ratios to the same bdev in-process.

Called by perf/nvmf.sh (which builds in release and makes the temp dir).
For each bdev (malloc; writecache in pmem mode with its cache file in RAM
over a malloc origin):
  * in-process: `bdevperf -z -m 0x1` on the bdev, one `perform_tests` per
    workload and queue depth;
  * over NVMe/TCP: `writecache_tgt -m 0x1` (one reactor) exports the same
    bdev configuration; `nvmf_perf` (one thread, one queue pair, pinned to
    the other core) drives it.
Writes run before reads, in both, so the reads find the same state.
Results: nvmf.json and nvmf.md in the output directory.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Bdevperf, RpcProcess, log, pmem_size, summarize  # noqa: E402

NQN = "nqn.2016-06.io.spdk:bench"
# On a shared machine other processes' time slices stall a two-process
# pipeline (target and initiator) far more than one spinning bdevperf:
# every stall of either side stops both. RT=1 (as root) gives the reactor
# threads (bdevperf's, writecache_tgt's) and nvmf_perf SCHED_FIFO priority 1
# for the runs (the kernel's RT throttling still leaves 5% to others);
# NICE="nice -n -20" is the milder alternative.
NICE = os.environ.get("NICE", "").split()
RT = os.environ.get("RT") == "1"


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
WORKLOADS = ["randwrite", "randread"]


def bdev_configs(tmp, mib):
    blocks = mib * 256
    malloc = [{"method": "bdev_malloc_create",
               "params": {"name": "Malloc0", "num_blocks": blocks, "block_size": 4096}}]
    cache_blocks = blocks // 2
    wc = [{"method": "bdev_malloc_create",
           "params": {"name": "Origin0", "num_blocks": blocks, "block_size": 4096}},
          {"method": "bdev_pmem_create",
           "params": {"name": "Cache0", "filename": os.path.join(tmp, "cache.pmem"),
                      "size": pmem_size(cache_blocks)}},
          {"method": "bdev_writecache_create",
           "params": {"name": "WC0", "base_bdev": "Origin0", "cache_bdev": "Cache0"}}]
    return [("malloc", "Malloc0", malloc), ("writecache", "WC0", wc)]


def nvmf_config(bdev, port):
    return [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": True}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": {"bdev_name": bdev}}},
        {"method": "nvmf_subsystem_add_listener",
         "params": {"nqn": NQN, "listen_address": {"trtype": "TCP", "traddr": "127.0.0.1",
                                                   "trsvcid": str(port)}}},
    ]


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def in_process(a, name, bdev, cfg):
    out = {}
    rm_cache(a.tmp)
    bp = Bdevperf(os.path.join(a.bin, "bdevperf"), a.tmp, f"inproc_{name}", cfg, ["-m", "0x1"], bdev)
    if NICE:
        subprocess.run(["renice", "-n", NICE[-1], "-p", str(bp.proc.pid)], capture_output=True)
    realtime_reactors(bp.proc.pid)
    try:
        for wl in WORKLOADS:
            for qd in a.qds:
                cell = summarize(bp.perform(wl, 4096, qd, a.secs))
                out[f"{wl}/{qd}"] = cell
                log(f"in-process {name:10} {wl:9} qd {qd:3}: {cell['iops'] if cell else 0:12,.0f} IOPS")
    finally:
        bp.close()
    return out


def rm_cache(tmp):
    p = os.path.join(tmp, "cache.pmem")
    if os.path.exists(p):
        os.unlink(p)


def over_tcp(a, name, bdev, cfg):
    out = {}
    rm_cache(a.tmp)
    port = free_port()
    path = os.path.join(a.tmp, f"tcp_{name}.json")
    with open(path, "w") as f:
        json.dump({"subsystems": [{"subsystem": "bdev", "config": cfg},
                                  {"subsystem": "nvmf", "config": nvmf_config(bdev, port)}]}, f)
    sock = os.path.join(a.tmp, f"tcp_{name}.sock")
    tgt = RpcProcess("writecache_tgt",
                     [*NICE, "taskset", "-c", "0", os.path.join(a.bin, "writecache_tgt"), "-m", "0x1",
                      "-r", sock, "--json", path, "--log-level", "ERROR"],
                     sock, os.path.join(a.tmp, f"tcp_{name}.log"), 120)
    realtime_reactors(tgt.proc.pid)
    try:
        for wl in WORKLOADS:
            for qd in a.qds:
                prio = ["chrt", "-f", "1"] if RT else NICE
                cmd = [*prio, "taskset", "-c", "1", os.path.join(a.bin, "nvmf_perf"),
                       "--addr", f"127.0.0.1:{port}", "--nqn", NQN, "--rw", wl,
                       "--qd", str(qd), "--time", str(a.secs), "--poll"]
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.secs + 60)
                if r.returncode != 0:
                    log(f"nvmf_perf failed: {r.stderr.strip()}")
                    out[f"{wl}/{qd}"] = None
                    continue
                cell = json.loads(r.stdout)
                out[f"{wl}/{qd}"] = cell
                log(f"nvme/tcp   {name:10} {wl:9} qd {qd:3}: {cell['iops']:12,.0f} IOPS")
    finally:
        tgt.close()
    return out


def report(a, results):
    L = ["# NVMe/TCP target: loopback vs in-process", "",
         f"{datetime.datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} CPUs, "
         f"{a.secs} s per cell, one run each. In-process: `bdevperf -m 0x1`. Over TCP: "
         "`writecache_tgt -m 0x1` (core 0, busy polling) exporting the same bdev, driven by "
         "`nvmf_perf --poll` (one thread busy-polling one queue pair, core 1). 4 KiB I/O; "
         f"writes run first, then reads. Priority: "
         f"`{'SCHED_FIFO 1 for the reactors and nvmf_perf' if RT else ' '.join(NICE) or 'default'}`.", "",
         "| bdev | workload | QD | in-process IOPS | NVMe/TCP IOPS | ratio | NVMe/TCP p50 µs | NVMe/TCP p99 µs |",
         "|---|---|---|---|---|---|---|---|"]
    for name in results:
        for wl in WORKLOADS:
            for qd in a.qds:
                k = f"{wl}/{qd}"
                i = results[name]["in_process"].get(k)
                t = results[name]["tcp"].get(k)
                ii = i["iops"] if i else 0
                ti = t["iops"] if t else 0
                ratio = f"{ti / ii:.2f}x" if ii and ti else "-"
                p50 = t["p50_us"] if t else "-"
                p99 = t["p99_us"] if t else "-"
                L.append(f"| {name} | {wl} | {qd} | {ii:,.0f} | {ti:,.0f} | {ratio} | {p50} | {p99} |")
    L += ["", "Target of issue 14: NVMe/TCP >= 0.5x the in-process IOPS on 1 reactor each side."]
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--secs", type=float, default=3)
    ap.add_argument("--qds", default="1,32,128")
    ap.add_argument("--mib", type=int, default=512)
    a = ap.parse_args()
    a.qds = [int(q) for q in a.qds.split(",")]
    results = {}
    for name, bdev, cfg in bdev_configs(a.tmp, a.mib):
        results[name] = {"in_process": in_process(a, name, bdev, cfg),
                         "tcp": over_tcp(a, name, bdev, cfg)}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "nvmf.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = report(a, results)
    with open(os.path.join(a.out, "nvmf.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
