#!/usr/bin/env bash
# The whole test suite: installs what it needs, then lint, build and every
# test. CI (.ci/run) calls exactly this.  Opt-in slow suites:
#   WC_SOAK=1    longer crash/stress runs
#   WC_REQUIRE_FIO_ENGINE=1  fail (instead of skip) when fio's source
#                cannot be fetched for the fio engine build
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
# spdk-rpc may land in a pyenv or user bin directory.
for d in "$HOME/.local/bin" "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)"; do
  [ -n "$d" ] && [ -d "$d" ] && PATH="$PATH:$d"
done
export WC_REQUIRE_SPDK_RPC=1
export CARGO_TERM_COLOR=never

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build (debug binaries for the integration tests)"
cargo build --workspace --locked --bins

echo "== cargo test"
cargo test --workspace --locked --no-fail-fast -- --test-threads=2

echo "== fio in-process engine (writecache_bdev): built against fio's source; malloc and writecache jobs, both loading ways, bad input"
fio_rc=0
fio_so=$(bash scripts/build_fio_engine.sh) || fio_rc=$?
if [ "$fio_rc" -eq 3 ] && [ "${WC_REQUIRE_FIO_ENGINE:-0}" != 1 ]; then
  echo "SKIP: fio's source could not be fetched (no network?); WC_REQUIRE_FIO_ENGINE=1 makes this fail"
elif [ "$fio_rc" -ne 0 ]; then
  echo "FAIL: scripts/build_fio_engine.sh (exit $fio_rc)"
  exit 1
else
  bash fio/tests/engine.sh "$fio_so"
fi

echo "== vhost-user-blk: a QEMU guest (TCG, 2 queues) writes through a writecache bdev (pmem mode, and a second disk in ssd mode), read back over NBD; bdev deleted under the live controller"
bash exports/vhost/tests/qemu_vm.sh target/debug/writecache_tgt

echo "== dm-writecache interop: Linux's dm-writecache in a QEMU guest (TCG) and ours read and write each other's caches; stats parity (§3.11)"
bash tests/vm/dm_writecache.sh target/debug/writecache_tgt

echo "== NVMe/TCP: the Linux kernel's nvme-tcp host (QEMU, TCG) writes through a writecache bdev with and without digests, reconnects after a restart from save_config"
bash tests/vm/nvme_tcp_host.sh target/debug/writecache_tgt

echo "== NVMe/TCP initiator: bdev_nvme_attach_controller against the Linux kernel's nvmet-tcp (QEMU, TCG) with and without digests, fast I/O fail and controller loss when the guest dies"
bash tests/vm/nvmet_target.sh target/debug/writecache_tgt

echo "== python plugin syntax"
python3 -m py_compile scripts/writecache_rpc.py

echo "test.sh: all suites passed"
