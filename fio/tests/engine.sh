#!/usr/bin/env bash
# The in-process fio engine end to end, with Debian's fio:
#  * malloc bdev (JSON config): randwrite through LD_PRELOAD +
#    ioengine=writecache_bdev, randread through ioengine=external:<path>,
#    verify (crc32c, do_verify=1); two jobs each (numjobs=2);
#  * writecache bdev (YAML config: pmem cache file over a malloc origin):
#    time-based randwrite with the RPC server inside fio, whose
#    bdev_writecache_get_stats (stock spdk-rpc + our plugin) must count the
#    writes during the run; verify; then verify_only in a new fio process:
#    the data is read back from the cache file, so the first process's
#    shutdown committed the cache; the same with one job (its reactor, the
#    only writer, runs the autocommits itself);
#  * bad input: unknown bdev, bad config, unaligned bs, missing thread=1,
#    missing spdk_json_conf -> fio fails with our message, the process ends
#    and its RPC socket is gone.
# fio's JSON output is checked for each run: no job error, iops > 0, the
# verify reads covered what was written.
#
# Usage: fio/tests/engine.sh [path/to/libwritecache_fio.so]
#   (default target/fio/libwritecache_fio.so, built by
#   scripts/build_fio_engine.sh). Takes about 15 s.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SO=$(realpath -m "${1:-${CARGO_TARGET_DIR:-target}/fio/libwritecache_fio.so}")
JOBS=$ROOT/fio/tests/jobs
TMP=$(mktemp -d)
SHM=/dev/shm
[ -d "$SHM" ] && [ -w "$SHM" ] || SHM=$TMP
CACHE=$(mktemp -u "$SHM/wc-fio-cache.XXXXXX")
FIO_PID=""
cleanup() {
  [ -n "$FIO_PID" ] && kill "$FIO_PID" 2>/dev/null
  rm -rf "$TMP" "$CACHE"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; for f in "$TMP"/*.err; do [ -s "$f" ] && { echo "--- $f"; tail -15 "$f"; }; done; exit 1; }

command -v fio >/dev/null || fail "fio is not installed"
[ -f "$SO" ] || fail "$SO not built (scripts/build_fio_engine.sh)"
export PYTHONPATH=$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}
RPC=$(command -v spdk-rpc || true)
[ -n "$RPC" ] || fail "spdk-rpc not installed (scripts/deps.sh)"

cat >"$TMP/malloc.json" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_malloc_create",
   "params": {"name": "Malloc0", "num_blocks": 65536, "block_size": 512}},
  {"method": "bdev_malloc_create",
   "params": {"name": "Malloc1", "num_blocks": 65536, "block_size": 512}}]}]}
EOF
# Watermarks at 100%: no writeback, so everything written stays in the
# cache file and only the cache can give it back to the second process.
cat >"$TMP/wc.yaml" <<EOF
subsystems:
  - subsystem: bdev
    config:
      - method: bdev_malloc_create
        params: {name: Origin0, num_blocks: 8192, block_size: 4096}
      - method: bdev_pmem_create
        params: {name: Cache0, filename: $CACHE, size: 67108864}
      - method: bdev_writecache_create
        params: {name: WC0, base_bdev: Origin0, cache_bdev: Cache0,
                 high_watermark: 100, low_watermark: 100}
EOF

# run NAME JOBFILE [fio args...]: fio with the JSON report in NAME.json.
# PRELOAD=1 loads the engine with LD_PRELOAD (ENGINE=writecache_bdev).
run_fio() {
  local name=$1 job=$2
  shift 2
  local pre=()
  [ "${PRELOAD:-0}" = 1 ] && pre=(env "LD_PRELOAD=$SO")
  (cd "$TMP" && timeout 60 "${pre[@]}" fio "$JOBS/$job" --output-format=json "$@") \
    >"$TMP/$name.json" 2>"$TMP/$name.err"
}

# check NAME MODE: fio's JSON report (NJOBS jobs). MODE write|read|verify.
check() {
  python3 - "$TMP/$1.json" "$2" "$QD" "$NJOBS" <<'EOF' || fail "$1: fio's report"
import json, sys
text = open(sys.argv[1]).read()
# fio may print warnings before the JSON document.
j = json.loads(text[text.index("{"):])
mode = sys.argv[2]
jobs = j["jobs"]
want = int(sys.argv[4])
assert len(jobs) == want, f"{len(jobs)} jobs in the report, want {want}"
for x in jobs:
    assert x["error"] == 0, f"job error {x['error']}"
    w, r = x["write"], x["read"]
    if mode in ("write", "read"):
        d = w if mode == "write" else r
        assert d["iops"] > 0 and d["io_bytes"] > 0, f"no {mode}s"
        # iodepth honoured: fio reached QD I/O in flight, never more. (The
        # engine hands fio every completion ready, as SPDK's plugin, so fio
        # refills from what it reaped: its submit depths spread over 1..QD.)
        qd = int(sys.argv[3])
        levels = {int(k.lstrip(">=")): v for k, v in x["iodepth_level"].items()
                  if k.lstrip(">=").isdigit()}
        bucket = max(k for k in levels if k <= qd)
        assert levels[bucket] > 0, f"never at depth {qd}: {x['iodepth_level']}"
        above = sum(v for k, v in levels.items() if k > bucket)
        assert above == 0, f"deeper than {qd}: {x['iodepth_level']}"
    elif mode == "verify":
        assert w["io_bytes"] > 0, "no writes"
        # do_verify reads back every block written.
        assert r["io_bytes"] == w["io_bytes"], f"verified {r['io_bytes']} of {w['io_bytes']} bytes"
        assert w["iops"] > 0 and r["iops"] > 0
    elif mode == "verify_only":
        # (fio accounts the skipped writes in write.io_bytes too)
        assert r["io_bytes"] == w["io_bytes"] > 0, "verify_only did not read everything"
        assert r["iops"] > 0
print(f"  {mode}: " + ", ".join(f"{x['write']['iops'] + x['read']['iops']:.0f} IOPS" for x in jobs))
EOF
}

LD_PRELOAD=$SO /bin/true || fail "preloading the engine into a program other than fio breaks it"

export QD=16 NJOBS=2
EXT="external:$SO"

echo "== malloc: randwrite (LD_PRELOAD, ioengine=writecache_bdev)"
ENGINE=writecache_bdev CONF=$TMP/malloc.json BDEV=Malloc0 SIZE=8m PRELOAD=1 \
  run_fio mw randwrite.fio || fail "randwrite on malloc (rc $?)"
check mw write

echo "== malloc: randread (ioengine=external:)"
ENGINE=$EXT CONF=$TMP/malloc.json BDEV=Malloc0 SIZE=8m \
  run_fio mr randread.fio || fail "randread on malloc (rc $?)"
check mr read

echo "== two bdevs in one job (filename=Malloc0:Malloc1)"
ENGINE=$EXT CONF=$TMP/malloc.json BDEV=Malloc0:Malloc1 SIZE=8m \
  run_fio m2 randwrite.fio || fail "randwrite on Malloc0:Malloc1 (rc $?)"
check m2 write

echo "== malloc: verify crc32c"
ENGINE=$EXT CONF=$TMP/malloc.json BDEV=Malloc0 SIZE=8m \
  run_fio mv verify.fio || fail "verify on malloc (rc $?)"
check mv verify

echo "== writecache: randwrite with the RPC server inside fio, stats during the run"
SOCK=$TMP/rpc.sock
ENGINE=writecache_bdev CONF=$TMP/wc.yaml BDEV=WC0 SIZE=8m RPC_SOCK=$SOCK RUNTIME=3 PRELOAD=1 \
  run_fio wt timed-rpc.fio &
FIO_PID=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done
[ -S "$SOCK" ] || fail "no RPC socket $SOCK during the run"
STATS=""
for _ in $(seq 40); do
  STATS=$("$RPC" -s "$SOCK" --plugin writecache_rpc bdev_writecache_get_stats WC0 2>"$TMP/rpc.err") || true
  python3 -c 'import json,sys; s=json.loads(sys.argv[1]); s=s[0] if isinstance(s,list) else s; sys.exit(0 if s["write_blocks"] > 0 else 1)' "$STATS" 2>/dev/null && break
  sleep 0.1
done
echo "  during the run: $(python3 -c 'import json,sys; s=json.loads(sys.argv[1]); s=s[0] if isinstance(s,list) else s; print("write_blocks", s["write_blocks"], "state", s["state"])' "$STATS" 2>/dev/null || echo "no stats: $STATS")"
python3 -c 'import json,sys; s=json.loads(sys.argv[1]); s=s[0] if isinstance(s,list) else s; sys.exit(0 if s["write_blocks"] > 0 else 1)' "$STATS" 2>/dev/null ||
  fail "bdev_writecache_get_stats through fio's RPC server: $STATS $(cat "$TMP/rpc.err")"
wait "$FIO_PID" || fail "timed randwrite on writecache (rc $?)"
FIO_PID=""
check wt write
[ -e "$SOCK" ] && fail "RPC socket left behind after fio exited"

echo "== writecache: verify crc32c, then verify_only in a new fio process (shutdown committed the cache)"
rm -f "$CACHE"
ENGINE=$EXT CONF=$TMP/wc.yaml BDEV=WC0 SIZE=8m \
  run_fio wv verify.fio || fail "verify on writecache (rc $?)"
check wv verify
ENGINE=$EXT CONF=$TMP/wc.yaml BDEV=WC0 SIZE=8m \
  run_fio wvo verify-only.fio || fail "verify_only after restart on writecache (rc $?)"
check wvo verify_only

echo "== writecache, one job: its reactor is the only writer and commits itself; verify_only after restart"
rm -f "$CACHE"
ENGINE=$EXT CONF=$TMP/wc.yaml BDEV=WC0 SIZE=16m NJOBS=1 \
  run_fio wv1 verify.fio || fail "one-job verify on writecache (rc $?)"
NJOBS=1 check wv1 verify
ENGINE=$EXT CONF=$TMP/wc.yaml BDEV=WC0 SIZE=16m NJOBS=1 \
  run_fio wvo1 verify-only.fio || fail "one-job verify_only after restart on writecache (rc $?)"
NJOBS=1 check wvo1 verify_only

echo "== bad input: fio fails with our message, nothing left running"
# bad NAME MESSAGE [fio args]: a one-job command-line run that must fail.
bad() {
  local name=$1 msg=$2
  shift 2
  local t0=$SECONDS
  (cd "$TMP" && timeout 30 fio --name="$name" --ioengine="$EXT" --direct=1 --rw=randwrite --size=1m "$@" \
    ) >"$TMP/$name.out" 2>"$TMP/$name.err"
  local rc=$?
  [ "$rc" -ne 0 ] || fail "$name: fio exited 0"
  [ "$rc" -ne 124 ] || fail "$name: fio hung (killed after 30 s)"
  grep -qF -- "$msg" "$TMP/$name.err" "$TMP/$name.out" || fail "$name: no '$msg' in fio's output"
  echo "  $name: rc $rc in $((SECONDS - t0)) s: $(grep -hF -- "$msg" "$TMP/$name.err" "$TMP/$name.out" | head -1)"
}
printf '{"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_nonsense_create"' >"$TMP/bad.json"
bad unknown_bdev "bdev Nvme0n1 does not exist" --thread=1 --bs=4k \
  --spdk_json_conf="$TMP/malloc.json" --filename=Nvme0n1 --spdk_rpc_listen_addr="$TMP/bad.sock"
[ -e "$TMP/bad.sock" ] && fail "unknown_bdev: RPC socket left behind"
bad bad_config "cannot start with config" --thread=1 --bs=4k \
  --spdk_json_conf="$TMP/bad.json" --filename=Malloc0
bad unaligned_bs "is not a multiple of bdev Malloc0's block size 512" --thread=1 --bs=1000 \
  --spdk_json_conf="$TMP/malloc.json" --filename=Malloc0
bad no_thread "must set thread=1 when using spdk plugin" --bs=4k \
  --spdk_json_conf="$TMP/malloc.json" --filename=Malloc0
bad no_config "spdk_json_conf=FILE is required" --thread=1 --bs=4k --filename=Malloc0

echo "fio engine: all checks passed"
