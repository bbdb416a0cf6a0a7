"""``esbridge replay APP --topic T --from N [--to M]``: republish a range of a notification log.

APP is the application class as an import path (``package.module:DogSchool``)
or just the application's name (``DogSchool``), as for ``esbridge relay``.
Each notification is published with the key, partition and headers its relay
gave it, so consumers that already processed it skip it as a duplicate and
the others process it in order. The topic must exist. The application's
database is read with the ``POSTGRES_*`` settings (prefixed ones such as
``DOGSCHOOL_POSTGRES_DBNAME`` win), Kafka with ``KAFKA_*`` settings or
``--kafka-config FILE``.

Progress (count, rate, ETA) is one line redrawn on a terminal, a log line
every few seconds otherwise.

``--upstream-url URL`` (or ``UPSTREAM_LOG_URL``; token ``UPSTREAM_LOG_TOKEN``)
reads the range from the application's ``esbridge serve-log`` at URL instead
of its database: no ``POSTGRES_*`` settings needed. A service that does not
answer exits 1 (run it again); one that refuses the token exits 2.

For an analytics topic give ``--analytics structured|binary`` and the
application class (as APP, or ``--app-class package.module:Class``), for its
transcodings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any

from esbridge.cli.common import (
    add_app_dir,
    add_command,
    application_name,
    load_application,
    missing_extra,
)
from esbridge.cli.upstream_log_options import add_upstream_url, upstream_log_settings
from esbridge.errors import ConfigurationError
from esbridge.kafka.config import load_kafka_config
from esbridge.wire.encoding import Encoder


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "replay",
        "republish a notification-id range of an application to a topic",
        __doc__,
    )
    parser.add_argument(
        "app", help="application class (package.module:Class) or the application's name"
    )
    parser.add_argument("--topic", required=True, help="the topic to publish to (must exist)")
    parser.add_argument(
        "--from", dest="start", type=int, default=1, help="first notification id (default 1)"
    )
    parser.add_argument(
        "--to", dest="stop", type=int, default=None, help="last notification id (default: end)"
    )
    parser.add_argument("--kafka-config", default=None, help="librdkafka properties file")
    parser.add_argument(
        "--analytics",
        choices=["structured", "binary"],
        default=None,
        help="publish in the analytics format (CloudEvents) instead of the default one",
    )
    parser.add_argument(
        "--app-class",
        default=None,
        help="the application class, package.module:Class (needed with --analytics)",
    )
    add_upstream_url(parser, "the range")
    add_app_dir(parser)
    parser.set_defaults(func=replay_command)


def replay_command(args: argparse.Namespace) -> int:
    try:
        # esbridge_connectors is the optional ``connectors`` extra: imported when the
        # command runs, so that the core ``esbridge`` command works without it.
        from esbridge_connectors.replay import Replay
    except ModuleNotFoundError as e:
        raise missing_extra("connectors", "esbridge replay", e) from e

    env = dict(os.environ)
    app = application_name(args.app, args.app_dir)  # as esbridge relay takes it
    app_class_path = args.app_class or (args.app if args.app != app else None)
    kafka_config = load_kafka_config(args.kafka_config, env)
    encoder: Encoder | None = None
    if args.analytics:
        if not app_class_path:
            raise ConfigurationError(
                "--analytics needs --app-class package.module:Class (the application's "
                "transcodings decode its events)"
            )
        try:  # the optional ``connectors`` extra, as above
            from esbridge_connectors.analytics import CloudEventsEncoder
            from esbridge_connectors.upstream import application_mapper
        except ModuleNotFoundError as e:
            raise missing_extra("connectors", "esbridge replay --analytics", e) from e

        app_class = load_application(app_class_path, args.app_dir)
        encoder = CloudEventsEncoder(app, application_mapper(app_class, env), mode=args.analytics)
    remote = upstream_log_settings(args)
    log = remote.log(app) if remote is not None else None
    # Progress: one redrawn line on a terminal, log lines otherwise (see Replay).
    replay = Replay(
        app,
        kafka_config=kafka_config,
        topic=args.topic,
        env=env,
        recorder=log,
        encoder=encoder,
        progress=sys.stderr,
    )
    try:
        result = replay.run(args.start, args.stop)
    finally:
        if log is not None:
            log.close()
    print(json.dumps(asdict(result)))
    return 0
