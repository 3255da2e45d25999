#  SPDX-License-Identifier: BSD-3-Clause
"""rpc.py plugin for the chronicle bdev module.

    PYTHONPATH=spdk_config /opt/spdk/scripts/rpc.py --plugin chronicle_rpc bdev_chronicle_get_version

Every method of the module gets a subcommand here as it is added (docs/SPDK.md).
"""

import json


def _print(result):
    print(json.dumps(result, indent=2))


def bdev_chronicle_get_version(args):
    _print(args.client.call('bdev_chronicle_get_version'))


def bdev_chronicle_inspect(args):
    _print(args.client.call('bdev_chronicle_inspect', {'bdev_name': args.bdev_name}))


def spdk_rpc_plugin_initialize(subparsers):
    p = subparsers.add_parser('bdev_chronicle_get_version',
                              help='Version of the chronicle module and of its on-disk format')
    p.set_defaults(func=bdev_chronicle_get_version)

    p = subparsers.add_parser('bdev_chronicle_inspect',
                              help='Read a bdev\'s chronicle superblocks (without claiming it)')
    p.add_argument('bdev_name', help='Name of the bdev to inspect')
    p.set_defaults(func=bdev_chronicle_inspect)
