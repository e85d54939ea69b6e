#!/usr/bin/env python3
"""Where the time of a cell goes, writecache against malloc: profiles the
same bdevperf cell on both (`perf/profile_cell.py`, the matrix's state),
groups each profile's samples by layer and prints nanoseconds of a core
per I/O for each layer, side by side, so the difference between the two
columns is what the cache costs on top of malloc's work — and which layer
it is in.

Usage: perf/bounds.py [--out FILE] [--secs S] CELL...

  CELL  WORKLOAD:QD:MODE, e.g. randread_hit:1:1r write128k:128:2r
        (WORKLOAD and MODE as perf/profile_cell.py takes them)
Environment: MIB (bdev size, default 1024, the matrix's), BIN (bdevperf,
default target/release/bdevperf), PRE_WRITE128K (profile_cell's PRE for
write128k cells, default randwrite: the matrix's state).

ns per I/O = (the layer's share of the process's samples) x (cores busy
polling) / IOPS of the profiled run. Both bdevs busy-poll every core they
have, so the shares are shares of the same wall time.
"""

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Layers, first match wins (perf's demangled symbol names).
LAYERS = [
    ("data copy", re.compile(r"^\[\.\] .*(memmove|memcpy|memset|copy_nt|nt_copy|copy_into_io"
                             r"|copy_from_io|write_nt|stream_copy)")),
    ("cache index", re.compile(r"wc_writecache::meta::(Index|Slots)")),
    ("cache block states, free pool", re.compile(r"wc_writecache::meta::|FreePool|free_drip"
                                                 r"|wc_writecache::fifo")),
    ("cache I/O path", re.compile(r"wc_writecache::channel")),
    ("cache commit, writeback, home", re.compile(r"wc_writecache::|crossbeam_epoch")),
    ("bdev layer (channels, I/O, completions)", re.compile(r"wc_bdev::")),
    ("malloc module", re.compile(r"wc_bdev_malloc")),
    ("stacked bdevs (delay, uring, pmem)", re.compile(r"wc_bdev_(delay|uring|pmem)")),
    ("reactor (poller loop, messages)", re.compile(r"wc_reactor::")),
    ("bdevperf job", re.compile(r"bdevperf::")),
    ("kernel", re.compile(r"^\[k\]")),
]


def layer_of(sym):
    for name, rx in LAYERS:
        if rx.search(sym):
            return name
    return "other"


def profile(wk, qd, mode, bdev, outdir, secs):
    svg = os.path.join(outdir, f"{wk}-{qd}-{mode}-{bdev}.svg")
    env = dict(os.environ, BDEV=bdev, MIB=os.environ.get("MIB", "1024"), SECS=str(secs),
               NO_FLAME="1")
    if wk == "write128k":
        env.setdefault("PRE", os.environ.get("PRE_WRITE128K", "randwrite"))
    cmd = [sys.executable, os.path.join(ROOT, "perf/profile_cell.py"), wk, str(qd), mode, svg]
    if os.environ.get("BIN"):
        cmd.append(os.environ["BIN"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    m = re.search(r"([\d,]+) IOPS", out.stdout)
    if not m:
        raise RuntimeError(f"profile of {wk} {qd} {mode} {bdev} failed:\n{out.stdout}{out.stderr}")
    iops = float(m.group(1).replace(",", ""))
    data = os.path.splitext(svg)[0] + ".data"
    rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym",
                          "--stdio", "-g", "none"], capture_output=True, text=True, check=True)
    layers, syms = {}, []
    for ln in rep.stdout.splitlines():
        mm = re.match(r"\s*([\d.]+)%\s+(\[.\])\s+(.*\S)", ln)
        if not mm:
            continue
        share, kind, sym = float(mm.group(1)) / 100, mm.group(2), mm.group(3)
        key = f"{kind} {sym}"
        layers[layer_of(key)] = layers.get(layer_of(key), 0.0) + share
        syms.append((share, sym))
    return iops, layers, syms


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", nargs="+")
    ap.add_argument("--out", help="append the markdown here too")
    ap.add_argument("--secs", type=float, default=2)
    ap.add_argument("--keep", default="/tmp/wc-bounds", help="where the perf data goes")
    a = ap.parse_args()
    os.makedirs(a.keep, exist_ok=True)
    lines = []
    for cell in a.cells:
        wk, qd, mode = cell.split(":")
        cores = 2 if mode == "2r" else 1
        start = len(lines)
        res = {b: profile(wk, int(qd), mode, b, a.keep, a.secs) for b in ("malloc", "wc")}
        ns = {b: {k: v * cores * 1e9 / res[b][0] for k, v in res[b][1].items()} for b in res}
        tot = {b: cores * 1e9 / res[b][0] for b in res}
        lines += [f"### {wk}, QD {qd}, {mode}: wc/malloc {res['wc'][0] / res['malloc'][0]:.2f} "
                  f"in the profiled runs ({res['wc'][0]:,.0f} vs {res['malloc'][0]:,.0f} IOPS)", "",
                  "| layer | malloc ns/I/O | writecache ns/I/O | difference |",
                  "|---|---:|---:|---:|"]
        names = [n for n, _ in LAYERS] + ["other"]
        for n in names:
            m, w = ns["malloc"].get(n, 0.0), ns["wc"].get(n, 0.0)
            if m < 0.5 and w < 0.5:
                continue
            lines.append(f"| {n} | {m:.0f} | {w:.0f} | {w - m:+.0f} |")
        lines.append(f"| **total (a core's time per I/O)** | **{tot['malloc']:.0f}** | "
                     f"**{tot['wc']:.0f}** | **{tot['wc'] - tot['malloc']:+.0f}** |")
        top = ", ".join(f"`{s.split('::')[-1] if '::' in s else s}` {p * 100:.1f}%"
                        for p, s in res["wc"][2][:6])
        lines += ["", f"writecache's top symbols: {top}.", ""]
        print("\n".join(lines[start:]), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
