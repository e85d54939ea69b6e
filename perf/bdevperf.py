#!/usr/bin/env python3
#  SPDX-License-Identifier: BSD-3-Clause
"""Client for `bdevperf -z`: sends `perform_tests` and prints the results.

The same command line as SPDK's examples/bdev/bdevperf/bdevperf.py, so
scripts written for SPDK work unchanged (and SPDK's own script works
against our bdevperf):

    perf/bdevperf.py [-s SOCK] [-t TIMEOUT] perform_tests [-q QD] [-o SIZE] [-t SECS] [-M PCT] [-w TYPE]

Every perform_tests option is optional; what is given overrides the
bdevperf command line (and earlier perform_tests) for this and later runs.
The reply timeout grows to the run time + 5 s. Needs SPDK's Python client
(`pip install spdk`, which also provides `spdk-rpc`).
"""

import argparse
import json
import sys

try:
    from spdk.rpc.client import JSONRPCClient, JSONRPCException
except ImportError:
    print("SPDK's Python client is missing: pip install spdk (or add spdk/python to PYTHONPATH)",
          file=sys.stderr)
    sys.exit(1)

WORKLOADS = ("read", "write", "randread", "randwrite", "rw", "randrw", "verify", "reset",
             "unmap", "flush", "write_zeroes")
PARAMS = ("queue_depth", "time_in_sec", "workload_type", "io_size", "rw_percentage")


def seconds(s):
    """An int as SPDK's client sends; fractions allowed (our bdevperf takes them)."""
    v = float(s)
    return int(v) if v.is_integer() else v


def perform_tests(args):
    # Unlike SPDK's script, 0 is sent too (-M 0: all writes); None is not.
    params = {k: getattr(args, k) for k in PARAMS if getattr(args, k, None) is not None}
    return args.client.call("perform_tests", params)


def main(argv=None):
    ap = argparse.ArgumentParser(description="bdevperf RPC client (perform_tests)")
    ap.add_argument("-s", dest="server_addr", default="/var/tmp/spdk.sock",
                    help="RPC domain socket path or IP address")
    ap.add_argument("-p", dest="port", type=int, default=5260,
                    help="RPC port number (if server_addr is an IP address)")
    ap.add_argument("-t", dest="timeout", type=float, default=60.0,
                    help="seconds to wait for the response (default 60; at least run time + 5)")
    ap.add_argument("-v", dest="verbose", action="store_const", const="INFO", default="ERROR")
    sub = ap.add_subparsers(dest="method")
    p = sub.add_parser("perform_tests", help="run the tests (options override the command line)")
    p.add_argument("-q", dest="queue_depth", type=int, help="io depth")
    p.add_argument("-o", dest="io_size", type=str, help="io size in bytes (4096, 4k, 128k)")
    p.add_argument("-t", dest="time_in_sec", type=seconds, help="time in seconds")
    p.add_argument("-M", dest="rw_percentage", type=int, choices=range(0, 101), metavar="[0-100]",
                   help="rwmixread (100 for reads, 0 for writes)")
    p.add_argument("-w", dest="workload_type", choices=WORKLOADS, type=str.lower,
                   help=f"io pattern type, one of {', '.join(WORKLOADS)}")
    args = ap.parse_args(argv)
    if args.method != "perform_tests":
        ap.print_help(sys.stderr)
        return 1
    if args.time_in_sec is not None:
        args.timeout = max(float(args.time_in_sec) + 5, args.timeout)
    try:
        args.client = JSONRPCClient(args.server_addr, args.port, args.timeout)
        print(json.dumps(perform_tests(args), indent=2))
    except JSONRPCException as e:
        print(e.message if hasattr(e, "message") else e, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot reach bdevperf at {args.server_addr}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
