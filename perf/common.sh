# Sourced by perf/run.sh and perf/fio.sh: the temp dirs they make (TMP in
# RAM, ORIGIN_DIR on disk) are removed, and the Python driver they start
# (PY_PID) is stopped, however the script ends.

TMP="" ORIGIN_DIR="" PY_PID="" HUGE_MNT=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$PY_PID" ]] && kill -0 "$PY_PID" 2>/dev/null; then
    kill -TERM "$PY_PID" 2>/dev/null || true
    wait "$PY_PID" 2>/dev/null || true
  fi
  [[ -n "$TMP" ]] && rm -rf "$TMP"
  if [[ -n "$HUGE_MNT" ]]; then
    umount "$HUGE_MNT" 2>/dev/null || umount -l "$HUGE_MNT" 2>/dev/null || true
    rmdir "$HUGE_MNT" 2>/dev/null || true
  fi
  [[ -n "$ORIGIN_DIR" ]] && rm -rf "$ORIGIN_DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ram_tmp PARENT PREFIX: sets TMP to a fresh dir in RAM for the cache
# files. By default (CACHE_PAGES=huge) on a tmpfs mounted with huge=always
# under PARENT, so the pmem cache file is mapped with 2 MiB pages as DAX
# pmem is (and as malloc's memory is): on /dev/shm's 4 KiB pages every
# random 4 KiB block costs a TLB miss and a page walk that real pmem does
# not pay. Falls back to PARENT itself (4 KiB pages), with a warning, when
# that mount is not possible (not root, no THP); CACHE_PAGES=4k asks for it.
ram_tmp() {
  local parent=$1 prefix=$2
  if [[ "${CACHE_PAGES:-huge}" != 4k ]]; then
    local shmem=/sys/kernel/mm/transparent_hugepage/shmem_enabled
    if [[ $(id -u) -eq 0 && -r $shmem ]] && ! grep -q '\[deny\]' "$shmem"; then
      HUGE_MNT=$(mktemp -d "$parent/wc-huge.XXXXXX")
      if ! mount -t tmpfs -o huge=always,mode=0700 tmpfs "$HUGE_MNT" 2>/dev/null; then
        rmdir "$HUGE_MNT"
        HUGE_MNT=""
      fi
    fi
    if [[ -z "$HUGE_MNT" ]]; then
      echo "warning: no tmpfs with huge pages (needs root and THP): cache files on" \
        "$parent, 4 KiB pages" >&2
    fi
  fi
  TMP=$(mktemp -d "${HUGE_MNT:-$parent}/$prefix.XXXXXX")
}
