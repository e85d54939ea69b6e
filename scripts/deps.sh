#!/usr/bin/env bash
# Installs what building and testing writecache needs on a fresh Debian
# machine (idempotent; quiet when everything is present).
set -euo pipefail

need_pkgs=()
for p in build-essential pkg-config libhwloc-dev libudev-dev python3-pip fio libnbd-bin qemu-utils; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  echo "deps: installing Debian packages: ${need_pkgs[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# The vhost-user-blk VM test boots Debian's kernel with a busybox initramfs
# under QEMU; without these packages it skips (with a message), so a
# failure to install them is not fatal.
vm_pkgs=()
for p in qemu-system-x86 busybox-static linux-image-amd64 file xz-utils zstd; do
  dpkg -s "$p" >/dev/null 2>&1 || vm_pkgs+=("$p")
done
if [ "${#vm_pkgs[@]}" -gt 0 ] && [ "${WC_SKIP_VM:-0}" != 1 ]; then
  echo "deps: installing VM test packages: ${vm_pkgs[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${vm_pkgs[@]}" >/dev/null 2>&1 ||
    echo "deps: warning: VM test packages not installed; the vhost VM test will skip"
fi

if [ "${WC_SKIP_PY:-0}" != 1 ]; then
  if ! command -v spdk-rpc >/dev/null 2>&1 || ! python3 -c 'import spdk' >/dev/null 2>&1; then
    echo "deps: installing SPDK's Python client (spdk==26.9)"
    python3 -m pip install --quiet --disable-pip-version-check spdk==26.9 2>/dev/null ||
      python3 -m pip install --quiet --disable-pip-version-check --break-system-packages spdk==26.9
  fi
fi
