"""A SQL projection as a sink of esbridge's consumer loop.

Why: a projection fed from Kafka needs everything a process application fed
from Kafka needs (ordering per partition, duplicates skipped, gaps filled from
the upstream log, poison retried then parked, offsets kept only as hints), so
it is driven by the same :class:`~esbridge.consumer.adapter.ConsumerAdapter`
instead of a loop of its own. This module is the projection's side of that:
a :class:`~esbridge.processing.sink.BatchSink` whose positions live in the
projection's own database (``esbridge_projection_tracking``, one row per
tracking name) and whose batches are one transaction of that database: the
rows the handlers wrote, the dead letters, and the positions moved with a
compare-and-set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from eventsourcing.persistence import IntegrityError, OperationalError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from esbridge.processing.sink import StepFailed
from esbridge.processing.steps import Step
from esbridge_connectors import sql_tracking
from esbridge_connectors.sql_projection import (
    SqlProjection,
    is_transient,
    reset_projection,
    set_up_projection,
)
from esbridge_connectors.sql_tracking import Position, ProjectionConflictError

log = logging.getLogger("esbridge.connectors.projection")


class _FailedAtCommit(Exception):
    """The transaction failed after every handler ran (a flush, a constraint)."""


class ProjectionSink:
    """Applies the consumer's batches to ``projection`` in ``engine``, one transaction each.

    Steps that carry an event run its handler (events without one only move
    the position); parked steps go to the dead-letter table of the
    projection's database. A handler that raises is a
    :class:`~esbridge.processing.sink.StepFailed` (the consumer retries it,
    then parks it); a lost connection or a database that is down is an
    ``OperationalError`` (the consumer waits it out); a position moved by
    another runner is an ``IntegrityError`` (the consumer re-reads positions).
    ``skipped`` counts the messages parked without a position (not an esbridge
    payload, or foreign to the upstream log).
    """

    def __init__(
        self,
        projection: SqlProjection,
        engine: Engine,
        *,
        on_version_change: Literal["error", "rebuild"] = "error",
    ) -> None:
        self.projection = projection
        self.engine = engine
        self.on_version_change = on_version_change
        self.skipped = 0

    def setup(self, tracking_names: Sequence[str]) -> None:
        """Create the tables if missing; check the version stored under ``tracking_names``."""
        set_up_projection(self.engine, self.projection, tracking_names, self.on_version_change)

    def rebuild(self) -> None:
        """Empty the projection: tables recreated, positions and dead letters forgotten."""
        reset_projection(self.engine, self.projection)

    def position(self, tracking_name: str) -> int:
        with self.engine.connect() as conn:
            found = sql_tracking.read_position(conn, self.projection.name, tracking_name)
        return 0 if found is None else found.notification_id

    def apply(self, steps: Sequence[Step], expected: Mapping[str, int]) -> None:
        try:
            try:
                self._transaction(steps, expected, flush_each=False)
            except _FailedAtCommit:
                # Which step's rows broke it? Once more, flushing after each handler.
                self._transaction(steps, expected, flush_each=True)
        except ProjectionConflictError as e:
            raise IntegrityError(str(e)) from e
        skipped = [s for s in steps if s.dead_letter is not None and s.tracking is None]
        for step in skipped:
            assert step.dead_letter is not None
            log.error(
                "projection %s: skipped a message at %s[%s]@%s (%s: %s). No notification is "
                "lost by that: one it carried is found missing when the next message of its "
                "partition arrives. It is kept in the dead-letter table",
                self.projection.name,
                step.dead_letter.kafka_topic,
                step.dead_letter.kafka_partition,
                step.dead_letter.kafka_offset,
                step.dead_letter.reason,
                step.dead_letter.error,
            )
        self.skipped += len(skipped)

    def _transaction(
        self, steps: Sequence[Step], expected: Mapping[str, int], *, flush_each: bool
    ) -> None:
        targets: dict[str, int] = {}
        for step in steps:
            if step.tracking is not None:
                name = step.tracking.application_name
                targets[name] = max(targets.get(name, 0), step.tracking.notification_id)
        index = -1
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                conn = session.connection()
                for index, step in enumerate(steps):
                    if step.dead_letter is not None:
                        sql_tracking.park(conn, step.dead_letter)
                    elif step.event is not None:
                        self._handle(session, step.event, index)
                    if flush_each:
                        session.flush()
                index = -1
                for name, target in targets.items():
                    stored = expected.get(name, 0)
                    sql_tracking.advance(
                        conn,
                        self.projection.name,
                        name,
                        expected=Position(stored, self.projection.version) if stored else None,
                        notification_id=target,
                        version=self.projection.version,
                    )
        except (StepFailed, ProjectionConflictError):
            raise
        except Exception as e:
            if is_transient(e):
                raise OperationalError(f"projection {self.projection.name!r}: {e}") from e
            if index >= 0:  # a flush after step ``index``
                raise StepFailed(index, e) from e
            if flush_each:  # every step flushed: the commit itself failed
                raise
            raise _FailedAtCommit() from e

    def _handle(self, session: Session, event: Any, index: int) -> None:
        handler = self.projection.handler_for(type(event))
        if handler is None:
            return
        try:
            handler(session, event)
        except Exception as e:
            if is_transient(e):
                raise
            raise StepFailed(index, e) from e
