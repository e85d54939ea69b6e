#!/usr/bin/env python3
"""Per-I/O cost of the NVMe/TCP loopback pair (our bdevperf initiator on
core 1, writecache_tgt on core 0, as in perf/nvme_tcp_bench.py), for one
or more builds back to back (order alternating per round), medians:

  * syscalls per I/O on each side (perf stat tracepoints: all, recvfrom,
    recvfrom that returned data, writev, epoll_wait), counted during the
    middle of each cell;
  * the target reactor's CPU per I/O: its thread's CPU time times the
    share of its iterations that did work (framework_get_reactors busy /
    (busy + idle) ticks), so busy polling and time slices lost to other
    processes are left out.

Needs root (tracepoints). Example (A/B of an old and a new build):
  PORTS=47300-47399 perf/nvme_tcp_cost.py --bins /tmp/base,target/release \\
      --cells randread:32,randread:128,randwrite:32,randwrite:128
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvme_tcp_bench as nb  # noqa: E402
from bench import log, summarize  # noqa: E402

EVENTS = {"all": "raw_syscalls:sys_enter", "recv": "syscalls:sys_enter_recvfrom",
          "writev": "syscalls:sys_enter_writev", "epoll_wait": "syscalls:sys_enter_epoll_wait"}


def perf_stat(pid, path, secs):
    cmd = ["perf", "stat", "-x", ",", "-o", path, "-p", str(pid)]
    for e in EVENTS.values():
        cmd += ["-e", e]
    cmd += ["-e", "syscalls:sys_exit_recvfrom", "--filter", "ret > 0", "--", "sleep", str(secs)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_stat(path):
    names = {v: k for k, v in EVENTS.items()}
    names["syscalls:sys_exit_recvfrom"] = "recv_data"
    out = {}
    for line in open(path):
        f = line.strip().split(",")
        if len(f) > 2 and f[2] in names and f[0].replace(".", "").isdigit():
            out[names[f[2]]] = float(f[0])
    return out


def thread_cpu(pid, tid):
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cell(a, tgt, bp, wl, qd):
    window = max(0.2, a.secs - 0.6)

    def stats():
        time.sleep(0.3)
        procs = [perf_stat(tgt.proc.proc.pid, f"{a.tmp}/stat_tgt", window),
                 perf_stat(bp.proc.pid, f"{a.tmp}/stat_host", window)]
        for p in procs:
            p.wait()

    th = threading.Thread(target=stats)
    th.start()
    r0 = tgt.proc.call("framework_get_reactors")["reactors"][0]
    cpu0 = thread_cpu(tgt.proc.proc.pid, r0["tid"])
    res = summarize(bp.perform(wl, nb.BS, qd, a.secs))
    th.join()
    r1 = tgt.proc.call("framework_get_reactors")["reactors"][0]
    cpu1 = thread_cpu(tgt.proc.proc.pid, r0["tid"])
    if not res:
        return None
    busy, idle = r1["busy"] - r0["busy"], r1["idle"] - r0["idle"]
    ios = res["iops"] * a.secs
    row = {"iops": res["iops"], "tgt_busy_share": busy / max(1, busy + idle),
           "tgt_cpu_us_per_io": 1e6 * (busy / max(1, busy + idle)) * (cpu1 - cpu0) / ios}
    for side in ("tgt", "host"):
        for k, v in read_stat(f"{a.tmp}/stat_{side}").items():
            row[f"{side}_{k}_per_io"] = v / (res["iops"] * window)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bins", required=True, help="comma-separated build dirs")
    ap.add_argument("--bdev", choices=["malloc", "writecache"], default="malloc")
    ap.add_argument("--cells", default="randread:32,randread:128,randwrite:32,randwrite:128")
    ap.add_argument("--secs", type=float, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256)
    a = ap.parse_args()
    bins = a.bins.split(",")
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in a.cells.split(",")]
    out = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        a.tmp = tmp
        for r in range(a.rounds):
            for b in (bins if r % 2 == 0 else bins[::-1]):
                cfg, bdev = nb.bdev_configs(a)[a.bdev]
                nb.rm(os.path.join(tmp, "cache.pmem"))
                tgt = nb.RemoteTarget(a, b, "cost", cfg, bdev)
                try:
                    bp = nb.bdevperf(b, a, "cost_host", [nb.attach(tgt.port)], "0x2", "Nv0n1")
                    try:
                        bp.perform("randwrite", nb.BS, 32, 1)  # reads find written blocks
                        for wl, qd in cells:
                            row = cell(a, tgt, bp, wl, qd)
                            out.setdefault((b, wl, qd), []).append(row)
                            log(f"{b} {wl} qd {qd}: {row['iops'] if row else 0:,.0f} IOPS")
                    finally:
                        bp.close()
                finally:
                    tgt.close()
    keys = ["iops", "tgt_cpu_us_per_io", "tgt_busy_share", "tgt_recv_data_per_io",
            "tgt_recv_per_io", "tgt_epoll_wait_per_io", "tgt_writev_per_io",
            "host_recv_data_per_io", "host_recv_per_io", "host_writev_per_io"]
    print(f"| build | {a.bdev} cell | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for (b, wl, qd), rows in out.items():
        rows = [r for r in rows if r]
        med = [statistics.median(r.get(k, 0) for r in rows) if rows else 0 for k in keys]
        print(f"| {b} | {wl}/{qd} | " + " | ".join(
            f"{v:,.0f}" if k == "iops" else f"{v:.3f}" for k, v in zip(keys, med)) + " |")


if __name__ == "__main__":
    main()
