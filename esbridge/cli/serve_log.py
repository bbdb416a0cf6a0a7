"""``esbridge serve-log APP... --bind HOST:PORT --token-file FILE``: serve notification logs.

Each APP (``package.module:Class``, or the application's name) is served
read-only at ``/v1/{name}/...`` (docs/remote-log.md), read with the
``POSTGRES_*`` settings (``{NAME}_POSTGRES_*`` win), so that followers in other
services read it over HTTP instead of with this database's credentials. The
token file has one ``TOKEN APP[,APP...]`` line per token (``*``: every
application; ``#`` comments); list the new token beside the old one to rotate.
``--certfile``/``--keyfile`` serve HTTPS. SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from esbridge.cli.common import add_app_dir, add_command, application_name, missing_extra
from esbridge.errors import ConfigurationError


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "serve-log", "serve applications' notification logs over HTTP", __doc__
    )
    parser.add_argument(
        "apps", nargs="+", help="application classes (package.module:Class) or names"
    )
    parser.add_argument("--bind", default="127.0.0.1:8470", help="HOST:PORT (default %(default)s)")
    parser.add_argument(
        "--token-file", required=True, help="lines 'TOKEN APP[,APP...]' ('*': every application)"
    )
    parser.add_argument("--certfile", help="TLS certificate (PEM); with --keyfile: HTTPS")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    parser.add_argument(
        "--max-limit", type=int, default=1000, help="most notifications a page (default 1000)"
    )
    add_app_dir(parser)
    parser.set_defaults(func=serve_log)


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port)."""
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"--bind {bind!r}: give HOST:PORT, e.g. 127.0.0.1:8470")
    return host.strip("[]"), int(port)


def serve_log(args: argparse.Namespace) -> int:
    try:
        from esbridge_connectors.log_service import NotificationLogService, TokenTable, serve
    except ModuleNotFoundError as e:
        raise missing_extra("connectors", "esbridge serve-log", e) from e
    from esbridge.eventlog.notification_log import close_recorder, open_recorder

    host, port = parse_bind(args.bind)
    tokens = TokenTable.from_file(args.token_file)
    env = dict(os.environ)
    names = [application_name(app, args.app_dir) for app in args.apps]
    logs = {name: open_recorder(name, env) for name in names}
    try:
        service = NotificationLogService(logs, tokens, max_limit=args.max_limit)
        started = serve(service, host, port, certfile=args.certfile, keyfile=args.keyfile)
    finally:
        for recorder in logs.values():
            close_recorder(recorder)
    return 0 if started else 3
