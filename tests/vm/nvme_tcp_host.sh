#!/usr/bin/env bash
# The Linux kernel's NVMe/TCP initiator against our target, through a
# writecache bdev:
#  * writecache_tgt (2 reactors, interrupt mode) runs WC0 = a writecache
#    with a pmem cache file over a malloc origin, exported by the NVMe/TCP
#    target as namespace 1 of nqn.2016-06.io.spdk:cnode1 on 127.0.0.1:PORT
#    (plus a discovery listener), all set up through RPCs;
#  * boot 1: Debian's kernel in QEMU (TCG, user-mode network: the host's
#    loopback is 10.0.2.2) loads nvme-tcp; Debian's nvme-cli (when
#    installed) reads the discovery log and finds the subsystem; the guest
#    connects by writing the
#    options string to /dev/nvme-fabrics, without digests: it writes a
#    1 MiB pattern (carried in the initramfs) with direct I/O, flushes,
#    reads it back and compares; disconnects; connects again with header
#    and data digests, reads the pattern back, writes and checks a second
#    pattern, disconnects;
#  * the host saves the config (save_config), stops the target, starts a
#    new one from the saved file;
#  * boot 2: the guest connects (digests on) and finds both patterns; the
#    host deletes WC0 under the live namespace (bdev_writecache_delete):
#    the guest's reads fail, the namespace goes, the target stays up.
# Skips (exit 0, clear message) only when QEMU / kernel / busybox are missing.
# Usage: tests/vm/nvme_tcp_host.sh [path/to/writecache_tgt]
#   ACCEL=kvm; VM_TIMEOUT=seconds per boot (240).
set -uo pipefail
cd "$(dirname "$0")/../.."
TGT=${1:-${TGT:-target/debug/writecache_tgt}}
source tests/vm/guest.sh
vm_test_init "$TGT"

NQN=nqn.2016-06.io.spdk:cnode1
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:6b4e28ba-2fa1-11d2-883f-0016d3cc0001
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
DPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

# --- initramfs: busybox, nvme-tcp (+ nvme-core, nvme-fabrics), crc32c for
# the digests, the two patterns.
head -c $((1 << 20)) /dev/urandom > "$TMP/pat1"
head -c $((1 << 20)) /dev/urandom > "$TMP/pat2"
cat > "$TMP/guest.sh" <<'GUEST'
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
STEP=$(arg wc_step); PORT=$(arg wc_port); NQN=$(arg wc_nqn); HOSTNQN=$(arg wc_hostnqn)
connect() { # connect EXTRA-OPTIONS: connects, waits for the namespace
  echo "transport=tcp,traddr=10.0.2.2,trsvcid=$PORT,nqn=$NQN,hostnqn=$HOSTNQN$1" > /dev/nvme-fabrics ||
    { echo "NVMF-FAIL connect$1"; return 1; }
  for i in $(seq 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
  [ -b /dev/nvme0n1 ] || { echo "NVMF-FAIL no namespace"; return 1; }
  echo "guest: connected$1: $(cat /sys/class/nvme/nvme0/subsysnqn) model '$(cat /sys/class/nvme/nvme0/model | tr -s ' ')'" \
    "size $(cat /sys/block/nvme0n1/size) sectors, $(ls /sys/block/nvme0n1/mq | wc -l) queues," \
    "wwid $(cat /sys/block/nvme0n1/wwid 2>/dev/null)"
}
disconnect() {
  echo 1 > /sys/class/nvme/nvme0/delete_controller
  for i in $(seq 100); do [ -e /sys/class/nvme/nvme0 ] || break; sleep 0.1; done
}
check() { # check PATTERN OFFSET-IN-4K-BLOCKS
  dd if=/dev/nvme0n1 of=/tmp/back bs=4096 skip=$2 count=256 iflag=direct 2>/dev/null
  cmp /$1 /tmp/back && echo "guest: $1 read back at block $2"
}
ok=1
if [ "$STEP" = write ] && [ -x /bin/nvme ]; then
  # Debian's nvme-cli reads the discovery log page.
  DPORT=$(arg wc_dport)
  mkdir -p /etc/nvme; echo "$HOSTNQN" > /etc/nvme/hostnqn
  if nvme discover -t tcp -a 10.0.2.2 -s "$DPORT" --hostnqn="$HOSTNQN" > /tmp/disc 2>&1 &&
     grep -q "subnqn: *$NQN" /tmp/disc && grep -q "trsvcid: *$PORT" /tmp/disc; then
    echo "guest: nvme discover lists $NQN at port $PORT"
  else
    cat /tmp/disc; echo "NVMF-FAIL discovery"; ok=0
  fi
fi
if [ "$STEP" = write ]; then
  connect "" || ok=0
  if [ $ok = 1 ]; then
    taskset 1 dd if=/pat1 of=/dev/nvme0n1 bs=4096 count=128 oflag=direct 2>/dev/null &
    taskset 2 dd if=/pat1 of=/dev/nvme0n1 bs=4096 skip=128 seek=128 count=128 oflag=direct 2>/dev/null &
    wait
    sync; blockdev --flushbufs /dev/nvme0n1 || ok=0
    echo 3 > /proc/sys/vm/drop_caches
    check pat1 0 || ok=0
    disconnect
  fi
  connect ",hdr_digest,data_digest" || ok=0
  if [ $ok = 1 ]; then
    check pat1 0 || ok=0
    # 128 KiB writes: R2T + H2CData with data digests.
    dd if=/pat2 of=/dev/nvme0n1 bs=131072 seek=8 count=8 oflag=direct 2>/dev/null || ok=0
    blockdev --flushbufs /dev/nvme0n1 || ok=0
    check pat2 256 || ok=0
    disconnect
  fi
else
  connect ",hdr_digest,data_digest" || ok=0
  if [ $ok = 1 ]; then
    check pat1 0 || ok=0
    check pat2 256 || ok=0
  fi
  [ $ok = 1 ] && echo NVMF-OK || echo NVMF-FAIL
  # Read until the host deletes WC0 under the namespace: the reads must
  # then fail (and the kernel drops the namespace on the changed-namespace
  # event).
  res=NVMF-NOEIO
  for i in $(seq 1200); do
    if ! dd if=/dev/nvme0n1 of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; then
      res=NVMF-EIO; break
    fi
    sleep 0.1
  done
  echo $res
  for i in $(seq 50); do [ -b /dev/nvme0n1 ] || break; sleep 0.1; done
  [ -b /dev/nvme0n1 ] && echo "guest: namespace still present" || echo "guest: namespace removed by the kernel"
  disconnect
  exit 0
fi
[ $ok = 1 ] && echo NVMF-OK || echo NVMF-FAIL
GUEST
NVME_CLI=()
command -v nvme >/dev/null && NVME_CLI=(--bin "$(command -v nvme)")
vm_initramfs "$TMP/initrd.gz" "$TMP/guest.sh" --mod nvme-tcp --mod crc32c_generic "${NVME_CLI[@]}" \
  --file "$TMP/pat1:/pat1" --file "$TMP/pat2:/pat2" || fail "initramfs"

start_tgt() { # start_tgt [CONFIG]
  "$TGT" -m 0x3 --interrupt-mode -r "$TMP/rpc.sock" ${1:+-c "$1"} > "$TMP/tgt.log" 2>&1 &
  TGT_PID=$!
  for _ in $(seq 100); do rpc rpc_get_methods >/dev/null 2>&1 && return 0; sleep 0.1; done
  fail "target did not start"
}

# --- target: WC0 = writecache (pmem cache file) over a malloc origin,
# exported over NVMe/TCP, configured by RPC.
start_tgt
rpc bdev_malloc_create '{"name":"Origin0","num_blocks":65536,"block_size":512}' >/dev/null || fail "malloc"
rpc bdev_pmem_create "{\"name\":\"Cache0\",\"filename\":\"$TMP/cache.pmem\",\"size\":16777216}" >/dev/null || fail "pmem"
rpc bdev_writecache_create '{"name":"WC0","base_bdev":"Origin0","cache_bdev":"Cache0"}' >/dev/null || fail "writecache"
rpc nvmf_create_transport '{"trtype":"TCP"}' >/dev/null || fail "transport"
rpc nvmf_create_subsystem "{\"nqn\":\"$NQN\",\"allow_any_host\":true,\"serial_number\":\"WC0001\",\"model_number\":\"writecache\"}" >/dev/null || fail "subsystem"
rpc nvmf_subsystem_add_ns "{\"nqn\":\"$NQN\",\"namespace\":{\"bdev_name\":\"WC0\"}}" >/dev/null || fail "add_ns"
rpc nvmf_subsystem_add_listener "{\"nqn\":\"$NQN\",\"listen_address\":{\"trtype\":\"tcp\",\"adrfam\":\"ipv4\",\"traddr\":\"127.0.0.1\",\"trsvcid\":\"$PORT\"}}" >/dev/null || fail "listener"
rpc nvmf_subsystem_add_listener "{\"nqn\":\"nqn.2014-08.org.nvmexpress.discovery\",\"listen_address\":{\"trtype\":\"tcp\",\"traddr\":\"127.0.0.1\",\"trsvcid\":\"$DPORT\"}}" >/dev/null || fail "discovery listener"

ACCEL=${ACCEL:-tcg}
export VM_MEM=256M
boot() { # boot STEP N
  vm_run "$TMP/console.log" "$TMP/initrd.gz" "wc_step=$1 wc_port=$PORT wc_dport=$DPORT wc_nqn=$NQN wc_hostnqn=$HOSTNQN" \
    -nic user,model=virtio-net-pci
  local rc=$?
  echo "boot $2: $(grep -aoE "guest:[^$(printf '\r')]*|NVMF-[A-Z]+[^$(printf '\r')]*" "$TMP/console.log" | tr '\n' ' ')"
  kill -0 "$TGT_PID" 2>/dev/null || fail "target died"
  grep -qa NVMF-OK "$TMP/console.log" || { tail -40 "$TMP/console.log"; fail "boot $2 (qemu rc=$rc, accel=$ACCEL)"; }
}

boot write 1
WRITES=$(rpc bdev_writecache_get_stats '{"name":"WC0"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["write_blocks"])')
[ "$WRITES" -gt 0 ] 2>/dev/null || fail "WC0 counted no writes ($WRITES)"
rpc nvmf_subsystem_get_controllers "{\"nqn\":\"$NQN\"}" | grep -q '^\[\]$' || fail "controllers left after disconnect"

# --- restart from the saved config: the cache file keeps the data.
# save_config is client-side in SPDK (framework_get_subsystems, then
# framework_get_config for each): use spdk-rpc when installed, the same
# calls by hand otherwise.
if command -v spdk-rpc >/dev/null; then
  spdk-rpc -s "$TMP/rpc.sock" save_config > "$TMP/saved.json" || fail "save_config"
else
  {
    echo '{"subsystems":['
    first=1
    for s in $(rpc framework_get_subsystems | python3 -c 'import json,sys; print(" ".join(x["subsystem"] for x in json.load(sys.stdin)))'); do
      [ $first = 1 ] || echo ','
      first=0
      echo "{\"subsystem\":\"$s\",\"config\":$(rpc framework_get_config "{\"name\":\"$s\"}")}"
    done
    echo ']}'
  } > "$TMP/saved.json" || fail "save_config"
fi
grep -q nvmf_subsystem_add_ns "$TMP/saved.json" || fail "save_config has no nvmf section"
kill "$TGT_PID"; wait "$TGT_PID"; TGT_PID=""
start_tgt "$TMP/saved.json"
rpc nvmf_get_subsystems | grep -q "$NQN" || fail "subsystem not restored"

# --- boot 2: reads the data back, then WC0 is deleted under it.
vm_start "$TMP/console.log" "$TMP/initrd.gz" "wc_step=read wc_port=$PORT wc_dport=$DPORT wc_nqn=$NQN wc_hostnqn=$HOSTNQN" \
  -nic user,model=virtio-net-pci
vm_wait_for "$TMP/console.log" "NVMF-(OK|FAIL)" || { tail -40 "$TMP/console.log"; fail "boot 2 did not read back"; }
grep -qa NVMF-OK "$TMP/console.log" || { tail -40 "$TMP/console.log"; fail "boot 2: data not intact after the restart"; }
[ "$(rpc bdev_writecache_delete '{"name":"WC0"}')" = true ] || fail "bdev_writecache_delete WC0"
vm_wait
echo "boot 2: $(grep -aoE "guest:[^$(printf '\r')]*|NVMF-[A-Z]+[^$(printf '\r')]*" "$TMP/console.log" | tr '\n' ' ')"
grep -qa NVMF-EIO "$TMP/console.log" || { tail -30 "$TMP/console.log"; fail "the guest's reads did not fail after the delete"; }
kill -0 "$TGT_PID" 2>/dev/null || fail "target died"
rpc nvmf_get_subsystems | python3 -c 'import json,sys; s=[x for x in json.load(sys.stdin) if x["nqn"]==sys.argv[1]][0]; sys.exit(len(s["namespaces"]) != 0)' "$NQN" ||
  fail "the namespace of the deleted bdev is still listed"
echo "PASS: Linux nvme-tcp host: pattern written, flushed, read back with and without digests, intact after a restart from save_config; I/O fails after the bdev is deleted, target up"
