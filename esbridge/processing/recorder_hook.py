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
from eventsourcing.postgres import PostgresProcessRecorder
from eventsourcing.system import Follower
from psycopg.sql import SQL, Identifier

from esbridge.deadletters.store import DeadLetter, DeadLetterStore
from esbridge.errors import ConfigurationError
from esbridge.processing.pg_binary import use_binary_stored_events
from esbridge.runtime.persistence import require_postgres_app

WRITE_KWARG = "esbridge_write"
"""The keyword that carries esbridge's extra writes through ``EventStore.put``."""


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


_hooked_classes: dict[type, type] = {}


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
    cls = type(recorder)
    hooked = _hooked_classes.get(cls)
    if hooked is None:
        hooked = type(f"Esbridge{cls.__name__}", (_RecorderHook, cls), {})
        _hooked_classes[cls] = hooked
    recorder.__class__ = hooked
