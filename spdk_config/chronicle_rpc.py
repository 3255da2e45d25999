#  SPDX-License-Identifier: BSD-3-Clause
"""rpc.py plugin for the chronicle bdev module.

    PYTHONPATH=spdk_config /opt/spdk/scripts/rpc.py --plugin chronicle_rpc bdev_chronicle_get_version
    PYTHONPATH=spdk_config /opt/spdk/scripts/rpc.py -s /tmp/spdk.sock --plugin chronicle_rpc \\
        bdev_chronicle_create -b C0 --base-bdev B0 --journal-bdev J0 --backup-bdev K0 --history-bdev H0

One subcommand per method of the module; docs/RPC.md describes each. Options left out are
not sent, so the module's defaults apply (and an existing volume keeps what it was formatted
with).
"""

import json


def _print(result):
    print(json.dumps(result, indent=2))


def _call(args, method, params=None):
    """Calls `method` with the parameters that were given (None values are left out)."""
    if params is not None:
        params = {key: value for key, value in params.items() if value is not None}
    _print(args.client.call(method, params))


def bdev_chronicle_get_version(args):
    _call(args, 'bdev_chronicle_get_version')


def bdev_chronicle_inspect(args):
    _call(args, 'bdev_chronicle_inspect', {'bdev_name': args.bdev_name})


def bdev_chronicle_create(args):
    _call(args, 'bdev_chronicle_create', {
        'name': args.name,
        'base_bdev': args.base_bdev,
        'journal_bdev': args.journal_bdev,
        'backup_bdev': args.backup_bdev,
        'history_bdev': args.history_bdev,
        'host_write_size': args.host_write_size,
        'durability': args.durability,
        'journal_full': args.journal_full,
        'journal_mode': args.journal_mode,
        # Flags: sent only when they differ from the module's defaults.
        'strict': True if args.strict else None,
        'copy_base_to_backup': False if args.no_copy_base_to_backup else None,
        'automatic_sort': False if args.no_automatic_sort else None,
        'follow_submitter': False if args.no_follow_submitter else None,
        'sort_rate_limit_bytes_per_second': args.sort_rate_limit,
        'marker_read_back_bytes': args.marker_read_back_bytes,
    })


def bdev_chronicle_delete(args):
    _call(args, 'bdev_chronicle_delete', {'name': args.name})


def bdev_chronicle_mark(args):
    _call(args, 'bdev_chronicle_mark', {'name': args.name, 'comment': args.comment})


def bdev_chronicle_rollback(args):
    _call(args, 'bdev_chronicle_rollback', {'name': args.name, 'generation': args.generation,
                                            'comment': args.comment})


def bdev_chronicle_restore(args):
    _call(args, 'bdev_chronicle_restore', {'name': args.name, 'generation': args.generation,
                                           'sequence': args.sequence, 'time': args.time,
                                           'restore_name': args.restore_name})


def bdev_chronicle_delete_restore(args):
    _call(args, 'bdev_chronicle_delete_restore', {'restore_name': args.restore_name})


def bdev_chronicle_get_generations(args):
    _call(args, 'bdev_chronicle_get_generations', {'name': args.name})


def bdev_chronicle_get_status(args):
    _call(args, 'bdev_chronicle_get_status', {'name': args.name})


def bdev_chronicle_merge(args):
    _call(args, 'bdev_chronicle_merge', {'name': args.name, 'from': args.from_generation,
                                         'through': args.through})


def bdev_chronicle_delete_generation(args):
    _call(args, 'bdev_chronicle_delete_generation', {'name': args.name, 'generation': args.generation})


def bdev_chronicle_set_retention(args):
    _call(args, 'bdev_chronicle_set_retention', {
        'name': args.name,
        'keep_last': args.keep_last,
        'merge_older': True if args.merge_older else None,
        'max_generations': args.max_generations,
        'max_age_seconds': args.max_age_seconds,
        'compress_older': True if args.compress_older else None,
    })


def bdev_chronicle_compress_generation(args):
    _call(args, 'bdev_chronicle_compress_generation', {'name': args.name, 'generation': args.generation})


def bdev_chronicle_decompress_generation(args):
    _call(args, 'bdev_chronicle_decompress_generation', {'name': args.name, 'generation': args.generation})


def bdev_chronicle_load(args):
    # The answer comes when the load ends: wait at least that long (rpc.py's -t is 60 s).
    args.client.timeout = max(args.client.timeout, args.seconds + 60.0)
    _call(args, 'bdev_chronicle_load', {
        'name': args.name,
        'seconds': args.seconds,
        'writes': args.writes,
        'queue_depth': args.queue_depth,
        'marker_every_ms': args.marker_every_ms,
        'marker_every_writes': args.marker_every_writes,
        'seed': args.seed,
        'ack_log': args.ack_log,
    })


def bdev_chronicle_verify_load(args):
    _call(args, 'bdev_chronicle_verify_load', {'name': args.name, 'ack_log': args.ack_log})


def spdk_rpc_plugin_initialize(subparsers):
    p = subparsers.add_parser('bdev_chronicle_get_version',
                              help='Version of the chronicle module and of its on-disk format')
    p.set_defaults(func=bdev_chronicle_get_version)

    p = subparsers.add_parser('bdev_chronicle_inspect',
                              help='Read a bdev\'s chronicle superblocks (without claiming it)')
    p.add_argument('bdev_name', help='Name of the bdev to inspect')
    p.set_defaults(func=bdev_chronicle_inspect)

    p = subparsers.add_parser('bdev_chronicle_create',
                              help='Create a chronicle bdev: format blank journal and history bdevs, '
                              'or open the volume they hold')
    p.add_argument('-b', '--name', required=True,
                   help='Name of the chronicle bdev (recorded on the devices, at most 63 bytes)')
    p.add_argument('--base-bdev', required=True, help='The volume\'s current image')
    p.add_argument('--journal-bdev', required=True, help='Journal: superblocks, catalogs, index, elements')
    p.add_argument('--backup-bdev', required=True, help='The backup image, one generation behind')
    p.add_argument('--history-bdev', required=True, help='History of the blocks the sort overwrote')
    p.add_argument('-w', '--host-write-size', type=int,
                   help='Bytes per journal element, a power of two from 512 to 1048576 '
                   '(default 4096 for a new volume; an existing volume must be given its own or nothing)')
    p.add_argument('-d', '--durability', choices=['flush', 'write-through'],
                   help='When a write is acknowledged: flush (durable after the next flush; default) '
                   'or write-through (durable when acknowledged). Fixed at format')
    p.add_argument('-f', '--journal-full', choices=['block', 'fail', 'merge-oldest', 'bitmap-only'],
                   help='When the journal has no room: block (wait for the sort; default), fail, or '
                   'merge-oldest (block, and give up the oldest history generations when the history is '
                   'full), or bitmap-only (write to the base only, tracked by a durable bitmap, until the '
                   'sort frees space; FIG 36). Fixed at format')
    p.add_argument('-m', '--journal-mode', choices=['latest', 'all'],
                   help='What the journal keeps of a block written again within a generation: latest '
                   '(default) or all (every write, with its sequence and time: restore at any point). '
                   'Fixed at format')
    p.add_argument('--strict', action='store_true',
                   help='Refuse writes that are not whole host-write-size units instead of '
                   'widening them by read-modify-write')
    p.add_argument('--no-copy-base-to-backup', action='store_true',
                   help='On format, do not copy the base to the backup (only for bases known to be '
                   'zero, like new malloc bdevs or files)')
    p.add_argument('--no-automatic-sort', action='store_true',
                   help='Do not sort sealed generations into the backup in the background')
    p.add_argument('--no-follow-submitter', action='store_true',
                   help='Keep the volume on the app thread even when one channel on another '
                   'thread submits all its I/O (by default it moves there)')
    p.add_argument('-r', '--sort-rate-limit', type=int, metavar='BYTES_PER_SECOND',
                   help='Limit the sort to this many bytes per second read from the journal')
    p.add_argument('--marker-read-back-bytes', type=int, metavar='BYTES',
                   help='Rewritten elements whose checksum waits for the marker, in bytes '
                        '(default 256 MiB; 0 checksums every write at once)')
    p.set_defaults(func=bdev_chronicle_create)

    p = subparsers.add_parser('bdev_chronicle_delete',
                              help='Delete a chronicle bdev (closes the volume; its data stays on the devices)')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.set_defaults(func=bdev_chronicle_delete)

    p = subparsers.add_parser('bdev_chronicle_mark',
                              help='Cut a generation: seal the open one (prints its number) and open the next')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.add_argument('-c', '--comment', help='Comment recorded with the generation')
    p.set_defaults(func=bdev_chronicle_mark)

    p = subparsers.add_parser('bdev_chronicle_rollback',
                              help='Roll the volume back to the image of a generation, as a new generation '
                              '(prints its number; the one before it is the undo point)')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.add_argument('-g', '--generation', type=int, required=True, help='The generation whose image comes back')
    p.add_argument('-c', '--comment', help='Comment recorded with the new generation')
    p.set_defaults(func=bdev_chronicle_rollback)

    p = subparsers.add_parser('bdev_chronicle_restore',
                              help='Open a generation, or ("all" journal mode) the image after a write, as a '
                              'restore volume (R-VOL): a new bdev that reads its image at once, without '
                              'copying, and keeps its own writes apart')
    p.add_argument('name', help='Name of the chronicle bdev')
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument('-g', '--generation', type=int, help='The generation to show')
    target.add_argument('-s', '--sequence', type=int,
                        help='"all" mode: the image right after the write with this sequence '
                        '(restore_sequences in bdev_chronicle_get_generations)')
    target.add_argument('-t', '--time',
                        help='"all" mode: the image after every write taken by this time, RFC 3339 '
                        '(2026-11-30T13:05:07.5Z) or Unix nanoseconds')
    p.add_argument('-r', '--restore-name', dest='restore_name', required=True, help='Name of the new bdev')
    p.set_defaults(func=bdev_chronicle_restore)

    p = subparsers.add_parser('bdev_chronicle_delete_restore',
                              help='Delete a restore volume (its writes are given up; the generations stay)')
    p.add_argument('restore_name', help='Name of the restore volume bdev')
    p.set_defaults(func=bdev_chronicle_delete_restore)

    p = subparsers.add_parser('bdev_chronicle_get_generations',
                              help='List the generations of a chronicle bdev')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.set_defaults(func=bdev_chronicle_get_generations)

    p = subparsers.add_parser('bdev_chronicle_merge',
                              help='Merge the history records of generations FROM..THROUGH into one '
                              '(image FROM stays restorable, the ones after it are given up)')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.add_argument('--from', dest='from_generation', type=int, required=True,
                   help='First generation (its image stays restorable)')
    p.add_argument('--through', type=int, required=True, help='Last generation merged')
    p.set_defaults(func=bdev_chronicle_merge)

    p = subparsers.add_parser('bdev_chronicle_delete_generation',
                              help='Give up the image of one history generation')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.add_argument('-g', '--generation', type=int, required=True, help='The generation to give up')
    p.set_defaults(func=bdev_chronicle_delete_generation)

    p = subparsers.add_parser('bdev_chronicle_set_retention',
                              help='Which history records are kept, merged or dropped (after every sort)')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.add_argument('-k', '--keep-last', type=int, help='Newest history records kept individually')
    p.add_argument('-m', '--merge-older', action='store_true',
                   help='Merge the records older than --keep-last into one')
    p.add_argument('-n', '--max-generations', type=int, help='Drop the oldest records beyond this many')
    p.add_argument('-a', '--max-age-seconds', type=int, help='Drop records older than this')
    p.add_argument('-c', '--compress-older', action='store_true',
                   help='Compress the records older than --keep-last (those that do not shrink are left)')
    p.set_defaults(func=bdev_chronicle_set_retention)

    p = subparsers.add_parser('bdev_chronicle_compress_generation',
                              help='Compress the history record of a generation (it stays restorable)')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.add_argument('-g', '--generation', type=int, required=True, help='The generation whose record to compress')
    p.set_defaults(func=bdev_chronicle_compress_generation)

    p = subparsers.add_parser('bdev_chronicle_decompress_generation',
                              help='Decompress the history record of a generation')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.add_argument('-g', '--generation', type=int, required=True, help='The generation whose record to decompress')
    p.set_defaults(func=bdev_chronicle_decompress_generation)

    p = subparsers.add_parser('bdev_chronicle_get_status',
                              help='State, journal and history use, sort progress and counters of a chronicle bdev')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.set_defaults(func=bdev_chronicle_get_status)

    p = subparsers.add_parser('bdev_chronicle_load',
                              help='Write self-identifying blocks through a chronicle bdev for SECONDS, '
                              'optionally cutting generations and logging every acknowledged write (crash tests)')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.add_argument('-t', '--seconds', type=float, required=True, help='How long to write (0 < SECONDS <= 86400)')
    p.add_argument('-w', '--writes', type=int, help='Stop after this many writes if that comes first')
    p.add_argument('-q', '--queue-depth', type=int, help='Writes in flight (1 to 256; default 32)')
    p.add_argument('-m', '--marker-every-ms', type=int, help='Cut a generation this often (default: none)')
    p.add_argument('--marker-every-writes', type=int,
                   help='Cut a generation after every this many writes submitted (default: none)')
    p.add_argument('--seed', type=int, help='Seed of the block choice (default 1)')
    p.add_argument('-a', '--ack-log', help='File (on the application\'s machine) to append "block sequence" '
                   'lines to, one per acknowledged write')
    p.set_defaults(func=bdev_chronicle_load)

    p = subparsers.add_parser('bdev_chronicle_verify_load',
                              help='Read back every block of an ack log through a chronicle bdev and check '
                              'it holds its newest acknowledged write (or a newer one)')
    p.add_argument('name', help='Name of the chronicle bdev')
    p.add_argument('-a', '--ack-log', required=True, help='Ack log written by bdev_chronicle_load')
    p.set_defaults(func=bdev_chronicle_verify_load)
