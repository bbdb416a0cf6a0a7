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
process that dies releases it with its connection.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def turn_key(follower: str) -> int:
    """The advisory lock key (a signed 64-bit int) of ``follower``'s turns."""
    digest = hashlib.blake2b(f"esbridge.turns:{follower}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class TakingTurns:
    """Whether a sink takes turns with other processes now, and the turn itself."""

    #: Seconds after the last collision during which batches take turns.
    QUIET = 5.0

    def __init__(
        self,
        datastore: Any,
        follower: str,
        quiet: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.datastore = datastore
        self.key = turn_key(follower)
        self.quiet = self.QUIET if quiet is None else quiet
        self._clock = clock
        self._until = 0.0
        #: Batches (runs of a batch) that held the lock, for tests and diagnostics.
        self.turns = 0

    def collided(self) -> None:
        """A write collided with another process's: take turns for the next ``quiet`` seconds."""
        self._until = self._clock() + self.quiet

    @property
    def contended(self) -> bool:
        """True while batches take turns (a collision less than ``quiet`` seconds ago)."""
        return self._clock() < self._until

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the follower's lock inside, when contended (else nothing)."""
        if self.datastore is None or not self.contended:
            yield
            return
        with self.datastore.get_connection() as conn:  # autocommit: the lock is the session's
            conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
            try:
                self.turns += 1
                yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
