"""Members of a consumer group that keep colliding on the same aggregates take turns.

Consumers of one follower in different processes (members of a group, each
owning some partitions) run their batches optimistically: each reads, runs
the policies and writes, and the aggregates' unique ``(id, version)``
constraint refuses the second of two writes of one version; that batch runs
again (:class:`~esbridge.processing.application_sink.ProcessApplicationSink`).
When many upstream keys write the same aggregates (counters, totals) nearly
every batch of one member collides with the other's, and a re-run costs a
whole batch: measured on ``bench/scale.py``'s shared workload, 10 to 17 of 22
batches ran again and two members did more work than one.

So after a collision a sink takes turns for ``quiet`` seconds: it holds a
Postgres advisory lock of the follower while it reads, runs the policies and
writes each batch. Members taking turns do not collide with each other, and
while one holds the lock the others poll Kafka and decode their next batch,
which is what a group can still do in parallel on shared aggregates. After
``quiet`` seconds without a collision the sink goes back to optimistic batches
(aligned workloads never collide, so never take turns).

The lock only orders writers; what keeps processing exactly-once is still the
version constraint and the compare-and-set of the tracking positions (a member
that does not take the lock is refused as before). The lock is session-level,
on a connection of the follower's own pool, always taken before the
follower's in-process ``processing_lock`` and never while holding it, and a
process that dies releases it with its connection. A member that is alive
but stuck (frozen, or a policy waiting on a slow call) keeps it: the others
wait at most ``wait`` seconds for their turn, then run the batch
optimistically, as without turns, so one stuck member never stops the group.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from psycopg.errors import LockNotAvailable

log = logging.getLogger("esbridge.processing")


def turn_key(follower: str) -> int:
    """The advisory lock key (a signed 64-bit int) of ``follower``'s turns."""
    digest = hashlib.blake2b(f"esbridge.turns:{follower}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class TakingTurns:
    """Whether a sink takes turns with other processes now, and the turn itself."""

    #: Seconds after the last collision during which batches take turns.
    QUIET = 5.0
    #: Longest wait for a turn (seconds); then the batch runs without one.
    WAIT = 10.0

    def __init__(
        self,
        datastore: Any,
        follower: str,
        quiet: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.datastore = datastore
        self.follower = follower
        self.key = turn_key(follower)
        self.quiet = self.QUIET if quiet is None else quiet
        self.wait = self.WAIT
        self._clock = clock
        self._until = 0.0
        #: Batches (runs of a batch) that held the lock, for tests and diagnostics.
        self.turns = 0
        #: Batches that waited ``wait`` seconds for a turn in vain and ran without one.
        self.missed = 0

    def collided(self) -> None:
        """A write collided with another process's: take turns for the next ``quiet`` seconds."""
        self._until = self._clock() + self.quiet

    @property
    def contended(self) -> bool:
        """True while batches take turns (a collision less than ``quiet`` seconds ago)."""
        return self._clock() < self._until

    @property
    def possible(self) -> bool:
        """Whether the follower's pool can hold a turn's connection besides the batch's own.

        With a pool of one connection (``POSTGRES_POOL_SIZE=1``,
        ``POSTGRES_MAX_OVERFLOW=0``) the turn would take the connection the batch
        then waits for: such a sink never takes turns.
        """
        pool = getattr(self.datastore, "pool", None)
        return self.datastore is not None and getattr(pool, "max_size", 2) >= 2

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the follower's lock inside, when contended (else nothing)."""
        if not self.contended or not self.possible:
            yield
            return
        with self.datastore.get_connection() as conn:
            if self._take(conn):
                try:
                    self.turns += 1
                    yield
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
                return
        yield  # no turn within ``wait``: as without turns

    def _take(self, conn: Any) -> bool:
        """Take the lock on ``conn``'s session, waiting up to ``wait`` s; False if not had."""
        try:
            # Session-level: held after this transaction, which only bounds the wait.
            with conn.transaction():
                timeout = f"{int(self.wait * 1000)}ms"
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (timeout,))
                conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
        except LockNotAvailable:
            self.missed += 1
            log.warning(
                "%s: another member held the turn for more than %.0f s (stuck?); "
                "running this batch without waiting for it",
                self.follower,
                self.wait,
            )
            return False
        return True
