#!/usr/bin/env bash
# Our bdevperf against SPDK's bdevperf on a null bdev (issue 17's "null
# bdev, ours/SPDK v25.09 in one run" row), in one command:
#
#   SPDK_DIR=/var/tmp/spdk perf/spdk_null.sh [path/to/our/bdevperf]
#
# 4 KiB randwrite and randread at QD 1/32/128 on one core (-m $MASK,
# pinned, busy polling: both apps' defaults), a 1 GiB null bdev created
# from --json by the same bdev_null_create entry. Each cell alternates the
# two processes (ours, SPDK's, ours, ...) ROUNDS times; the figure is the
# median of each, and ours/SPDK is the ratio of the medians. Writes
# perf/results/spdk_null.md. Skips (exit 0) with a message unless SPDK_DIR
# points at a built SPDK tree (../shared/reference/spdk-peer-build.md);
# needs root for hugepages unless 512 are reserved. Not part of
# scripts/test.sh (SPDK is not a dependency).
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

# One run of bdevperf ($1: ours, base or spdk) with workload $2 at QD $3;
# prints its Total IOPS ("-" when the run failed: its output is shown).
one_run() {
  local who=$1 wl=$2 qd=$3 cmd
  case "$who" in
    ours) cmd=("$OURS" -m "$MASK" -r "$TMP/ours.sock" --json "$TMP/null.json") ;;
    base) cmd=("$BASE" -m "$MASK" -r "$TMP/ours.sock" --json "$TMP/null.json") ;;
    spdk) cmd=("$SPDK_DIR/build/examples/bdevperf" --no-pci -s 256 -m "$MASK"
      -r "$TMP/spdk.sock" --json "$TMP/null.json") ;;
  esac
  local iops="-"
  if timeout $((SECS + 60)) "${cmd[@]}" -q "$qd" -o 4096 -w "$wl" -t "$SECS" \
    > "$TMP/$who.out" 2>&1; then
    iops=$(total_iops "$TMP/$who.out")
  fi
  if [ "$iops" = "-" ]; then
    cp "$TMP/$who.out" "$TMP/$who-$wl-$qd.failed.log"
    { echo "$who bdevperf $wl QD $qd failed:"; tail -5 "$TMP/$who.out"; } >&2
  fi
  echo "$iops"
}

# IOPS as an integer ("-" stays "-").
whole() {
  awk -v v="$1" 'BEGIN {if (v == "-") print "-"; else printf "%.0f", v}'
}

median() {
  printf '%s\n' "$@" | grep -v '^-$' | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) print "-"; else print v[int((NR + 1) / 2)]}'
}

# $1 / $2 to two decimals ("-" when either is missing).
ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN {if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b}'
}

WHO=(ours spdk)
[ -n "$BASE" ] && WHO=(ours base spdk)
ROWS=()
for wl in $WORKLOADS; do
  for qd in $QDS; do
    declare -A runs=([ours]="" [base]="" [spdk]="")
    for _ in $(seq "$ROUNDS"); do
      for who in "${WHO[@]}"; do
        runs[$who]+="$(one_run "$who" "$wl" "$qd") "
      done
    done
    # shellcheck disable=SC2086  # the runs are words
    mo=$(median ${runs[ours]}) ms=$(median ${runs[spdk]})
    row="| $wl | $qd | $(whole "$mo") | $(whole "$ms") | **$(ratio "$mo" "$ms")** |"
    line="$wl QD $qd: ours ${runs[ours]}| SPDK ${runs[spdk]}| ours/SPDK $(ratio "$mo" "$ms")"
    if [ -n "$BASE" ]; then
      # shellcheck disable=SC2086
      mb=$(median ${runs[base]})
      row+=" $(whole "$mb") | $(ratio "$mb" "$ms") | $(ratio "$mo" "$mb") |"
      line+=" | base ${runs[base]}| base/SPDK $(ratio "$mb" "$ms") | ours/base $(ratio "$mo" "$mb")"
    fi
    echo "$line"
    ROWS+=("$row ${runs[ours]}| ${runs[spdk]}|${BASE:+ ${runs[base]}|}")
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
  echo "(${WHO[*]}) $ROUNDS times, figures are medians, ratios are of the medians."
  echo
  if [ -n "$BASE" ]; then
    echo "| workload | QD | ours IOPS | SPDK IOPS | ours/SPDK | base IOPS | base/SPDK | ours/base | ours, each run | SPDK, each run | base, each run |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"
  else
    echo "| workload | QD | ours IOPS | SPDK IOPS | ours/SPDK | ours, each run | SPDK, each run |"
    echo "|---|---:|---:|---:|---:|---|---|"
  fi
  printf '%s\n' "${ROWS[@]}"
} > "$OUT/spdk_null.md"
echo "wrote $OUT/spdk_null.md"
ls "$TMP"/*.failed.log >/dev/null 2>&1 && fail "some runs failed"
exit 0
