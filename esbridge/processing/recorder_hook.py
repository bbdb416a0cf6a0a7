"""The one place that touches the ``eventsourcing`` library's internals: the recorder hook.

The write path reuses the library's recorder (``Application._record`` →
``EventStore.put`` → ``PostgresProcessRecorder.insert_events``: table lock,
NOTIFY, one transaction). esbridge extends the recorder's ``_insert_events``
hook so the same transaction also writes (a) the tracking records of several
names with a compare-and-set on the expected previous position, which keeps a
zombie consumer (one that lost its partition in a rebalance but still runs)
from recording a batch twice, (b) dead letters and (c) replay marks. Keeping
this in one module means one file to check when the library changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eventsourcing.persistence import IntegrityError, Tracking
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresProcessRecorder
from eventsourcing.system import Follower
from psycopg.sql import SQL, Identifier

from esbridge.deadletters.store import DeadLetter, DeadLetterStore
from esbridge.errors import ConfigurationError
from esbridge.processing.pg_binary import use_binary_stored_events
from esbridge.runtime.persistence import require_postgres_app
from esbridge.runtime.tracing import (
    TraceContext,
    current_trace_context,
    require_tracing,
    trace_table_name,
)

WRITE_KWARG = "esbridge_write"
"""The keyword that carries esbridge's extra writes through ``EventStore.put``."""

TRACE_KWARG = "esbridge_traces"
"""The keyword that carries each new event's trace context (a list parallel to the events)."""


@dataclass
class EsbridgeWrite:
    """The extra writes that ride in the recorder's transaction."""

    trackings: list[tuple[Tracking, int]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    replayed: list[int] = field(default_factory=list)
    store: DeadLetterStore | None = None

    def execute(self, recorder: Any, curs: Any) -> None:
        table = SQL("{0}.{1}").format(
            Identifier(recorder.datastore.schema or "public"),
            Identifier(recorder.tracking_table_name),
        )
        statement = SQL(
            "INSERT INTO {0} AS t (application_name, notification_id) VALUES (%s, %s) "
            "ON CONFLICT (application_name) "
            "DO UPDATE SET notification_id = EXCLUDED.notification_id "
            "WHERE t.notification_id = %s RETURNING notification_id"
        ).format(table)
        for tracking, expected in self.trackings:
            curs.execute(
                statement,
                (tracking.application_name, tracking.notification_id, expected),
                prepare=True,
            )
            if curs.fetchone() is None:
                raise IntegrityError(
                    f"tracking position of {tracking.application_name!r} is no longer "
                    f"{expected}: another consumer recorded it first"
                )
        if self.store is not None:
            if self.dead_letters:
                self.store.insert(curs, self.dead_letters)
            if self.replayed:
                self.store.mark_replayed(curs, self.replayed)


class _RecorderHook:
    """Mixed into the follower's ``PostgresProcessRecorder`` class (see module docstring)."""

    def _insert_events(self, curs: Any, stored_events: Any, **kwargs: Any) -> None:
        write = kwargs.get(WRITE_KWARG)
        if write is not None:
            write.execute(self, curs)
        super()._insert_events(curs, stored_events, **kwargs)  # type: ignore[misc]

    def _insert_stored_events(self, curs: Any, stored_events: Any, **kwargs: Any) -> None:
        # The library's statement and values; the array parameter travels in binary.
        use_binary_stored_events(self, curs, stored_events)
        super()._insert_stored_events(curs, stored_events, **kwargs)  # type: ignore[misc]


class _TraceCapture:
    """Mixed into the recorder class of an application that records trace context."""

    _esbridge_trace_insert: Any

    def _fetch_ids_after_insert_events(self, curs: Any, stored_events: Any, **kwargs: Any) -> Any:
        ids = super()._fetch_ids_after_insert_events(curs, stored_events, **kwargs)  # type: ignore[misc]
        if not ids:
            return ids
        traces: list[TraceContext | None] | None = kwargs.get(TRACE_KWARG)
        if traces is None or len(traces) != len(ids):
            current = current_trace_context()
            if current is None:
                return ids
            traces = [current] * len(ids)
        nids, parents, states = [], [], []
        for nid, found in zip(ids, traces, strict=True):
            if found is not None:
                nids.append(nid)
                parents.append(found[0])
                states.append(found[1])
        if nids:
            curs.execute(self._esbridge_trace_insert, (nids, parents, states), prepare=True)
        return ids


def record_trace_context(app: Any) -> None:
    """Record the current trace context with every event ``app`` saves from now on.

    Why: the relay that publishes the events runs later, in another process;
    the context must be in Postgres for it to put on the Kafka messages
    (docs/tracing.md). Call it once after constructing the application, in
    every process that saves its events (command handlers, webhook intake,
    and the consumers of a follower whose own events should stay traced).

    Creates the side table if needed. Idempotent. Refuses applications that
    do not record in Postgres, and ``POSTGRES_ENABLE_DB_FUNCTIONS=y`` (the
    library's insert function returns no ids to attach the context to).
    """
    require_tracing()
    recorder = app.recorder
    if isinstance(recorder, _TraceCapture):
        return
    require_postgres_app(app)
    if not isinstance(recorder, PostgresApplicationRecorder):
        raise ConfigurationError(
            f"application {app.name!r} has no Postgres application recorder "
            f"({type(recorder).__name__}): it has no notification log to trace"
        )
    datastore = recorder.datastore
    if datastore.enable_db_functions:
        raise ConfigurationError(
            f"application {app.name!r} has POSTGRES_ENABLE_DB_FUNCTIONS=y: trace context "
            "cannot be recorded with it; unset it (or set it to 'n')"
        )
    table = SQL("{0}.{1}").format(
        Identifier(datastore.schema or "public"),
        Identifier(trace_table_name(recorder.events_table_name)),
    )
    with datastore.get_connection() as conn, conn.cursor() as curs:
        curs.execute(
            SQL(
                "CREATE TABLE IF NOT EXISTS {0} (notification_id bigint PRIMARY KEY, "
                "traceparent text NOT NULL, tracestate text)"
            ).format(table)
        )
    recorder._esbridge_trace_insert = SQL(  # type: ignore[attr-defined]
        "INSERT INTO {0} (notification_id, traceparent, tracestate) "
        "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[])"
    ).format(table)
    recorder.__class__ = _hooked(type(recorder), _TraceCapture, "Traced")


def captures_traces(recorder: Any) -> bool:
    """True when ``recorder`` records trace context (:func:`record_trace_context`)."""
    return isinstance(recorder, _TraceCapture)


_hooked_classes: dict[tuple[type, type], type] = {}


def _hooked(cls: type, mixin: type, prefix: str) -> type:
    """``cls`` with ``mixin`` in front (one class per pair, so instances share it)."""
    hooked = _hooked_classes.get((cls, mixin))
    if hooked is None:
        hooked = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
        _hooked_classes[(cls, mixin)] = hooked
    return hooked


def install_recorder_hook(follower: Follower[Any]) -> None:
    """Let the follower's recorder write esbridge's extras in its transactions.

    Refuses configurations where tracking records could be lost or are not
    single-row (compare-and-set needs one row per name).
    """
    recorder = follower.recorder
    if isinstance(recorder, _RecorderHook):
        return
    require_postgres_app(follower)
    if not isinstance(recorder, PostgresProcessRecorder):
        raise ConfigurationError(
            f"follower {follower.name!r} has no Postgres process recorder "
            f"({type(recorder).__name__}): it has no tracking records to consume into"
        )
    datastore = recorder.datastore
    if datastore.enable_db_functions:
        raise ConfigurationError(
            f"follower {follower.name!r} has POSTGRES_ENABLE_DB_FUNCTIONS=y, with which "
            "eventsourcing 9.5.6 silently drops tracking records: unset it (or set it to 'n') "
            "for applications that esbridge feeds"
        )
    if not datastore.single_row_tracking:
        raise ConfigurationError(
            f"follower {follower.name!r} uses legacy multi-row tracking "
            "(SINGLE_ROW_TRACKING=n): esbridge needs the default single-row tracking table"
        )
    recorder.__class__ = _hooked(type(recorder), _RecorderHook, "Esbridge")
