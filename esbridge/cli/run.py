"""``esbridge run package.module:system [--app NAME] [--workers N] [--supervise]``.

Runs an ``eventsourcing`` System with Kafka as the transport (see
:mod:`esbridge.system.runner`). Without ``--app`` every application runs in this
process (threads); with ``--app NAME`` only that application's relay (if it
leads) and consumers (one per leader it follows). ``--workers N`` starts N
worker processes of the application that share each topic's partitions
through one consumer group; each runs the relay too, one publishing, the
others standing by (see :mod:`esbridge.relay.lease`). ``--supervise``
restarts a worker that dies (kill -9 included).

Each application's settings come from the environment, with the library's
per-application prefix winning (``ORDERS_POSTGRES_HOST`` over
``POSTGRES_HOST``). A follower reads its leaders' logs from their databases,
or, with ``--upstream-url [LEADER=]URL`` (or ``[LEADER_]UPSTREAM_LOG_URL``)
and the token in ``[LEADER_]UPSTREAM_LOG_TOKEN``, over HTTP from the
leader's ``esbridge serve-log``: services with their own databases
(docs/remote-log.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
from typing import Any

from esbridge.cli.common import add_app_dir, add_command, add_metrics_options, use_app_dir
from esbridge.cli.dead_letter_options import (
    add_dead_letter_options,
    dead_letter_argv,
    policy_from_args,
)
from esbridge.cli.relay import parse_tuning
from esbridge.errors import ConfigurationError
from esbridge.runtime.signals import catch_stop_signals, stop_on_signals, waiting_for

#: The ``esbridge`` command run by this interpreter (works without the console script on PATH).
ESBRIDGE_COMMAND = [
    sys.executable,
    "-c",
    "import sys; from esbridge.cli import main; sys.exit(main())",
]


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "run", "run a System (all applications, or one with --app) over Kafka", __doc__
    )
    add_system_arguments(parser)
    parser.add_argument(
        "--app",
        "--apps",
        action="append",
        dest="apps",
        metavar="NAME[,NAME...]",
        help="application(s) to run here (repeatable or comma-separated; default: all of them)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes per application (default 1)"
    )
    parser.add_argument(
        "--worker-index",
        type=int,
        default=None,
        help="run as worker I of --workers N (set by the supervisor)",
    )
    parser.add_argument(
        "--supervise", action="store_true", help="restart worker processes that die"
    )
    parser.add_argument(
        "--no-relay", action="store_true", help="run only the consumers of the applications"
    )
    parser.add_argument(
        "--relay-only", action="store_true", help="run only the relays of the applications"
    )
    parser.add_argument(
        "--setup",
        action="store_true",
        help="create the tables of every application (with --app: of those) and their "
        "topics, then exit",
    )
    parser.add_argument(
        "--at-least-once",
        action="store_true",
        help="relays publish without transactions (brokers without transaction support)",
    )
    add_metrics_options(
        parser, "serve Prometheus /metrics on this port (worker N of an application: port + N)"
    )
    parser.add_argument(
        "--relay-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="tuning of the relays run here, as `esbridge relay --set` (linger, batch_size, ...)",
    )
    parser.add_argument(
        "--upstream-url",
        action="append",
        default=[],
        metavar="[LEADER=]URL",
        help="read the leaders' logs (or LEADER's) over HTTP from the esbridge serve-log at "
        "URL, not from their databases (token: UPSTREAM_LOG_TOKEN, or LEADER_UPSTREAM_LOG_TOKEN "
        "in upper case; repeatable; same as setting [LEADER_]UPSTREAM_LOG_URL; "
        "docs/remote-log.md)",
    )
    add_dead_letter_options(parser)
    parser.set_defaults(func=run)


def add_system_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``run`` and ``status``: which system, which names, which broker."""
    parser.add_argument("system", help="the System, as package.module:attribute")
    add_app_dir(parser)
    parser.add_argument(
        "--topic-prefix", default="esbridge.", help="prefix of topic and group names"
    )
    parser.add_argument(
        "--partitions", type=int, default=1, help="partitions of each topic it creates"
    )
    parser.add_argument(
        "--mode",
        action="append",
        default=[],
        metavar="[LEADER=]payloads|prompts",
        help="relay mode, for every leader or for one (repeatable; default payloads)",
    )
    parser.add_argument(
        "--kafka-config", default=None, help="librdkafka properties file (KAFKA_* env wins)"
    )


def relay_modes(values: list[str]) -> str | dict[str, str]:
    """``["prompts"]`` -> ``"prompts"``; ``["Orders=prompts"]`` -> ``{"Orders": "prompts"}``."""
    modes: dict[str, str] = {}
    default = "payloads"
    for value in values:
        name, sep, mode = value.partition("=")
        if sep:
            modes[name] = mode
        else:
            default = value
    if not modes:
        return default
    return modes if default == "payloads" else {"*": default, **modes}


def load_from_args(args: argparse.Namespace) -> Any:
    from esbridge.system.runner import load_system

    use_app_dir(args.app_dir)
    return load_system(args.system)


def kafka_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from esbridge.kafka.config import load_kafka_config

    return load_kafka_config(file=args.kafka_config)


def run(args: argparse.Namespace) -> int:
    catch_stop_signals()  # a signal during the start-up waits ends the command at once
    if args.workers < 1:
        raise ConfigurationError("--workers must be at least 1")
    if args.no_relay and args.relay_only:
        raise ConfigurationError("--no-relay and --relay-only exclude each other")
    if args.apps:
        args.apps = [name.strip() for value in args.apps for name in value.split(",") if name]
    # Parsed before anything starts, so that a wrong name fails first.
    args.relay_options = parse_tuning(args.relay_set, "--relay-set")
    args.dead_letter_policy = policy_from_args(args)
    system = load_from_args(args)
    from esbridge.system.upstream_logs import parse_upstream_urls

    args.upstream_env = parse_upstream_urls(args.upstream_url, system)
    if args.setup:
        return setup(args, system)
    if args.worker_index is None and (args.workers > 1 or args.supervise):
        return supervise(args, system)
    return run_here(args, system)


def setup(args: argparse.Namespace, system: Any) -> int:
    from esbridge.names import SystemTopics
    from esbridge.system.runner import check_local_apps, leaders_used
    from esbridge.system.setup import ensure_topics, setup_system

    apps = args.apps or list(system.nodes)
    check_local_apps(system, apps)
    setup_system(system, apps=apps)
    names = SystemTopics(args.topic_prefix)
    ensure_topics(
        kafka_config_from_args(args),
        {names.topic(n): args.partitions for n in leaders_used(system, apps)},
    )
    which = f"{', '.join(args.apps)} of " if args.apps else ""
    print(f"tables and topics of {which}{args.system} are ready", file=sys.stderr)
    return 0


def run_here(args: argparse.Namespace, system: Any) -> int:
    """Run this process's share of the system until SIGTERM/SIGINT."""
    from esbridge.system.runner import KafkaRunner, SystemRunnerError, run_until

    worker_index = args.worker_index or 0
    runner = KafkaRunner(
        system,
        args.upstream_env,
        kafka_config=kafka_config_from_args(args),
        apps=args.apps,
        topic_prefix=args.topic_prefix,
        partitions=args.partitions,
        relay_modes=relay_modes(args.mode),
        exactly_once=not args.at_least_once,
        relay_options=args.relay_options,
        consumer_options=(
            {"dead_letter_policy": args.dead_letter_policy}
            if args.dead_letter_policy is not None
            else None
        ),
        # Every worker runs its application's relay: one publishes (it holds the relay's
        # lease), the others stand by and take over at once when it dies. Without the
        # lease (--relay-set standby=false) they would fence each other: worker 0 only.
        run_relays=not args.no_relay
        and (worker_index == 0 or args.relay_options.get("standby", True) is not False),
        run_consumers=not args.relay_only,
        # A process of named applications is a worker that a supervisor restarts:
        # its consumers join their groups as static members (see esbridge.system.parts).
        worker_id=f"w{worker_index}" if args.apps else None,
    )
    if args.metrics_port:
        from esbridge.runtime.metrics import serve_metrics

        serve_metrics(args.metrics_port + worker_index, args.metrics_addr)
    stopping = threading.Event()

    stop_on_signals(lambda name: stopping.set())
    try:
        # Leaving the stack raises a failure that run_until had not seen yet.
        with contextlib.ExitStack() as started:
            with waiting_for(f"{', '.join(runner.local)} to start"):
                started.enter_context(runner)
            print(
                f"esbridge run: {', '.join(runner.local)} "
                f"(worker {worker_index}, pid {os.getpid()}) running",
                file=sys.stderr,
                flush=True,
            )
            run_until(stopping.is_set, runner)
    except SystemRunnerError as e:
        # A runtime failure (not a configuration error, which exits with 2):
        # exit 1, so that a supervisor starts the worker again and it resumes.
        logging.getLogger("esbridge.run").error("%s", e)
        print(f"esbridge run: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def supervise(args: argparse.Namespace, system: Any) -> int:
    """Start (and with --supervise restart) one process per application and worker."""
    from esbridge.system.supervisor import Supervisor

    apps = args.apps or list(system.nodes)
    commands = {}
    for app in apps:
        for index in range(args.workers):
            commands[f"{app}[{index}]"] = worker_command(args, app, index)
    supervisor = Supervisor(commands, restart=args.supervise)

    stop_on_signals(supervisor.request_stop)
    return supervisor.run()


def worker_command(args: argparse.Namespace, app: str, index: int) -> list[str]:
    """The command line of worker ``index`` of application ``app``."""
    command = [
        *ESBRIDGE_COMMAND,
        "--log-level",
        args.log_level,
        "--log-format",
        args.log_format,
        "run",
        args.system,
        "--app",
        app,
        "--app-dir",
        os.path.abspath(args.app_dir),
        "--topic-prefix",
        args.topic_prefix,
        "--partitions",
        str(args.partitions),
        "--workers",
        str(args.workers),
        "--worker-index",
        str(index),
    ]
    for mode in args.mode:
        command += ["--mode", mode]
    if args.kafka_config:
        command += ["--kafka-config", os.path.abspath(args.kafka_config)]
    if args.no_relay:
        command.append("--no-relay")
    if args.relay_only:
        command.append("--relay-only")
    if args.at_least_once:
        command.append("--at-least-once")
    if args.metrics_port:
        command += ["--metrics-port", str(args.metrics_port), "--metrics-addr", args.metrics_addr]
    for item in args.relay_set:
        command += ["--relay-set", item]
    for item in args.upstream_url:
        command += ["--upstream-url", item]
    return command + dead_letter_argv(args)
