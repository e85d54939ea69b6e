#!/usr/bin/env bash
# Interop with the real Linux dm-writecache (Debian's kernel, its
# dm-writecache.ko, dmsetup, in a TCG guest booted by tests/vm/guest.sh), in
# both modes: ssd mode with a virtio disk for the cache, pmem mode with
# legacy pmem (memmap=16M!512M, the kernel's nd_pmem), loaded from and
# saved to a virtio disk; the origin is a virtio disk. For each mode:
#
#  A. we write a cache (through NBD: writes, overwrites, FLUSH, writes with
#     no FLUSH, then a clean delete); the kernel attaches it and reads every
#     block with 4 KiB direct reads: it must read exactly what we served.
#  B. the kernel writes a cache (committed writes, overwrites, writes with no
#     FLUSH, then power off); we attach a copy, flush, delete; the kernel
#     writes back another copy itself (flush_on_suspend + suspend): both
#     origins must be identical.
#  C. stats parity (design §3.11): the same write/FLUSH plan through our NBD
#     export and through the kernel gives the same write_blocks,
#     writes_allocate, write_hits_committed, write_hits_uncommitted,
#     flushes, blocks and free_blocks.
#
# Usage: tests/vm/dm_writecache.sh [path/to/writecache_tgt]
#   WC_VM_MODES="s p" (default): the modes to run (s = ssd, p = pmem).
# Skips (exit 0, "SKIP: ...") only where QEMU, the kernel or busybox are
# missing.
set -uo pipefail
cd "$(dirname "$0")/../.."
TGT=${1:-${TGT:-target/debug/writecache_tgt}}
source tests/vm/guest.sh
vm_test_init "$TGT"
[ -x /usr/sbin/dmsetup ] || { echo "SKIP: dmsetup not installed (apt-get install dmsetup)"; exit 0; }
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null ||
  { echo "FAIL: qemu-img/qemu-io missing (apt-get install qemu-utils)"; exit 1; }
T0=$(date +%s)

ORIGIN_MB=8
CACHE_MB=16
head -c $((2 << 20)) /dev/urandom > "$TMP/pat"

# --- the guest side: one script, the step on the kernel command line
cat > "$TMP/guest.sh" <<'GUEST'
for i in $(seq 50); do [ -b /dev/vdb ] && break; sleep 0.2; done
STEP=$(sed -n 's/.*wc_step=\([a-z]*\).*/\1/p' /proc/cmdline)
MODE=$(sed -n 's/.*wc_mode=\([a-z]*\).*/\1/p' /proc/cmdline)
SECTORS=$(cat /sys/block/vda/size)
CACHE=/dev/vdb
if [ "$MODE" = p ]; then
  # Legacy pmem: RAM that the kernel treats as persistent memory; the
  # cache image travels in and out on vdb.
  for i in $(seq 50); do [ -b /dev/pmem0 ] && break; sleep 0.2; done
  CACHE=/dev/pmem0
  echo "guest: pmem0 $(cat /sys/block/pmem0/size) sectors"
  case "$STEP" in read|drain) dd if=/dev/vdb of=/dev/pmem0 bs=1M 2>/dev/null ;; esac
fi
save() { [ "$MODE" = p ] && dd if=/dev/pmem0 of=/dev/vdb bs=1M 2>/dev/null; }
TABLE="0 $SECTORS writecache $MODE /dev/vda $CACHE 4096 0"  # origin, then cache
st() { echo "WC-STATUS $1 $(dmsetup status wc)"; }
dmsetup create wc --table "$TABLE" || { echo WC-FAIL create; exit 1; }
# No udev here: dmsetup may not have made the /dev/mapper node.
DEV=/dev/mapper/wc; [ -b $DEV ] || DEV=/dev/$(ls /sys/block | grep '^dm-' | head -1)
st attached
case "$STEP" in
  read)  # every block, one 4 KiB direct read at a time, onto vdc
    dd if=$DEV of=/dev/vdc bs=4096 iflag=direct 2>/dev/null || echo WC-FAIL read
    st read
    dmsetup remove wc ;;
  write) # committed writes, overwrites, then writes with no FLUSH
    dd if=/pat of=$DEV bs=4096 count=256 oflag=direct conv=fsync 2>/tmp/dd.err || { cat /tmp/dd.err; echo WC-FAIL dd; }
    dd if=/pat of=$DEV bs=4096 skip=256 seek=64 count=64 oflag=direct conv=fsync 2>/tmp/dd.err || { cat /tmp/dd.err; echo WC-FAIL dd; }
    dd if=/pat of=$DEV bs=4096 skip=320 seek=200 count=100 oflag=direct 2>/tmp/dd.err || { cat /tmp/dd.err; echo WC-FAIL dd; }
    dd if=/pat of=$DEV bs=4096 skip=420 seek=1000 count=40 oflag=direct 2>/tmp/dd.err || { cat /tmp/dd.err; echo WC-FAIL dd; }
    st written
    save ;;  # power off with the cache attached
  drain) # the kernel's own writeback of everything
    dmsetup message wc 0 flush_on_suspend
    dmsetup suspend wc
    st suspended
    dmsetup resume wc
    dmsetup remove wc ;;
  plan)  # design §3.11
    dd if=/dev/zero of=$DEV bs=4096 count=900 oflag=direct conv=fsync 2>/tmp/dd.err || { cat /tmp/dd.err; echo WC-FAIL dd; }
    dd if=/dev/zero of=$DEV bs=4096 count=300 oflag=direct conv=fsync 2>/tmp/dd.err || { cat /tmp/dd.err; echo WC-FAIL dd; }
    dd if=/dev/zero of=$DEV bs=4096 seek=300 count=200 oflag=direct conv=fsync 2>/tmp/dd.err || { cat /tmp/dd.err; echo WC-FAIL dd; }
    # pmem mode: 180 more overwrites of committed blocks (§3.11).
    [ "$MODE" = p ] && dd if=/dev/zero of=$DEV bs=4096 seek=500 count=180 oflag=direct 2>/tmp/dd.err
    dd if=/dev/zero of=$DEV bs=4096 seek=900 count=300 oflag=direct 2>/tmp/dd.err || { cat /tmp/dd.err; echo WC-FAIL dd; }
    st plan
    save ;;
esac
echo WC-DONE
GUEST
vm_initramfs "$TMP/initrd.gz" "$TMP/guest.sh" --mod dm-writecache --mod nd_pmem --mod nd_e820 \
  --bin /usr/sbin/dmsetup --file "$TMP/pat:/pat" || fail "initramfs"

export VM_MEM=1G
M=s
boot() { # boot STEP ORIGIN CACHE [OUT]: the kernel runs STEP over the images
  local step=$1 log="$TMP/console-$1.log"
  local args=(-drive "file=$2,format=raw,if=virtio" -drive "file=$3,format=raw,if=virtio")
  [ -n "${4:-}" ] && args+=(-drive "file=$4,format=raw,if=virtio")
  local append="wc_step=$step wc_mode=$M"
  [ $M = p ] && append="$append memmap=${CACHE_MB}M!512M"
  vm_run "$log" "$TMP/initrd.gz" "$append" "${args[@]}"
  local rc=$?
  grep -aoE "WC-STATUS [a-z]+ [^$(printf '\r')]*" "$log" | sed "s/^/  kernel $step: /"
  grep -qa WC-DONE "$log" && ! grep -qa WC-FAIL "$log" ||
    { tail -30 "$log"; fail "guest step $step (qemu rc=$rc)"; }
}
# Field N (1-based) of the kernel's status line for STEP's label LABEL.
kstat() { grep -aoE "WC-STATUS $2 [^$(printf '\r')]*" "$TMP/console-$1.log" | tail -1 | awk -v n=$(( $3 + 5 )) '{print $n}'; }

# --- our side: writecache_tgt over uring bdevs on the image files
start_tgt() { # start_tgt ORIGIN CACHE: instance wc0 in ssd mode, NBD export e0
  "$TGT" -m 0x1 --interrupt-mode -r "$TMP/rpc.sock" -S "$TMP" > "$TMP/tgt.log" 2>&1 &
  TGT_PID=$!
  for _ in $(seq 100); do [ -S "$TMP/rpc.sock" ] && break; sleep 0.1; done
  rpc() { tgt_rpc "$TMP/rpc.sock" "$@"; }
  rpc bdev_uring_create "{\"name\":\"O0\",\"filename\":\"$1\",\"block_size\":512}" >/dev/null || fail "uring origin"
  if [ $M = p ]; then
    rpc bdev_pmem_create "{\"name\":\"C0\",\"filename\":\"$2\"}" >/dev/null || fail "pmem cache"
  else
    rpc bdev_uring_create "{\"name\":\"C0\",\"filename\":\"$2\",\"block_size\":512}" >/dev/null ||
      fail "uring cache"
  fi
  local mode=ssd; [ $M = p ] && mode=pmem
  rpc bdev_writecache_create "{\"name\":\"wc0\",\"base_bdev\":\"O0\",\"cache_bdev\":\"C0\",\"mode\":\"$mode\"}" \
    >/dev/null || fail "bdev_writecache_create"
  rpc nbd_server_start "{\"listen\":\"$TMP/nbd.sock\"}" >/dev/null || fail "nbd_server_start"
  rpc nbd_export_create '{"bdev_name":"wc0","export_name":"e0"}' >/dev/null || fail "nbd_export_create"
}
URI() { echo "nbd+unix:///e0?socket=$TMP/nbd.sock"; }
# (-t writeback: qemu-io's default writethrough mode adds a FLUSH after
# every write and one at close, which would show in the flush count.)
qio() { qemu-io -t writeback -f raw "$(URI)" "$@" > "$TMP/qio.log" 2>&1 && ! grep -q failed "$TMP/qio.log" ||
  { cat "$TMP/qio.log"; fail "qemu-io $*"; }; }
ours() { tgt_rpc "$TMP/rpc.sock" bdev_writecache_get_stats '{"name":"wc0"}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0][sys.argv[1]])' "$1"; }
stop_ours() { # commit-only delete, then stop the target
  tgt_rpc "$TMP/rpc.sock" bdev_writecache_delete "{\"name\":\"wc0\"${1:+,\"flush\":true}}" >/dev/null ||
    fail "bdev_writecache_delete"
  stop_tgt
}
blank() { rm -f "$2"; truncate -s "${1}M" "$2"; }

run_mode() { # run_mode s|p: parts A, B, C in ssd or pmem mode
  M=$1
  # --- A: we write, the kernel reads
  blank $ORIGIN_MB "$TMP/a-origin.img"; blank $CACHE_MB "$TMP/a-cache.img"; blank $ORIGIN_MB "$TMP/a-out.img"
  head -c $((ORIGIN_MB << 20)) /dev/urandom > "$TMP/a-origin.img"   # an origin with content
  start_tgt "$TMP/a-origin.img" "$TMP/a-cache.img"
  qio -c "write -P 0x11 0 1M" -c "write -P 0x22 256k 128k" -c "flush" \
      -c "write -P 0x33 4M 64k" -c "write -P 0x44 8k 4k" -c "write -P 0x55 6M 12k"
  qemu-img convert -f raw -O raw "$(URI)" "$TMP/a-want.img" || fail "reading our bdev back"
  echo "$M A: ours wrote $(ours write_blocks) blocks, $(ours dirty) cached; clean delete"
  stop_ours
  boot read "$TMP/a-origin.img" "$TMP/a-cache.img" "$TMP/a-out.img"
  cmp "$TMP/a-want.img" "$TMP/a-out.img" || fail "$M A: the kernel read something else than we served"
  echo "$M A: ok — the kernel read back exactly what we wrote ($ORIGIN_MB MiB, 4 KiB reads)"

  # --- B: the kernel writes, both write back
  blank $ORIGIN_MB "$TMP/b-origin.img"; blank $CACHE_MB "$TMP/b-cache.img"
  head -c $((ORIGIN_MB << 20)) /dev/urandom > "$TMP/b-origin.img"
  boot write "$TMP/b-origin.img" "$TMP/b-cache.img"
  cp "$TMP/b-origin.img" "$TMP/b-origin-k.img"; cp "$TMP/b-cache.img" "$TMP/b-cache-k.img"
  start_tgt "$TMP/b-origin.img" "$TMP/b-cache.img"
  echo "$M B: ours recovered $(ours dirty) committed blocks of the kernel's cache"
  tgt_rpc "$TMP/rpc.sock" bdev_writecache_flush '{"name":"wc0"}' >/dev/null || fail "bdev_writecache_flush"
  [ "$(ours dirty)" = 0 ] || fail "$M B: dirty blocks after our flush"
  stop_ours
  boot drain "$TMP/b-origin-k.img" "$TMP/b-cache-k.img"
  cmp "$TMP/b-origin.img" "$TMP/b-origin-k.img" || fail "$M B: our writeback and the kernel's differ"
  echo "$M B: ok — our writeback of the kernel's cache equals the kernel's own"

  # --- C: stats parity
  blank $ORIGIN_MB "$TMP/c-origin.img"; blank $CACHE_MB "$TMP/c-cache.img"
  boot plan "$TMP/c-origin.img" "$TMP/c-cache.img"
  blank $ORIGIN_MB "$TMP/c-origin.img"; blank $CACHE_MB "$TMP/c-cache.img"
  start_tgt "$TMP/c-origin.img" "$TMP/c-cache.img"
  # The counts are read while qemu-io still holds the connection: closing it
  # sends one more FLUSH.
  EXTRA=(); WANT=1700; [ $M = p ] && { EXTRA=(-c "write -P 5 2000k 720k"); WANT=1880; }
  qemu-io -t writeback -f raw "$(URI)" -c "write -P 1 0 3600k" -c "flush" -c "write -P 2 0 1200k" \
    -c "flush" -c "write -P 3 1200k 800k" -c "flush" "${EXTRA[@]}" -c "write -P 4 3600k 1200k" -c "sleep 10000" \
    > "$TMP/qio.log" 2>&1 &
  QIO=$!
  for _ in $(seq 100); do [ "$(ours write_blocks)" = $WANT ] && break; sleep 0.1; done
  # One snapshot of every count (before qemu-io's sleep ends).
  tgt_rpc "$TMP/rpc.sock" bdev_writecache_get_stats '{"name":"wc0"}' > "$TMP/ours.json"
  wait $QIO || { cat "$TMP/qio.log"; fail "qemu-io (plan)"; }
  # Kernel status fields after "writecache": error blocks free writeback
  # read_blocks read_hits write_blocks hits_uncommitted hits_committed
  # writes_around writes_allocate blocked flushes discards.
  bad=0
  for pair in blocks:2 free_blocks:3 write_blocks:7 write_hits_uncommitted:8 \
              write_hits_committed:9 writes_allocate:11 flushes:13; do
    f=${pair%%:*}; k=$(kstat plan plan "${pair##*:}")
    o=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0][sys.argv[2]])' "$TMP/ours.json" "$f")
    echo "$M C: $f: kernel $k, ours $o"
    [ "$k" = "$o" ] || bad=1
  done
  stop_ours
  [ $bad = 0 ] || fail "$M C: counts differ from the kernel's"
  echo "$M C: ok — the §3.11 plan gives the kernel's counts"
}

for m in ${WC_VM_MODES:-s p}; do run_mode $m; done
echo "dm_writecache.sh: ssd and pmem mode interop passed in $(( $(date +%s) - T0 )) s"
