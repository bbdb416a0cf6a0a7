"""``--upstream-url``: the commands that read an upstream log read it over HTTP when given.

``consume``, ``status`` and ``replay`` read an upstream application's
notification log; by default from its database, with ``--upstream-url`` (or
``UPSTREAM_LOG_URL``) from its ``esbridge serve-log``, signed in with
``UPSTREAM_LOG_TOKEN`` (a token is never an option: command lines show in
``ps``) and trusting ``UPSTREAM_LOG_CA_FILE``. One option, one resolution
(:class:`~esbridge.eventlog.remote.RemoteLogSettings`), so that the same
command line and environment mean the same service for every command.
"""

from __future__ import annotations

import argparse
import os

from esbridge.eventlog.remote import (
    CA_VARIABLE,
    TOKEN_VARIABLE,
    URL_VARIABLE,
    RemoteLogSettings,
)


def add_upstream_url(parser: argparse.ArgumentParser, reads: str) -> None:
    """Add ``--upstream-url``; ``reads``: what the command reads from the log, for its help."""
    parser.add_argument(
        "--upstream-url",
        default=None,
        metavar="URL",
        help=f"read {reads} over HTTP from the esbridge serve-log at URL instead of the "
        f"database (token: {TOKEN_VARIABLE}, CA file: {CA_VARIABLE}); default ${URL_VARIABLE}",
    )


def upstream_log_settings(args: argparse.Namespace) -> RemoteLogSettings | None:
    """The log service given by ``--upstream-url`` or the environment (None: read the database)."""
    return RemoteLogSettings.resolve(args.upstream_url, os.environ)
