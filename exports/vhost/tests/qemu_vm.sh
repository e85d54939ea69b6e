#!/usr/bin/env bash
# vhost-user-blk end to end, through a writecache bdev:
#  * writecache_tgt (2 reactors, interrupt mode) runs WC0 = a writecache
#    with a pmem cache file over a malloc origin, exported as the
#    vhost-user-blk controller vhost.0 (2 queues, one per reactor);
#  * boot 1: QEMU (TCG; ACCEL=kvm opts in) boots Debian's kernel with a
#    busybox initramfs built here, 2 vCPUs, the disk on our socket; the
#    guest writes a 1 MiB pattern (carried in the initramfs) from both
#    vCPUs, flushes, drops its caches, reads it back and compares;
#  * the host checks the bytes landed in WC0: its stats count the writes,
#    and reading WC0 through the target's NBD export (nbdcopy or qemu-img)
#    gives the pattern back;
#  * boot 2 (same target: the VM restart reconnects): the guest finds the
#    pattern; vhost_delete_controller is refused (EBUSY, as SPDK) while it
#    is connected; it reads until the host deletes WC0 under the live
#    controller (bdev_writecache_delete); its reads must then fail with an
#    I/O error; the controller reports the bdev gone, vhost_delete_controller
#    works once the VM is gone and the target stays up.
#  * ssd mode: WC1 = an ssd-mode writecache (uring cache file over a malloc
#    origin) is exported as vhost.1, the guest's second disk in boot 1; the
#    guest writes the pattern to it, flushes, drops its caches and reads it
#    back; the host reads WC1 back over NBD too.
# Skips (exit 0, clear message) only when QEMU / kernel / busybox are missing.
# Usage: exports/vhost/tests/qemu_vm.sh [path/to/writecache_tgt]
#   VM_TGT_BUSY=1: one busy-polling reactor instead (both queues on it, no
#   kicks); ACCEL=kvm; VM_TIMEOUT=seconds per boot (240).
set -uo pipefail
cd "$(dirname "$0")/../../.."
TGT=${1:-${TGT:-target/debug/writecache_tgt}}
source tests/vm/guest.sh
vm_test_init "$TGT"
command -v nbdcopy >/dev/null || command -v qemu-img >/dev/null ||
  { echo "FAIL: no NBD client to read the bdev back (apt-get install libnbd-bin or qemu-utils)"; exit 1; }


# --- initramfs (tests/vm/guest.sh): busybox, the virtio modules and the pattern
PAT_BYTES=$((1 << 20))
head -c $PAT_BYTES /dev/urandom > "$TMP/pat"
cat > "$TMP/guest.sh" <<'GUEST'
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.2; done
echo "guest: vda size $(cat /sys/block/vda/size 2>/dev/null) sectors, $(ls /sys/block/vda/mq 2>/dev/null | wc -l) queues, $(nproc) cpus"
STEP=$(sed -n 's/.*wc_step=\([a-z]*\).*/\1/p' /proc/cmdline)
if [ "$STEP" = write ]; then
  # Half of the pattern from each vCPU (so from each queue), direct I/O.
  taskset 1 dd if=/pat of=/dev/vda bs=4096 count=128 oflag=direct 2>/dev/null &
  taskset 2 dd if=/pat of=/dev/vda bs=4096 skip=128 seek=128 count=128 oflag=direct 2>/dev/null &
  wait
  sync; blockdev --flushbufs /dev/vda
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/vda of=/tmp/back bs=4096 count=256 2>/dev/null
  if cmp /pat /tmp/back; then echo VHOST-OK; else echo VHOST-FAIL; fi
  # The second disk: the ssd-mode writecache.
  for i in $(seq 50); do [ -b /dev/vdb ] && break; sleep 0.2; done
  dd if=/pat of=/dev/vdb bs=4096 count=256 oflag=direct 2>/dev/null
  sync; blockdev --flushbufs /dev/vdb
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/vdb of=/tmp/back1 bs=4096 count=256 iflag=direct 2>/dev/null
  if cmp /pat /tmp/back1; then echo VHOST-SSD-OK; else echo VHOST-SSD-FAIL; fi
else
  # Reconnected after the restart: the data is still there.
  dd if=/dev/vda of=/tmp/back bs=4096 count=256 iflag=direct 2>/dev/null
  if cmp /pat /tmp/back; then echo VHOST-OK; else echo VHOST-FAIL; fi
  # Read until the host deletes the bdev: the reads must then fail.
  res=VHOST-NOEIO
  for i in $(seq 1200); do
    if ! dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; then
      res=VHOST-EIO; break
    fi
    sleep 0.1
  done
  echo $res
fi
GUEST
vm_initramfs "$TMP/initrd.gz" "$TMP/guest.sh" --file "$TMP/pat:/pat" || fail "initramfs"

# --- target: WC0 = writecache (pmem cache file) over a malloc origin;
# WC1 = ssd-mode writecache (uring cache file) over another
truncate -s 16M "$TMP/cache1.img"
cat > "$TMP/cfg.json" <<JSON
{"subsystems":[
 {"subsystem":"bdev","config":[
  {"method":"bdev_malloc_create","params":{"name":"Origin0","num_blocks":65536,"block_size":512}},
  {"method":"bdev_pmem_create","params":{"name":"Cache0","filename":"$TMP/cache.pmem","size":16777216}},
  {"method":"bdev_writecache_create","params":{"name":"WC0","base_bdev":"Origin0","cache_bdev":"Cache0"}},
  {"method":"bdev_malloc_create","params":{"name":"Origin1","num_blocks":65536,"block_size":512}},
  {"method":"bdev_uring_create","params":{"name":"Cache1","filename":"$TMP/cache1.img","block_size":4096}},
  {"method":"bdev_writecache_create","params":{"name":"WC1","base_bdev":"Origin1","cache_bdev":"Cache1","mode":"ssd"}}]},
 {"subsystem":"vhost_blk","config":[{"method":"vhost_create_blk_controller","params":{"ctrlr":"vhost.0","dev_name":"WC0"}},
  {"method":"vhost_create_blk_controller","params":{"ctrlr":"vhost.1","dev_name":"WC1"}}]}
]}
JSON
# Interrupt mode: two busy-polling reactors would leave no CPU to TCG.
MASK=0x3 MODE=--interrupt-mode
[ "${VM_TGT_BUSY:-0}" = 1 ] && MASK=0x1 MODE=
"$TGT" -m $MASK $MODE -r "$TMP/rpc.sock" -S "$TMP" -c "$TMP/cfg.json" > "$TMP/tgt.log" 2>&1 &
TGT_PID=$!
for _ in $(seq 100); do [ -S "$TMP/vhost.0" ] && break; sleep 0.1; done
[ -S "$TMP/vhost.0" ] || fail "no vhost socket"
rpc vhost_get_controllers | grep -q "\"cpumask\": \"$MASK\"" || fail "controller not on the reactors of $MASK"

ACCEL=${ACCEL:-tcg}
export VM_MEM=256M
start_vm() { # start_vm STEP [QEMU ARGS]: boots in the background, console in $TMP/console.log
  local step=$1; shift
  vm_start "$TMP/console.log" "$TMP/initrd.gz" "wc_step=$step" \
    -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
    -chardev socket,id=c0,path="$TMP/vhost.0" -device vhost-user-blk-pci,chardev=c0,num-queues=2,queue-size=1024 "$@"
}
wait_vm() { # wait_vm BOOT: waits for QEMU to exit, reports, checks the target
  vm_wait; local rc=$?
  echo "boot $1: $(grep -aoE "guest:[^$(printf '\r')]*|VHOST-[A-Z-]+" "$TMP/console.log" | tr '\n' ' ')"
  kill -0 "$TGT_PID" 2>/dev/null || fail "target died"
  grep -qa VHOST-OK "$TMP/console.log" || { tail -30 "$TMP/console.log"; fail "boot $1 (qemu rc=$rc, accel=$ACCEL)"; }
}
stat_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)[0][sys.argv[1]])' "$1"; }

# --- boot 1: the guest writes the pattern (to WC0 and to WC1, ssd mode)
start_vm write -chardev socket,id=c1,path="$TMP/vhost.1" -device vhost-user-blk-pci,chardev=c1,num-queues=1
wait_vm 1
grep -qa VHOST-SSD-OK "$TMP/console.log" || fail "the guest did not read its pattern back from WC1 (ssd mode)"
WRITES=$(rpc bdev_writecache_get_stats '{"name":"WC0"}' | stat_of write_blocks)
[ "$WRITES" -gt 0 ] 2>/dev/null || fail "WC0 counted no writes ($WRITES)"
# The bytes, read back from WC0 through the target's NBD export.
rpc nbd_server_start "{\"listen\":\"$TMP/nbd.sock\"}" >/dev/null || fail "nbd_server_start"
rpc nbd_export_create '{"bdev_name":"WC0","export_name":"wc0","readonly":true}' >/dev/null || fail "nbd_export_create"
URI="nbd+unix:///wc0?socket=$TMP/nbd.sock"
if command -v nbdcopy >/dev/null; then
  nbdcopy "$URI" "$TMP/wc0.img" || fail "nbdcopy"
else
  qemu-img convert -f raw -O raw "$URI" "$TMP/wc0.img" || fail "qemu-img convert"
fi
cmp -n $PAT_BYTES "$TMP/pat" "$TMP/wc0.img" || fail "WC0 does not hold the guest's bytes"
rpc nbd_export_delete '{"export_name":"wc0"}' >/dev/null
echo "host: WC0 holds the guest's 1 MiB ($WRITES cache blocks written, read back over NBD)"
rpc bdev_get_bdevs '{"name":"WC1"}' |
  python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)[0]["driver_specific"]["writecache"]["mode"] != "ssd")' ||
  fail "WC1 is not in ssd mode"
WRITES1=$(rpc bdev_writecache_get_stats '{"name":"WC1"}' | stat_of write_blocks)
[ "$WRITES1" -gt 0 ] 2>/dev/null || fail "WC1 counted no writes ($WRITES1)"
rpc nbd_export_create '{"bdev_name":"WC1","export_name":"wc1","readonly":true}' >/dev/null || fail "nbd_export_create wc1"
URI1="nbd+unix:///wc1?socket=$TMP/nbd.sock"
if command -v nbdcopy >/dev/null; then
  nbdcopy "$URI1" "$TMP/wc1.img" || fail "nbdcopy wc1"
else
  qemu-img convert -f raw -O raw "$URI1" "$TMP/wc1.img" || fail "qemu-img convert wc1"
fi
cmp -n $PAT_BYTES "$TMP/pat" "$TMP/wc1.img" || fail "WC1 (ssd mode) does not hold the guest's bytes"
rpc nbd_export_delete '{"export_name":"wc1"}' >/dev/null
echo "host: WC1 (ssd mode) holds the guest's 1 MiB ($WRITES1 blocks written, read back over NBD)"

# --- boot 2: reconnect, then WC0 deleted under the live controller
start_vm check
vm_wait_for "$TMP/console.log" "VHOST-OK|VHOST-FAIL"
grep -qa VHOST-OK "$TMP/console.log" || { wait_vm 2; fail "boot 2 did not find the pattern"; }
# As SPDK: no deleting a controller under a connected VM.
err=$(rpc vhost_delete_controller '{"ctrlr":"vhost.0"}' 2>&1) && fail "vhost_delete_controller succeeded under a connected VM"
case "$err" in *"busy"*) ;; *) fail "vhost_delete_controller under a connected VM: $err" ;; esac
[ "$(rpc bdev_writecache_delete '{"name":"WC0"}')" = true ] || fail "bdev_writecache_delete WC0"
wait_vm 2
grep -qa VHOST-EIO "$TMP/console.log" || fail "the guest's reads did not fail after the delete"
rpc vhost_get_controllers | python3 -c 'import json,sys; c=json.load(sys.stdin)[0]; sys.exit(c["backend_specific"]["block"]["bdev"] is not None)' ||
  fail "vhost_get_controllers still names the deleted bdev"
# The VM is gone; the controller notices the closed connection on its own.
deleted=""
for _ in $(seq 100); do
  [ "$(rpc vhost_delete_controller '{"ctrlr":"vhost.0"}' 2>/dev/null)" = true ] && { deleted=1; break; }
  sleep 0.1
done
[ -n "$deleted" ] || fail "vhost_delete_controller after the VM stopped"
[ -e "$TMP/vhost.0" ] && fail "socket left behind"
rpc spdk_get_version >/dev/null || fail "target does not answer"
echo "host: WC0 deleted under the live controller: guest reads failed, controller deleted, target up"
echo "PASS (accel=$ACCEL, 2 boots, 2 queues on the reactors of $MASK${MODE:+, interrupt mode}; pmem and ssd mode)"
