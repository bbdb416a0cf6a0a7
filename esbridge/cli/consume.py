"""``esbridge consume``: run one consumer adapter (a topic -> a process application).

Example::

    esbridge consume myapp.apps:Counters --upstream DogSchool --topic dogschool \\
        --upstream-log --metrics-port 9108

The follower application is constructed with the process environment
(``POSTGRES_*``, ``PERSISTENCE_MODULE``, its own settings). Kafka settings come
from ``--kafka-config FILE`` and ``KAFKA_*`` variables. ``--upstream-log``
lets the consumer read the upstream application's notification log (with the
same environment; ``{UPSTREAM}_POSTGRES_*`` win) to fill gaps; prompt mode
needs it. ``--upstream-url URL`` (or ``UPSTREAM_LOG_URL``) reads that log over
HTTP from the upstream's ``esbridge serve-log`` instead (the token in
``UPSTREAM_LOG_TOKEN``, the CA in ``UPSTREAM_LOG_CA_FILE``): no upstream
database settings needed. ``--schema-registry URL`` consumes a topic in the
Schema Registry wire format (docs/analytics-pipelines.md). SIGTERM/SIGINT stop
it gracefully after the current batch.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from esbridge.cli.common import (
    add_app_dir,
    add_command,
    add_connect_timeout,
    add_metrics_options,
    load_application,
    missing_extra,
)
from esbridge.cli.dead_letter_options import add_dead_letter_options, policy_from_args
from esbridge.cli.upstream_log_options import add_upstream_url, upstream_log_settings
from esbridge.runtime.signals import catch_stop_signals, stop_on_signals


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "consume",
        "consume a relay's topic into a process application, exactly once",
        __doc__,
    )
    parser.add_argument("follower", help="the follower class, as package.module:Class")
    parser.add_argument("--upstream", required=True, help="upstream application name")
    parser.add_argument("--topic", required=True, help="the relay's topic")
    parser.add_argument(
        "--group", help="consumer group id (default esbridge.<follower>.<upstream>)"
    )
    parser.add_argument(
        "--mode",
        default="payloads",
        choices=["payloads", "prompts"],
        help="the relay's mode: events in the messages, or prompts to pull them from the "
        "upstream log (default payloads)",
    )
    parser.add_argument(
        "--upstream-log",
        action="store_true",
        help="read the upstream notification log (fills gaps; required for prompts)",
    )
    add_upstream_url(parser, "the upstream notification log (gaps, prompts)")
    parser.add_argument(
        "--verify-messages",
        action="store_true",
        help="with --upstream-log: check every message against the upstream log (one read a "
        "batch); a message the log does not hold under its id is parked as foreign",
    )
    parser.add_argument(
        "--upstream-class",
        help="upstream application class (package.module:Class) for its cipher/compressor env",
    )
    parser.add_argument("--partitions", type=int, help="expected partition count of the topic")
    parser.add_argument("--kafka-config", help="librdkafka properties file")
    add_app_dir(parser)
    add_metrics_options(parser, "serve Prometheus /metrics on this port")
    parser.add_argument(
        "--batch-size", type=int, default=1000, help="messages a transaction (default 1000)"
    )
    parser.add_argument(
        "--hold-timeout",
        type=float,
        default=60.0,
        help="seconds a partition waits for a missing message it cannot read from the "
        "upstream log, then the consumer fails naming the gap (default 60)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=None,
        help="attempts more for a failing policy before its message is parked (default 3; "
        "the former form of --max-attempts)",
    )
    parser.add_argument(
        "--no-causal-dependencies",
        action="store_true",
        help="process each partition on its own, ignoring the esb_deps header of a relay "
        "with causal dependencies (default: an event waits for what it depends on in other "
        "partitions; docs/partitioning.md)",
    )
    parser.add_argument(
        "--causal-timeout",
        type=float,
        default=60.0,
        help="seconds an event may wait for its causal dependencies, then the consumer "
        "fails naming the partition it waits for (default 60)",
    )
    parser.add_argument(
        "--schema-registry",
        metavar="URL",
        help="the topic is in the Schema Registry wire format (a relay with a "
        "SchemaRegistryEncoder: Avro or JSON Schema): decode its values with their writers' "
        "schemas from this registry (docs/analytics-pipelines.md)",
    )
    add_dead_letter_options(parser)
    add_connect_timeout(parser)
    parser.set_defaults(func=consume)


def registry_steps(url: str, follower: Any, upstream: str, upstream_cls: type | None) -> Any:
    """The ``steps`` of ``--schema-registry``: values decoded with the registry's schemas."""
    try:
        from esbridge_connectors.registry_follower import RegistryStepFactory
    except ModuleNotFoundError as e:
        raise missing_extra("schema-registry", "esbridge consume --schema-registry", e) from e
    return RegistryStepFactory.of_follower(
        follower, upstream, {"url": url}, upstream_class=upstream_cls
    )


def consume(args: argparse.Namespace) -> int:
    from esbridge.consumer.adapter import ConsumerAdapter
    from esbridge.kafka.config import load_kafka_config
    from esbridge.runtime.metrics import serve_metrics
    from esbridge.runtime.postgres_retry import connection_diagnosis, retry_unreachable
    from esbridge.system.setup import prepared_app

    catch_stop_signals()  # a signal during the start-up waits ends the command at once
    policy = policy_from_args(args)  # a wrong flag fails before anything starts
    poison: dict[str, Any] = {"dead_letter_policy": policy} if policy is not None else {}
    if args.retries is not None:
        poison["retries"] = args.retries
    follower_cls = load_application(args.follower, args.app_dir)
    upstream_cls = (
        load_application(args.upstream_class, args.app_dir) if args.upstream_class else None
    )
    env = dict(os.environ)
    name = getattr(follower_cls, "name", follower_cls.__name__)
    # prepared_app: several consumer processes starting at once race to create the tables;
    # a missing table or privilege is named before anything is consumed.
    follower: Any = retry_unreachable(
        f"constructing {args.follower}",
        lambda: prepared_app(follower_cls, name, env, [args.upstream]),
        timeout=args.connect_timeout,
        diagnose=connection_diagnosis(name, env),
    )
    wants_log = args.upstream_log or args.mode == "prompts"
    remote = upstream_log_settings(args)
    upstream_env = env if wants_log and remote is None else None
    group = args.group or f"esbridge.{follower.name.lower()}.{args.upstream.lower()}"
    steps = (
        registry_steps(args.schema_registry, follower, args.upstream, upstream_cls)
        if args.schema_registry
        else None
    )
    adapter = ConsumerAdapter(
        follower,
        upstream=args.upstream,
        topic=args.topic,
        kafka_config=load_kafka_config(file=args.kafka_config),
        group_id=group,
        mode=args.mode,
        upstream_env=upstream_env,
        upstream_url=remote.url if remote else None,
        upstream_token=remote.token if remote else None,
        upstream_cafile=remote.cafile if remote else None,
        upstream_class=upstream_cls,
        steps=steps,
        partitions=args.partitions,
        batch_size=args.batch_size,
        hold_timeout=args.hold_timeout,
        connect_timeout=args.connect_timeout,
        verify_messages=args.verify_messages,
        causal_dependencies=not args.no_causal_dependencies,
        causal_timeout=args.causal_timeout,
        **poison,
    )
    if args.metrics_port:
        serve_metrics(args.metrics_port, args.metrics_addr)

    stop_on_signals(lambda name: adapter.stop())
    try:
        adapter.run()
    finally:
        follower.close()
    return 0
