"""What every ``esbridge`` subcommand module shares when it registers itself."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from esbridge.errors import ConfigurationError


def add_command(subparsers: Any, name: str, help: str, doc: str | None) -> argparse.ArgumentParser:
    """Add subcommand ``name``: ``help`` in the command list, the module's ``doc`` as ``--help``.

    The module docstring is shown as written (its line breaks and examples kept).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def add_app_dir(parser: argparse.ArgumentParser) -> None:
    """The ``--app-dir`` option of every command that imports the user's code.

    A console script, unlike ``python -m``, does not put the current directory
    on the Python path: without this, ``esbridge relay myapp:Shop`` run in the
    project's directory could not import ``myapp``.
    """
    parser.add_argument(
        "--app-dir",
        default=".",
        help="directory put first on the Python path, to import your code from (default: .)",
    )


def add_metrics_options(parser: argparse.ArgumentParser, port_help: str) -> None:
    """``--metrics-port`` and ``--metrics-addr``, the same for every long-running command.

    The address defaults to loopback; a Prometheus server on another host (or
    pod) needs ``--metrics-addr 0.0.0.0`` or the address of an interface.
    """
    parser.add_argument("--metrics-port", type=int, help=port_help)
    parser.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        help="address the metrics endpoint listens on (default 127.0.0.1)",
    )


def add_connect_timeout(parser: argparse.ArgumentParser) -> None:
    """``--connect-timeout``: how long a long-running command waits for its servers at start."""
    parser.add_argument(
        "--connect-timeout",
        type=float,
        help="seconds to wait for an unreachable Postgres or broker at start-up "
        "(default: for ever, logging each retry)",
    )


def missing_extra(extra: str, command: str, error: ModuleNotFoundError) -> ConfigurationError:
    """The error for ``command`` run without the optional ``extra`` it imports.

    Optional extras are imported only by the commands that use them, so that
    ``pip install esbridge`` gives a working core; this says what to install.
    """
    return ConfigurationError(
        f"{command} needs the optional {extra!r} extra ({error}): pip install 'esbridge[{extra}]'"
    )


def use_app_dir(app_dir: str) -> None:
    """Put ``app_dir`` (made absolute) first on the Python path, once."""
    app_dir = os.path.abspath(app_dir)
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)


def load_class(path: str, app_dir: str = ".") -> Any:
    """``package.module:Class`` -> the class (``app_dir`` is put on the Python path)."""
    from eventsourcing.utils import resolve_topic

    use_app_dir(app_dir)
    try:
        return resolve_topic(path)
    except Exception as e:
        raise ConfigurationError(
            f"cannot import {path!r} ({type(e).__name__}: {e}): write it as "
            "package.module:Class and check --app-dir"
        ) from e
