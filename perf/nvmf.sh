#!/usr/bin/env bash
# NVMe/TCP target benchmark (issue 14), in one command:
#
#   perf/nvmf.sh [--quick] [--rounds N] [--ab BASE_BIN_DIR]
#
# perf/nvme_tcp.sh with the target's small initiator: 4 KiB random writes
# then reads at QD 1/32/128 on malloc and on writecache (pmem cache file in
# RAM over a malloc origin), in-process with bdevperf (-m 0x1), then over
# loopback NVMe/TCP (writecache_tgt -m 0x1 on core 0, nvmf_perf with one
# queue pair on core 1); ratios in perf/results/nvmf.md and nvmf.json.
# --quick: 1 s per cell. Environment overrides: see perf/nvme_tcp.sh
# (MIB defaults to 512 here).
set -euo pipefail
MIB=${MIB:-512} exec "$(dirname "${BASH_SOURCE[0]}")/nvme_tcp.sh" \
  --initiator nvmf_perf --parts ratios "$@"
