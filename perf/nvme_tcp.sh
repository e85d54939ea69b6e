#!/usr/bin/env bash
# NVMe/TCP initiator benchmark (issue 15), in one command:
#
#   perf/nvme_tcp.sh [--quick]
#
# bdevperf (core 1) over bdev_nvme_attach_controller to writecache_tgt
# (core 0) exporting the bdev over loopback NVMe/TCP: 4 KiB randwrite and
# randread at QD 1/32/128 on malloc and writecache, as ratios to the same
# bdev in-process; then randwrite on a writecache stacked on the NVMe/TCP
# origin (burst: cache never writes back; steady state: small cache at its
# watermarks) vs the origin alone. One run per cell; results in
# perf/results/nvme_tcp.md and nvme_tcp.json. --quick: 1 s per cell.
# Overrides (environment): SECS (3), QDS (1,32,128), MIB (256),
# STEADY_MIB (32), WARM (3), SHM_DIR=/dev/shm, RESULTS_DIR=perf/results.
set -euo pipefail
SECS=${SECS:-3}
WARM=${WARM:-3}
for arg in "$@"; do
  case "$arg" in
    --quick) SECS=1; WARM=1 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=${RESULTS_DIR:-$ROOT/perf/results}
SHM_DIR=${SHM_DIR:-/dev/shm}
# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"
echo "building bdevperf and writecache_tgt (release)..." >&2
cargo build --release -p wc-perf -p writecache-tgt -q
TMP=$(mktemp -d "$SHM_DIR/wc-nvme-perf.XXXXXX")
python3 perf/nvme_tcp_bench.py --bin "$ROOT/target/release" --tmp "$TMP" --out "$OUT" \
  --secs "$SECS" --qds "${QDS:-1,32,128}" --mib "${MIB:-256}" \
  --steady-mib "${STEADY_MIB:-32}" --warm "$WARM" &
PY_PID=$!
wait "$PY_PID"
