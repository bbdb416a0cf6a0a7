"""SQL projections: event handlers that update SQLAlchemy rows, reliably.

The seed's "reliable projections": the rows a notification produces and the
position in the upstream notification log commit in ONE transaction of the
target database, so after any crash the projection resumes exactly where its
last commit left it: no event applied twice, none skipped.

You write a :class:`SqlProjection` with one method per event class::

    class DogNames(SqlProjection):
        name = "dog_names"
        tables = [DogRow]

        @handles(Dog.Registered)
        def registered(self, session: Session, event: Dog.Registered) -> None:
            session.add(DogRow(id=str(event.originator_id), name=event.name))

and run it with a :class:`ProjectionRunner`, which reads the upstream log in
large pages and applies a whole page per transaction (one commit for hundreds
of events, not one per event).

Failures: a database that is down or a lost connection is *transient*: the
batch rolls back and is retried from the committed position until the
database is back (nothing is parked). A handler that raises is retried
``max_attempts`` times; then the notification is *parked* in the dead-letter
table with the reason, in the same transaction that moves the tracking row
past it, and the projection continues with the next notification.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TextIO, TypeVar

from eventsourcing.persistence import Mapper, Notification
from eventsourcing.persistence import OperationalError as EventStoreOperationalError
from eventsourcing.utils import resolve_topic
from sqlalchemy import Connection, Table
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, TimeoutError
from sqlalchemy.orm import Session

from esbridge.deadletters.store import REASON_POLICY, DeadLetter
from esbridge.errors import ConfigurationError, EsbridgeError, RemoteLogUnreachableError
from esbridge.eventlog.notification_log import (
    NotificationReader,
    open_recorder,
    read_pages,
    release_recorder,
)
from esbridge.eventlog.remote import given_remote_log
from esbridge.runtime.catch_up import CatchUpLog
from esbridge_connectors import sql_tracking
from esbridge_connectors.sql_tracking import Position, ProjectionConflictError

log = logging.getLogger("esbridge.connectors.projection")

F = TypeVar("F", bound=Callable[..., Any])
Handler = Callable[[Session, Any], None]
_HANDLES = "_esbridge_handles"


class ProjectionVersionError(EsbridgeError):
    """The projection's tables were built by another version of its code: rebuild it."""


def handles(*event_classes: type) -> Callable[[F], F]:
    """Mark a method of a :class:`SqlProjection` as the handler of ``event_classes``.

    The method is called as ``method(session, event)`` for events of those
    classes or their subclasses (the most specific handler wins). It adds,
    updates or deletes rows through ``session``; it must not commit.
    """
    if not event_classes:
        raise TypeError("@handles needs at least one event class")

    def decorate(method: F) -> F:
        setattr(method, _HANDLES, (*getattr(method, _HANDLES, ()), *event_classes))
        return method

    return decorate


class SqlProjection:
    """Base class of SQL projections: set ``name``, ``tables``, and write ``@handles`` methods.

    * ``name``: the projection's identity in the tracking table. A new name
      builds a new projection from scratch (blue/green rebuilds).
    * ``version``: bump it when the handlers change meaning; a runner then
      refuses to continue on tables built by the old version (rebuild them,
      or pass ``on_version_change="rebuild"``).
    * ``tables``: the tables (or ORM classes) this projection owns; rebuild
      drops and recreates exactly these.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    tables: ClassVar[Sequence[Any]] = ()
    _handler_names: ClassVar[dict[type, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names: dict[type, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for event_class in getattr(value, _HANDLES, ()):
                    names[event_class] = attr
        cls._handler_names = names

    def __init__(self) -> None:
        if not self.name:
            raise ConfigurationError(f"{type(self).__qualname__} needs a 'name' class attribute")
        self._cache: dict[type, Handler | None] = {}

    def handler_for(self, event_class: type) -> Handler | None:
        """The bound handler of ``event_class`` (most specific in its MRO), or None."""
        if event_class not in self._cache:
            found: Handler | None = None
            for klass in event_class.__mro__:
                attr = self._handler_names.get(klass)
                if attr is not None:
                    found = getattr(self, attr)
                    break
            self._cache[event_class] = found
        return self._cache[event_class]

    def table_objects(self) -> list[Table]:
        """The projection's tables, in the order given (created in it, dropped in reverse)."""
        result: list[Table] = []
        for item in self.tables:
            table = getattr(item, "__table__", item)
            if not isinstance(table, Table):
                raise ConfigurationError(
                    f"{type(self).__qualname__}.tables holds {item!r}: give Tables or ORM classes"
                )
            result.append(table)
        return result

    def create_tables(self, conn: Connection) -> None:
        """Create the projection's tables if missing."""
        for table in self.table_objects():
            table.create(conn, checkfirst=True)

    def drop_tables(self, conn: Connection) -> None:
        """Drop the projection's tables (only these)."""
        for table in reversed(self.table_objects()):
            table.drop(conn, checkfirst=True)


def is_transient(error: BaseException) -> bool:
    """True for failures of the infrastructure (retry later), not of a handler (park).

    Lost connections, a database that is down or read-only for a while, pool
    timeouts, the upstream recorder's operational errors and a remote log
    service that does not answer are transient.
    """
    transient = DisconnectionError | TimeoutError | EventStoreOperationalError
    if isinstance(error, transient | RemoteLogUnreachableError):
        return True
    if isinstance(error, DBAPIError):
        return bool(error.connection_invalidated) or type(error).__name__ in (
            "OperationalError",
            "InterfaceError",
        )
    return False


def set_up_projection(
    engine: Engine,
    projection: SqlProjection,
    upstreams: Sequence[str],
    on_version_change: Literal["error", "rebuild"] = "error",
) -> dict[str, Position | None]:
    """Create the tracking and projection tables if missing and check the stored version.

    Returns the stored position of each tracking name in ``upstreams`` (None:
    nothing applied yet). A position written by another ``projection.version``
    is a :class:`ProjectionVersionError`, or with ``on_version_change="rebuild"``
    the projection is reset (:func:`reset_projection`) and starts from nothing.
    """
    with engine.begin() as conn:
        sql_tracking.create_tracking_tables(conn)
        projection.create_tables(conn)
        positions = {u: sql_tracking.read_position(conn, projection.name, u) for u in upstreams}
    stale = [p.version for p in positions.values() if p and p.version != projection.version]
    if stale:
        if on_version_change != "rebuild":
            raise ProjectionVersionError(
                f"projection {projection.name!r} was built by version {stale[0]} "
                f"and the code is version {projection.version}: call rebuild() (or "
                "pass on_version_change='rebuild'), or give the new version a new name "
                "and new tables to build it beside the old one"
            )
        reset_projection(engine, projection)
        positions = dict.fromkeys(upstreams)
    return positions


def reset_projection(engine: Engine, projection: SqlProjection) -> None:
    """Drop and recreate ``projection``'s tables and forget its positions and dead letters.

    One transaction, so a crash during it leaves either the old projection or
    an empty one at position 0, never empty tables with the old position. The
    tracking row is deleted first: on SQLite the driver only opens the
    transaction at the first DML statement, and the DDL that follows must be
    inside it. Other projections (other names) are untouched.
    """
    with engine.begin() as conn:
        sql_tracking.create_tracking_tables(conn)
    with engine.begin() as conn:
        sql_tracking.reset(conn, projection.name)
        projection.drop_tables(conn)
        projection.create_tables(conn)


class _HandlerFailure(Exception):
    """A handler (or the commit of its rows) failed at ``index`` of a batch (None: unknown)."""

    def __init__(self, index: int | None, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.index = index
        self.error = error


@dataclass(frozen=True)
class RunStats:
    """What one :meth:`ProjectionRunner.run_once` did."""

    applied: int
    parked: int
    transactions: int
    position: int


class ProjectionRunner:
    """Apply an upstream application's notifications to a :class:`SqlProjection`.

    ``engine``: the target database (any SQLAlchemy database with
    transactions). ``upstream``: the upstream application's name; its log is
    read through ``recorder`` (any reader of it), from its ``esbridge
    serve-log`` at ``upstream_url`` (with ``upstream_token`` and
    ``upstream_cafile``, as the consumer adapter: docs/remote-log.md), or by
    default with ``open_recorder(upstream, env)``.
    ``mapper``: the upstream application's mapper (see
    :func:`esbridge_connectors.upstream.application_mapper`).

    ``page_size`` notifications are applied per transaction. A handler that
    raises is retried ``max_attempts`` times (``retry_delay`` seconds, doubling)
    and then parked. ``on_version_change``: ``"error"`` (default) or
    ``"rebuild"`` when the stored version differs from ``projection.version``.

    A rebuild or a catch-up of a backlog (1000 notifications or more) logs its
    progress (count, rate, ETA) every few seconds, or redraws it on one line of
    ``progress`` (e.g. ``sys.stderr``) when that is a terminal.
    """

    def __init__(
        self,
        projection: SqlProjection,
        engine: Engine,
        *,
        upstream: str,
        mapper: Mapper[Any],
        recorder: NotificationReader | None = None,
        env: Mapping[str, str] | None = None,
        upstream_url: str | None = None,
        upstream_token: str | None = None,
        upstream_cafile: str | None = None,
        page_size: int = 500,
        max_attempts: int = 3,
        retry_delay: float = 0.1,
        poll_interval: float = 0.5,
        on_version_change: Literal["error", "rebuild"] = "error",
        progress: TextIO | None = None,
    ) -> None:
        self.projection = projection
        self.engine = engine
        self.upstream = upstream
        self.mapper = mapper
        remote = given_remote_log(
            upstream,
            upstream_url,
            upstream_token,
            other_ways=recorder is not None or env is not None,
            cafile=upstream_cafile,
        )
        self._remote = remote
        self._recorder: NotificationReader | None = remote or recorder
        # The caller's (never closed here); a remote log is the runner's own but kept: it
        # is not opened again from settings, and close() closes only its connection.
        self._given_recorder = remote or recorder
        self._env = env
        self.page_size = page_size
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.poll_interval = poll_interval
        self.on_version_change = on_version_change
        self._position: Position | None = None
        self._stopping = threading.Event()
        self._topics: dict[str, type | None] = {}
        self._set_up = False
        self._progress = CatchUpLog(
            log,
            f"projection {projection.name} <- {upstream}",
            "notifications",
            terminal=progress,
        )

    # -- setup and state ------------------------------------------------------------------------

    @property
    def recorder(self) -> NotificationReader:
        """The upstream application's recorder (opened on first use, read-only)."""
        if self._recorder is None:
            if self._env is None:
                raise ConfigurationError(
                    f"projection {self.projection.name!r} needs to read the log of "
                    f"{self.upstream!r}: give the upstream 'recorder', or the 'env' "
                    "(POSTGRES_* settings) to open it with"
                )
            self._recorder = open_recorder(self.upstream, self._env)
        return self._recorder

    def setup(self) -> None:
        """Create the tracking and projection tables if missing; check the version."""
        positions = set_up_projection(
            self.engine, self.projection, [self.upstream], self.on_version_change
        )
        self._position = positions[self.upstream]
        self._set_up = True

    def position(self) -> int:
        """The committed notification id (0 before the first commit), read from the database."""
        with self.engine.connect() as conn:
            found = sql_tracking.read_position(conn, self.projection.name, self.upstream)
        return 0 if found is None else found.notification_id

    def dead_letters(self) -> list[DeadLetter]:
        """The notifications parked by this projection (from this upstream)."""
        with self.engine.connect() as conn:
            return sql_tracking.dead_letters(conn, self.projection.name, self.upstream)

    def rebuild(self, *, catch_up: bool = True) -> RunStats | None:
        """Rebuild from scratch: drop and recreate the tables, forget position and dead letters.

        The reset (tables, position, dead letters) is one transaction, so a
        crash during it leaves either the old projection or an empty one at
        position 0, never empty tables with the old position. The tracking
        row is deleted first: on SQLite the driver only opens the transaction
        at the first DML statement, and the DDL that follows must be inside it.
        Then the log is applied again (``catch_up``), in the usual batches:
        readers see the tables fill up (build a new version under a new name
        beside the old one to avoid that). Other projections (other names) are
        untouched and keep running. Stop any other runner of *this* projection
        first: its next commit would fail with :class:`ProjectionConflictError`
        anyway, and nothing would be applied twice.
        """
        reset_projection(self.engine, self.projection)
        self._position = None
        self._set_up = True
        return self.run_once() if catch_up else None

    # -- running --------------------------------------------------------------------------------

    def run_once(self, stop: int | None = None) -> RunStats:
        """Apply everything in the upstream log now (up to ``stop``), then return.

        Transient failures propagate (call again later); handler failures are
        retried and parked as documented.
        """
        if not self._set_up:
            self.setup()
        applied = parked = transactions = 0
        after = self._current().notification_id if self._position else 0
        top = self.recorder.max_notification_id() or 0
        if stop is not None:
            top = min(top, stop)
        self._progress.update(after, max(0, top - after))
        try:
            for page in read_pages(self.recorder, after, stop=stop, page_size=self.page_size):
                a, p, t = self.apply(page)
                applied, parked, transactions = applied + a, parked + p, transactions + t
                top = max(top, page[-1].id)
                self._progress.update(page[-1].id, top - page[-1].id)
                if self._stopping.is_set():
                    break
        except BaseException:
            self._progress.close()  # an error's message on a line of its own
            raise
        return RunStats(applied, parked, transactions, self._current().notification_id)

    def run_forever(self) -> None:
        """Follow the upstream log until :meth:`stop`; transient failures are waited out."""
        delay = self.poll_interval
        while not self._stopping.is_set():
            try:
                stats = self.run_once()
                delay = self.poll_interval
                if stats.applied + stats.parked == 0:
                    self._stopping.wait(self.poll_interval)
            except Exception as e:
                if not is_transient(e):
                    raise
                log.warning("projection %s: %s; retrying in %.1f s", self.projection.name, e, delay)
                self._position = None
                self._set_up = False
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def stop(self) -> None:
        """Ask :meth:`run_forever` (or a long :meth:`run_once`) to return after this batch."""
        self._stopping.set()

    def close(self) -> None:
        """Close the upstream log's connections, if this runner opened them (idempotent).

        A recorder given to the constructor is the caller's to close. The runner
        opens the log again if it is used after this.
        """
        if self._remote is not None:
            self._remote.close()  # its connection; the next read opens another
        self._recorder = release_recorder(self._recorder, self._given_recorder)

    def _current(self) -> Position:
        return self._position or Position(0, self.projection.version)

    # -- one batch ------------------------------------------------------------------------------

    def apply(self, notifications: Sequence[Notification]) -> tuple[int, int, int]:
        """Apply notifications (ascending ids, after the position), committing tracking with them.

        Notifications at or below the committed position are skipped as
        duplicates (a Kafka-fed projection receives redeliveries). Returns
        (applied, parked, transactions).
        """
        if not self._set_up:
            self.setup()
        position = self._current().notification_id
        pending = [n for n in notifications if n.id > position]
        applied = parked = transactions = 0
        while pending:
            try:
                self._commit(pending)
                return applied + len(pending), parked, transactions + 1
            except _HandlerFailure as failure:
                index, error = failure.index, failure.error
            if index is None:  # failed at commit (flush): find the culprit one event at a time
                found = self._commit_one_by_one(pending)
                if found is None:
                    return applied + len(pending), parked, transactions + len(pending)
                index, error = found
                applied, transactions = applied + index, transactions + index
            elif index > 0:
                a, p, t = self.apply(pending[:index])
                applied, parked, transactions = applied + a, parked + p, transactions + t
            if self._retry_alone(pending[index]):
                applied += 1
            else:
                self._park(pending[index], error)
                parked += 1
            transactions += 1
            pending = pending[index + 1 :]
        return applied, parked, transactions

    def _commit(self, notifications: Sequence[Notification]) -> None:
        """Apply the handlers and move the tracking row, in one transaction."""
        expected = self._position
        target = notifications[-1].id
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                for index, notification in enumerate(notifications):
                    try:
                        self._apply_one(session, notification)
                    except Exception as e:
                        if is_transient(e):
                            raise
                        raise _HandlerFailure(index, e) from e
                sql_tracking.advance(
                    session.connection(),
                    self.projection.name,
                    self.upstream,
                    expected=expected,
                    notification_id=target,
                    version=self.projection.version,
                )
        except (_HandlerFailure, ProjectionConflictError):
            raise
        except Exception as e:
            if is_transient(e):
                raise
            raise _HandlerFailure(None, e) from e
        self._position = Position(target, self.projection.version)

    def _apply_one(self, session: Session, notification: Notification) -> None:
        event_class = self._event_class(notification.topic)
        handler = self.projection.handler_for(event_class)
        if handler is not None:
            handler(session, self.mapper.to_domain_event(notification))

    def _event_class(self, topic: str) -> type:
        if topic not in self._topics:
            self._topics[topic] = resolve_topic(topic)  # raises TopicError: parked
        found = self._topics[topic]
        assert found is not None
        return found

    def _commit_one_by_one(
        self, pending: Sequence[Notification]
    ) -> tuple[int, BaseException] | None:
        """Commit one notification per transaction up to the first failure (its index, error)."""
        for index, notification in enumerate(pending):
            try:
                self._commit([notification])
            except _HandlerFailure as failure:
                return index, failure.error
        return None

    def _retry_alone(self, notification: Notification) -> bool:
        for attempt in range(1, self.max_attempts):
            time.sleep(self.retry_delay * 2 ** (attempt - 1))
            try:
                self._commit([notification])
                return True
            except _HandlerFailure as failure:
                log.warning(
                    "projection %s: notification %d failed (attempt %d of %d): %s",
                    self.projection.name,
                    notification.id,
                    attempt + 1,
                    self.max_attempts,
                    failure,
                )
        return False

    def _park(self, notification: Notification, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"
        letter = DeadLetter(
            follower=self.projection.name,
            upstream=self.upstream,
            key=str(notification.originator_id),
            reason=REASON_POLICY,
            error=f"{reason}\n{''.join(traceback.format_exception(error))}",
            value=notification.state,
            tracking_name=self.upstream,
            nid=notification.id,
            event_topic=notification.topic,
            originator_version=notification.originator_version,
            attempts=self.max_attempts,
            parked_at=datetime.now(UTC),
        )
        with self.engine.begin() as conn:
            sql_tracking.park(conn, letter)
            sql_tracking.advance(
                conn,
                self.projection.name,
                self.upstream,
                expected=self._position,
                notification_id=notification.id,
                version=self.projection.version,
            )
        self._position = Position(notification.id, self.projection.version)
        log.error(
            "projection %s: parked notification %d (%s) after %d attempts: %s",
            self.projection.name,
            notification.id,
            notification.topic,
            self.max_attempts,
            reason,
        )
