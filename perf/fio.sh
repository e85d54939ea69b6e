#!/usr/bin/env bash
# fio (Debian's, ioengine=nbd) through writecache_tgt's NBD export, in one
# command:
#
#   perf/fio.sh [--quick | --smoke]
#
# The bdevperf suite's matrix (perf/run.sh): 4 KiB random writes, 4 KiB
# random reads (cache hits and misses), 128 KiB sequential writes and a
# 70/30 random mix, at QD 1/8/32/128, on a writecache (pmem file in
# /dev/shm over a uring origin file + bdev_delay) and a malloc bdev that
# one target exports side by side; each cell is the median of 3 runs of
# 3 s (about 8 min). --quick: 1 run of 1 s, QD 1 and 32 (about 1.5 min).
# --smoke: 1 run of 0.3 s at QD 8 on 32 MiB (seconds; the test suite runs
# it). Job files: perf/fio/*.fio (usable by hand, see perf/fio/common.inc).
#
# Writes perf/results/fio.md (the report: ratios writecache/malloc from the
# same run) and fio.json. Overrides (environment): RUNS, SECS, RAMP,
# QDS="1 8 32 128", SIZE_MIB, TGT_ARGS="-m 0x1", SHM_DIR=/dev/shm,
# ORIGIN_DIR_PARENT=/var/tmp, RESULTS_DIR=perf/results, WRITECACHE_TGT (a
# built binary; otherwise a release build is made).
# Cache files go on a tmpfs mounted huge=always under SHM_DIR (2 MiB pages,
# as DAX pmem) where root can mount one; CACHE_PAGES=4k puts them in SHM_DIR
# itself (see ram_tmp in perf/common.sh).
set -euo pipefail

MODE=full
for arg in "$@"; do
  case "$arg" in
    --quick) MODE=quick ;;
    --smoke) MODE=smoke ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--quick | --smoke]" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
command -v fio >/dev/null || { echo "fio is not installed (scripts/deps.sh installs it)" >&2; exit 1; }
OUT=${RESULTS_DIR:-$ROOT/perf/results}
SHM_DIR=${SHM_DIR:-/dev/shm}
ORIGIN_PARENT=${ORIGIN_DIR_PARENT:-${TMPDIR:-/var/tmp}}

if [[ -n "${WRITECACHE_TGT:-}" ]]; then
  TGT=$WRITECACHE_TGT
else
  echo "building writecache_tgt (release)..." >&2
  cargo build --release -q -p writecache-tgt
  TGT="$ROOT/target/release/writecache_tgt"
fi

# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"

ram_tmp "$SHM_DIR" wc-fio
ORIGIN_DIR=$(mktemp -d "$ORIGIN_PARENT/wc-fio-origin.XXXXXX")

python3 perf/fio_bench.py --mode "$MODE" --tgt "$TGT" --tmp "$TMP" --origin-dir "$ORIGIN_DIR" \
  --out "$OUT" &
PY_PID=$!
wait "$PY_PID"
PY_PID=""
echo
sed -n '/^## Headline/,/^## 4 KiB random write$/p' "$OUT/fio.md" | sed '$d'
echo "report: $OUT/fio.md"
