#!/usr/bin/env python3
"""Plots of perf/results/results.json (written by perf/bench.py).

Usage: plot.py RESULTS_DIR

* iops_<workload>.png: IOPS vs queue depth per bdev (log scale), one panel
  per reactor layout; the random-write plot adds writecache's steady state.
* latency_randwrite.png: p50 and p99 of 4 KiB random writes vs queue depth.
* recovery.png: recovery time vs cache size, and RAM per cache block.
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "null": ("tab:gray", "o", ":"),
    "malloc": ("tab:blue", "s", "-"),
    "uring": ("tab:brown", "v", "-"),
    "delay": ("tab:orange", "^", "-"),
    "wc": ("tab:green", "D", "-"),
    "wc_steady": ("tab:red", "x", "--"),
}


def legend_below(fig, axes, ncol=6):
    """One legend for all panels, under them (it never hides a curve)."""
    seen = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    rows = -(-len(seen) // ncol)
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=ncol,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.04 * rows, 1, 0.95))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__),
                                                              "results")
    with open(os.path.join(out, "results.json")) as f:
        doc = json.load(f)
    raw, med = doc["raw"], doc["median"]
    st = raw["settings"]
    qds = st["qds"]
    labels = dict(st["bdevs"])
    modes = st["modes"]
    info = raw["info"]
    machine = f"{info['cpu']}, {info['cores']} cores, {info['date'][:10]}"

    def series(b, m, w, k="iops"):
        xs, ys = [], []
        for q in qds:
            c = med.get(f"{b}|{m}|{w}|{q}")
            if c and c.get(k):
                xs.append(q)
                ys.append(c[k])
        return xs, ys

    for wkey, title in st["workloads"]:
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 5), sharey=True)
        for ax, (mkey, mlabel) in zip(axes, modes):
            bdevs = [b for b, _ in st["bdevs"] if b != "wc_steady"]
            if wkey == "randwrite":
                bdevs.append("wc_steady")
            for b in bdevs:
                xs, ys = series(b, mkey, wkey)
                if xs:
                    c, mk, ls = STYLE.get(b, (None, "o", "-"))
                    ax.plot(xs, ys, marker=mk, linestyle=ls, color=c, label=labels.get(b, b))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(qds)
            ax.set_xticklabels([str(q) for q in qds])
            ax.set_xlabel("queue depth (per job)")
            ax.set_title(mlabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("IOPS (median)")
        legend_below(fig, axes)
        fig.suptitle(f"{title} — {machine}", fontsize=10)
        fig.savefig(os.path.join(out, f"iops_{wkey}.png"), dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 5), sharey=True)
    for ax, (mkey, mlabel) in zip(axes, modes):
        for b in ["malloc", "delay", "wc", "wc_steady"]:
            c, mk, _ = STYLE[b]
            for k, ls in (("p50_us", "-"), ("p99_us", "--")):
                xs, ys = series(b, mkey, "randwrite", k)
                if xs:
                    ax.plot(xs, ys, marker=mk, linestyle=ls, color=c,
                            label=f"{labels.get(b, b)} {k[:3]}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(qds)
        ax.set_xticklabels([str(q) for q in qds])
        ax.set_xlabel("queue depth (per job)")
        ax.set_title(mlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (µs)")
    legend_below(fig, axes, ncol=4)
    fig.suptitle(f"4 KiB random write latency (solid p50, dashed p99) — {machine}",
                 fontsize=10)
    fig.savefig(os.path.join(out, "latency_randwrite.png"), dpi=110)
    plt.close(fig)

    rec = [(int(b), med.get(f"recovery|{b}")) for b in st["recovery_blocks"]]
    rec = [(b, c) for b, c in rec if c]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if rec:
        xs = [b / 2**20 for b, _ in rec]
        a1.plot(xs, [c["recovery_s"] for _, c in rec], marker="o", color="tab:green",
                label="recovery")
        a1.plot(xs, [c["fill_s"] for _, c in rec], marker="s", linestyle="--",
                color="tab:gray", label="fill (for reference)")
        a1.set_xscale("log", base=2)
        a1.set_xticks(xs)
        a1.set_xticklabels([f"{x:g} Mi\n({b * 512 / 2**30:g} GiB)" for x, (b, _) in
                            zip(xs, rec)])
        a1.set_xlabel("cache blocks of 512 B")
        a1.set_ylabel("seconds")
        a1.set_title("recovery time of a full cache")
        a1.grid(True, alpha=0.3)
        a1.legend(fontsize=8)
        w = 0.35
        idx = range(len(rec))
        a2.bar([i - w / 2 for i in idx], [c["ram_empty_b"] for _, c in rec], w,
               label="empty", color="tab:blue")
        a2.bar([i + w / 2 for i in idx], [c["ram_full_b"] for _, c in rec], w,
               label="full", color="tab:orange")
        a2.axhline(32, color="tab:red", linestyle=":", label="32 B target")
        a2.set_xticks(list(idx))
        a2.set_xticklabels([f"{b >> 20} Mi" for b, _ in rec])
        a2.set_ylabel("bytes of RAM per cache block")
        a2.set_title("RAM per cache block")
        a2.legend(fontsize=8)
        a2.grid(True, axis="y", alpha=0.3)
    else:
        a1.text(0.5, 0.5, "no recovery results", ha="center")
    fig.suptitle(f"wc_recovery — {machine}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(os.path.join(out, "recovery.png"), dpi=110)
    plt.close(fig)
    print(f"plots written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
