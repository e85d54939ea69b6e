#!/usr/bin/env bash
# Opt-in interop test of OUR NVMe/TCP target with SPDK's initiators (issue
# 14), and SPDK's own nvmf_tgt measured the same way in the same run: each
# target (core 0) exports a 64 MiB malloc bdev on 127.0.0.1; on core 1
#   * SPDK's spdk_nvme_perf: randrw (70% reads) QD 32, 4 KiB;
#   * SPDK's bdevperf over bdev_nvme_attach_controller: verify and randrw
#     (70% reads) QD 32, 4 KiB;
# each without and with header+data digests (spdk_nvme_perf -H -I;
# bdev_nvme_attach_controller hdgst/ddgst). A run that fails (a verify
# mismatch, an error exit) fails the test; the IOPS of both targets are
# printed side by side. Skips (exit 0) unless SPDK_DIR points at a built
# SPDK tree (../shared/reference/spdk-peer-build.md); needs root for
# hugepages unless 1024 are reserved. Never part of scripts/test.sh.
# Usage: SPDK_DIR=/var/tmp/spdk tests/peer/spdk_initiators.sh [path/to/writecache_tgt]
# Environment: SECS (5), QD (32).
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
declare -A IOPS

# spdk_nvme_perf against $PORT; $1: digests (true/false), $2: result key.
run_nvme_perf() {
  local dg=$1 key=$2 flags=()
  [ "$dg" = true ] && flags=(-H -I)
  timeout $((SECS + 60)) "$SPDK_DIR/build/bin/spdk_nvme_perf" -c 0x2 -s 512 -q "$QD" -o 4096 \
    -w randrw -M 70 -t "$SECS" "${flags[@]}" \
    -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PORT subnqn:$NQN" \
    > "$TMP/nvme_perf.out" 2>&1 || { cat "$TMP/nvme_perf.out"; fail "spdk_nvme_perf randrw (digests $dg, $key)"; }
  IOPS[$key]=$(total_iops "$TMP/nvme_perf.out")
  # spdk_nvme_perf exits 0 when it attached no controller at all.
  [ "${IOPS[$key]}" != "-" ] || { cat "$TMP/nvme_perf.out"; fail "spdk_nvme_perf randrw (digests $dg, $key): no Total line"; }
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
  timeout $((SECS + 60)) "$SPDK_DIR/build/examples/bdevperf" --no-pci -s 512 -m 0x2 \
    -r "$TMP/bdevperf.sock" --json "$TMP/host.json" -q "$QD" -o 4096 $wl -t "$SECS" \
    > "$TMP/bdevperf.out" 2>&1 || { cat "$TMP/bdevperf.out"; fail "SPDK bdevperf $wl (digests $dg, $key)"; }
  IOPS[$key]=$(total_iops "$TMP/bdevperf.out")
  [ "${IOPS[$key]}" != "-" ] || { cat "$TMP/bdevperf.out"; fail "SPDK bdevperf $wl (digests $dg, $key): no Total line"; }
}

run_all() {
  local who=$1 dg
  for dg in false true; do
    run_nvme_perf "$dg" "$who/nvme_perf randrw/$dg"
    run_bdevperf "$dg" "-w verify" "$who/bdevperf verify/$dg"
    run_bdevperf "$dg" "-w randrw -M 70" "$who/bdevperf randrw/$dg"
  done
}

stop_last() {
  local pid=${SPAWNED[-1]}
  kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  unset 'SPAWNED[-1]'
}

start_our_nvmf_tgt "$OUR_TGT" 0x1 64
run_all ours
stop_last
start_spdk_nvmf_tgt 0x1 64
run_all spdk
stop_last

printf '\n%-26s %-8s %14s %18s\n' "initiator / workload" digests "our target" "SPDK nvmf_tgt"
for w in "nvme_perf randrw" "bdevperf verify" "bdevperf randrw"; do
  for dg in false true; do
    printf '%-26s %-8s %14s %18s\n' "$w" "$dg" "${IOPS[ours/$w/$dg]}" "${IOPS[spdk/$w/$dg]}"
  done
done
echo "(IOPS, 4 KiB, QD $QD, $SECS s, randrw 70% reads; one core each side)"
echo "PASS: SPDK's spdk_nvme_perf and bdevperf against our target, verify and randrw, with and without digests"
