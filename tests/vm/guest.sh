# The one VM helper of the test suite: boots Debian's kernel with a busybox
# initramfs under QEMU (TCG) and runs a test script inside the guest. Every
# guest test (vhost-user-blk, dm-writecache interop, NVMe/TCP host and
# target) sources this file:
#
#   source tests/vm/guest.sh
#   vm_require                        # SKIP (exit 0) without QEMU/kernel/busybox
#   vm_initramfs "$TMP/initrd.gz" guest_test.sh --mod dm-writecache \
#       --bin /usr/sbin/dmsetup --file "$TMP/pattern:/pattern"
#   vm_run "$TMP/console.log" "$TMP/initrd.gz" "memmap=64M!1G" -drive ...
#
# In the guest: proc, sys, devtmpfs and configfs are mounted, the modules
# (with their dependencies, from modules.dep) are loaded in order, eth0 (if
# QEMU gave the guest a NIC) is up as 10.0.2.15/24 with 10.0.2.2 (the host's
# loopback under user-mode networking) as gateway; then the test script
# runs as /test.sh, its output on the console, and the guest powers off.
# The kernel command line is on /proc/cmdline for scripts that take
# arguments (e.g. wc_step=write).
#
# TCG by default: nested KVM hangs Debian's 6.1 kernel in early boot on
# these machines; ACCEL=kvm opts in. VM_TIMEOUT (240 s) bounds each boot,
# VM_MEM (512M) and VM_CPUS (2) size the guest.

VM_QEMU=$(command -v qemu-system-x86_64 || true)
VM_KERNEL=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -1)
VM_KVER=${VM_KERNEL#/boot/vmlinuz-}
VM_MODDIR=/lib/modules/$VM_KVER
VM_PID=""

# Exits 0 with "SKIP: why" when the guest cannot be booted on this machine.
vm_require() {
  local bb
  bb=$(command -v busybox || true)
  [ -n "$VM_QEMU" ] || { echo "SKIP: qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"; exit 0; }
  [ -n "$VM_KERNEL" ] && [ -f "$VM_MODDIR/modules.dep" ] ||
    { echo "SKIP: no kernel with modules in /boot (apt-get install linux-image-amd64)"; exit 0; }
  [ -n "$bb" ] && file -L "$bb" | grep -q static ||
    { echo "SKIP: no static busybox (apt-get install busybox-static)"; exit 0; }
  command -v cpio >/dev/null || { echo "SKIP: cpio not installed"; exit 0; }
}

# Paths (relative to $VM_MODDIR) of a module and its dependencies, the
# dependencies first. Module names match with '-' and '_' alike.
_vm_mod_paths() {
  local name=${1//_/-} line path deps d
  line=$(awk -v n="$name" -F: '{
      f=$1; sub(/.*\//, "", f); sub(/\.ko(\.[a-z]+)?$/, "", f); gsub(/_/, "-", f)
      if (f == n) { print; exit }
    }' "$VM_MODDIR/modules.dep")
  [ -n "$line" ] || { echo "vm: no kernel module '$1' in $VM_MODDIR" >&2; return 1; }
  path=${line%%:*}
  deps=${line#*:}
  # modules.dep lists a module's dependencies nearest first; load the
  # farthest first.
  for d in $(echo $deps | tr ' ' '\n' | tac); do echo "$d"; done
  echo "$path"
}

# Copies an executable and the shared libraries it links into ROOT.
_vm_copy_bin() {
  local root=$1 bin=$2 lib
  mkdir -p "$root/bin"
  cp -L "$bin" "$root/bin/$(basename "$bin")"
  for lib in $(ldd "$bin" 2>/dev/null | grep -oE '/[^ ]+'); do
    [ -f "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# vm_initramfs OUT.gz TEST_SCRIPT [--mod NAME]... [--bin PATH]... [--file SRC:DST]...
vm_initramfs() {
  local out=$1 script=$2 root m f p
  shift 2
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,mod,run,etc}
  cp -L "$(command -v busybox)" "$root/bin/busybox"
  cp "$script" "$root/test.sh"
  : > "$root/mod/order"
  local mods=(virtio_pci virtio_blk virtio_net)
  while [ "$#" -gt 0 ]; do
    case "$1" in
      --mod) mods+=("$2"); shift 2 ;;
      --bin) _vm_copy_bin "$root" "$2" || { rm -rf "$root"; return 1; }; shift 2 ;;
      --file) mkdir -p "$root$(dirname "${2#*:}")"; cp -L "${2%%:*}" "$root${2#*:}" ||
                { rm -rf "$root"; return 1; }; shift 2 ;;
      *) echo "vm_initramfs: unknown argument $1" >&2; rm -rf "$root"; return 1 ;;
    esac
  done
  for m in "${mods[@]}"; do
    for p in $(_vm_mod_paths "$m") ; do
      f=$(basename "$p"); f=${f%.xz}; f=${f%.zst}; f=${f%.gz}
      grep -qx "$f" "$root/mod/order" && continue
      case "$p" in
        *.xz) xz -dc "$VM_MODDIR/$p" > "$root/mod/$f" ;;
        *.zst) zstd -qdc "$VM_MODDIR/$p" > "$root/mod/$f" ;;
        *.gz) gzip -dc "$VM_MODDIR/$p" > "$root/mod/$f" ;;
        *) cp "$VM_MODDIR/$p" "$root/mod/$f" ;;
      esac
      echo "$f" >> "$root/mod/order"
    done || { rm -rf "$root"; return 1; }
  done
  cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mod/order); do insmod /mod/$m 2>/dev/null; done
mount -t configfs none /sys/kernel/config 2>/dev/null
ip link set lo up
for i in $(seq 20); do [ -e /sys/class/net/eth0 ] && break; [ -d /sys/bus/pci/drivers/virtio-pci ] || break; sleep 0.1; done
if [ -e /sys/class/net/eth0 ]; then
  ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up; ip route add default via 10.0.2.2
fi
echo "guest: up, kernel $(uname -r), $(nproc) cpus"
sh /test.sh
echo "guest: test script exited $?"
sync
poweroff -f
INIT
  chmod +x "$root/init"
  (cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$out")
  local rc=$?
  rm -rf "$root"
  return $rc
}

_vm_cmd() { # _vm_cmd LOG INITRD APPEND [qemu args...]: the QEMU command line
  local log=$1 initrd=$2 append=$3
  shift 3
  VM_ARGS=(timeout "${VM_TIMEOUT:-240}" "$VM_QEMU" -accel "${ACCEL:-tcg}" -cpu max
    -m "${VM_MEM:-512M}" -smp "${VM_CPUS:-2}"
    -kernel "$VM_KERNEL" -initrd "$initrd"
    -append "console=ttyS0 panic=-1 loglevel=4 $append"
    -nographic -no-reboot -nodefaults -serial stdio "$@")
}

# vm_run LOG INITRD APPEND [qemu args...]: boots in the foreground until the
# guest powers off (or VM_TIMEOUT); the console goes to LOG. Returns QEMU's
# status (124 on timeout).
vm_run() {
  local log=$1
  _vm_cmd "$@"
  "${VM_ARGS[@]}" > "$log" 2>&1 < /dev/null
}

# vm_start: as vm_run, in the background ($VM_PID); vm_wait / vm_stop.
vm_start() {
  local log=$1
  _vm_cmd "$@"
  "${VM_ARGS[@]}" > "$log" 2>&1 < /dev/null &
  VM_PID=$!
}
vm_wait() { local rc=0; [ -n "$VM_PID" ] && { wait "$VM_PID"; rc=$?; }; VM_PID=""; return $rc; }
vm_stop() { [ -n "$VM_PID" ] && { kill "$VM_PID" 2>/dev/null; wait "$VM_PID" 2>/dev/null; }; VM_PID=""; return 0; }

# vm_wait_for LOG PATTERN [SECONDS]: waits until PATTERN appears on the
# console (0) or the guest exits / time runs out (1).
vm_wait_for() {
  local log=$1 pat=$2 secs=${3:-${VM_TIMEOUT:-240}} i
  for i in $(seq $((secs * 10))); do
    grep -qaE "$pat" "$log" 2>/dev/null && return 0
    [ -n "$VM_PID" ] && ! kill -0 "$VM_PID" 2>/dev/null && { grep -qaE "$pat" "$log"; return; }
    sleep 0.1
  done
  return 1
}

# Host side. vm_test_init TGT: the set-up every guest test script shares:
# the guest must be bootable (else SKIP) and TGT built; $TMP is made;
# fail() prints the target's log (and the guest console) and exits 1;
# rpc() calls the target on $TMP/rpc.sock; stop_tgt() stops the target
# whose pid is $TGT_PID; on exit the VM and the target stop and $TMP goes.
vm_test_init() {
  vm_require
  [ -x "$1" ] || { echo "FAIL: $1 not built"; exit 1; }
  TMP=$(mktemp -d)
  TGT_PID=""
  trap '_vm_test_cleanup' EXIT
}
_vm_test_cleanup() { vm_stop; stop_tgt; rm -rf "$TMP"; }
stop_tgt() { [ -n "$TGT_PID" ] && kill "$TGT_PID" 2>/dev/null && wait "$TGT_PID" 2>/dev/null; TGT_PID=""; return 0; }
fail() {
  echo "FAIL: $*"
  [ -f "$TMP/tgt.log" ] && { echo "--- target log"; tail -30 "$TMP/tgt.log"; }
  [ -f "$TMP/console.log" ] && { echo "--- guest console"; tail -20 "$TMP/console.log"; }
  exit 1
}
rpc() { tgt_rpc "$TMP/rpc.sock" "$@"; }

# tgt_rpc SOCKET METHOD [PARAMS-JSON]: one JSON-RPC call to a
# writecache_tgt without any client installed; prints the result as JSON,
# fails (non-zero, the error on stderr) on an error reply.
tgt_rpc() {
  python3 - "$1" "$2" "${3:-}" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(120)
s.connect(sys.argv[1])
req = {"jsonrpc": "2.0", "id": 1, "method": sys.argv[2]}
if sys.argv[3]:
    req["params"] = json.loads(sys.argv[3])
s.sendall(json.dumps(req).encode())
buf = b""
dec = json.JSONDecoder()
while True:
    chunk = s.recv(65536)
    if not chunk:
        sys.exit("rpc %s: connection closed" % sys.argv[2])
    buf += chunk
    try:
        resp, _ = dec.raw_decode(buf.decode())
        break
    except ValueError:
        continue
if "error" in resp:
    sys.exit("rpc %s: %s" % (sys.argv[2], json.dumps(resp["error"])))
print(json.dumps(resp["result"]))
PY
}
