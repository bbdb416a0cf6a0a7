"""``esbridge relay APP``: publish one application's notification log to Kafka.

APP is the application class as an import path (``package.module:DogSchool``)
or just the application's name (``DogSchool``: its events table
``dogschool_events`` is read). The application's database comes from the
``POSTGRES_*`` environment variables (``DOGSCHOOL_POSTGRES_*`` win), as
eventsourcing reads them. Kafka settings go straight to librdkafka: from a
properties file (``--kafka-config``) and ``KAFKA_*`` variables
(``KAFKA_BOOTSTRAP_SERVERS`` -> ``bootstrap.servers``).

Stops gracefully on SIGTERM or SIGINT (finishes the current batch).
Exit status: 0 when stopped, 2 on a configuration or permanent error.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from esbridge.cli.common import (
    add_app_dir,
    add_command,
    add_connect_timeout,
    add_metrics_options,
    application_name,
)
from esbridge.errors import ConfigurationError
from esbridge.runtime.signals import catch_stop_signals, stop_on_signals

log = logging.getLogger("esbridge.relay")


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "relay",
        "publish an application's notification log to Kafka (payloads or prompts)",
        __doc__,
    )
    parser.add_argument("app", help="application class (module:Class) or application name")
    parser.add_argument(
        "--topic", help="Kafka topic (default esbridge.<app name, lower case>, as esbridge run)"
    )
    parser.add_argument(
        "--mode", choices=["payloads", "prompts"], default="payloads", help="default payloads"
    )
    parser.add_argument(
        "--partitions",
        type=int,
        help="the topic's partition count: checked, and used to create a missing topic",
    )
    parser.add_argument("--replication-factor", type=int, help="for topics the relay creates")
    parser.add_argument(
        "--no-create-topics", action="store_true", help="refuse missing topics instead"
    )
    parser.add_argument(
        "--relay-id",
        help="transactional.id and position key (default: as esbridge run, esbridge.relay.<app> "
        "for topic esbridge.<app>; see docs/message-format.md)",
    )
    parser.add_argument(
        "--allow-other-relays",
        action="store_true",
        help="start although other relay ids already published to the topic: a second relay "
        "on purpose, which publishes the whole log again (default: refuse, naming their ids)",
    )
    parser.add_argument(
        "--at-least-once",
        action="store_true",
        help="no Kafka transactions (for brokers without them): duplicates possible after a crash",
    )
    parser.add_argument(
        "--no-standby",
        action="store_true",
        help="take no lease: a second relay with this relay id then fences this one at once "
        "(default: it stands by until this one stops)",
    )
    add_app_dir(parser)
    parser.add_argument("--kafka-config", metavar="FILE", help="librdkafka properties file")
    add_metrics_options(parser, "serve Prometheus /metrics on this port")
    add_connect_timeout(parser)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="relay tuning (page_size, batch_size, batch_seconds, poll_interval, ...)",
    )
    parser.set_defaults(func=relay_command)


def parse_tuning(items: list[str], option: str = "--set") -> dict[str, Any]:
    """Relay tuning from ``name=value`` pairs (values as int, float, bool, None or text).

    ``option`` names the command-line option in the error a wrong name gets.
    """
    from esbridge.relay.tuning import RelayTuning

    fields = RelayTuning.__dataclass_fields__
    tuning: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise ConfigurationError(
                f"{option} {item!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}"
            )
        value: Any = text
        if text.lower() in ("true", "yes", "y"):
            value = True
        elif text.lower() in ("false", "no", "n"):
            value = False
        elif text.lower() == "none":
            value = None
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        tuning[name] = value
    return tuning


def relay_command(args: argparse.Namespace) -> int:
    from esbridge.kafka.config import load_kafka_config
    from esbridge.names import SystemTopics
    from esbridge.relay.relay import Relay
    from esbridge.runtime.metrics import serve_metrics

    catch_stop_signals()  # a signal during the start-up waits ends the command at once
    app = application_name(args.app, args.app_dir)
    topic = args.topic or SystemTopics().topic(app)
    tuning = parse_tuning(args.set)
    if args.allow_other_relays:
        tuning["allow_other_relays"] = True
    if args.no_create_topics:
        tuning["create_topics"] = False
    if args.no_standby:
        tuning["standby"] = False
    if args.replication_factor:
        tuning["replication_factor"] = args.replication_factor
    if args.connect_timeout is not None:
        tuning["connect_timeout"] = args.connect_timeout
    relay = Relay(
        app,
        kafka_config=load_kafka_config(args.kafka_config),
        topic=topic,
        mode=args.mode,
        relay_id=args.relay_id,
        exactly_once=not args.at_least_once,
        partitions=args.partitions,
        **tuning,
    )

    def on_signal(name: str) -> None:
        log.info("relay %s: %s received, stopping", app, name)
        relay.stop()

    stop_on_signals(on_signal)
    if args.metrics_port:
        serve_metrics(args.metrics_port, args.metrics_addr)
    relay.run()  # it logs its stop summary
    return 0
