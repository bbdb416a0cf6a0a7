"""Waiting for Postgres when it is unreachable, instead of failing.

Why: Postgres restarts (upgrades, fail-overs, a crashed server coming back)
are routine for a long-running relay or consumer, and a process that starts
while the database is down must not exit with a traceback that only a
supervisor can mend. Only the driver's connection errors are retried (the
library's ``OperationalError`` and ``InterfaceError``, which psycopg raises
for a refused or lost connection); anything else — a missing table, a wrong
password, a policy error — is not the database's absence and goes up at once.

Each retry logs a warning that names what was being done and the error, so
a wrong host or port is visible in the logs; ``timeout`` turns waiting into
a :class:`PostgresUnavailableError` that says what to check.

The library's connection pool reports every failure to connect alike
("couldn't get a connection after 30.00 sec"), whether the server is down
or refused the credentials. :func:`connection_diagnosis` connects once
directly to learn which: a server that answers "password authentication
failed" or "database ... does not exist" is up and the settings are wrong,
which waiting cannot mend, so that is a :class:`ConfigurationError` at once.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from eventsourcing.persistence import InterfaceError, OperationalError
from eventsourcing.utils import Environment

from esbridge.errors import ConfigurationError, PostgresUnavailableError
from esbridge.runtime.postgres_privileges import privilege_advice
from esbridge.runtime.signals import waiting_for

log = logging.getLogger("esbridge.postgres")

T = TypeVar("T")

TRANSIENT_ERRORS = (OperationalError, InterfaceError)
"""Database errors that are not the message's fault: retry, never park."""

#: What a server that is up says when the settings are wrong (waiting cannot help).
REFUSALS = (
    "does not exist",  # database or role
    "authentication failed",
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "no password supplied",
    "permission denied for database",  # no CONNECT privilege
)

Diagnosis = Callable[[], "str | None"]


def retry_unreachable(
    what: str,
    call: Callable[[], T],
    *,
    timeout: float | None = None,
    stopped: Callable[[], bool] | None = None,
    diagnose: Diagnosis | None = None,
    max_delay: float = 5.0,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """``call()``, retried with backoff (0.2 s doubling to ``max_delay``) while Postgres is down.

    A connection error that is a refusal by a server that is up (a wrong
    password, no CONNECT privilege: see :data:`REFUSALS`) is a
    :class:`ConfigurationError` at once, never retried.

    ``timeout=None`` waits for ever. Raises :class:`PostgresUnavailableError`
    when ``timeout`` seconds have passed or ``stopped()`` returns true.
    ``diagnose`` (see :func:`connection_diagnosis`) runs before the first
    attempt (settings the server refuses are reported at once, not after the
    pool's connect timeout) and after each failure: it raises
    :class:`ConfigurationError` when the server refuses the settings, or
    returns the real reason to log.

    While it waits, SIGINT or SIGTERM end an ``esbridge`` command at once
    (:func:`esbridge.runtime.signals.waiting_for`).
    """
    start = time.monotonic()
    delay = 0.2
    with contextlib.ExitStack() as marked:
        # Marked from the first sign that Postgres is down, not while it answers.
        down = diagnose is not None and diagnose() is not None
        if down:
            marked.enter_context(waiting_for(f"Postgres ({what})"))
        while True:
            try:
                return call()
            except TRANSIENT_ERRORS as e:
                message = " ".join(str(e).split())
                if any(refusal in message for refusal in REFUSALS):
                    # The server answered and refused: waiting cannot mend it.
                    raise ConfigurationError(refusal_message(what, message, None)) from e
                if not down:
                    down = True
                    marked.enter_context(waiting_for(f"Postgres ({what})"))
                reason = diagnose() if diagnose is not None else None
                detail = f"{e} ({reason})" if reason else str(e)
                waited = time.monotonic() - start
                if stopped is not None and stopped():
                    raise PostgresUnavailableError(
                        f"stopped while Postgres was unreachable ({what}): {detail}",
                        operation=what,
                        waited=waited,
                    ) from e
                if timeout is not None and waited >= timeout:
                    raise PostgresUnavailableError(
                        f"Postgres stayed unreachable for {waited:.0f} s ({what}): {detail}. "
                        "Check the POSTGRES_* settings (host, port) and that the server runs",
                        operation=what,
                        waited=waited,
                    ) from e
                log.warning(
                    "Postgres unreachable (%s: %s); retrying in %.1f s", what, detail, delay
                )
                sleep(delay)
                delay = min(delay * 2, max_delay)


def refusal_message(who: str, message: str, user: str | None) -> str:
    """What to do about Postgres refusing the connection of ``who`` (``message``, the driver's).

    ``user`` None: the role is read from the message where it names it.
    """
    if user is None and (named := re.search(r'for user "([^"]+)"', message)):
        user = named[1]
    if "password authentication failed" in message:
        return (
            f"Postgres rejected the password of user {user!r} ({who}): {message}. "
            "Check POSTGRES_PASSWORD"
        )
    advice = privilege_advice(message, user)
    if advice is not None:
        return f"Postgres refused {who}: {message}. {advice}"
    return (
        f"Postgres refused the settings of {who}: {message}. "
        "Check its POSTGRES_* settings (dbname, user, password)"
    )


def connection_diagnosis(name: str, env: Mapping[str, str]) -> Diagnosis:
    """A ``diagnose`` for :func:`retry_unreachable`: why application ``name`` cannot connect.

    Reads the ``POSTGRES_*`` settings as the library does (``{NAME}_POSTGRES_*``
    first). Its result connects once, directly (not through a pool), and raises
    :class:`ConfigurationError` when the server refuses the settings; returns
    the driver's message when it cannot connect otherwise (server down), and
    ``None`` when it can (or the application is not persisted with
    ``eventsourcing.postgres`` and plain ``POSTGRES_*`` settings).
    """
    environment = Environment(name, env)

    def diagnose() -> str | None:
        import psycopg
        import psycopg.conninfo

        params = {
            key: environment.get(f"POSTGRES_{key.upper()}")
            for key in ("dbname", "host", "port", "user", "password")
        }
        postgres = "postgres" in (environment.get("PERSISTENCE_MODULE") or "")
        if not postgres or not params["dbname"] or not params["host"]:
            return None
        if environment.get("POSTGRES_GET_PASSWORD_TOPIC"):
            params.pop("password")  # a function supplies it: connect through the pool only
        try:
            given = {key: value for key, value in params.items() if value}
            conninfo = psycopg.conninfo.make_conninfo("", connect_timeout=5, **given)
            psycopg.connect(conninfo).close()
        except psycopg.OperationalError as e:
            message = " ".join(str(e).split())
            if any(refusal in message for refusal in REFUSALS):
                who = f"application {name!r}"
                raise ConfigurationError(refusal_message(who, message, params["user"])) from e
            return message
        return None

    return diagnose
