#!/usr/bin/env bash
# Opt-in interop test of our NVMe/TCP initiator against SPDK's own
# nvmf_tgt (a local SPDK build, ../shared/reference/spdk-peer-build.md):
# SPDK exports a 64 MiB malloc bdev on 127.0.0.1; our bdevperf attaches it
# with bdev_nvme_attach_controller (from --json) and runs verify (QD 32)
# and randrw (70% reads, QD 32), each without and with header+data
# digests. Skips (exit 0) unless SPDK_DIR points at a built SPDK tree;
# never part of scripts/test.sh (SPDK is not a dependency).
# Usage: SPDK_DIR=/var/tmp/spdk tests/peer/spdk_nvmf_tgt.sh [path/to/bdevperf]
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -n "${SPDK_DIR:-}" ] || { echo "SKIP: SPDK_DIR is not set (a local SPDK build is needed)"; exit 0; }
[ -x "$SPDK_DIR/build/bin/nvmf_tgt" ] || { echo "SKIP: no $SPDK_DIR/build/bin/nvmf_tgt"; exit 0; }
BDEVPERF=${1:-target/release/bdevperf}
[ -x "$BDEVPERF" ] || { echo "FAIL: $BDEVPERF not built (cargo build --release -p wc-perf)"; exit 1; }
export LD_LIBRARY_PATH=$SPDK_DIR/build/lib:$SPDK_DIR/isa-l/.libs:$SPDK_DIR/isa-l-crypto/.libs
TMP=$(mktemp -d)
SPID=""
cleanup() { [ -n "$SPID" ] && kill "$SPID" 2>/dev/null && wait "$SPID" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; tail -20 "$TMP/nvmf_tgt.log" 2>/dev/null; exit 1; }
NQN=nqn.2016-06.io.spdk:peer
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RPC=("$SPDK_DIR/scripts/rpc.py" -s "$TMP/spdk.sock")

"$SPDK_DIR/build/bin/nvmf_tgt" --no-pci -s 512 -m 0x1 -r "$TMP/spdk.sock" > "$TMP/nvmf_tgt.log" 2>&1 &
SPID=$!
for _ in $(seq 100); do "${RPC[@]}" -t 1 rpc_get_methods >/dev/null 2>&1 && break; sleep 0.1; done
"${RPC[@]}" nvmf_create_transport -t TCP >/dev/null || fail "transport"
"${RPC[@]}" bdev_malloc_create -b Malloc0 64 4096 >/dev/null || fail "malloc"
"${RPC[@]}" nvmf_create_subsystem "$NQN" -a -s SPDKPEER >/dev/null || fail "subsystem"
"${RPC[@]}" nvmf_subsystem_add_ns "$NQN" Malloc0 >/dev/null || fail "ns"
"${RPC[@]}" nvmf_subsystem_add_listener "$NQN" -t tcp -a 127.0.0.1 -s "$PORT" >/dev/null || fail "listener"

for dg in false true; do
  cat > "$TMP/host.json" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_nvme_attach_controller","params":{"name":"Peer","trtype":"tcp","adrfam":"ipv4",
  "traddr":"127.0.0.1","trsvcid":"$PORT","subnqn":"$NQN","hdgst":$dg,"ddgst":$dg}},
 {"method":"bdev_wait_for_examine"}]}]}
JSON
  for wl in "verify" "randrw -M 70"; do
    # shellcheck disable=SC2086
    timeout 60 "$BDEVPERF" -m 0x2 --json "$TMP/host.json" -T Peern1 -q 32 -o 4096 -w $wl -t 5 \
      > "$TMP/bdevperf.out" 2>&1 || { cat "$TMP/bdevperf.out"; fail "bdevperf -w $wl (digests $dg)"; }
    echo "SPDK nvmf_tgt, digests $dg, $wl: $(grep -E 'Total|IOPS' "$TMP/bdevperf.out" | tail -1)"
  done
done
echo "PASS: our initiator against SPDK's nvmf_tgt, verify and randrw, with and without digests"
