#!/usr/bin/env bash
# NVMe/TCP over loopback vs in-process (issues 14 and 15), in one command:
#
#   perf/nvme_tcp.sh [--quick] [--initiator bdevperf|nvmf_perf]
#                    [--parts ratios,origin] [--rounds N] [--ab BASE_BIN_DIR]
#
# writecache_tgt (core 0, one reactor) exports the bdev over loopback
# NVMe/TCP; the initiator runs on core 1: bdevperf over our
# bdev_nvme_attach_controller (default), or nvmf_perf (the target's small
# test initiator; perf/nvmf.sh is this with --initiator nvmf_perf).
# ratios: 4 KiB randwrite and randread at QD 1/32/128 on malloc and
# writecache, as ratios to the same bdev in-process (bdevperf -m 0x1).
# origin (bdevperf only): randwrite on a writecache stacked on the NVMe/TCP
# origin (burst: cache never writes back; steady state: small cache at its
# watermarks) vs the origin alone. --rounds N: medians of N rounds.
# --ab DIR: A/B against the writecache_tgt/bdevperf/nvmf_perf copied to DIR
# from an older build, run back to back with the new ones in each round.
# Results in perf/results/nvme_tcp.md and .json (nvmf.* for nvmf_perf).
# --quick: 1 s per cell. Overrides (environment): SECS (3), QDS (1,32,128),
# MIB (256), STEADY_MIB (32), WARM (3), SHM_DIR=/dev/shm,
# RESULTS_DIR=perf/results, PORTS=first-last (listener ports),
# NICE="nice -n -20", RT=1 (root: SCHED_FIFO for the target's reactor and
# nvmf_perf; quiet dedicated machines only).
# Cache files go on a tmpfs mounted huge=always under SHM_DIR (2 MiB pages,
# as DAX pmem) where root can mount one; CACHE_PAGES=4k puts them in SHM_DIR
# itself (see ram_tmp in perf/common.sh).
set -euo pipefail
SECS=${SECS:-3}
WARM=${WARM:-3}
ARGS=()
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) SECS=1; WARM=1 ;;
    --initiator|--parts|--rounds)
      [[ $# -ge 2 ]] || { usage >&2; exit 2; }
      ARGS+=("$1" "$2"); shift ;;
    --ab)
      [[ $# -ge 2 && -d "$2" ]] || { echo "--ab needs a directory of base binaries" >&2; exit 2; }
      ARGS+=(--base-bin "$(cd "$2" && pwd)"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
  shift
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=${RESULTS_DIR:-$ROOT/perf/results}
SHM_DIR=${SHM_DIR:-/dev/shm}
# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"
echo "building bdevperf, nvmf_perf and writecache_tgt (release)..." >&2
cargo build --release -p wc-perf -p writecache-tgt -q
ram_tmp "$SHM_DIR" wc-nvme-perf
python3 perf/nvme_tcp_bench.py --bin "$ROOT/target/release" --tmp "$TMP" --out "$OUT" \
  --secs "$SECS" --qds "${QDS:-1,32,128}" --mib "${MIB:-256}" \
  --steady-mib "${STEADY_MIB:-32}" --warm "$WARM" "${ARGS[@]}" &
PY_PID=$!
wait "$PY_PID"
