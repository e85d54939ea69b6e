# Sourced by the opt-in SPDK peer tests (tests/peer/*.sh): skip checks, the
# SPDK run environment (../shared/reference/spdk-peer-build.md), a temp
# dir and a cleanup that stops every process started through `spawn`,
# SPDK's nvmf_tgt exporting a malloc bdev, and our writecache_tgt doing
# the same; results go to perf/results (RESULTS_DIR). Never part of
# scripts/test.sh (SPDK is not a dependency).
#
# Callers set NQN before calling start_*; each start_* sets PORT.

SPAWNED=()
TMP=$(mktemp -d)
HUGE_OLD=""
peer_cleanup() {
  local pid
  for pid in "${SPAWNED[@]}"; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  if [ -n "$HUGE_OLD" ]; then
    echo "$HUGE_OLD" > /proc/sys/vm/nr_hugepages
  fi
  rm -rf "$TMP"
}
trap peer_cleanup EXIT

skip() { echo "SKIP: $*"; exit 0; }
fail() {
  echo "FAIL: $*"
  local f
  for f in "$TMP"/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done
  exit 1
}

# Skips (exit 0) unless SPDK_DIR is a built SPDK tree with the given
# binaries (paths relative to SPDK_DIR).
require_spdk() {
  [ -n "${SPDK_DIR:-}" ] || skip "SPDK_DIR is not set (a local SPDK build is needed)"
  local b
  for b in "$@"; do
    [ -x "$SPDK_DIR/$b" ] || skip "no $SPDK_DIR/$b"
  done
  export LD_LIBRARY_PATH=$SPDK_DIR/build/lib:$SPDK_DIR/isa-l/.libs:$SPDK_DIR/isa-l-crypto/.libs
}

# SPDK apps need hugepages: reserves PAGES 2 MiB pages if none are (root
# only; the old count is restored on exit).
require_hugepages() {
  local pages=$1 total
  total=$(awk '/^HugePages_Total/ {print $2}' /proc/meminfo)
  if [ "${total:-0}" -lt "$pages" ]; then
    [ -w /proc/sys/vm/nr_hugepages ] || skip "need $pages hugepages (echo $pages > /proc/sys/vm/nr_hugepages as root)"
    HUGE_OLD=${total:-0}
    echo "$pages" > /proc/sys/vm/nr_hugepages
  fi
  mkdir -p /dev/hugepages
  mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages ||
    skip "cannot mount hugetlbfs on /dev/hugepages"
}

# A free loopback port; PORTS="first-last" keeps to that range.
free_port() {
  python3 - "${PORTS:-0-0}" <<'PY'
import socket, sys
lo, _, hi = sys.argv[1].partition("-")
for port in range(int(lo), int(hi or lo) + 1):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        print(s.getsockname()[1])
        break
    except OSError:
        pass
    finally:
        s.close()
else:
    sys.exit(f"no free port in {sys.argv[1]}")
PY
}

# Runs "$@" in the background, output to $TMP/<name>.log; stopped on exit.
spawn() {
  local name=$1
  shift
  "$@" > "$TMP/$name.log" 2>&1 &
  SPAWNED+=("$!")
}

# Stops the process `spawn` started last.
stop_last() {
  local pid=${SPAWNED[-1]}
  kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  unset 'SPAWNED[-1]'
}

# The median of the numbers given ("-" entries skipped; "-" if none).
median() {
  printf '%s\n' "$@" | grep -v '^-$' | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) print "-"; else print v[int((NR + 1) / 2)]}'
}

# Prints stdin and writes it to $RESULTS_DIR/$1 (default perf/results).
record_result() {
  local f=${RESULTS_DIR:-perf/results}/$1
  mkdir -p "$(dirname "$f")"
  tee "$f"
  echo "wrote $f"
}

# Waits until `$1 ... rpc_get_methods` answers (RPC command as words).
wait_rpc() {
  local _
  for _ in $(seq 200); do
    "$@" rpc_get_methods >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

# SPDK's nvmf_tgt (core MASK) exporting a MIB MiB malloc bdev as $NQN on
# 127.0.0.1:$PORT.
start_spdk_nvmf_tgt() {
  local mask=$1 mib=$2
  PORT=$(free_port)
  local rpc=("$SPDK_DIR/scripts/rpc.py" -s "$TMP/spdk_tgt.sock")
  spawn spdk_nvmf_tgt "$SPDK_DIR/build/bin/nvmf_tgt" --no-pci -s 512 -m "$mask" -r "$TMP/spdk_tgt.sock"
  wait_rpc "${rpc[@]}" -t 1 || fail "SPDK nvmf_tgt did not start"
  "${rpc[@]}" nvmf_create_transport -t TCP >/dev/null || fail "SPDK nvmf_create_transport"
  "${rpc[@]}" bdev_malloc_create -b Malloc0 "$mib" 4096 >/dev/null || fail "SPDK bdev_malloc_create"
  "${rpc[@]}" nvmf_create_subsystem "$NQN" -a -s SPDKPEER >/dev/null || fail "SPDK nvmf_create_subsystem"
  "${rpc[@]}" nvmf_subsystem_add_ns "$NQN" Malloc0 >/dev/null || fail "SPDK nvmf_subsystem_add_ns"
  "${rpc[@]}" nvmf_subsystem_add_listener "$NQN" -t tcp -a 127.0.0.1 -s "$PORT" >/dev/null ||
    fail "SPDK nvmf_subsystem_add_listener"
}

# Our writecache_tgt (binary $1, core MASK) exporting a MIB MiB malloc bdev
# as $NQN on 127.0.0.1:$PORT, configured from --json.
start_our_nvmf_tgt() {
  local tgt=$1 mask=$2 mib=$3
  PORT=$(free_port)
  cat > "$TMP/our_tgt.json" <<JSON
{"subsystems":[
 {"subsystem":"bdev","config":[{"method":"bdev_malloc_create",
   "params":{"name":"Malloc0","num_blocks":$((mib * 256)),"block_size":4096}}]},
 {"subsystem":"nvmf","config":[
   {"method":"nvmf_create_transport","params":{"trtype":"TCP"}},
   {"method":"nvmf_create_subsystem","params":{"nqn":"$NQN","allow_any_host":true,"serial_number":"OURS"}},
   {"method":"nvmf_subsystem_add_ns","params":{"nqn":"$NQN","namespace":{"bdev_name":"Malloc0"}}},
   {"method":"nvmf_subsystem_add_listener","params":{"nqn":"$NQN","listen_address":
     {"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"$PORT"}}}]}]}
JSON
  spawn our_tgt "$tgt" -m "$mask" -r "$TMP/our_tgt.sock" --json "$TMP/our_tgt.json"
  wait_rpc spdk-rpc -s "$TMP/our_tgt.sock" -t 1 || fail "writecache_tgt did not start"
}

# The IOPS column of the "Total" line SPDK's bdevperf and spdk_nvme_perf
# print (both: "Total : <IOPS> <MiB/s> ..."; SPDK's bdevperf starts it
# with a carriage return, after its in-place progress line).
total_iops() {
  awk '{gsub(/\r/, "")} /^ *Total *:/ {sub(/.*Total *: */, ""); print $1; found=1} END {if (!found) print "-"}' "$1" | tail -1
}

# run_for_iops KEY WHAT OUT CMD...: runs CMD (bounded by SECS + 60 s) with
# its output in OUT and appends its Total IOPS to IOPS[KEY]; a failed run or
# one with no Total line (spdk_nvme_perf exits 0 when it attached no
# controller at all) fails the script with OUT shown.
run_for_iops() {
  local key=$1 what=$2 out=$3
  shift 3
  timeout $((SECS + 60)) "$@" > "$out" 2>&1 || { cat "$out"; fail "$what ($key)"; }
  local v
  v=$(total_iops "$out")
  [ "$v" != "-" ] || { cat "$out"; fail "$what ($key): no Total line"; }
  IOPS[$key]+="$v "
}

# ratio_rows PREFIX_A PREFIX_B ROW...: one table row per ROW and digest
# setting, "| ROW | digests | median A | median B | B/A |", from IOPS[A/ROW/dg].
ratio_rows() {
  local a=$1 b=$2 row dg x y
  shift 2
  for row in "$@"; do
    for dg in false true; do
      # shellcheck disable=SC2086  # the runs are words
      x=$(median ${IOPS[$a/$row/$dg]}) y=$(median ${IOPS[$b/$row/$dg]})
      printf '| %s | %s | %.0f | %.0f | %.2f |\n' "$row" "$dg" "$x" "$y" "$(awk -v a="$y" -v b="$x" 'BEGIN {print a / b}')"
    done
  done
}
