#!/usr/bin/env bash
# Instructions per I/O of fio + our in-process engine on the writecache
# config of perf/run.sh (uring origin file + bdev_delay, pmem cache in
# /dev/shm, watermarks 100: no writeback), all threads, under callgrind:
# (Ir at 25000 I/Os - Ir at 5000 I/Os) / 20000, so start-up cancels out;
# the fio job thread alone (repeatable) and all threads.
#
#   perf/fio_engine_cg.sh [ENGINE.so ...]   (default target/fio/libwritecache_fio.so)
#
# One line per engine. Needs valgrind; no timing is involved.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOB=$ROOT/perf/fio/engine/callgrind-randwrite.fio
TMP=$(mktemp -d)
SHM=$(mktemp -d /dev/shm/wc-fio-cg.XXXXXX)
trap 'rm -rf "$TMP" "$SHM"' EXIT
truncate -s 128M "$TMP/origin.img"
python3 - "$TMP" "$SHM" <<'PY'
import json, sys
tmp, shm = sys.argv[1:]
bs, nb = 4096, 32768
blocks = nb + 16384
pmem = -(-(64 + 16 * blocks) // bs) * bs + blocks * bs
cfg = [
    {"method": "bdev_uring_create",
     "params": {"name": "Origin0", "filename": f"{tmp}/origin.img", "block_size": bs}},
    {"method": "bdev_delay_create",
     "params": {"name": "Delay0", "base_bdev_name": "Origin0", "avg_read_latency": 40,
                "p99_read_latency": 80, "avg_write_latency": 40, "p99_write_latency": 80}},
    {"method": "bdev_pmem_create",
     "params": {"name": "Cache0", "filename": f"{shm}/cache.pmem", "size": pmem}},
    {"method": "bdev_writecache_create",
     "params": {"name": "WC0", "base_bdev": "Delay0", "cache_bdev": "Cache0",
                "high_watermark": 100, "low_watermark": 100}},
]
json.dump({"subsystems": [{"subsystem": "bdev", "config": cfg}]}, open(f"{tmp}/wc.json", "w"))
PY
ir() { # engine nios -> "Ir of the fio job thread (the busiest), Ir of all threads"
  rm -f "$SHM/cache.pmem" "$TMP"/cg.out*
  CONF=$TMP/wc.json BDEV=WC0 NIOS=$2 LD_PRELOAD=$1 valgrind --tool=callgrind \
    --separate-threads=yes --callgrind-out-file="$TMP/cg.out" fio --output-format=json \
    --output="$TMP/out.json" "$JOB" >"$TMP/log" 2>&1 || { cat "$TMP/log" >&2; exit 1; }
  grep -h -m1 '^summary:' "$TMP"/cg.out-* | awk '{ if ($2 > m) m = $2; t += $2 } END { print m, t }'
}
[ $# -gt 0 ] || set -- "$ROOT/target/fio/libwritecache_fio.so"
for so in "$@"; do
  read -r ja ta < <(ir "$so" 5000)
  read -r jb tb < <(ir "$so" 25000)
  echo "$so: per I/O $(( (jb - ja) / 20000 )) Ir on the fio job thread," \
    "$(( (tb - ta) / 20000 )) Ir all threads (the other reactors' idle spinning varies)"
done
