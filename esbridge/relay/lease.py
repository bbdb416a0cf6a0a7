"""One publishing relay per relay id: a lease held as a Postgres advisory lock.

Kafka's transactions keep a relay's output exactly once whatever else runs: a
relay that starts with the same ``transactional.id`` fences the one before it.
Fencing alone makes a poor story for availability, though: two relays started
for the same log (two replicas of a deployment, a second ``esbridge relay``
started by mistake) fence each other in turn, every restart of one stopping
the other with :class:`~esbridge.errors.RelayFencedError`.

So a relay first takes a session-level advisory lock on the application's own
Postgres database, keyed by its relay id, and publishes only while it holds
it. Other relays with the same id wait for the lock (*standby*); the first of
them gets it the moment the active relay's session ends: it stopped, crashed,
was killed with ``kill -9`` (its kernel closes the socket at once), or
Postgres restarted. It then starts as a restarted relay does:
``init_transactions`` aborts whatever the old one left open, and it resumes
from the committed position. The lease decides who works; exactly-once never
depends on it (a relay that lost its lease while stalled is still fenced by
Kafka when it wakes up).

Advisory locks need no write access (a relay needs none). They belong to one
server: relays that read the log from different servers (a replica) do not see
each other's lease, and fall back to fencing. The lease's connection asks the
server to probe it with TCP keepalives, so the lease of a relay whose machine
vanished without closing its connection is freed within about 30 seconds.

A relay that hangs keeps its process and its connection alive: keepalives
never free its lease. So the lease also *expires*: its session asks the server
to end it once it has been idle for ``expiry`` seconds
(``idle_session_timeout``, Postgres 14 and later), and the relay keeps it busy
with a ``SELECT 1`` from its own loop, every ``check_interval``. A relay whose
loop stops (frozen with SIGSTOP, a paused container, a deadlock) stops those
round trips; the server ends its session after ``expiry`` seconds, which frees
the lock for a standby. Nothing on the relay's side has to run for that.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import tuple_row

from esbridge.errors import ConfigurationError
from esbridge.names import lease_name

log = logging.getLogger("esbridge.relay_lease")

#: Longest wait in one ``pg_advisory_lock`` call (then the stop flag is checked).
WAIT_STEP = "1s"

#: The server probes an idle lease connection after 10 s, every 5 s, 3 times.
_SESSION_SETTINGS = (
    f"SET lock_timeout = '{WAIT_STEP}'; SET tcp_keepalives_idle = 10; "
    "SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
)
#: Longest silence of a lease holder before the server ends its session (see above).
#: Above the relay's 60 s Kafka commit and init timeouts, so that a slow broker alone
#: does not hand the lease over (that would be harmless, but pointless).
DEFAULT_EXPIRY = 90.0

_CLIENT_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def lease_key(relay_id: str) -> int:
    """The advisory lock key (a signed 64-bit int) of ``relay_id``."""
    digest = hashlib.blake2b(lease_name(relay_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


#: The session holding an advisory lock on a bigint key (Postgres shows it as two oids).
_HOLDER = (
    "SELECT a.application_name, a.client_addr::text, a.pid FROM pg_locks l "
    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
    "AND l.classid = ((%(key)s::bigint >> 32) & 4294967295)::oid "
    "AND l.objid = (%(key)s::bigint & 4294967295)::oid AND l.objsubid = 1"
)


def lease_holder(conn: psycopg.Connection[Any], relay_id: str) -> str | None:
    """Who holds ``relay_id``'s lease, or ``None`` when no relay does.

    The holder's ``application_name`` (a relay's is ``esbridge relay pid N on
    HOST``), its address, and its server process id, as far as the role of
    ``conn`` may see them.
    """
    cursor = conn.cursor(row_factory=tuple_row)
    row = cursor.execute(_HOLDER, {"key": lease_key(relay_id)}).fetchone()
    if row is None:
        return None
    name, address, pid = row
    where = f" at {address}" if address else ""
    return f"{name or 'a session'}{where} (server pid {pid})"


def check_expiry(check_interval: float, expiry: float | None) -> None:
    """Refuse an ``expiry`` that a relay checking every ``check_interval`` s could miss."""
    if expiry is not None and expiry <= 2 * check_interval:
        raise ConfigurationError(
            f"lease_expiry ({expiry} s) must be more than twice lease_check "
            f"({check_interval} s): a relay renews its lease every lease_check seconds, and "
            "a lease that expires between two renewals would pass from relay to relay"
        )


class RelayLease:
    """The advisory lock that lets one relay with ``relay_id`` publish at a time.

    ``connect_kwargs``: how to reach the application's database (the
    recorder's pool settings, see :func:`esbridge.eventlog.follower.connection_kwargs`).
    ``check_interval``: seconds between the round trips :meth:`check` makes
    to confirm the lease is still held (and to keep its session busy).
    ``expiry``: seconds without such a round trip after which the server ends
    the session, freeing the lease (``None``: never; must be more than twice
    ``check_interval``).
    """

    def __init__(
        self,
        relay_id: str,
        connect_kwargs: dict[str, Any],
        check_interval: float = 2.0,
        expiry: float | None = DEFAULT_EXPIRY,
    ) -> None:
        check_expiry(check_interval, expiry)
        self.relay_id = relay_id
        self.key = lease_key(relay_id)
        self.check_interval = check_interval
        self.expiry = expiry
        self._kwargs = dict(connect_kwargs)
        self._conn: psycopg.Connection[Any] | None = None
        self._held = False  # the lock was granted on self._conn
        self.waited = False  # the last acquire() waited for another holder
        self._checked = 0.0  # monotonic time of the last confirmation
        self.me = f"esbridge relay pid {os.getpid()} on {socket.gethostname()}"[:63]

    @property
    def held(self) -> bool:
        """True after :meth:`acquire` succeeded, until the lease is released or found lost."""
        return self._held

    def acquire(self, stopped: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until this relay holds the lease; False if ``stopped()`` or ``timeout`` first.

        Postgres being unreachable is waited out (with a log line), like the
        relay's other reads of the database.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting_logged = False
        delay = 0.2
        while not stopped():
            if deadline is not None and time.monotonic() > deadline:
                return False
            try:
                conn = self._connection()
                conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
            except pg_errors.LockNotAvailable:
                if not waiting_logged:
                    log.info(
                        "relay %s is standing by: %s publishes this log; this one takes over "
                        "when it stops",
                        self.relay_id,
                        self.holder() or "another relay",
                    )
                    waiting_logged = True
                continue
            except psycopg.Error as e:
                self._close()
                log.warning(
                    "relay %s: cannot take its lease in Postgres (%s: %s); retrying in %.1f s",
                    self.relay_id,
                    type(e).__name__,
                    " ".join(str(e).split()),
                    delay,
                )
                _sleep_unless(stopped, delay)
                delay = min(delay * 2, 5.0)
                continue
            self._held = True
            self._checked = time.monotonic()
            self.waited = waiting_logged
            if waiting_logged:
                log.info("relay %s took over: it holds the lease now", self.relay_id)
            return True
        return False

    def check(self, now: bool = False) -> bool:
        """Whether the lease is still held (a round trip at most every ``check_interval`` s).

        ``now``: make the round trip whatever the interval. A lost connection
        means a lost lease (the server released the lock with the session).
        """
        if not self.held:
            return False
        if not now and time.monotonic() - self._checked < self.check_interval:
            return True
        try:
            assert self._conn is not None
            self._conn.execute("SELECT 1")
        except psycopg.Error as e:
            log.warning(
                "relay %s lost its lease (%s: %s): it stops publishing",
                self.relay_id,
                type(e).__name__,
                " ".join(str(e).split()),
            )
            self._close()
            return False
        self._checked = time.monotonic()
        return True

    def release(self) -> None:
        """Give the lease up (closing the session releases the lock)."""
        self._close()

    def holder(self) -> str | None:
        """Who holds the lease (see :func:`lease_holder`); ``None`` if that cannot be read."""
        try:
            return lease_holder(self._connection(), self.relay_id)
        except psycopg.Error:
            return None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            kwargs = {k: v for k, v in self._kwargs.items() if k != "conninfo"}
            kwargs.update(_CLIENT_KEEPALIVES)
            conn = psycopg.connect(
                self._kwargs.get("conninfo", ""),
                autocommit=True,
                connect_timeout=5,
                application_name=self.me,
                **kwargs,
            )
            conn.execute(_SESSION_SETTINGS)
            self._set_expiry(conn)
            self._conn = conn
            self._held = False  # a new session holds nothing yet
        return self._conn

    def _set_expiry(self, conn: psycopg.Connection[Any]) -> None:
        """Ask the server to end this session after ``expiry`` idle seconds (if it can)."""
        if self.expiry is None:
            return
        if conn.info.server_version < 140000:
            log.warning(
                "relay %s: Postgres %s cannot expire its lease (idle_session_timeout needs "
                "Postgres 14): a relay that hangs keeps the lease until it is killed",
                self.relay_id,
                conn.info.server_version,
            )
            return
        milliseconds = max(1, round(self.expiry * 1000))
        conn.execute(f"SET idle_session_timeout = {milliseconds}")

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        self._held = False
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # closing a broken connection
                conn.close()


def _sleep_unless(stopped: Callable[[], bool], seconds: float) -> None:
    """Sleep ``seconds``, returning early (within 0.1 s) once ``stopped()`` is true."""
    deadline = time.monotonic() + seconds
    while not stopped() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
