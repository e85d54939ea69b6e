#!/usr/bin/env bash
# The main job, end to end on an embedded default: builds, starts
# writecache_tgt with a pmem cache file and an origin file under a temp dir,
# creates a writecache bdev over JSON-RPC (SPDK's own client + our plugin),
# runs a short bdevperf workload on it, restarts the target from the saved
# config (the cache is recovered, not reformatted), prints stats, flushes
# everything back to the origin and stops. No root-only or hardware needs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

bash scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
for d in "$HOME/.local/bin" "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)"; do
  [ -n "$d" ] && [ -d "$d" ] && PATH="$PATH:$d"
done
echo "== building (release)"
cargo build --release --bins -q

TMP=$(mktemp -d)
SHM=$TMP
[ -d /dev/shm ] && [ -w /dev/shm ] && SHM=$(mktemp -d /dev/shm/wc-demo.XXXXXX)
SOCK=$TMP/spdk.sock
TGT_PID=""
cleanup() {
  [ -n "$TGT_PID" ] && kill "$TGT_PID" 2>/dev/null && wait "$TGT_PID" 2>/dev/null || true
  rm -rf "$TMP" "$SHM"
}
trap cleanup EXIT

export PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
rpc() { spdk-rpc -s "$SOCK" --plugin writecache_rpc "$@"; }

start_tgt() {
  "$ROOT/target/release/writecache_tgt" -m 0x1 --interrupt-mode -r "$SOCK" "$@" >>"$TMP/tgt.log" 2>&1 &
  TGT_PID=$!
  for _ in $(seq 100); do
    spdk-rpc -s "$SOCK" -t 1 rpc_get_methods >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "writecache_tgt did not start:"; cat "$TMP/tgt.log"; exit 1
}
stop_tgt() {
  rpc spdk_kill_instance SIGTERM >/dev/null
  wait "$TGT_PID" || { echo "target exited with $?"; exit 1; }
  TGT_PID=""
}

fallocate -l 256M "$TMP/origin.img" 2>/dev/null || truncate -s 256M "$TMP/origin.img"

echo "== starting writecache_tgt (socket $SOCK)"
start_tgt
rpc bdev_uring_create "$TMP/origin.img" Origin0 4096
rpc bdev_pmem_create "$SHM/cache.pmem" -n Cache0 --size-mb 64
rpc bdev_writecache_create WC0 -o Origin0 -c Cache0 --autocommit-time-ms 100
echo "== bdev_get_bdevs -b WC0 (driver_specific)"
spdk-rpc -s "$SOCK" bdev_get_bdevs -b WC0 | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)[0]["driver_specific"], indent=2))'
spdk-rpc -s "$SOCK" save_config > "$TMP/config.json"
stop_tgt

echo "== bdevperf on the same config: 4 KiB random writes, then a verify pass"
"$ROOT/target/release/bdevperf" --json "$TMP/config.json" -T WC0 -q 32 -o 4096 -w randwrite -t 2 -m 0x1 --log-level WARNING
"$ROOT/target/release/bdevperf" --json "$TMP/config.json" -T WC0 -q 8 -o 4096 -w verify -t 1 -m 0x1 --log-level WARNING

echo "== restarting writecache_tgt from the saved config: the cache is recovered"
start_tgt --json "$TMP/config.json"
echo "== exporting WC0 over NBD ($TMP/nbd.sock)"
rpc nbd_server_start "$TMP/nbd.sock" >/dev/null
rpc nbd_export_create WC0 wc0 >/dev/null
URI="nbd+unix:///wc0?socket=$TMP/nbd.sock"
if command -v nbdinfo >/dev/null; then
  echo "== nbdinfo: the export as a client sees it"
  nbdinfo "$URI" | grep -E "export-size|block_size_minimum"
else
  echo "== SKIPPED nbdinfo: command not found (apt-get install libnbd-bin)"
fi
if command -v qemu-io >/dev/null; then
  echo "== qemu-io: writing 256 KiB through the NBD export, flush, read back"
  qemu-io -f raw "$URI" -c 'write -P 0x5a 1M 256k' -c flush -c 'read -P 0x5a 1M 256k' | grep -E "wrote|read"
else
  echo "== SKIPPED the qemu-io write through NBD: qemu-io not found (apt-get install qemu-utils)"
fi
echo "== bdev_writecache_get_stats WC0"
rpc bdev_writecache_get_stats WC0
echo "== bdev_writecache_flush WC0 (commit + write everything back)"
rpc bdev_writecache_flush WC0
rpc bdev_writecache_get_stats WC0 | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]; print("after flush: dirty", s["dirty"], "free", s["free_blocks"], "of", s["blocks"], "written back", s["writeback_completed_blocks"])'
stop_tgt
echo "demo: done"
