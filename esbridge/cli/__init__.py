"""The ``esbridge`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``; the module list below is the whole CLI.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from esbridge.cli.common import Parser
from esbridge.errors import EsbridgeError, RemoteLogUnreachableError

SUBCOMMAND_MODULES = (
    "esbridge.cli.relay",
    "esbridge.cli.consume",
    "esbridge.cli.dlq",
    "esbridge.cli.run",
    "esbridge.cli.status",
    "esbridge.cli.demo",
    "esbridge.cli.replay",
    "esbridge.cli.serve_log",
    "esbridge.cli.dev_servers",
    "esbridge.cli.dashboard",
    "esbridge.cli.acls",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand registered."""
    parser = Parser(
        prog="esbridge",
        description="Bridge event-sourced applications (eventsourcing, PostgreSQL) and Kafka, "
        "exactly once.",
        epilog="'esbridge COMMAND --help' gives a command's options. Kafka settings come from "
        "KAFKA_* variables (KAFKA_BOOTSTRAP_SERVERS=... is bootstrap.servers), Postgres "
        "settings from the eventsourcing library's POSTGRES_* variables.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="log line format"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # subcommand not shipped in this build
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``esbridge`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from esbridge.runtime.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS
    from esbridge.runtime.signals import interruption

    try:
        code = int(args.func(args) or 0)
    except EsbridgeError as e:
        if (interrupted := interruption()) is not None:
            return interrupted.exit_code  # what the wait raised on its way out is no news
        logging.getLogger("esbridge").error("%s: %s", type(e).__name__, e)
        print(f"esbridge: error: {e}", file=sys.stderr)
        # A log service that does not answer, as an unreachable Postgres below: try again.
        return 1 if isinstance(e, RemoteLogUnreachableError) else 2
    except TRANSIENT_ERRORS as e:  # one-shot commands (status, dlq) do not wait for Postgres
        logging.getLogger("esbridge").error("%s: %s", type(e).__name__, e)
        print(
            f"esbridge: error: Postgres unreachable ({e}); check the POSTGRES_* settings "
            "(host, port) and that the server runs, then try again",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    interrupted = interruption()
    return code if interrupted is None else interrupted.exit_code


if __name__ == "__main__":
    sys.exit(main())
