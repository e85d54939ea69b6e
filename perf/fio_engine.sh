#!/usr/bin/env bash
# fio in-process (the writecache_bdev engine) vs bdevperf vs fio over NBD,
# in one command:
#
#   perf/fio_engine.sh
#
# Same bdevs (malloc; writecache with a pmem cache file in RAM over a
# uring origin file + bdev_delay, as perf/run.sh), 4 KiB random writes and
# reads, QD 1 and 32, 2 s per cell, RUNS=3 rounds of all methods (medians;
# about 4 min). Builds bdevperf, writecache_tgt and the engine first.
#
# Writes perf/results/fio_engine.md (the report: IOPS ratios to bdevperf
# from the same rounds) and fio_engine.json. Overrides (environment): RUNS,
# SECS, RAMP, QDS="1 32", SIZE_MIB, SHM_DIR=/dev/shm,
# ORIGIN_DIR_PARENT=/var/tmp, RESULTS_DIR=perf/results.
# Cache files go on a tmpfs mounted huge=always under SHM_DIR (2 MiB pages,
# as DAX pmem) where root can mount one; CACHE_PAGES=4k puts them in SHM_DIR
# itself (see ram_tmp in perf/common.sh).
set -euo pipefail

for arg in "$@"; do
  case "$arg" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
command -v fio >/dev/null || { echo "fio is not installed (scripts/deps.sh installs it)" >&2; exit 1; }
OUT=${RESULTS_DIR:-$ROOT/perf/results}
SHM_DIR=${SHM_DIR:-/dev/shm}
ORIGIN_PARENT=${ORIGIN_DIR_PARENT:-${TMPDIR:-/var/tmp}}

echo "building bdevperf, writecache_tgt and the fio engine (release)..." >&2
cargo build --release -q -p wc-perf -p writecache-tgt
ENGINE=$(bash scripts/build_fio_engine.sh --release)

# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"

ram_tmp "$SHM_DIR" wc-fio-engine
ORIGIN_DIR=$(mktemp -d "$ORIGIN_PARENT/wc-fio-engine-origin.XXXXXX")

python3 perf/fio_engine_bench.py --bin "$ROOT/target/release" --engine "$ENGINE" \
  --tmp "$TMP" --origin-dir "$ORIGIN_DIR" --out "$OUT" &
PY_PID=$!
wait "$PY_PID"
PY_PID=""
echo
sed -n '/^## Headline/,/^Target/p' "$OUT/fio_engine.md"
echo "report: $OUT/fio_engine.md"
