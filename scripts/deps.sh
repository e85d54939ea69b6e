#!/usr/bin/env bash
# Installs what building and testing writecache needs on a fresh Debian
# machine (idempotent; quiet when everything is present).
#
# It checks for the *commands* the tests run, not for packages: on this
# image one apt transaction can remove another package (the image ships a
# backported qemu-utils that Debian's qemu-system-x86 cannot live with, so
# installing the VM packages removes qemu-io/qemu-img). So: install the
# packages, then check every required command and install what is missing
# after all other installs, and fail loudly if a required command is still
# absent.
#
#   WC_SKIP_VM=1   do not install the kernel/QEMU guest packages
#   WC_SKIP_PY=1   do not install SPDK's Python client
set -euo pipefail

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
APT_UPDATED=0
apt_install() { # apt_install PKG...: one transaction, lists refreshed once
  [ "$#" -gt 0 ] || return 0
  if [ "$APT_UPDATED" = 0 ]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# The Python scripts directory where pip puts spdk-rpc (pyenv, ~/.local).
for d in "$HOME/.local/bin" "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)"; do
  [ -n "$d" ] && [ -d "$d" ] && PATH="$PATH:$d"
done

# command -> Debian package that provides it.
declare -A build_cmds=(
  [cc]=build-essential [make]=build-essential [pkg-config]=pkg-config
  [pip3]=python3-pip [dpkg-source]=dpkg-dev
)
declare -A client_cmds=(
  [fio]=fio [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin
  [qemu-io]=qemu-utils [qemu-img]=qemu-utils
)
# Guest tests (vhost-user-blk, dm-writecache interop, NVMe/TCP): QEMU,
# Debian's kernel, static busybox, dmsetup; they skip only where these
# cannot be installed.
declare -A vm_cmds=(
  [qemu-system-x86_64]=qemu-system-x86 [busybox]=busybox-static [dmsetup]=dmsetup
  [file]=file [xz]=xz-utils [zstd]=zstd [cpio]=cpio [nvme]=nvme-cli
)
headers_ok() { [ -e /usr/include/hwloc.h ] && [ -e /usr/include/libudev.h ]; }
kernel_ok() { ls /boot/vmlinuz-* >/dev/null 2>&1; }
busybox_static() { command -v busybox >/dev/null && file -L "$(command -v busybox)" | grep -q static; }

missing_pkgs() { # missing_pkgs ASSOC-NAME: packages for absent commands
  local -n cmds=$1
  local c out=()
  for c in "${!cmds[@]}"; do
    command -v "$c" >/dev/null 2>&1 || out+=("${cmds[$c]}")
  done
  printf '%s\n' "${out[@]}" | sort -u | grep -v '^$' || true
}

# 1. Build tools and the clients the tests drive, in one transaction.
mapfile -t pkgs < <(missing_pkgs build_cmds; missing_pkgs client_cmds)
headers_ok || pkgs+=(libhwloc-dev libudev-dev)
if [ "${#pkgs[@]}" -gt 0 ]; then
  echo "deps: installing Debian packages: ${pkgs[*]}"
  apt_install "${pkgs[@]}"
fi

# 2. The guest-test packages (may replace the image's qemu-utils).
if [ "${WC_SKIP_VM:-0}" != 1 ]; then
  mapfile -t pkgs < <(missing_pkgs vm_cmds)
  busybox_static || pkgs+=(busybox-static)
  kernel_ok || pkgs+=(linux-image-amd64)
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u | grep -v '^$' || true)
  if [ "${#pkgs[@]}" -gt 0 ]; then
    echo "deps: installing guest test packages: ${pkgs[*]}"
    apt_install "${pkgs[@]}" ||
      echo "deps: warning: guest test packages not installed; the QEMU guest tests will skip"
  fi
fi

# 3. After every other install: whatever a transaction above removed comes
#    back now (qemu-utils, from Debian's own version that fits QEMU).
mapfile -t pkgs < <(missing_pkgs build_cmds; missing_pkgs client_cmds)
if [ "${#pkgs[@]}" -gt 0 ]; then
  echo "deps: reinstalling packages whose commands went missing: ${pkgs[*]}"
  apt_install "${pkgs[@]}"
fi

# 4. SPDK's Python client.
if [ "${WC_SKIP_PY:-0}" != 1 ]; then
  if ! command -v spdk-rpc >/dev/null 2>&1 || ! python3 -c 'import spdk' >/dev/null 2>&1; then
    echo "deps: installing SPDK's Python client (spdk==26.9)"
    python3 -m pip install --quiet --disable-pip-version-check spdk==26.9 2>/dev/null ||
      python3 -m pip install --quiet --disable-pip-version-check --break-system-packages spdk==26.9
  fi
fi

# 5. Verify: every required command is here, or fail loudly.
absent=()
for c in "${!build_cmds[@]}" "${!client_cmds[@]}"; do
  command -v "$c" >/dev/null 2>&1 || absent+=("$c")
done
headers_ok || absent+=("hwloc.h/libudev.h")
if [ "${WC_SKIP_PY:-0}" != 1 ]; then
  command -v spdk-rpc >/dev/null 2>&1 || absent+=(spdk-rpc)
fi
if [ "${#absent[@]}" -gt 0 ]; then
  echo "deps: FAILED: required commands still missing: ${absent[*]}" >&2
  exit 1
fi
if [ "${WC_SKIP_VM:-0}" != 1 ]; then
  vm_absent=()
  for c in "${!vm_cmds[@]}"; do command -v "$c" >/dev/null 2>&1 || vm_absent+=("$c"); done
  busybox_static || vm_absent+=("busybox (static)")
  kernel_ok || vm_absent+=("/boot/vmlinuz-*")
  [ "${#vm_absent[@]}" -eq 0 ] ||
    echo "deps: warning: guest tests will skip, missing: ${vm_absent[*]}"
fi
exit 0
