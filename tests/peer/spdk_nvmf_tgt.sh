#!/usr/bin/env bash
# Opt-in interop test of our NVMe/TCP initiator against SPDK's own
# nvmf_tgt (a local SPDK build, ../shared/reference/spdk-peer-build.md):
# SPDK exports a 64 MiB malloc bdev on 127.0.0.1 (core 0); our bdevperf
# (core 1) attaches it with bdev_nvme_attach_controller (from --json) and
# runs verify (QD 32) and randrw (70% reads, QD 32), each without and with
# header+data digests. Our writecache_tgt exporting the same is measured
# the same way, alternating run by run (a fresh target each), so the
# results (perf/results/spdk_nvmf_tgt.md) put our initiator's IOPS against
# both targets side by side. A failed run (verify mismatch, error exit, no
# result) fails the test. Skips (exit 0) unless SPDK_DIR points at a built
# SPDK tree; never part of scripts/test.sh (SPDK is not a dependency). The
# sibling tests/peer/spdk_initiators.sh runs SPDK's initiators against our
# target.
# Usage: SPDK_DIR=/var/tmp/spdk tests/peer/spdk_nvmf_tgt.sh [path/to/bdevperf [path/to/writecache_tgt]]
# Environment: SECS (5), ROUNDS (1), PORTS (first-last), RESULTS_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/peer/spdk_common.sh
source tests/peer/spdk_common.sh
require_spdk build/bin/nvmf_tgt
BDEVPERF=${1:-target/release/bdevperf}
OUR_TGT=${2:-target/release/writecache_tgt}
[ -x "$BDEVPERF" ] || fail "$BDEVPERF not built (cargo build --release -p wc-perf)"
[ -x "$OUR_TGT" ] || fail "$OUR_TGT not built (cargo build --release -p writecache-tgt)"
command -v spdk-rpc >/dev/null || fail "spdk-rpc not installed (scripts/deps.sh)"
require_hugepages 512
NQN=nqn.2016-06.io.spdk:peer
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-1}
declare -A IOPS

# Our bdevperf against target $1 (spdk or ours, started fresh); $2: digests,
# $3: workload words.
run_cell() {
  local who=$1 dg=$2 wl=$3 v
  if [ "$who" = ours ]; then start_our_nvmf_tgt "$OUR_TGT" 0x1 64; else start_spdk_nvmf_tgt 0x1 64; fi
  cat > "$TMP/host.json" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_nvme_attach_controller","params":{"name":"Peer","trtype":"tcp","adrfam":"ipv4",
  "traddr":"127.0.0.1","trsvcid":"$PORT","subnqn":"$NQN","hdgst":$dg,"ddgst":$dg}},
 {"method":"bdev_wait_for_examine"}]}]}
JSON
  # shellcheck disable=SC2086  # $wl is "verify" or "randrw -M 70"
  timeout $((SECS + 60)) "$BDEVPERF" -m 0x2 -r "$TMP/bdevperf.sock" --json "$TMP/host.json" \
    -T Peern1 -q 32 -o 4096 -w $wl -t "$SECS" \
    > "$TMP/bdevperf.out" 2>&1 || { cat "$TMP/bdevperf.out"; fail "bdevperf -w $wl against $who (digests $dg)"; }
  v=$(total_iops "$TMP/bdevperf.out")
  [ "$v" != "-" ] || { cat "$TMP/bdevperf.out"; fail "bdevperf -w $wl against $who (digests $dg): no Total line"; }
  IOPS[$who/$wl/$dg]+="$v "
  stop_last
}

WORKLOADS=("verify" "randrw -M 70")
for wl in "${WORKLOADS[@]}"; do
  for dg in false true; do
    for _ in $(seq "$ROUNDS"); do
      run_cell spdk "$dg" "$wl"
      run_cell ours "$dg" "$wl"
    done
    echo "$wl, digests $dg: SPDK nvmf_tgt ${IOPS[spdk/$wl/$dg]}| our target ${IOPS[ours/$wl/$dg]}"
  done
done

{
  echo "# Our NVMe/TCP initiator (bdevperf) against SPDK's nvmf_tgt and our target"
  echo
  echo "\`SPDK_DIR=$SPDK_DIR tests/peer/spdk_nvmf_tgt.sh\` ($(git -C "$SPDK_DIR" describe --tags 2>/dev/null))"
  echo "on $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "IOPS of our bdevperf (core 1, bdev_nvme_attach_controller), 4 KiB, QD 32, $SECS s"
  echo "per run, randrw 70% reads; each target on core 0 exporting a 64 MiB malloc bdev"
  echo "on 127.0.0.1; the targets alternate run by run, $ROUNDS run(s) each, medians."
  echo
  echo "| workload | digests | SPDK nvmf_tgt | our target | ours/SPDK |"
  echo "|---|---|---:|---:|---:|"
  ratio_rows spdk ours "${WORKLOADS[@]}"
} | record_result spdk_nvmf_tgt.md
echo "PASS: our initiator against SPDK's nvmf_tgt, verify and randrw, with and without digests"
