#  SPDX-License-Identifier: BSD-3-Clause
"""spdk-rpc plugin with the writecache_tgt methods the stock SPDK client lacks.

Usage (the module must be importable, hence PYTHONPATH; --plugin goes before the method):

    PYTHONPATH=scripts spdk-rpc --plugin writecache_rpc bdev_pmem_create /dev/dax0.0 -n Pmem0
    PYTHONPATH=scripts spdk-rpc --plugin writecache_rpc bdev_writecache_create wc0 \\
        -o Nvme0n1 -c Pmem0 --mode pmem

Written against SPDK's PyPI client 26.9 (`spdk-rpc`) but it only relies on
`args.client.call(method, params)`, which every version of rpc.py has, and
prints results itself (the print helpers moved between SPDK releases).
Optional parameters that are not given are not sent, so the server's defaults
apply.
"""

import json


def _print_result(result):
    """Prints like rpc.py's print_json: strings bare, anything else as indented JSON.

    `None` (what the --dry-run client returns) prints nothing.
    """
    if result is None:
        return
    if isinstance(result, str):
        print(result)
    else:
        print(json.dumps(result, indent=2))


def _call(args, method, params):
    """Sends `method` with `params` minus the keys whose value is None."""
    params = {k: v for k, v in params.items() if v is not None}
    _print_result(args.client.call(method, params))


def _mb_to_bytes(mb):
    if mb is None:
        return None
    return int(mb * 1024 * 1024)


# (dest, flags, kwargs) of the writecache tunables shared by create and set_options.
_TUNABLES = [
    ('high_watermark', ['--high-watermark'],
     dict(type=int, help='Start writeback when this percentage of cache blocks is used (0-100)')),
    ('low_watermark', ['--low-watermark'],
     dict(type=int, help='Stop writeback when used cache blocks fall below this percentage (0-100)')),
    ('writeback_jobs', ['--writeback-jobs'],
     dict(type=int, help='Maximum number of blocks being written back at a time')),
    ('autocommit_blocks', ['--autocommit-blocks'],
     dict(type=int, help='Commit after this many blocks were written (0: disabled)')),
    ('autocommit_time_ms', ['--autocommit-time-ms'],
     dict(type=int, help='Commit at least every this many milliseconds (0: disabled)')),
    ('max_age_ms', ['--max-age-ms'],
     dict(type=int, help='Write back blocks that were cached longer than this many milliseconds')),
    ('pause_writeback_ms', ['--pause-writeback-ms'],
     dict(type=int, help='Pause writeback while writes went around the cache (to the origin) '
                         'in the last this many milliseconds')),
    ('writeback_retry_ms', ['--writeback-retry-ms'],
     dict(type=int, help='Keep retrying a writeback that the origin failed for this many '
                         'milliseconds of backoff in total (steps from 10 ms doubling, at most '
                         '1 s each) before entering the error state (default 310)')),
]


def _add_tunables(p):
    for dest, flags, kwargs in _TUNABLES:
        p.add_argument(*flags, dest=dest, **kwargs)


def _tunable_params(args):
    return {dest: getattr(args, dest) for dest, _, _ in _TUNABLES}


def spdk_rpc_plugin_initialize(subparsers):
    """Entry point called by spdk-rpc for `--plugin writecache_rpc`."""

    def add_parser(name, **kwargs):
        # Never shadow a command the stock client already has (argparse would
        # raise "conflicting subparser" on Python >= 3.11).
        if name in subparsers.choices:
            return None
        return subparsers.add_parser(name, **kwargs)

    def simple(method, help, params=()):
        """A command that sends its arguments as they are: `params` are
        (RPC parameter, add_argument flags, add_argument kwargs)."""
        p = add_parser(method, help=help)
        if p is None:
            return
        for _, flags, kwargs in params:
            p.add_argument(*flags, **kwargs)

        def run(args):
            _call(args, method, {name: getattr(args, name) for name, _, _ in params})
        p.set_defaults(func=run)

    WC_NAME = ('name', ['name'], dict(help='writecache bdev name'))

    # ---- pmem bdev -------------------------------------------------------
    def bdev_pmem_create(args):
        _call(args, 'bdev_pmem_create', {
            'name': args.name,
            'filename': args.filename,
            'block_size': args.block_size,
            'size': _mb_to_bytes(args.size_mb),
        })

    p = add_parser('bdev_pmem_create',
                   help='Create a pmem bdev on a memory-mapped file or device-DAX node')
    if p is not None:
        p.add_argument('filename', help='Path to the file or device-DAX node (e.g. /dev/dax0.0)')
        p.add_argument('-n', '--name', required=True, help='Name of the new bdev')
        p.add_argument('--block-size', dest='block_size', type=int,
                       help='Block size in bytes (default 4096)')
        p.add_argument('--size-mb', dest='size_mb', type=float,
                       help='Size in MiB: create/extend a regular file to this size '
                            '(default: the size of the existing file or device)')
        p.set_defaults(func=bdev_pmem_create)

    simple('bdev_pmem_delete', 'Delete a pmem bdev',
           [('name', ['name'], dict(help='pmem bdev name'))])

    # ---- writecache vbdev ------------------------------------------------
    def bdev_writecache_create(args):
        t = _tunable_params(args)
        _call(args, 'bdev_writecache_create', {
            'name': args.name,
            'base_bdev': args.base_bdev,
            'cache_bdev': args.cache_bdev,
            'mode': args.mode,
            'block_size': args.block_size,
            'start_sector': args.start_sector,
            'high_watermark': t['high_watermark'],
            'low_watermark': t['low_watermark'],
            'writeback_jobs': t['writeback_jobs'],
            'autocommit_blocks': t['autocommit_blocks'],
            'autocommit_time_ms': t['autocommit_time_ms'],
            'fua': False if args.nofua else None,
            'cleaner': True if args.cleaner else None,
            'max_age_ms': t['max_age_ms'],
            'pause_writeback_ms': t['pause_writeback_ms'],
            'writeback_retry_ms': t['writeback_retry_ms'],
        })

    p = add_parser('bdev_writecache_create',
                   help='Create a writecache vbdev caching writes to an origin bdev on a cache bdev')
    if p is not None:
        p.add_argument('name', help='Name of the new writecache bdev')
        p.add_argument('-o', '--base-bdev', dest='base_bdev', required=True,
                       help='Origin (slow) bdev whose writes are cached')
        p.add_argument('-c', '--cache-bdev', dest='cache_bdev', required=True,
                       help='Cache (fast) bdev: a pmem bdev or an SSD')
        p.add_argument('--mode', choices=['pmem', 'ssd'],
                       help='Cache mode: pmem (default; the cache bdev must be byte-addressable) '
                            'or ssd (any block bdev)')
        p.add_argument('--block-size', dest='block_size', type=int,
                       help='Cache block size in bytes (512-4096, power of two; default 4096)')
        p.add_argument('--start-sector', dest='start_sector', type=int,
                       help='Offset of the cache metadata on the cache bdev, in 512-byte sectors (default 0)')
        _add_tunables(p)
        p.add_argument('--nofua', action='store_true', default=None,
                       help='Write back with normal writes followed by a flush instead of FUA writes')
        p.add_argument('--cleaner', action='store_true', default=None,
                       help='Start in cleaner mode: cache no new writes and write back everything')
        p.set_defaults(func=bdev_writecache_create)

    def bdev_writecache_delete(args):
        _call(args, 'bdev_writecache_delete', {
            'name': args.name,
            'flush': True if args.flush else None,
        })

    p = add_parser('bdev_writecache_delete', help='Delete a writecache vbdev')
    if p is not None:
        p.add_argument('name', help='writecache bdev name')
        p.add_argument('--flush', action='store_true', default=None,
                       help='Write every cached block back to the origin before deleting')
        p.set_defaults(func=bdev_writecache_delete)

    simple('bdev_writecache_flush',
           'Commit and write back every cached block, and wait until done', [WC_NAME])

    def bdev_writecache_set_flush_on_suspend(args):
        _call(args, 'bdev_writecache_set_flush_on_suspend', {
            'name': args.name,
            'enable': not args.disable,
        })

    p = add_parser('bdev_writecache_set_flush_on_suspend',
                   help='Write everything back on the next suspend, delete or shutdown')
    if p is not None:
        p.add_argument('name', help='writecache bdev name')
        p.add_argument('--disable', action='store_true',
                       help='Turn flush-on-suspend off (default: turn it on)')
        p.set_defaults(func=bdev_writecache_set_flush_on_suspend)

    simple('bdev_writecache_suspend',
           'Quiesce I/O to a writecache bdev (queued, not failed) and commit', [WC_NAME])

    simple('bdev_writecache_resume', 'Resume I/O to a suspended writecache bdev', [WC_NAME])

    simple('bdev_writecache_get_stats',
           'Show writecache statistics (all writecache bdevs, or one)',
           [('name', ['name'], dict(nargs='?', help='writecache bdev name (default: all)'))])

    simple('bdev_writecache_clear_stats', 'Reset the statistics of a writecache bdev',
           [WC_NAME])

    def bdev_writecache_set_options(args):
        t = _tunable_params(args)
        _call(args, 'bdev_writecache_set_options', {
            'name': args.name,
            'high_watermark': t['high_watermark'],
            'low_watermark': t['low_watermark'],
            'writeback_jobs': t['writeback_jobs'],
            'autocommit_blocks': t['autocommit_blocks'],
            'autocommit_time_ms': t['autocommit_time_ms'],
            'fua': args.fua,
            'cleaner': args.cleaner,
            'max_age_ms': t['max_age_ms'],
            'pause_writeback_ms': t['pause_writeback_ms'],
            'writeback_retry_ms': t['writeback_retry_ms'],
        })

    p = add_parser('bdev_writecache_set_options',
                   help='Change the tunables of a running writecache bdev (only those given)')
    if p is not None:
        p.add_argument('name', help='writecache bdev name')
        _add_tunables(p)
        fua = p.add_mutually_exclusive_group()
        fua.add_argument('--nofua', dest='fua', action='store_false', default=None,
                         help='Write back with normal writes followed by a flush')
        fua.add_argument('--fua', dest='fua', action='store_true', default=None,
                         help='Write back with FUA writes (the default)')
        cleaner = p.add_mutually_exclusive_group()
        cleaner.add_argument('--cleaner', dest='cleaner', action='store_true', default=None,
                             help='Enter cleaner mode: cache no new writes, write back everything')
        cleaner.add_argument('--no-cleaner', dest='cleaner', action='store_false', default=None,
                             help='Leave cleaner mode')
        p.set_defaults(func=bdev_writecache_set_options)

    # --- NBD export (writecache_tgt serves NBD itself; SPDK's nbd_start_disk
    # needs the kernel driver) ---

    simple('nbd_server_start', 'Listen for NBD clients on a Unix socket path or HOST:PORT',
           [('listen', ['listen'], dict(help='Unix socket path (containing a "/") or HOST:PORT, '
                                             'HOST being an IPv4 literal, [IPv6] or localhost'))])

    simple('nbd_server_stop', 'Stop an NBD listener and close its connections',
           [('listen', ['listen'], dict(help='The address given to nbd_server_start'))])

    def nbd_export_create(args):
        _call(args, 'nbd_export_create', {
            'bdev_name': args.bdev_name,
            'export_name': args.export_name,
            'readonly': True if args.readonly else None,
        })

    p = add_parser('nbd_export_create', help='Export a bdev to NBD clients under a name')
    if p is not None:
        p.add_argument('bdev_name', help='bdev to export')
        p.add_argument('export_name', help='Name NBD clients ask for')
        p.add_argument('-r', '--readonly', action='store_true', help='Refuse writes')
        p.set_defaults(func=nbd_export_create)

    simple('nbd_export_delete', 'Delete an NBD export and close its connections',
           [('export_name', ['export_name'], dict(help='Export name'))])

    simple('nbd_get_exports', 'List NBD exports',
           [('export_name', ['-e', '--export-name'],
             dict(dest='export_name', help='Only this export'))])

    simple('nbd_get_servers', 'List NBD listeners')
