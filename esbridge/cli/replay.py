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
transcodings. For a Schema Registry topic, ``--analytics avro|json-schema``,
the registry's URL (``--schema-registry URL`` or ``SCHEMA_REGISTRY_URL``) and,
when the event classes are not in the application class's module,
``--event-classes MODULE`` (repeatable): the schemas are registered (or found,
unchanged) before anything is published, as the relay's encoder does.
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
        choices=["structured", "binary", "avro", "json-schema"],
        default=None,
        help="publish in an analytics format (CloudEvents; avro and json-schema through a "
        "Schema Registry) instead of the default one",
    )
    parser.add_argument(
        "--schema-registry",
        default=None,
        help="the Schema Registry URL for --analytics avro|json-schema "
        "(default: SCHEMA_REGISTRY_URL)",
    )
    parser.add_argument(
        "--event-classes",
        action="append",
        default=None,
        help="module (or module:Class) of the event classes for --analytics avro|json-schema "
        "(repeatable; default: the application class's module)",
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
        mapper = application_mapper(app_class, env)
        if args.analytics in ("avro", "json-schema"):
            encoder = registry_encoder(args, app, app_class, mapper, env)
        else:
            encoder = CloudEventsEncoder(app, mapper, mode=args.analytics)
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


def registry_encoder(
    args: argparse.Namespace, app: str, app_class: type, mapper: Any, env: dict[str, str]
) -> Encoder:
    """The Schema Registry encoder of ``--analytics avro|json-schema`` (registers the schemas)."""
    url = args.schema_registry or env.get("SCHEMA_REGISTRY_URL")
    if not url:
        raise ConfigurationError(
            f"--analytics {args.analytics} needs the Schema Registry: --schema-registry URL "
            "or SCHEMA_REGISTRY_URL"
        )
    try:
        from esbridge_connectors.registry import SchemaRegistryEncoder
    except ModuleNotFoundError as e:
        raise missing_extra(
            "schema-registry", f"esbridge replay --analytics {args.analytics}", e
        ) from e
    from esbridge_connectors.schemas import discover_event_classes

    classes = discover_event_classes(args.event_classes or [app_class.__module__])
    if not classes:
        raise ConfigurationError(
            f"no event classes found in {args.event_classes or [app_class.__module__]}: "
            "name their modules with --event-classes"
        )
    return SchemaRegistryEncoder(
        app,
        mapper,
        {"url": url},
        topic=args.topic,
        event_classes=classes,
        format="avro" if args.analytics == "avro" else "json",
    )
