#!/usr/bin/env bash
# Opt-in interop test of OUR NVMe/TCP target with SPDK's initiators (issue
# 14), and SPDK's own nvmf_tgt measured the same way in the same run: each
# target (core 0) exports a 64 MiB malloc bdev on 127.0.0.1; on core 1
#   * SPDK's spdk_nvme_perf: randrw (70% reads) QD 32, 4 KiB;
#   * SPDK's bdevperf over bdev_nvme_attach_controller: verify and randrw
#     (70% reads) QD 32, 4 KiB;
# each without and with header+data digests (spdk_nvme_perf -H -I;
# bdev_nvme_attach_controller hdgst/ddgst). A run that fails (a verify
# mismatch, an error exit, no result) fails the test; the two targets
# alternate run by run (a fresh target each) and their IOPS (medians of
# ROUNDS) go side by side to perf/results/spdk_initiators.md. Skips (exit 0) unless SPDK_DIR points at a built
# SPDK tree (../shared/reference/spdk-peer-build.md); needs root for
# hugepages unless 1024 are reserved. Never part of scripts/test.sh.
# Usage: SPDK_DIR=/var/tmp/spdk tests/peer/spdk_initiators.sh [path/to/writecache_tgt]
# Environment: SECS (5), QD (32), ROUNDS (1), PORTS (first-last), RESULTS_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/peer/spdk_common.sh
source tests/peer/spdk_common.sh
require_spdk build/bin/spdk_nvme_perf build/examples/bdevperf build/bin/nvmf_tgt
OUR_TGT=${1:-target/release/writecache_tgt}
[ -x "$OUR_TGT" ] || fail "$OUR_TGT not built (cargo build --release -p writecache-tgt)"
command -v spdk-rpc >/dev/null || fail "spdk-rpc not installed (scripts/deps.sh)"
require_hugepages 1024
NQN=nqn.2016-06.io.spdk:peer
SECS=${SECS:-5}
QD=${QD:-32}
ROUNDS=${ROUNDS:-1}
declare -A IOPS

# spdk_nvme_perf against $PORT; $1: digests (true/false), $2: result key.
run_nvme_perf() {
  local dg=$1 key=$2 flags=()
  [ "$dg" = true ] && flags=(-H -I)
  run_for_iops "$key" "spdk_nvme_perf randrw (digests $dg)" "$TMP/nvme_perf.out" \
    "$SPDK_DIR/build/bin/spdk_nvme_perf" -c 0x2 -s 512 -q "$QD" -o 4096 \
    -w randrw -M 70 -t "$SECS" "${flags[@]}" \
    -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PORT subnqn:$NQN"
}

# SPDK's bdevperf over bdev_nvme_attach_controller to $PORT; $1: digests,
# $2: workload words (-w ...), $3: result key.
run_bdevperf() {
  local dg=$1 wl=$2 key=$3
  cat > "$TMP/host.json" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_nvme_attach_controller","params":{"name":"Peer","trtype":"tcp","adrfam":"ipv4",
  "traddr":"127.0.0.1","trsvcid":"$PORT","subnqn":"$NQN","hdgst":$dg,"ddgst":$dg}},
 {"method":"bdev_wait_for_examine"}]}]}
JSON
  # shellcheck disable=SC2086  # $wl is "-w verify" or "-w randrw -M 70"
  run_for_iops "$key" "SPDK bdevperf $wl (digests $dg)" "$TMP/bdevperf.out" \
    "$SPDK_DIR/build/examples/bdevperf" --no-pci -s 512 -m 0x2 \
    -r "$TMP/bdevperf.sock" --json "$TMP/host.json" -q "$QD" -o 4096 $wl -t "$SECS"
}

# One cell against target $1 (ours or spdk): a fresh target per run, so
# the two alternate run by run.
run_cell() {
  local who=$1 what=$2 dg=$3
  if [ "$who" = ours ]; then start_our_nvmf_tgt "$OUR_TGT" 0x1 64; else start_spdk_nvmf_tgt 0x1 64; fi
  case "$what" in
    "nvme_perf randrw") run_nvme_perf "$dg" "$who/$what/$dg" ;;
    "bdevperf verify") run_bdevperf "$dg" "-w verify" "$who/$what/$dg" ;;
    "bdevperf randrw") run_bdevperf "$dg" "-w randrw -M 70" "$who/$what/$dg" ;;
  esac
  stop_last
}

CELLS=("nvme_perf randrw" "bdevperf verify" "bdevperf randrw")
for what in "${CELLS[@]}"; do
  for dg in false true; do
    for _ in $(seq "$ROUNDS"); do
      run_cell ours "$what" "$dg"
      run_cell spdk "$what" "$dg"
    done
    echo "$what, digests $dg: our target ${IOPS[ours/$what/$dg]}| SPDK nvmf_tgt ${IOPS[spdk/$what/$dg]}"
  done
done

{
  echo "# SPDK's initiators against our NVMe/TCP target and SPDK's nvmf_tgt"
  echo
  echo "\`SPDK_DIR=$SPDK_DIR tests/peer/spdk_initiators.sh\` ($(git -C "$SPDK_DIR" describe --tags 2>/dev/null))"
  echo "on $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "IOPS, 4 KiB, QD $QD, $SECS s per run, randrw 70% reads; each target on core 0"
  echo "exporting a 64 MiB malloc bdev on 127.0.0.1, the initiator on core 1; the two"
  echo "targets alternate run by run, $ROUNDS run(s) each, medians."
  echo
  echo "| initiator / workload | digests | SPDK nvmf_tgt | our target | ours/SPDK |"
  echo "|---|---|---:|---:|---:|"
  ratio_rows spdk ours "${CELLS[@]}"
} | record_result spdk_initiators.md
echo "PASS: SPDK's spdk_nvme_perf and bdevperf against our target, verify and randrw, with and without digests"
