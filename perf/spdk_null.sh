#!/usr/bin/env bash
# Our bdevperf against SPDK's bdevperf on a null bdev (issue 17's "null
# bdev, ours/SPDK v25.09 in one run" row), in one command:
#
#   SPDK_DIR=/var/tmp/spdk perf/spdk_null.sh [path/to/our/bdevperf]
#
# 4 KiB randwrite and randread at QD 1/32/128 on one core (-m $MASK,
# pinned, busy polling: both apps' defaults), a 1 GiB null bdev created
# from --json by the same bdev_null_create entry. Each cell alternates the
# processes (ours, SPDK's, ours, ...) ROUNDS times; figures are medians and
# ratios are of the medians. Two figures per run:
#   * IOPS, SPDK's "Total" line (wall clock);
#   * IOPS per CPU-second: IOPS divided by the share of a CPU the process
#     got while its I/O ran (its threads' run time from
#     /proc/PID/task/*/schedstat over the first 60% of the run). On a busy
#     machine the wall-clock figure mostly measures the scheduler; this one
#     measures the I/O path's own cost.
# Writes perf/results/spdk_null.md. Skips (exit 0) with a message unless
# SPDK_DIR points at a built SPDK tree (../shared/reference/
# spdk-peer-build.md); needs root for hugepages unless 512 are reserved.
# Not part of scripts/test.sh (SPDK is not a dependency).
# BASE=path/to/older/bdevperf adds a third process to the rotation (an A/B
# of our bdevperf in the same run: base/SPDK and ours/base columns).
# Environment: SECS (2), ROUNDS (3), QDS ("1 32 128"),
# WORKLOADS ("randwrite randread"), MASK (0x1), BASE, RESULTS_DIR
# (perf/results).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
# shellcheck source=tests/peer/spdk_common.sh
source tests/peer/spdk_common.sh
require_spdk build/examples/bdevperf
OURS=${1:-target/release/bdevperf}
[ -x "$OURS" ] || fail "$OURS not built (cargo build --release -p wc-perf)"
require_hugepages 512
SECS=${SECS:-2}
ROUNDS=${ROUNDS:-3}
QDS=${QDS:-"1 32 128"}
WORKLOADS=${WORKLOADS:-"randwrite randread"}
MASK=${MASK:-0x1}
BASE=${BASE:-}
[ -z "$BASE" ] || [ -x "$BASE" ] || fail "BASE=$BASE is not an executable"
OUT=${RESULTS_DIR:-$ROOT/perf/results}
mkdir -p "$OUT"

cat > "$TMP/null.json" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_null_create","params":{"name":"Null0","num_blocks":262144,"block_size":4096}}]}]}
JSON

# Run time (ns) of every thread of process $1 so far.
cpu_ns() {
  cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

# One run of bdevperf ($1: ours, base or spdk) with workload $2 at QD $3;
# sets RUN_IOPS and RUN_CPU_IOPS ("-" when the run failed: its output is
# shown).
one_run() {
  local who=$1 wl=$2 qd=$3 cmd pid t0 c0 t1 c1
  case "$who" in
    ours) cmd=("$OURS" -m "$MASK" -r "$TMP/ours.sock" --json "$TMP/null.json") ;;
    base) cmd=("$BASE" -m "$MASK" -r "$TMP/ours.sock" --json "$TMP/null.json") ;;
    spdk) cmd=("$SPDK_DIR/build/examples/bdevperf" --no-pci -s 256 -m "$MASK"
      -r "$TMP/spdk.sock" --json "$TMP/null.json") ;;
  esac
  RUN_IOPS="-" RUN_CPU_IOPS="-"
  timeout $((SECS + 60)) "${cmd[@]}" -q "$qd" -o 4096 -w "$wl" -t "$SECS" \
    > "$TMP/$who.out" 2>&1 &
  pid=$!
  SPAWNED+=("$pid")
  # Both print "Running I/O for N seconds..." as the jobs start.
  for _ in $(seq 600); do
    grep -qs 'Running I/O' "$TMP/$who.out" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  # The busy thread is timeout's child (timeout itself only waits).
  local app
  app=$(pgrep -P "$pid" | head -1)
  t0=$(date +%s%N) c0=$(cpu_ns "${app:-$pid}")
  sleep "$(awk -v s="$SECS" 'BEGIN {print s * 0.6}')"
  t1=$(date +%s%N) c1=$(cpu_ns "${app:-$pid}")
  if wait "$pid"; then
    RUN_IOPS=$(total_iops "$TMP/$who.out")
  fi
  unset 'SPAWNED[-1]'
  if [ "$RUN_IOPS" = "-" ]; then
    cp "$TMP/$who.out" "$TMP/$who-$wl-$qd.failed.log"
    { echo "$who bdevperf $wl QD $qd failed:"; tail -5 "$TMP/$who.out"; } >&2
    return
  fi
  RUN_CPU_IOPS=$(awk -v i="$RUN_IOPS" -v c=$((c1 - c0)) -v t=$((t1 - t0)) \
    -v c1="$c1" 'BEGIN {s = c / t; if (c1 == 0 || s <= 0) print "-"; else printf "%.0f", i / (s > 1 ? 1 : s)}')
}

# IOPS as an integer ("-" stays "-").
whole() {
  awk -v v="$1" 'BEGIN {if (v == "-") print "-"; else printf "%.0f", v}'
}

# $1 / $2 to two decimals ("-" when either is missing).
ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN {if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b}'
}

# "1.2M" style, for the per-run columns.
short() {
  local v
  for v in "$@"; do
    awk -v v="$v" 'BEGIN {if (v == "-") printf "- "; else printf "%.2fM ", v / 1e6}'
  done
}

WHO=(ours spdk)
[ -n "$BASE" ] && WHO=(ours base spdk)
ROWS=()
for wl in $WORKLOADS; do
  for qd in $QDS; do
    declare -A wall=([ours]="" [base]="" [spdk]="") cpu=([ours]="" [base]="" [spdk]="")
    for _ in $(seq "$ROUNDS"); do
      for who in "${WHO[@]}"; do
        one_run "$who" "$wl" "$qd"
        wall[$who]+="$RUN_IOPS " cpu[$who]+="$RUN_CPU_IOPS "
      done
    done
    # shellcheck disable=SC2086  # the runs are words
    {
      mo=$(median ${wall[ours]}) ms=$(median ${wall[spdk]})
      co=$(median ${cpu[ours]}) cs=$(median ${cpu[spdk]})
    }
    row="| $wl | $qd | $(whole "$mo") | $(whole "$ms") | $(ratio "$mo" "$ms") | $(whole "$co") | $(whole "$cs") | **$(ratio "$co" "$cs")** |"
    line="$wl QD $qd: IOPS ours $(short ${wall[ours]})SPDK $(short ${wall[spdk]})-> $(ratio "$mo" "$ms"); per CPU-s ours $(short ${cpu[ours]})SPDK $(short ${cpu[spdk]})-> $(ratio "$co" "$cs")"
    if [ -n "$BASE" ]; then
      # shellcheck disable=SC2086
      mb=$(median ${wall[base]}) cb=$(median ${cpu[base]})
      row+=" $(ratio "$cb" "$cs") | $(ratio "$co" "$cb") | $(ratio "$mo" "$mb") |"
      line+="; base $(short ${cpu[base]})-> base/SPDK $(ratio "$cb" "$cs"), ours/base $(ratio "$co" "$cb") (IOPS $(ratio "$mo" "$mb"))"
    fi
    echo "$line"
    row+=" $(short ${wall[ours]})| $(short ${wall[spdk]})|"
    row+=" $(short ${cpu[ours]})| $(short ${cpu[spdk]})|${BASE:+ $(short ${cpu[base]})|}"
    ROWS+=("$row")
  done
done

SPDK_VER=$(git -C "$SPDK_DIR" describe --tags 2>/dev/null || echo unknown)
{
  echo "# Null bdev: our bdevperf vs SPDK's bdevperf ($SPDK_VER), one run"
  echo
  echo "\`SPDK_DIR=$SPDK_DIR${BASE:+ BASE=$BASE} perf/spdk_null.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'),"
  echo "$(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end."
  echo "4 KiB, one core (\`-m $MASK\`, pinned, busy polling), a 1 GiB \`bdev_null_create\`"
  echo "bdev from \`--json\`, $SECS s per run; each cell alternates the processes"
  echo "(${WHO[*]}) $ROUNDS times; figures are medians, ratios are of the medians."
  echo "IOPS: wall clock (SPDK's Total line). Per CPU-s: IOPS / the share of a CPU"
  echo "the process got while its I/O ran (schedstat), the I/O path's own cost"
  echo "when other work shares the cores."
  echo
  if [ -n "$BASE" ]; then
    echo "| workload | QD | ours IOPS | SPDK IOPS | ours/SPDK (IOPS) | ours per CPU-s | SPDK per CPU-s | ours/SPDK (per CPU-s) | base/SPDK (per CPU-s) | ours/base (per CPU-s) | ours/base (IOPS) | ours IOPS, each run | SPDK IOPS, each run | ours per CPU-s, each run | SPDK per CPU-s, each run | base per CPU-s, each run |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---|"
  else
    echo "| workload | QD | ours IOPS | SPDK IOPS | ours/SPDK (IOPS) | ours per CPU-s | SPDK per CPU-s | ours/SPDK (per CPU-s) | ours IOPS, each run | SPDK IOPS, each run | ours per CPU-s, each run | SPDK per CPU-s, each run |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"
  fi
  printf '%s\n' "${ROWS[@]}"
} > "$OUT/spdk_null.md"
echo "wrote $OUT/spdk_null.md"
ls "$TMP"/*.failed.log >/dev/null 2>&1 && fail "some runs failed"
exit 0
