"""Waiting out a Postgres outage inside a consumer, without making it deaf to ``stop()``.

Every read and write of the consumer goes through :meth:`PostgresWait.retry`:
a restarting Postgres costs a pause, not a crash. Stopping meanwhile raises
:class:`~esbridge.consumer.batch_commit.Abandoned`, which ends the run quietly:
nothing of the batch was recorded, and the next start processes it.

An upstream log read over HTTP (:mod:`esbridge.eventlog.remote`) is waited
for the same way: when the log service stays down past the client's own
retries, the consumer holds (logging a warning) and goes on when it returns,
as it does for its own Postgres.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from esbridge.consumer.batch_commit import Abandoned
from esbridge.errors import PostgresUnavailableError, RemoteLogUnreachableError
from esbridge.runtime import gc_pause
from esbridge.runtime.postgres_retry import Diagnosis, retry_unreachable

logger = logging.getLogger("esbridge.consumer")


class PostgresWait:
    """Retries calls while Postgres (or an upstream log service) is unreachable, as ``what``."""

    def __init__(self, what: str, stop: threading.Event) -> None:
        self.what = what
        self.stop = stop

    def retry(self, call: Callable[[], Any]) -> Any:
        """``call()``, retried with backoff while Postgres is unreachable (for ever)."""
        return self.wait(self.what, call)

    def wait(
        self,
        what: str,
        call: Callable[[], Any],
        timeout: float | None = None,
        diagnose: Diagnosis | None = None,
    ) -> Any:
        """``call()``, retried while Postgres is unreachable, up to ``timeout`` (None: for ever)."""

        def sleep(delay: float) -> None:
            gc_pause.checkpoint()
            time.sleep(delay)

        started = time.monotonic()
        delay = 1.0
        while True:
            try:
                stopped = self.stop.is_set
                return retry_unreachable(
                    what, call, timeout=timeout, stopped=stopped, diagnose=diagnose, sleep=sleep
                )
            except PostgresUnavailableError as e:
                if self.stop.is_set():
                    raise Abandoned(str(e)) from e
                raise
            except RemoteLogUnreachableError as e:
                if self.stop.is_set():
                    raise Abandoned(str(e)) from e
                if timeout is not None and time.monotonic() - started >= timeout:
                    raise
                logger.warning("%s; holding (%s), retrying in %.0f s", e, what, delay)
                if self.stop.wait(delay):
                    raise Abandoned(str(e)) from e
                delay = min(delay * 2, 30.0)
