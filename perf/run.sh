#!/usr/bin/env bash
# Benchmark matrix: 4 KiB random writes through bdevperf (one reactor, busy
# polling) on null, malloc, the origin alone (uring, O_DIRECT, preallocated
# file) and writecache (pmem mode, cache file in /dev/shm) over that origin.
# Each cell is the median of RUNS runs; the report states ratios measured in
# this one run. Usage: perf/run.sh [seconds-per-run] [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-2}
RUNS=${2:-3}
OUT=perf/results
mkdir -p "$OUT"
cargo build --release -p wc-perf -q
BP=target/release/bdevperf
TMP=$(mktemp -d /dev/shm/wc-perf.XXXXXX)
ORIGIN_DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/wc-perf-origin.XXXXXX")
trap 'rm -rf "$TMP" "$ORIGIN_DIR"' EXIT
fallocate -l 2G "$ORIGIN_DIR/origin.img"

cfg() { # name, json-entries
  printf '{"subsystems":[{"subsystem":"bdev","config":[%s]}]}\n' "$2" > "$TMP/$1.json"
}
cfg null '{"method":"bdev_null_create","params":{"name":"Null0","num_blocks":524288,"block_size":4096}}'
cfg malloc '{"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":524288,"block_size":4096}}'
cfg origin "{\"method\":\"bdev_uring_create\",\"params\":{\"name\":\"Origin0\",\"filename\":\"$ORIGIN_DIR/origin.img\",\"block_size\":4096}}"
cfg wc "{\"method\":\"bdev_uring_create\",\"params\":{\"name\":\"Origin0\",\"filename\":\"$ORIGIN_DIR/origin.img\",\"block_size\":4096}},
 {\"method\":\"bdev_pmem_create\",\"params\":{\"name\":\"Cache0\",\"filename\":\"$TMP/cache.pmem\",\"size\":2214592512}},
 {\"method\":\"bdev_writecache_create\",\"params\":{\"name\":\"WC0\",\"base_bdev\":\"Origin0\",\"cache_bdev\":\"Cache0\"}}"

cfg wcnowb "{\"method\":\"bdev_uring_create\",\"params\":{\"name\":\"Origin0\",\"filename\":\"$ORIGIN_DIR/origin.img\",\"block_size\":4096}},
 {\"method\":\"bdev_pmem_create\",\"params\":{\"name\":\"Cache0\",\"filename\":\"$TMP/cache.pmem\",\"size\":2214592512}},
 {\"method\":\"bdev_writecache_create\",\"params\":{\"name\":\"WC0\",\"base_bdev\":\"Origin0\",\"cache_bdev\":\"Cache0\",\"high_watermark\":100,\"low_watermark\":100}}"

run() { # cfg target qd -> iops
  local vals=()
  for _ in $(seq "$RUNS"); do
    rm -f "$TMP/cache.pmem"
    local j="$TMP/out.json"
    "$BP" --json "$TMP/$1.json" -q "$3" -o 4096 -w randwrite -t "$SECS" -m 0x1 -T "$2" \
      --log-level ERROR --output-json "$j" >/dev/null 2>&1 || { echo 0; return; }
    vals+=("$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print(int(r["iops"]), r["latency_percentiles_us"]["p99"])' "$j")")
  done
  printf '%s\n' "${vals[@]}" | sort -n | awk -v n="$RUNS" 'NR==int((n+1)/2){print}'
}

declare -A R
for qd in 1 32; do
  for c in null:Null0 malloc:Malloc0 origin:Origin0 wc:WC0 wcnowb:WC0; do
    R[$c/$qd]=$(run "${c%%:*}" "${c##*:}" "$qd")
    echo "qd $qd ${c%%:*}: ${R[$c/$qd]}" >&2
  done
done

host="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
{
  echo "# writecache benchmark ($(date -u +%F))"
  echo
  echo "Machine: $host. bdevperf, 1 reactor (busy polling), 4 KiB randwrite, ${SECS}s per run, median of ${RUNS}."
  echo "Cache: pmem bdev on a tmpfs file (movnt+sfence); origin: uring O_DIRECT on a preallocated 2 GiB file."
  echo "writecache: default watermarks (writeback from 50% used, the origin then sets the pace);"
  echo "writecache (no wb): high_watermark 100, the write path alone (the cache holds the whole origin)."
  echo
  echo "| QD | null IOPS | malloc IOPS | origin IOPS | writecache IOPS | wc (no wb) IOPS | wc/malloc | wc (no wb)/malloc | wc/origin | wc p99 (us) |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for qd in 1 32; do
    n=${R[null:Null0/$qd]%% *}; m=${R[malloc:Malloc0/$qd]%% *}; o=${R[origin:Origin0/$qd]%% *}; w=${R[wc:WC0/$qd]%% *}; p=${R[wc:WC0/$qd]##* }; x=${R[wcnowb:WC0/$qd]%% *}
    python3 - "$qd" "$n" "$m" "$o" "$w" "$p" "$x" <<'PY'
import sys
qd, n, m, o, w, p, x = sys.argv[1:]
n, m, o, w, x = map(int, (n, m, o, w, x))
r = lambda a, b: f"{a / b:.2f}" if b else "n/a"
print(f"| {qd} | {n:,} | {m:,} | {o:,} | {w:,} | {x:,} | {r(w, m)} | {r(x, m)} | {r(w, o)} | {p} |")
PY
  done
} > "$OUT/report.md"
cat "$OUT/report.md"
