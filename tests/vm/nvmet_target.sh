#!/usr/bin/env bash
# Our NVMe/TCP initiator (bdev_nvme_attach_controller) against the Linux
# kernel's NVMe/TCP target, nvmet + nvmet-tcp from Debian's kernel, in a
# QEMU guest (TCG):
#  * the guest exports its virtio disk (a 32 MiB file on the host) as
#    namespace 1 of nqn.2026-12.io.writecache:nvmet, configured through
#    configfs, on port 4420; user-mode networking forwards
#    127.0.0.1:PORT on the host to it;
#  * writecache_tgt (2 reactors, interrupt mode) attaches it without
#    digests: qemu-io (over the target's NBD export of the namespace bdev)
#    writes a pattern (in-capsule and R2T-sized), flushes, reads it back;
#    detach; attaches again with header and data digests and does the same
#    with a second pattern; detach;
#  * attaches with ctrlr_loss_timeout_sec 8, reconnect_delay_sec 1,
#    fast_io_fail_timeout_sec 3, then kills the guest: a read issued right
#    after fails once fast_io_fail_timeout_sec has passed (not at once),
#    the controller reports a reconnecting state meanwhile, and after
#    ctrlr_loss_timeout_sec the controller and its bdev are gone;
#  * the disk file holds both patterns (nvmet wrote them through).
# Skips (exit 0, clear message) only when QEMU / kernel / busybox are missing.
# Usage: tests/vm/nvmet_target.sh [path/to/writecache_tgt]
set -uo pipefail
cd "$(dirname "$0")/../.."
TGT=${1:-${TGT:-target/debug/writecache_tgt}}
source tests/vm/guest.sh
vm_test_init "$TGT"
command -v qemu-io >/dev/null || { echo "FAIL: qemu-io missing (scripts/deps.sh installs qemu-utils)"; exit 1; }

NQN=nqn.2026-12.io.writecache:nvmet
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

cat > "$TMP/guest.sh" <<'GUEST'
NQN=$(sed -n 's/.*wc_nqn=\([^ ]*\).*/\1/p' /proc/cmdline)
N=/sys/kernel/config/nvmet
S=$N/subsystems/$NQN
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
mkdir $S && echo 1 > $S/attr_allow_any_host && mkdir $S/namespaces/1 &&
  echo /dev/vda > $S/namespaces/1/device_path && echo 1 > $S/namespaces/1/enable &&
  mkdir $N/ports/1 && echo tcp > $N/ports/1/addr_trtype && echo ipv4 > $N/ports/1/addr_adrfam &&
  echo 0.0.0.0 > $N/ports/1/addr_traddr && echo 4420 > $N/ports/1/addr_trsvcid &&
  ln -s $S $N/ports/1/subsystems/$NQN && echo "NVMET-READY $(cat /sys/block/vda/size) sectors" ||
  echo NVMET-FAIL
# Serve until the host kills the guest.
while true; do sleep 5; done
GUEST
vm_initramfs "$TMP/initrd.gz" "$TMP/guest.sh" --mod nvmet-tcp --mod crc32c_generic || fail "initramfs"
truncate -s 32M "$TMP/disk.img"

"$TGT" -m 0x3 --interrupt-mode -r "$TMP/rpc.sock" > "$TMP/tgt.log" 2>&1 &
TGT_PID=$!
for _ in $(seq 100); do rpc rpc_get_methods >/dev/null 2>&1 && break; sleep 0.1; done
rpc nbd_server_start "{\"listen\":\"$TMP/nbd.sock\"}" >/dev/null || fail "nbd server"

export VM_MEM=256M
T0=$SECONDS
vm_start "$TMP/console.log" "$TMP/initrd.gz" "wc_nqn=$NQN" \
  -nic "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:$PORT-:4420" \
  -drive "file=$TMP/disk.img,if=virtio,format=raw"
vm_wait_for "$TMP/console.log" "NVMET-(READY|FAIL)" || fail "guest did not come up"
grep -qa NVMET-READY "$TMP/console.log" || fail "nvmet configfs setup"
echo "guest: nvmet ready after $((SECONDS - T0)) s"

attach() { # attach NAME EXTRA-JSON → bdev name
  local out i
  # The guest's listener may lag behind the configfs write: retry briefly.
  for i in $(seq 20); do
    out=$(rpc bdev_nvme_attach_controller "{\"name\":\"$1\",\"trtype\":\"tcp\",\"adrfam\":\"ipv4\",\"traddr\":\"127.0.0.1\",\"trsvcid\":\"$PORT\",\"subnqn\":\"$NQN\"$2}" 2>&1) &&
      { echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0])'; return 0; }
    sleep 1
  done
  echo "$out" >&2
  return 1
}
qio() { # qio BDEV qemu-io-commands...: through an NBD export of BDEV
  local b=$1 args=() c
  shift
  rpc nbd_export_create "{\"bdev_name\":\"$b\",\"export_name\":\"$b\"}" >/dev/null || return 1
  for c in "$@"; do args+=(-c "$c"); done
  timeout 60 qemu-io -f raw -t writeback "nbd+unix:///$b?socket=$TMP/nbd.sock" "${args[@]}" > "$TMP/qio.out" 2>&1
  local rc=$?
  rpc nbd_export_delete "{\"export_name\":\"$b\"}" >/dev/null 2>&1
  [ $rc = 0 ] && ! grep -qi "fail" "$TMP/qio.out"
}

# 1. No digests: 8 KiB (in capsule) and 512 KiB (R2T/H2CData) writes.
B=$(attach K0 "") || fail "attach without digests"
[ "$B" = K0n1 ] || fail "bdev name $B"
rpc bdev_nvme_get_controllers '{"name":"K0"}' | grep -q '"state": "enabled"' || fail "K0 not enabled"
qio K0n1 "write -P 0xa5 0 8k" "write -P 0xa6 1M 512k" "flush" "read -P 0xa5 0 8k" "read -P 0xa6 1M 512k" ||
  { cat "$TMP/qio.out"; fail "I/O without digests"; }
rpc bdev_nvme_detach_controller '{"name":"K0"}' >/dev/null || fail "detach K0"
rpc bdev_get_bdevs '{"name":"K0n1"}' >/dev/null 2>&1 && fail "K0n1 still there after detach"
echo "nvmet: attach, write (in-capsule + R2T), flush, read back, detach without digests: ok"

# 2. Header and data digests.
B=$(attach K1 ',"hdgst":true,"ddgst":true') || fail "attach with digests"
qio K1n1 "read -P 0xa6 1M 512k" "write -P 0x5a 4M 1M" "flush" "read -P 0x5a 4M 1M" ||
  { cat "$TMP/qio.out"; fail "I/O with digests"; }
rpc bdev_nvme_detach_controller '{"name":"K1"}' >/dev/null || fail "detach K1"
echo "nvmet: the same with header and data digests: ok"

# 3. The guest dies: fast I/O fail, then controller loss.
B=$(attach K2 ',"ctrlr_loss_timeout_sec":8,"reconnect_delay_sec":1,"fast_io_fail_timeout_sec":3') ||
  fail "attach K2"
qio K2n1 "read -P 0x5a 4M 64k" || fail "I/O before the kill"
rpc nbd_export_create "{\"bdev_name\":\"K2n1\",\"export_name\":\"K2n1\"}" >/dev/null || fail "export K2n1"
vm_stop
KILLED=$SECONDS
T1=$(date +%s.%N)
timeout 30 qemu-io -f raw -t writeback "nbd+unix:///K2n1?socket=$TMP/nbd.sock" -c "read 0 4k" > "$TMP/qio.out" 2>&1
T2=$(date +%s.%N)
grep -qi "fail\|error" "$TMP/qio.out" || { cat "$TMP/qio.out"; fail "a read with the target gone succeeded"; }
WAITED=$(python3 -c "print(round($T2 - $T1, 1))")
python3 -c "import sys; sys.exit(0 if 2.0 <= $T2 - $T1 <= 7.0 else 1)" ||
  fail "queued read failed after ${WAITED}s, expected about fast_io_fail_timeout_sec (3 s)"
STATE=$(rpc bdev_nvme_get_controllers '{"name":"K2"}' 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["ctrlrs"][0]["state"])' 2>/dev/null)
case "$STATE" in
  resetting|reconnect_is_delayed) ;;
  *) fail "controller state $STATE while the target is away" ;;
esac
echo "nvmet: guest killed; queued read failed after ${WAITED}s (fast_io_fail_timeout_sec 3), state $STATE"
for _ in $(seq 200); do
  rpc bdev_nvme_get_controllers '{"name":"K2"}' >/dev/null 2>&1 || break
  sleep 0.1
done
GONE=$((SECONDS - KILLED))
rpc bdev_nvme_get_controllers '{"name":"K2"}' >/dev/null 2>&1 && fail "controller still there ${GONE}s after the kill"
rpc bdev_get_bdevs '{"name":"K2n1"}' >/dev/null 2>&1 && fail "K2n1 not hot-removed"
[ "$GONE" -ge 7 ] || fail "controller deleted after ${GONE}s, before ctrlr_loss_timeout_sec (8 s)"
echo "nvmet: controller deleted and K2n1 hot-removed ${GONE}s after the kill (ctrlr_loss_timeout_sec 8)"
kill -0 "$TGT_PID" 2>/dev/null || fail "target died"

# 4. nvmet wrote the patterns through to the disk file.
python3 - "$TMP/disk.img" <<'PY' || fail "disk image does not hold the patterns"
import sys
d = open(sys.argv[1], "rb").read()
for pat, off, n in [(0xa5, 0, 8192), (0xa6, 1 << 20, 512 << 10), (0x5a, 4 << 20, 1 << 20)]:
    if d[off:off + n] != bytes([pat]) * n:
        sys.exit("pattern 0x%02x at %d missing" % (pat, off))
PY
echo "PASS: our NVMe/TCP initiator against Linux nvmet: with and without digests, fast I/O fail and controller loss on a killed target, data on the target's disk"
