#!/usr/bin/env bash
# Instructions per 4 KiB random write, counted by callgrind (repeatable on a
# busy machine, unlike IOPS): bdevperf on one reactor runs the same
# workload for two lengths on malloc and on writecache (pmem mode, cache
# file in /dev/shm); per-I/O = (Ir(long) - Ir(short)) / (I/Os(long) -
# I/Os(short)), so start-up and tear-down cancel out.
#
# The whole-process count includes the reactor's empty iterations, which
# vary with machine load; "wc-own/IO" (the writecache and pmem crates' own
# instructions per I/O, idle pollers left out) is the stable figure.
#
# usage: perf/callgrind_write.sh [BIN_DIR] [QD...]     (default: target/release, QD 1 32)
# env:   SHORT/LONG (seconds under callgrind, default 2/6), ORIGIN_MIB (64),
#        KEEP=DIR keeps the callgrind.out files there (for callgrind_annotate).
#
# The writecache's origin is a second malloc bdev (not uring+delay as in
# perf/bench.py): with high_watermark 100 writeback never starts, so a
# write never reaches the origin and the write path is the same.
set -euo pipefail
BIN=${1:-target/release}
shift || true
QDS=("$@")
[ ${#QDS[@]} -gt 0 ] || QDS=(1 32)
SHORT=${SHORT:-2}
LONG=${LONG:-6}
ORIGIN_MIB=${ORIGIN_MIB:-64}
BS=4096
NB=$((ORIGIN_MIB * 1024 * 1024 / BS))

TMP=$(mktemp -d /dev/shm/wc-callgrind.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# Cache: the whole origin + 16384 blocks of slack (perf/bench.py's "wc").
CB=$((NB + 16384))
META=$(((64 + 16 * CB + BS - 1) / BS * BS))
PMEM_SIZE=$((META + CB * BS))

cat >"$TMP/malloc.json" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [
 {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": $NB, "block_size": $BS}}]}]}
EOF
cat >"$TMP/wc.json" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [
 {"method": "bdev_malloc_create", "params": {"name": "Origin0", "num_blocks": $NB, "block_size": $BS}},
 {"method": "bdev_pmem_create", "params": {"name": "Cache0", "filename": "$TMP/cache", "size": $PMEM_SIZE}},
 {"method": "bdev_writecache_create", "params": {"name": "WC0", "base_bdev": "Origin0",
   "cache_bdev": "Cache0", "high_watermark": 100, "low_watermark": 100}}]}]}
EOF

# run NAME CFG TARGET QD SECS: writes "Ir IOs" to $TMP/NAME.res
run() {
    local name=$1 cfg=$2 target=$3 qd=$4 secs=$5
    rm -f "$TMP/cache"
    local out="$TMP/$name.out"
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$BIN/bdevperf" --json "$cfg" -m 0x1 -q "$qd" -o 4096 -w randwrite \
        -t "$secs" -T "$target" --log-level ERROR --output-json "$TMP/$name.json" \
        >"$TMP/$name.log" 2>&1 &
    PIDS+=($!)
    wait $!
    local ir ios
    ir=$(sed -n 's/^summary: //p' "$out")
    ios=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"]
print(round(sum(j["iops"]*j["runtime"] for j in r)))' "$TMP/$name.json")
    echo "$ir $ios" >"$TMP/$name.res"
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP" && cp "$out" "$KEEP/$name.callgrind" && cp "$TMP/$name.res" "$KEEP/"
    fi
}

# own NAME: per-I/O Ir of the writecache and pmem crates' own functions
# (self cost, long minus short), without the per-iteration pollers that
# are idle at this workload: unlike the whole process's count it does not
# move with the number of empty reactor iterations (a busy machine stalls
# the run under callgrind and the reactor spins meanwhile).
own() {
    python3 - "$TMP/$1-short" "$TMP/$1-long" <<'PY'
import re, subprocess, sys
def prof(base):
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100",
                          "--auto=no", base + ".out"], capture_output=True, text=True).stdout
    d = {}
    for l in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*)$", l)
        if m and ":" in m.group(2):
            d[m.group(2)] = d.get(m.group(2), 0) + int(m.group(1).replace(",", ""))
    return d, int(open(base + ".res").read().split()[1])
(a, n1), (b, n2) = prof(sys.argv[1]), prof(sys.argv[2])
idle = r"create_channel::\{\{closure\}\}|start_home_pollers::\{\{closure\}\}|free_retired|run_reads"
own = sum(b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)
          if re.search(r"wc_writecache|wc_bdev_pmem", k.split(":", 1)[1])
          and not re.search(idle, k.split(":", 1)[1]))
print(f"{own / max(1, n2 - n1):.0f}")
PY
}

printf '%-8s %4s %12s %12s %12s\n' bdev QD 'Ir/IO' 'wc-own/IO' 'IOs(long)'
for qd in "${QDS[@]}"; do
    for b in malloc:Malloc0 wc:WC0; do
        key=${b%%:*}
        tgt=${b#*:}
        run "$key-q$qd-short" "$TMP/$key.json" "$tgt" "$qd" "$SHORT"
        run "$key-q$qd-long" "$TMP/$key.json" "$tgt" "$qd" "$LONG"
        read -r ir1 n1 <"$TMP/$key-q$qd-short.res"
        read -r ir2 n2 <"$TMP/$key-q$qd-long.res"
        per=$(python3 -c "print(f'{($ir2-$ir1)/max(1,$n2-$n1):.0f}')")
        mine=-
        [ "$key" = wc ] && mine=$(own "$key-q$qd")
        printf '%-8s %4s %12s %12s %12s\n' "$key" "$qd" "$per" "$mine" "$n2"
    done
done
