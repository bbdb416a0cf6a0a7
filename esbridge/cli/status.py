"""``esbridge status package.module:system``: the lag of every edge (leader → follower).

Read from the databases (``POSTGRES_*`` and per-application settings, as the
applications read them), so it works from anywhere that can read them,
whether the system runs or not. Exit status 0; ``--fail-on-lag`` exits 1
when any follower is behind (for health checks).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from typing import Any

from esbridge.cli.common import add_command
from esbridge.cli.run import add_system_arguments


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "status", "lag of every edge (leader -> follower) of a System", __doc__
    )
    # The same options as ``esbridge run``: the same command line names the same
    # topics and tracking records.
    add_system_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per edge")
    parser.add_argument(
        "--fail-on-lag", action="store_true", help="exit 1 when any follower is behind"
    )
    parser.set_defaults(func=status)


def status(args: argparse.Namespace) -> int:
    from esbridge.cli.run import load_from_args, relay_modes
    from esbridge.runner import PROMPTS, resolve_relay_modes
    from esbridge.system_status import edge_statuses, format_table

    system = load_from_args(args)
    modes = resolve_relay_modes(system, relay_modes(args.mode))
    # Followers of a prompted leader keep one tracking record; of a relayed one, one per partition.
    partitions = {name: 1 if mode == PROMPTS else args.partitions for name, mode in modes.items()}
    statuses = edge_statuses(system, dict(os.environ), partitions=partitions)
    if args.json:
        for s in statuses:
            print(json.dumps({**asdict(s), "position": s.position}))
    else:
        print(format_table(statuses))
    if args.fail_on_lag and any(not s.caught_up for s in statuses):
        return 1
    return 0
