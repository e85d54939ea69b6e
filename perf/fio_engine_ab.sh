#!/usr/bin/env bash
# A/B of two builds of the in-process fio engine, in one run:
#
#   perf/fio_engine_ab.sh OLD.so NEW.so
#
# (keep a copy of target/fio/libwritecache_fio.so before a change, e.g.
# cp target/fio/libwritecache_fio.so /tmp/old.so). Cells: malloc and a
# writecache (pmem cache file in /dev/shm over a malloc origin, watermarks
# 100%), 4 KiB randwrite and randread at QD 1 and 32, SECS (2) s each after
# a 128 KiB pre-write of the range; old and new interleaved, RUNS (3) times.
# Prints per cell and build the median IOPS and the median CPU time of fio's
# job thread per I/O (its usr+sys over the run / I/Os, in ns: steadier than
# IOPS on a shared machine, where the thread gets only part of a core).
# About 3 min. BDEVS="malloc wc", RWS="randwrite randread", QDS="1 32"
# pick cells.
set -euo pipefail
[[ $# -eq 2 && -f $1 && -f $2 ]] || { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
OLD=$(realpath "$1") NEW=$(realpath "$2")
command -v fio >/dev/null || { echo "fio is not installed" >&2; exit 1; }
SHM=${SHM_DIR:-/dev/shm}
TMP=$(mktemp -d "$SHM/wc-fio-ab.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
RUNS=${RUNS:-3} SECS=${SECS:-2}

python3 - "$TMP" <<'PY'
import json, sys
tmp, bs, nb = sys.argv[1], 4096, 32768
blocks = nb + 16384
size = -(-(64 + 16 * blocks) // bs) * bs + blocks * bs
mk = lambda name: {"method": "bdev_malloc_create",
                   "params": {"name": name, "num_blocks": nb, "block_size": bs}}
def conf(entries):
    return {"subsystems": [{"subsystem": "bdev", "config": entries}]}
json.dump(conf([mk("Malloc0")]), open(f"{tmp}/malloc.json", "w"))
json.dump(conf([mk("Origin0"),
                {"method": "bdev_pmem_create",
                 "params": {"name": "Cache0", "filename": f"{tmp}/cache.pmem", "size": size}},
                {"method": "bdev_writecache_create",
                 "params": {"name": "WC0", "base_bdev": "Origin0", "cache_bdev": "Cache0",
                            "high_watermark": 100, "low_watermark": 100}}]),
          open(f"{tmp}/wc.json", "w"))
PY
cat >"$TMP/job.fio" <<'FIO'
[global]
ioengine=writecache_bdev
spdk_json_conf=${CONF}
thread=1
direct=1
filename=${BDEV}
size=128m
norandommap=1
numjobs=1
interrupt_mode=0
[prewrite]
rw=write
bs=128k
iodepth=32
[measured]
stonewall
rw=${RW}
bs=4k
iodepth=${QD}
time_based=1
runtime=${SECS}s
FIO

# One fio run: "IOPS CPU-ns-per-I/O" of the measured job (0 0 on failure).
cell() {
  local out
  rm -f "$TMP/cache.pmem"
  out=$(CONF=$1 BDEV=$2 RW=$3 QD=$4 SECS=$SECS LD_PRELOAD=$5 timeout $((SECS + 60)) \
    fio --output-format=json "$TMP/job.fio" 2>/dev/null) || { echo "0 0"; return; }
  python3 -c '
import json, sys
t = sys.stdin.read(); j = json.loads(t[t.index("{"):])["jobs"][-1]
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
cpu = (j["usr_cpu"] + j["sys_cpu"]) / 100.0 * j["job_runtime"] * 1e6
print(int(j["read"]["iops"] + j["write"]["iops"]), int(cpu / ios) if ios else 0)' <<<"$out"
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

printf '%-8s %-9s %-4s | %10s %10s %6s | %8s %8s\n' bdev rw QD "old IOPS" "new IOPS" new/old \
  "old ns" "new ns"
declare -A BDEV_OF=([malloc]=Malloc0 [wc]=WC0)
for c in ${BDEVS:-malloc wc}; do
  b=${BDEV_OF[$c]:?"BDEVS: malloc or wc, not $c"}
  for rw in ${RWS:-randwrite randread}; do
    for qd in ${QDS:-1 32}; do
      oi=() on=() ni=() nn=()
      for ((r = 0; r < RUNS; r++)); do
        read -r i n < <(cell "$TMP/$c.json" "$b" "$rw" "$qd" "$OLD"); oi+=("$i"); on+=("$n")
        read -r i n < <(cell "$TMP/$c.json" "$b" "$rw" "$qd" "$NEW"); ni+=("$i"); nn+=("$n")
      done
      o=$(median "${oi[@]}") n=$(median "${ni[@]}")
      printf '%-8s %-9s %-4s | %10s %10s %6s | %8s %8s\n' "$b" "$rw" "$qd" "$o" "$n" \
        "$(awk -v a="$o" -v b="$n" 'BEGIN{printf (a > 0 ? "%.2f" : "n/a"), (a > 0 ? b / a : 0)}')" \
        "$(median "${on[@]}")" "$(median "${nn[@]}")"
    done
  done
done
