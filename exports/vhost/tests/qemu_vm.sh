#!/usr/bin/env bash
# vhost-user-blk end to end: writecache_tgt exports a malloc bdev on a
# vhost-user socket; QEMU (KVM if /dev/kvm works, TCG otherwise) boots
# Debian's kernel with a busybox initramfs built here; the guest writes a
# random 1 MiB pattern to /dev/vda with dd, syncs, drops caches, reads it
# back and compares; the serial console must print VHOST-OK.
# Skips (exit 0, clear message) only when QEMU / kernel / busybox are missing.
# Usage: exports/vhost/tests/qemu_vm.sh [path/to/writecache_tgt]
set -uo pipefail
cd "$(dirname "$0")/../../.."
TGT=${1:-${TGT:-target/debug/writecache_tgt}}
QEMU=$(command -v qemu-system-x86_64 || true)
KERNEL=$(ls /boot/vmlinuz-* 2>/dev/null | head -1)
BUSYBOX=$(command -v busybox || true)
skip() { echo "SKIP: $*"; exit 0; }
[ -n "$QEMU" ] || skip "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
[ -n "$KERNEL" ] || skip "no kernel in /boot (apt-get install linux-image-amd64)"
[ -n "$BUSYBOX" ] && file -L "$BUSYBOX" | grep -q static || skip "no static busybox (apt-get install busybox-static)"
[ -x "$TGT" ] || { echo "FAIL: $TGT not built"; exit 1; }
KVER=${KERNEL#/boot/vmlinuz-}
MODS=/lib/modules/$KVER/kernel/drivers
TMP=$(mktemp -d)
TGT_PID=""
cleanup() {
  [ -n "$TGT_PID" ] && kill "$TGT_PID" 2>/dev/null && wait "$TGT_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

# --- initramfs
R=$TMP/root
mkdir -p "$R"/{bin,dev,proc,sys,tmp,mod}
cp "$BUSYBOX" "$R/bin/busybox"
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev \
         virtio/virtio_pci_modern_dev virtio/virtio_pci block/virtio_blk; do
  f=$(ls "$MODS/$m.ko"* 2>/dev/null | head -1)
  [ -n "$f" ] || continue
  case "$f" in
    *.xz) xz -dc "$f" > "$R/mod/$(basename "$m").ko" ;;
    *.zst) zstd -dc "$f" > "$R/mod/$(basename "$m").ko" ;;
    *) cp "$f" "$R/mod/$(basename "$m").ko" ;;
  esac
  echo "$(basename "$m")" >> "$R/mod/order"
done
cat > "$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mod/order); do insmod /mod/$m.ko 2>/dev/null; done
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.2; done
echo "guest: vda size $(cat /sys/block/vda/size 2>/dev/null) sectors"
dd if=/dev/urandom of=/tmp/pat bs=4096 count=256 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=4096 count=256 2>/dev/null && sync && blockdev --flushbufs /dev/vda
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=4096 count=256 2>/dev/null
if cmp /tmp/pat /tmp/back; then echo VHOST-OK; else echo VHOST-FAIL; fi
poweroff -f
INIT
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc 2>/dev/null | gzip > "$TMP/initrd.gz")

# --- target
cat > "$TMP/cfg.json" <<JSON
{"subsystems":[
 {"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":65536,"block_size":512}}]},
 {"subsystem":"vhost_blk","config":[{"method":"vhost_create_blk_controller","params":{"ctrlr":"vhost.0","dev_name":"Malloc0"}}]}
]}
JSON
"$TGT" -m 0x1 -r "$TMP/rpc.sock" -S "$TMP" -c "$TMP/cfg.json" > "$TMP/tgt.log" 2>&1 &
TGT_PID=$!
for _ in $(seq 100); do [ -S "$TMP/vhost.0" ] && break; sleep 0.1; done
[ -S "$TMP/vhost.0" ] || { echo "FAIL: no vhost socket"; cat "$TMP/tgt.log"; exit 1; }

# TCG by default: on this CI host /dev/kvm exists but a KVM guest hangs in
# early boot; ACCEL=kvm opts in.
ACCEL=${ACCEL:-tcg}
# Two boots on the same socket: the second proves the reconnect after a
# VM restart (the target keeps running).
for RUN in 1 2; do
timeout "${VM_TIMEOUT:-240}" "$QEMU" -accel $ACCEL -m 256M -smp 1 \
  -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
  -kernel "$KERNEL" -initrd "$TMP/initrd.gz" -append "console=ttyS0 panic=-1 loglevel=4" \
  -chardev socket,id=c0,path="$TMP/vhost.0" -device vhost-user-blk-pci,chardev=c0,num-queues=1 \
  -nographic -no-reboot -nodefaults -serial stdio > "$TMP/console.log" 2>&1
RC=$?
echo "boot $RUN: $(grep -a "guest:\|VHOST-" "$TMP/console.log" | tr -d '\r' | tr '\n' ' ')"
kill -0 "$TGT_PID" 2>/dev/null || { echo "FAIL: target died"; cat "$TMP/tgt.log"; exit 1; }
if ! grep -qa VHOST-OK "$TMP/console.log"; then
  echo "FAIL (boot $RUN, qemu rc=$RC, accel=$ACCEL)"; tail -30 "$TMP/console.log"
  echo "--- target log"; tail -20 "$TMP/tgt.log"; exit 1
fi
done
echo "PASS (accel=$ACCEL, 2 boots)"
