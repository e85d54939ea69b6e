#!/usr/bin/env bash
# NVMe/TCP target benchmark (issue 14), in one command:
#
#   perf/nvmf.sh [--quick]
#
# 4 KiB random writes then reads at QD 1/32/128 on malloc and on writecache
# (pmem cache file in RAM over a malloc origin): in-process with bdevperf
# (-m 0x1), then over loopback NVMe/TCP (writecache_tgt -m 0x1 on core 0,
# nvmf_perf with one queue pair on core 1); ratios in
# perf/results/nvmf.md and nvmf.json. --quick: 1 s per cell.
# Overrides (environment): SECS (3), QDS (1,32,128), MIB (512),
# SHM_DIR=/dev/shm, RESULTS_DIR=perf/results; on a busy shared machine
# RT=1 (root: SCHED_FIFO for the reactors and the initiator during the
# runs) or NICE="nice -n -20" (see perf/nvmf_bench.py).
set -euo pipefail
SECS=${SECS:-3}
for arg in "$@"; do
  case "$arg" in
    --quick) SECS=1 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=${RESULTS_DIR:-$ROOT/perf/results}
SHM_DIR=${SHM_DIR:-/dev/shm}
# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"
echo "building bdevperf, nvmf_perf and writecache_tgt (release)..." >&2
cargo build --release -p wc-perf -p writecache-tgt -q
TMP=$(mktemp -d "$SHM_DIR/wc-nvmf-perf.XXXXXX")
python3 perf/nvmf_bench.py --bin "$ROOT/target/release" --tmp "$TMP" --out "$OUT" \
  --secs "$SECS" --qds "${QDS:-1,32,128}" --mib "${MIB:-512}" &
PY_PID=$!
wait "$PY_PID"
