#!/usr/bin/env bash
# Opt-in interop test of our NVMe/TCP initiator against SPDK's own
# nvmf_tgt (a local SPDK build, ../shared/reference/spdk-peer-build.md):
# SPDK exports a 64 MiB malloc bdev on 127.0.0.1; our bdevperf attaches it
# with bdev_nvme_attach_controller (from --json) and runs verify (QD 32)
# and randrw (70% reads, QD 32), each without and with header+data
# digests. Skips (exit 0) unless SPDK_DIR points at a built SPDK tree;
# never part of scripts/test.sh (SPDK is not a dependency). The sibling
# tests/peer/spdk_initiators.sh runs SPDK's initiators against our target.
# Usage: SPDK_DIR=/var/tmp/spdk tests/peer/spdk_nvmf_tgt.sh [path/to/bdevperf]
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/peer/spdk_common.sh
source tests/peer/spdk_common.sh
require_spdk build/bin/nvmf_tgt
BDEVPERF=${1:-target/release/bdevperf}
[ -x "$BDEVPERF" ] || fail "$BDEVPERF not built (cargo build --release -p wc-perf)"
require_hugepages 512
NQN=nqn.2016-06.io.spdk:peer
start_spdk_nvmf_tgt 0x1 64

for dg in false true; do
  cat > "$TMP/host.json" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_nvme_attach_controller","params":{"name":"Peer","trtype":"tcp","adrfam":"ipv4",
  "traddr":"127.0.0.1","trsvcid":"$PORT","subnqn":"$NQN","hdgst":$dg,"ddgst":$dg}},
 {"method":"bdev_wait_for_examine"}]}]}
JSON
  for wl in "verify" "randrw -M 70"; do
    # shellcheck disable=SC2086
    timeout 60 "$BDEVPERF" -m 0x2 -r "$TMP/bdevperf.sock" --json "$TMP/host.json" -T Peern1 -q 32 -o 4096 -w $wl -t 5 \
      > "$TMP/bdevperf.out" 2>&1 || { cat "$TMP/bdevperf.out"; fail "bdevperf -w $wl (digests $dg)"; }
    echo "SPDK nvmf_tgt, digests $dg, $wl: $(grep -E 'Total|IOPS' "$TMP/bdevperf.out" | tail -1)"
  done
done
echo "PASS: our initiator against SPDK's nvmf_tgt, verify and randrw, with and without digests"
