#!/usr/bin/env bash
# The benchmark suite of issue 6, in one command:
#
#   perf/run.sh [--quick]
#
# Runs the whole matrix with our SPDK-compatible bdevperf -- 4 KiB random
# writes, 4 KiB random reads (cache hits and misses), 128 KiB sequential
# writes and a 70/30 random mix, at QD 1/8/32/128, on 1 and 2 reactors
# (-m 0x1; -m 0x3 -C), on null, malloc, the origin alone (uring O_DIRECT on
# a file; also wrapped in bdev_delay, 40 us avg / 80 us p99, a stand-in for
# an NVMe) and writecache (pmem mode, cache file in RAM) over that
# origin -- plus writecache in the steady state (a small cache kept at the
# high watermark while writeback runs) and wc_recovery (recovery time for
# 1/4/16 Mi cache blocks of 512 B, RAM per cache block) and copy_limit (the
# raw-copy limit: 4 KiB / 128 KiB non-temporal stores and memcpy in and out
# of a mapping of the cache's size, one core, no framework; the report shows
# writecache/limit next to writecache/malloc). Every cell is the median of 3
# runs (--quick: 1 run of 1 s, QD 1 and 32: a few minutes).
#
# Writes perf/results/report.md, results.json, headline.md and PNG plots
# (perf/plot.py, matplotlib: installed with pip when missing).
# Overrides (environment): RUNS, SECS, QDS="1 8 32 128", ORIGIN_MIB=1024,
# STEADY_CACHE_MIB=64, STEADY_WARM, STEADY_SECS, RECOVERY_MI="1 4 16",
# SHM_DIR=/dev/shm, ORIGIN_DIR_PARENT=/var/tmp, RESULTS_DIR=perf/results.
# Cache files go on a tmpfs mounted huge=always under SHM_DIR (2 MiB pages,
# as DAX pmem) where root can mount one; CACHE_PAGES=4k puts them in SHM_DIR
# itself (see ram_tmp in perf/common.sh).
set -euo pipefail

QUICK=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=(--quick) ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=${RESULTS_DIR:-$ROOT/perf/results}
SHM_DIR=${SHM_DIR:-/dev/shm}
ORIGIN_PARENT=${ORIGIN_DIR_PARENT:-${TMPDIR:-/var/tmp}}

# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"

echo "building bdevperf, wc_recovery and copy_limit (release)..." >&2
cargo build --release -p wc-perf -q
BIN="$ROOT/target/release"

if ! python3 -c 'import matplotlib' 2>/dev/null; then
  echo "installing matplotlib..." >&2
  python3 -m pip install --quiet matplotlib 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages matplotlib ||
    echo "warning: no matplotlib; the report will have no plots" >&2
fi

ram_tmp "$SHM_DIR" wc-perf
ORIGIN_DIR=$(mktemp -d "$ORIGIN_PARENT/wc-perf-origin.XXXXXX")

ARGS=(--tmp "$TMP" --origin-dir "$ORIGIN_DIR" --bin "$BIN" --out "$OUT" "${QUICK[@]}")
EST=$(python3 perf/bench.py "${ARGS[@]}" --estimate-only)
echo "perf/run.sh ${QUICK[*]}: estimated $((EST / 60)) min $((EST % 60)) s" \
  "(bounded: every test has a fixed duration); started $(date '+%H:%M:%S')" >&2

START=$SECONDS
python3 perf/bench.py "${ARGS[@]}" &
PY_PID=$!
wait "$PY_PID"
PY_PID=""

if python3 -c 'import matplotlib' 2>/dev/null; then
  python3 perf/plot.py "$OUT"
fi
echo "finished in $(((SECONDS - START) / 60)) min $(((SECONDS - START) % 60)) s;" \
  "report: $OUT/report.md" >&2
echo
cat "$OUT/headline.md"
