"""esbridge dev-servers: a PostgreSQL and a Kafka broker for trying esbridge by hand.

Starts a PostgreSQL server (with a database named esbridge) and an Apache
Kafka broker (KRaft, transactions enabled), both listening on 127.0.0.1 only,
and prints the variables that point esbridge and your applications at them:

    export PERSISTENCE_MODULE=eventsourcing.postgres
    export POSTGRES_HOST=127.0.0.1
    export POSTGRES_PORT=...              (and POSTGRES_USER, _PASSWORD, _DBNAME)
    export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:...

Leave it running in a terminal of its own. In another terminal, load the
variables (start it with --env-file dev.env, then run `. ./dev.env`) and use
esbridge run, esbridge status and the other commands. Ctrl-C (or SIGTERM)
stops both servers and removes their files (--keep keeps them, for the
servers' logs) and the env file.

The servers come from esbridge's test harness: local processes by default
(PostgreSQL server binaries, Java 17+ and the Apache Kafka jars, which
`python -m esbridge.testing.provision` fetches), or containers with
--backend containers (Docker or podman, and pip install 'esbridge[containers]').
They are for development: a fixed password, data in temporary directories.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from esbridge.cli.common import add_command
from esbridge.runtime.signals import STOP_SIGNALS
from esbridge.testing.processes import interrupt

#: Seconds between two checks that both servers still accept connections.
CHECK_INTERVAL = 1.0


class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: stop the servers (raised in the main thread)."""


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "dev-servers",
        "start a local PostgreSQL and Kafka for trying esbridge (Ctrl-C stops them)",
        __doc__,
    )
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="also write the export lines to PATH (removed again when the servers stop)",
    )
    parser.add_argument(
        "--postgres-port",
        type=int,
        metavar="PORT",
        help="PostgreSQL's port on 127.0.0.1 (default: a free port)",
    )
    parser.add_argument(
        "--kafka-port",
        type=int,
        metavar="PORT",
        help="Kafka's port on 127.0.0.1 (default: a free port)",
    )
    parser.add_argument(
        "--backend",
        choices=["local", "containers"],
        default="local",
        help="local processes (default), or containers through Docker or podman",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the servers' files (data and logs) when they stop (local backend)",
    )
    parser.set_defaults(func=dev_servers)


def say(line: str) -> None:
    print(f"esbridge dev-servers: {line}", file=sys.stderr, flush=True)


def stop_on_signals() -> dict[signal.Signals, Any]:
    """Make SIGINT and SIGTERM raise :class:`StopRequested` in the main thread, once.

    Raising (rather than setting a flag, as the long-running commands do)
    interrupts any start-up wait at once (only the creation of a child
    process is let finish, see esbridge.testing.processes.spawning); the
    servers started so far are then stopped by the caller. Later signals
    are ignored, so that a second Ctrl-C cannot cut that clean-up short and
    leave a server behind.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        interrupt(StopRequested(signal.Signals(signum).name))

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    return previous


def dev_servers(args: argparse.Namespace) -> int:
    from esbridge.errors import HarnessError
    from esbridge.testing.dev_servers import (
        DevServers,
        check_env_file,
        check_options,
        export_lines,
        remove_env_file,
        start_dev_servers,
        write_env_file,
    )

    check_options(args.backend, args.postgres_port, args.kafka_port, args.keep)
    env_file = Path(args.env_file) if args.env_file else None
    if env_file is not None:
        check_env_file(env_file)
    previous_handlers = stop_on_signals()
    servers: DevServers | None = None
    try:
        where = "local processes" if args.backend == "local" else "containers"
        say(f"starting PostgreSQL and Kafka ({where}, listening on 127.0.0.1 only)")
        servers = start_dev_servers(args.backend, args.postgres_port, args.kafka_port)
        for line in servers.describe():
            say(line)
        print(export_lines(servers.env), end="", flush=True)
        if env_file is not None:
            write_env_file(env_file, servers.env)
            source = env_file if env_file.is_absolute() else f"./{env_file}"  # not from PATH
            say(f"wrote these lines to {env_file}; load them in a shell with: . {source}")
        say("ready; Ctrl-C to stop")
        while True:
            time.sleep(CHECK_INTERVAL)
            stopped = servers.stopped()
            if stopped is not None:
                raise HarnessError(f"{stopped}\nstopping the other server too")
    except StopRequested as e:
        if servers is None:
            say(f"{e}: interrupted while starting; everything started was stopped and removed")
            return 130
        say(f"{e}: stopping")
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        try:
            if env_file is not None:
                remove_env_file(env_file)
            if servers is not None:
                kept = servers.close(keep=args.keep)
                say(f"stopped; files kept in {', '.join(kept)}" if kept else "stopped")
        finally:
            for sig, previous in previous_handlers.items():
                signal.signal(sig, previous)
    return 0
