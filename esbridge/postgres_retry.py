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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from eventsourcing.persistence import InterfaceError, OperationalError

from esbridge.errors import PostgresUnavailableError

log = logging.getLogger("esbridge.postgres")

T = TypeVar("T")

TRANSIENT_ERRORS = (OperationalError, InterfaceError)
"""Database errors that are not the message's fault: retry, never park."""


def retry_unreachable(
    what: str,
    call: Callable[[], T],
    *,
    timeout: float | None = None,
    stopped: Callable[[], bool] | None = None,
    max_delay: float = 5.0,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """``call()``, retried with backoff (0.2 s doubling to ``max_delay``) while Postgres is down.

    ``timeout=None`` waits for ever. Raises :class:`PostgresUnavailableError`
    when ``timeout`` seconds have passed or ``stopped()`` returns true.
    """
    start = time.monotonic()
    delay = 0.2
    while True:
        try:
            return call()
        except TRANSIENT_ERRORS as e:
            waited = time.monotonic() - start
            if stopped is not None and stopped():
                raise PostgresUnavailableError(
                    f"stopped while Postgres was unreachable ({what}): {e}"
                ) from e
            if timeout is not None and waited >= timeout:
                raise PostgresUnavailableError(
                    f"Postgres stayed unreachable for {waited:.0f} s ({what}): {e}. Check the "
                    "POSTGRES_* settings (host, port) and that the server runs"
                ) from e
            log.warning("Postgres unreachable (%s: %s); retrying in %.1f s", what, e, delay)
            sleep(delay)
            delay = min(delay * 2, max_delay)
