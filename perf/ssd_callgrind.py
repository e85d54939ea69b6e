#!/usr/bin/env python3
"""Instructions per 4 KiB random write under callgrind (issue 13's ssd-mode
target, counted instead of timed): ssd mode with the cache on a malloc bdev
vs that malloc bdev alone, and any number of bdevperf builds in one run.

Each cell is one `bdevperf -q 32 -o 4096 -w randwrite -m 0x1` run under
`valgrind --tool=callgrind --separate-threads=yes`. From the reactor
thread's profile it takes the inclusive cost of the completions the bdev
layer's completion poller runs (`finish_io` called from
`run_completions`: every I/O's submission and completion happen under
them once the job runs), less the control-path callbacks among them
(`FnCompletion`: instance start, commits' metadata I/O), divided by the
I/Os bdevperf completed. That leaves out the start, other pollers and
the poller's own loop, which also runs on every idle reactor iteration
(counting it made one build's figure vary by 400 instructions per write
on a loaded machine), so the figure does not depend on how long the run
was or how loaded the machine is (callgrind slows the run 50x; the I/O
count varies, the per-I/O cost does not). Writes that ssd mode queues
for its channel's poller (several in one iteration: QD 32) are placed
there, outside any completion: that poller step (`run_batch`) is added. Commits by
age are pushed out of the run (autocommit_time_ms 1 h); a 0.6 s run
under callgrind writes fewer than the 64 Ki blocks of ssd mode's default
autocommit, so the figure is the data path's alone.

Usage: perf/ssd_callgrind.py --bin target/release/bdevperf [--bin OTHER ...]
                             [--secs 0.6] [--no-malloc]
Prints one line per build: ssd-mode instructions per write, malloc's, the
ratio malloc/ssd (the IOPS ratio the target asks for, if IPC were equal).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

CACHE_BLOCKS = 131072  # 512 MiB of 4 KiB blocks


def config(tmp, ssd):
    malloc = {"method": "bdev_malloc_create",
              "params": {"name": "Cache0", "num_blocks": CACHE_BLOCKS, "block_size": 4096}}
    if not ssd:
        return [malloc], "Cache0"
    origin_file = os.path.join(tmp, "origin.img")
    with open(origin_file, "wb") as f:
        f.truncate(16 << 30)  # sparse; random LBAs over 4 Mi blocks rarely repeat
    origin = {"method": "bdev_uring_create",
              "params": {"name": "Origin0", "filename": origin_file, "block_size": 4096}}
    wc = {"method": "bdev_writecache_create",
          "params": {"name": "WC0", "base_bdev": "Origin0", "cache_bdev": "Cache0",
                     "mode": "ssd", "high_watermark": 95, "low_watermark": 90,
                     "autocommit_time_ms": 3600000}}
    return [origin, malloc, wc], "WC0"


def star(ann, pattern):
    """Inclusive cost of the function whose `*` line matches, and where."""
    m = re.search(r"\n *([\d,]+) \([ .\d%]+\)  \*  [^\n]*" + pattern, ann)
    if m is None:
        return 0, -1
    return int(m.group(1).replace(",", "")), m.start()


def calls(ann, pattern):
    """Calls of a function: the sum over its callers (caller tree)."""
    _, at = star(ann, pattern)
    if at < 0:
        return 0
    block = ann[:at].split("\n\n")[-1]
    return sum(int(x.replace(",", "")) for x in re.findall(r"\((\d[\d,]*)x\)", block))


def per_io(binary, tmp, ssd, secs):
    cfg, target = config(tmp, ssd)
    cfg_path = os.path.join(tmp, "config.json")
    with open(cfg_path, "w") as f:
        json.dump({"subsystems": [{"subsystem": "bdev", "config": cfg}]}, f)
    out = os.path.join(tmp, "cg.out")
    for old in os.listdir(tmp):
        if old.startswith("cg.out"):
            os.remove(os.path.join(tmp, old))
    cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes",
           f"--callgrind-out-file={out}", binary, "--json", cfg_path,
           "-q", "32", "-o", "4096", "-w", "randwrite", "-t", str(secs), "-m", "0x1",
           "-T", target, "--log-level", "ERROR"]
    with open(os.path.join(tmp, "bdevperf.log"), "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if p.wait(timeout=600) != 0:
                sys.exit(f"bdevperf failed, see {tmp}/bdevperf.log")
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    best, best_ir = None, -1
    for name in os.listdir(tmp):
        if name.startswith("cg.out-"):
            path = os.path.join(tmp, name)
            with open(path) as f:
                ir = next((int(l.split()[1]) for l in f if l.startswith("summary:")), 0)
            if ir > best_ir:
                best, best_ir = path, ir
    # Run from the temporary directory: from a checkout, callgrind_annotate
    # finds the sources and names (and merges) inlined functions otherwise.
    ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--tree=caller", best],
                         capture_output=True, text=True, check=True, cwd=tmp).stdout
    total, _ = star(ann, r"wc_bdev::channel::finish_io \[")
    # Writes that come several per iteration are placed by the channel's
    # poller (`run_batch`), outside any completion: their cost too.
    deferred, _ = star(ann, r"Local>::run_batch \[")
    total += deferred
    control, _ = star(ann, r"<wc_bdev::io::FnCompletion<F> as wc_bdev::io::IoCompletion>::io_done \[")
    ios = calls(ann, r"Job as wc_bdev::io::IoCompletion>::io_done \[")
    if total == 0:
        sys.exit(f"no wc_bdev::channel::finish_io in {best} (inlined?)")
    if ios == 0:
        sys.exit(f"no I/O completed in {best}")
    return (total - control) / ios, ios


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", action="append", required=True, help="a bdevperf binary")
    ap.add_argument("--secs", type=float, default=0.6)
    ap.add_argument("--no-malloc", action="store_true", help="skip the malloc-alone cell")
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    with tempfile.TemporaryDirectory(prefix="wc-callgrind-") as tmp:
        for b in a.bin:
            ssd, n = per_io(b, tmp, True, a.secs)
            line = f"{b}: ssd mode {ssd:.0f} instructions per write ({n} writes)"
            if not a.no_malloc:
                alone, m = per_io(b, tmp, False, a.secs)
                line += f"; malloc alone {alone:.0f} ({m} writes); malloc/ssd {alone / ssd:.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
