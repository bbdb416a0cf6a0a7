"""Waking up when an application records new events.

``eventsourcing``'s Postgres recorder sends ``NOTIFY <events table>`` in every
transaction that inserts events; Postgres delivers it at commit. A
:class:`LogWaker` listens on that channel on its own connection, in a daemon
thread, and sets an event that a follower waits on with a timeout, so it
wakes within milliseconds of a commit and still polls now and then (a
notification can be missed while the listening connection reconnects, and
writers that bypass the recorder send none).

The library's own ``subscribe()`` stops for good when its listening
connection breaks; a relay must survive Postgres restarts, so the waker
reconnects with backoff instead.

Usage pattern (no lost wake-up): ``clear()``, read until caught up, then
``wait(timeout)``; a commit that lands after ``clear()`` sets the flag again.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
from eventsourcing.persistence import ApplicationRecorder
from psycopg import sql

log = logging.getLogger("esbridge.log_follower")


def listen_channel(recorder: ApplicationRecorder) -> str | None:
    """The NOTIFY channel of a Postgres application recorder, else ``None``."""
    return getattr(recorder, "channel_name", None)


def connection_kwargs(recorder: ApplicationRecorder) -> dict[str, Any] | None:
    """Connection settings of a Postgres recorder's pool, else ``None``."""
    datastore = getattr(recorder, "datastore", None)
    pool = getattr(datastore, "pool", None)
    kwargs = getattr(pool, "kwargs", None)
    if not isinstance(kwargs, dict):
        return None
    conninfo = getattr(pool, "conninfo", "") or ""
    result = {k: v for k, v in kwargs.items() if k != "row_factory"}
    if conninfo:
        result["conninfo"] = conninfo
    return result


class LogWaker:
    """Sets :attr:`event` when the recorder's channel is notified (LISTEN/NOTIFY)."""

    def __init__(self, recorder: ApplicationRecorder, name: str = "log-waker") -> None:
        self.event = threading.Event()
        self.channel = listen_channel(recorder)
        self._kwargs = connection_kwargs(recorder)
        self._stopped = threading.Event()
        self.connected = threading.Event()
        self._thread: threading.Thread | None = None
        if self.channel and self._kwargs is not None:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    @property
    def listening(self) -> bool:
        """True while a LISTEN connection is open (else the follower only polls)."""
        return self.connected.is_set()

    def clear(self) -> None:
        self.event.clear()

    def wait(self, timeout: float) -> bool:
        """Wait until notified or ``timeout`` seconds pass; True when notified."""
        return self.event.wait(timeout)

    def wake(self) -> None:
        """Wake the waiting follower (used by ``stop()``)."""
        self.event.set()

    def stop(self) -> None:
        self._stopped.set()
        self.event.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        assert self._kwargs is not None and self.channel is not None
        kwargs = dict(self._kwargs)
        conninfo = kwargs.pop("conninfo", "")
        delay = 0.2
        while not self._stopped.is_set():
            try:
                with psycopg.connect(
                    conninfo, autocommit=True, connect_timeout=5, **kwargs
                ) as conn:
                    conn.execute(sql.SQL("LISTEN {0}").format(sql.Identifier(self.channel)))
                    self.connected.set()
                    self.event.set()  # something may have been missed while disconnected
                    delay = 0.2
                    while not self._stopped.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self.event.set()
            except Exception as e:
                self.connected.clear()
                if self._stopped.is_set():
                    return
                log.warning(
                    "LISTEN %s: connection lost (%s: %s); polling until reconnected in %.1f s",
                    self.channel,
                    type(e).__name__,
                    e,
                    delay,
                )
                self._stopped.wait(delay)
                delay = min(delay * 2, 5.0)
        self.connected.clear()
