#!/usr/bin/env bash
# Builds the in-process fio ioengine `writecache_bdev`:
#
#   scripts/build_fio_engine.sh [--release]
#
# 1. fio's source matching the installed fio (Debian's package version) is
#    fetched once with `apt-get source --download-only` through a private
#    sources list (deb-src lines derived from the machine's Debian entries),
#    private lists and archive dirs (the system's apt state is untouched),
#    unpacked with dpkg-source and configured (fio's headers need
#    config-host.h), all cached under $CARGO_TARGET_DIR/fio/ (target/fio/).
#    Set FIO_SRC=/path/to/configured/fio/tree to use another tree.
# 2. the Rust half (crate wc-fio-engine, fio/) is built as a static library;
# 3. fio/ioengine.c is compiled against fio's headers and linked with it.
#
# Output: target/fio/libwritecache_fio.so (of the profile just built).
# Exit status 3: fio's source could not be had (no network, no deb-src);
# nothing else of the workspace depends on this build.
set -euo pipefail

PROFILE=debug
for arg in "$@"; do
  case "$arg" in
    --release) PROFILE=release ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--release]" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/fio
mkdir -p "$OUT"

command -v fio >/dev/null || { echo "fio is not installed (scripts/deps.sh installs it)" >&2; exit 3; }
FIO_DEB_VERSION=$(dpkg-query -W -f='${Version}' fio 2>/dev/null || true)
[[ -n "$FIO_DEB_VERSION" ]] || { echo "fio is not a Debian package here: set FIO_SRC" >&2; exit 3; }

# deb-src lines for the machine's Debian entries (one-line .list files and
# deb822 .sources files, enabled ones only).
debian_src_lines() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    sed -n 's/^[[:space:]]*deb[[:space:]]\+\(.*debian.*\)$/deb-src \1/p' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    awk '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && uris ~ /debian/ && enabled != "no") {
          n = split(suites, s, " ")
          for (i = 1; i <= n; i++)
            print "deb-src" (key != "" ? " [signed-by=" key "]" : "") " " uris " " s[i] " " comps
        }
        types = uris = suites = comps = key = enabled = ""
      }
      /^[[:space:]]*#/ { next }
      /^[[:space:]]*$/ { flush(); next }
      { k = $1; sub(/:$/, "", k); v = $0; sub(/^[^:]*:[[:space:]]*/, "", v) }
      k == "Types" { types = v } k == "URIs" { uris = v } k == "Suites" { suites = v }
      k == "Components" { comps = v } k == "Signed-By" { key = v } k == "Enabled" { enabled = tolower(v) }
      END { flush() }' "$f"
  done
}

fetch_fio_source() {
  local apt="$OUT/apt" dl="$OUT/dl"
  mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/cache" "$dl"
  debian_src_lines | sort -u >"$apt/sources.list"
  if [[ ! -s "$apt/sources.list" ]]; then
    echo "no Debian apt source entries found to derive deb-src lines from" >&2
    return 1
  fi
  local opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::lists=$apt/lists" -o "Dir::Cache=$apt/cache"
    -o "Dir::Cache::archives=$apt/archives"
    -o "APT::Sandbox::User=root" -qq)
  echo "fetching fio $FIO_DEB_VERSION source (private apt lists in $apt)..." >&2
  apt-get "${opts[@]}" update >&2 || return 1
  (cd "$dl" && apt-get "${opts[@]}" source --download-only "fio=$FIO_DEB_VERSION") >&2 || return 1
  local dsc
  dsc=$(ls "$dl"/fio_*.dsc 2>/dev/null | head -1)
  [[ -n "$dsc" ]] || return 1
  rm -rf "$SRC.tmp"
  if command -v dpkg-source >/dev/null; then
    dpkg-source --no-check -x "$dsc" "$SRC.tmp" >&2 || return 1
  else
    # Without dpkg-dev: the upstream tarball (Debian's patches do not
    # touch the headers).
    mkdir -p "$SRC.tmp"
    tar -xzf "$dl"/fio_*.orig.tar.gz -C "$SRC.tmp" --strip-components=1 || return 1
  fi
  echo "configuring fio (config-host.h)..." >&2
  (cd "$SRC.tmp" && ./configure --disable-native >configure.out 2>&1) || {
    echo "fio's ./configure failed; see $SRC.tmp/configure.out" >&2
    return 1
  }
  rm -rf "$SRC"
  mv "$SRC.tmp" "$SRC"
}

if [[ -n "${FIO_SRC:-}" ]]; then
  SRC=$FIO_SRC
else
  SRC=$OUT/src/fio-$FIO_DEB_VERSION
  if [[ ! -f "$SRC/config-host.h" ]]; then
    mkdir -p "$OUT/src"
    fetch_fio_source || { echo "cannot get fio's source; the fio engine is not built" >&2; exit 3; }
  fi
fi
[[ -f "$SRC/fio.h" && -f "$SRC/config-host.h" ]] || {
  echo "$SRC is not a configured fio source tree (fio.h, config-host.h)" >&2
  exit 3
}
SRC_VERSION=$(sed -n 's/^FIO_VERSION="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$SRC/FIO-VERSION-GEN" | head -1)
RUN_VERSION=$(fio --version)
if [[ -n "$SRC_VERSION" && "$SRC_VERSION" != "$RUN_VERSION" ]]; then
  echo "warning: fio source is $SRC_VERSION, the installed fio is $RUN_VERSION" >&2
fi

echo "building wc-fio-engine ($PROFILE)..." >&2
cargo_flags=(-p wc-fio-engine --lib --locked -q)
[[ $PROFILE == release ]] && cargo_flags+=(--release)
# The static library's native dependencies, as rustc reports them.
NATIVE=$(cargo rustc "${cargo_flags[@]}" -- --print native-static-libs 2>&1 |
  sed -n 's/.*native-static-libs: //p' | tail -1)
LIB=$TARGET_DIR/$PROFILE/libwc_fio_engine.a
[[ -f "$LIB" ]] || { echo "missing $LIB" >&2; exit 1; }

CC=${CC:-cc}
echo "linking $OUT/libwritecache_fio.so..." >&2
printf '{ global: ioengine; get_ioengine; local: *; };\n' >"$OUT/ioengine.map"
# fio's own build flags for its headers: config-host.h first, 64-bit
# offsets. -z nodelete: fio dlcloses external engines while our reactor
# threads still run (SPDK's documented shutdown race); the library stays.
# shellcheck disable=SC2086
$CC -O2 -g -fPIC -shared -std=gnu99 -Wall -Wno-unused-parameter \
  -D_GNU_SOURCE -D_LARGEFILE_SOURCE -D_FILE_OFFSET_BITS=64 \
  -include "$SRC/config-host.h" -I"$SRC" \
  -o "$OUT/libwritecache_fio.so.tmp" fio/ioengine.c "$LIB" \
  -Wl,--version-script="$OUT/ioengine.map" -Wl,-z,nodelete -Wl,--no-undefined-version \
  ${NATIVE:--lgcc_s -lutil -lrt -lpthread -lm -ldl -lc}
mv "$OUT/libwritecache_fio.so.tmp" "$OUT/libwritecache_fio.so"
echo "$OUT/libwritecache_fio.so"
