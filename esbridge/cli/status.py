"""``esbridge status package.module:system``: the lag of every edge (leader → follower).

Read from the databases (``POSTGRES_*`` and per-application settings, as the
applications read them), so it works from anywhere that can read them,
whether the system runs or not. Held gaps (partitions waiting for a missing
message) live only in the consumer processes: give their metrics endpoints
(``--metrics 127.0.0.1:9108`` per process, the ``--metrics-port`` of
``esbridge run``/``consume``) to see them. The relay column names the process
whose relay publishes the leader's log (its lease holder), or ``none``. A
dead-letter table that cannot be read shows ``unreadable`` (the reason on
stderr), never 0.

``--upstream-url URL`` (or ``UPSTREAM_LOG_URL``; token ``UPSTREAM_LOG_TOKEN``)
reads every leader's log from the ``esbridge serve-log`` at URL instead of the
leaders' databases: only the followers' databases are read, and the relay
column shows ``-``. A service that does not answer exits 1 (try again); one
that refuses the token exits 2.

Each topic's partition count is read from Kafka (``KAFKA_*`` settings, as
``esbridge run``); when no broker answers within 10 s, or no Kafka is
configured, from the followers' tracking records. ``--partitions`` is not
needed: given, it must agree with the topic (else exit 2). A refused Kafka
login, certificate or ACL stops it at once (exit 2), as every command.

``--watch`` redraws the table every ``--interval`` seconds (default 2) with a
progress bar per edge that is behind: events behind, rate and ETA, from
successive samples. On a terminal the screen is redrawn in place; piped, each
sample prints one line per edge. Ctrl-C stops it (exit 0).

Exit status 0; ``--fail-on-lag`` exits 1 when any follower is behind, holds a
gap or has an unreadable dead-letter table, or Kafka could not be read (for
health checks). Settings it cannot read with (applications not stored in
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
from esbridge.cli.upstream_log_options import add_upstream_url, upstream_log_settings


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "status", "lag of every edge (leader -> follower) of a System", __doc__
    )
    # The same options as ``esbridge run``: the same command line names the same
    # topics and tracking records.
    add_system_arguments(parser)
    # Read from each topic, not assumed: given, it is only checked against the topic.
    parser.set_defaults(partitions=None)
    parser.add_argument("--json", action="store_true", help="one JSON object per edge")
    parser.add_argument(
        "--fail-on-lag",
        action="store_true",
        help="exit 1 when any follower is behind, its dead-letter table or Kafka unreadable",
    )
    parser.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a consumer process's metrics endpoint, for the held-gaps column (repeatable)",
    )
    parser.add_argument(
        "--watch", action="store_true", help="redraw the table and catch-up bars until Ctrl-C"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=None,
        metavar="S",
        help="seconds between two samples of --watch (default 2)",
    )
    add_upstream_url(parser, "every leader's notification log (its max nid and backlog)")
    parser.set_defaults(func=status)


def check_watch_options(args: argparse.Namespace) -> float:
    """The --watch interval; one-shot options with --watch are a ConfigurationError."""
    from esbridge.errors import ConfigurationError

    if not args.watch:
        if args.interval is not None:
            raise ConfigurationError("--interval is the period of --watch: add --watch")
        return 0.0
    for option, given in (("--json", args.json), ("--fail-on-lag", args.fail_on_lag)):
        if given:
            raise ConfigurationError(
                f"{option} is for one look (a script, a health check) and --watch redraws a "
                f"table until Ctrl-C: drop one of them"
            )
    interval = 2.0 if args.interval is None else args.interval
    if not interval > 0:
        raise ConfigurationError(f"--interval {args.interval:g}: give a number of seconds above 0")
    return interval


def status(args: argparse.Namespace) -> int:
    from esbridge.cli.run import load_from_args, relay_modes
    from esbridge.kafka.config import load_kafka_config
    from esbridge.names import PROMPTS, SystemTopics
    from esbridge.system.runner import resolve_relay_modes
    from esbridge.system.status import (
        EdgeStatus,
        edge_statuses,
        format_table,
        held_gaps_from_metrics,
    )
    from esbridge.system.status_watch import watch
    from esbridge.system.topic_partitions import check_given_count, read_topic_partitions

    interval = check_watch_options(args)
    # The option: every leader's log there; without it, each leader's own variables
    # ({LEADER}_UPSTREAM_LOG_URL, then UPSTREAM_LOG_URL; see esbridge.system.upstream_logs).
    remote = upstream_log_settings(args) if args.upstream_url else None
    system = load_from_args(args)
    modes = resolve_relay_modes(system, relay_modes(args.mode))
    names = SystemTopics(args.topic_prefix)
    # Followers of a prompted leader keep one tracking record; of a relayed one, one per
    # partition: how many, the topic says (None: the followers' tracking records do).
    relayed = {name: names.topic(name) for name, mode in modes.items() if mode != PROMPTS}
    # Without Kafka settings the status is taken from the databases alone.
    kafka_config = load_kafka_config(file=args.kafka_config, require_servers=False)
    kafka = read_topic_partitions(kafka_config, list(relayed.values()))
    partitions: dict[str, int | None] = {name: 1 for name in modes}
    for leader, topic in relayed.items():
        count = partitions[leader] = kafka.counts[topic]
        if count is not None:
            check_given_count(topic, count, args.partitions, "Kafka's metadata")
    for note in kafka.notes:
        print(f"esbridge status: {note}", file=sys.stderr)

    def sample(report: bool) -> list[EdgeStatus]:
        held = None
        if args.metrics:
            held, errors = held_gaps_from_metrics(args.metrics)
            for error in errors if report else ():
                print(f"esbridge status: cannot read metrics {error}", file=sys.stderr)
            held = {edge: held.get(edge, 0) for edge in system.edges} if not errors else held
        return edge_statuses(
            system,
            dict(os.environ),
            partitions=partitions,
            held_gaps=held,
            relay_ids=names.relay_ids(system),
            remote=remote,
        )

    statuses = sample(report=True)
    for s in statuses:
        if s.leader in relayed and partitions[s.leader] is None and any(s.positions.values()):
            source = f"{s.follower}'s tracking records"
            check_given_count(relayed[s.leader], len(s.positions), args.partitions, source)
        if s.dlq_error is not None:
            print(f"esbridge status: {s.dlq_error}", file=sys.stderr)
    if args.watch:
        return watch(lambda: sample(report=False), sys.stdout, interval)
    if args.json:
        for s in statuses:
            print(json.dumps({**asdict(s), "position": s.position}))
    else:
        print(format_table(statuses))
    if args.fail_on_lag and (
        kafka.kafka_error is not None
        or any(not s.caught_up or s.held_gaps or s.dlq_error is not None for s in statuses)
    ):
        return 1
    return 0
