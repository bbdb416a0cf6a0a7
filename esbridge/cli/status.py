"""``esbridge status package.module:system``: the lag of every edge (leader → follower).

Read from the databases (``POSTGRES_*`` and per-application settings, as the
applications read them), so it works from anywhere that can read them,
whether the system runs or not. Held gaps (partitions waiting for a missing
message) live only in the consumer processes: give their metrics endpoints
(``--metrics 127.0.0.1:9108`` per process, the ``--metrics-port`` of
``esbridge run``/``consume``) to see them. The relay column names the process
whose relay publishes the leader's log (its lease holder), or ``none``. A
dead-letter table that cannot be read shows ``unreadable`` (the reason on
stderr), never 0. Exit status 0; ``--fail-on-lag`` exits 1 when any follower
is behind, holds a gap or has an unreadable dead-letter table (for health
checks). Settings it cannot read with (applications not stored in
PostgreSQL, a password Postgres refuses) exit 2, with or without ``--fail-on-lag``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
        "--fail-on-lag",
        action="store_true",
        help="exit 1 when any follower is behind (or its dead-letter table unreadable)",
    )
    parser.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a consumer process's metrics endpoint, for the held-gaps column (repeatable)",
    )
    parser.set_defaults(func=status)


def status(args: argparse.Namespace) -> int:
    from esbridge.cli.run import load_from_args, relay_modes
    from esbridge.names import PROMPTS, SystemTopics
    from esbridge.system.runner import resolve_relay_modes
    from esbridge.system.status import edge_statuses, format_table, held_gaps_from_metrics

    system = load_from_args(args)
    modes = resolve_relay_modes(system, relay_modes(args.mode))
    # Followers of a prompted leader keep one tracking record; of a relayed one, one per partition.
    partitions = {name: 1 if mode == PROMPTS else args.partitions for name, mode in modes.items()}
    held = None
    if args.metrics:
        held, errors = held_gaps_from_metrics(args.metrics)
        for error in errors:
            print(f"esbridge status: cannot read metrics {error}", file=sys.stderr)
        held = {edge: held.get(edge, 0) for edge in system.edges} if not errors else held
    relay_ids = SystemTopics(args.topic_prefix).relay_ids(system)
    statuses = edge_statuses(
        system, dict(os.environ), partitions=partitions, held_gaps=held, relay_ids=relay_ids
    )
    for s in statuses:
        if s.dlq_error is not None:
            print(f"esbridge status: {s.dlq_error}", file=sys.stderr)
    if args.json:
        for s in statuses:
            print(json.dumps({**asdict(s), "position": s.position}))
    else:
        print(format_table(statuses))
    if args.fail_on_lag and any(
        not s.caught_up or s.held_gaps or s.dlq_error is not None for s in statuses
    ):
        return 1
    return 0
