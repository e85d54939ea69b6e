#!/usr/bin/env bash
# fio (Debian's, ioengine=nbd) against writecache_tgt's NBD export: the
# same job on a malloc bdev and on a writecache (pmem file in /dev/shm over
# a uring origin file), in one run, reported as a ratio.
# Usage: perf/fio.sh [runtime-seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${1:-10}
command -v fio >/dev/null || { echo "fio is not installed (scripts/deps.sh installs it)"; exit 1; }
cargo build --release -q -p writecache-tgt
TMP=$(mktemp -d /dev/shm/wc-fio.XXXXXX)
ODIR=$(mktemp -d "${TMPDIR:-/var/tmp}/wc-fio-origin.XXXXXX")
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$TMP" "$ODIR"; }
trap cleanup EXIT
fallocate -l 1G "$ODIR/origin.img"
SOCK=$TMP/spdk.sock
"$ROOT/target/release/writecache_tgt" -m 0x1 -r "$SOCK" --log-level ERROR &
PID=$!
for _ in $(seq 100); do python3 - "$SOCK" <<'PY' 2>/dev/null && break
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
PY
  sleep 0.1; done
rpc() { python3 - "$SOCK" "$@" <<'PY'
import json, socket, sys
sock, method, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
s = socket.socket(socket.AF_UNIX); s.connect(sock)
req = {"jsonrpc": "2.0", "id": 1, "method": method}
if params: req["params"] = params
s.sendall(json.dumps(req).encode())
buf = b""
while True:
    buf += s.recv(65536)
    try:
        r = json.loads(buf); break
    except ValueError:
        continue
if "error" in r: sys.exit(f"{method}: {r['error']}")
PY
}
rpc bdev_malloc_create '{"name":"Malloc0","num_blocks":262144,"block_size":4096}'
rpc bdev_uring_create "{\"name\":\"Origin0\",\"filename\":\"$ODIR/origin.img\",\"block_size\":4096}"
rpc bdev_pmem_create "{\"name\":\"Cache0\",\"filename\":\"$TMP/cache.pmem\",\"size\":1207959552}"
rpc bdev_writecache_create '{"name":"WC0","base_bdev":"Origin0","cache_bdev":"Cache0","high_watermark":100,"low_watermark":100}'
rpc nbd_server_start "{\"listen\":\"$TMP/nbd.sock\"}"
rpc nbd_export_create '{"bdev_name":"Malloc0","export_name":"malloc"}'
rpc nbd_export_create '{"bdev_name":"WC0","export_name":"wc"}'

declare -A IOPS
for job in randwrite-4k-qd32 randread-4k-qd32; do
  for exp in malloc wc; do
    # Engine options (uri) belong in the job file: append it to [run].
    { cat "perf/fio/$job.fio"; echo "uri=nbd+unix:///$exp?socket=$TMP/nbd.sock"; } >"$TMP/job.fio"
    fio --runtime="$SECS" --output-format=json --output="$TMP/out.json" "$TMP/job.fio" ||
      { echo "fio failed on $exp:"; cat "$TMP/out.json"; exit 1; }
    IOPS[$job/$exp]=$(python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["write"]["iops"] + j["read"]["iops"]))' "$TMP/out.json")
    echo "$job $exp: ${IOPS[$job/$exp]} IOPS" >&2
  done
done
mkdir -p perf/results
{
  echo "# fio through the NBD export ($(date -u +%F), ${SECS}s per job, 1 reactor)"
  echo
  echo "| job | malloc IOPS | writecache IOPS | writecache/malloc |"
  echo "|---|---:|---:|---:|"
  for job in randwrite-4k-qd32 randread-4k-qd32; do
    m=${IOPS[$job/malloc]}; w=${IOPS[$job/wc]}
    python3 -c "import sys; m,w=int(sys.argv[2]),int(sys.argv[3]); print(f'| {sys.argv[1]} | {m:,} | {w:,} | {w/m if m else 0:.2f} |')" "$job" "$m" "$w"
  done
} | tee perf/results/fio.md
