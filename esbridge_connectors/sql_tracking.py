"""Tracking and dead-letter tables of SQL projections, in the projection's own database.

A projection is reliable only if the position it has reached in the upstream
notification log commits in the same transaction as the rows it wrote (the
seed's "reliable projections"). So the position lives in a table of the
*target* database, beside the projection's rows, whatever that database is
(PostgreSQL, SQLite, MySQL...): only SQLAlchemy Core and a transaction are
needed.

``esbridge_projection_tracking``: one row per (projection, upstream) with the
last notification id applied. It only moves forward, by compare-and-set:
``UPDATE ... WHERE notification_id = <the id this runner started from>``.
A second runner of the same projection (a zombie, or one started by mistake)
finds the row moved and rolls back its whole batch, so no notification is
applied twice even then.

``esbridge_projection_dead_letters``: notifications a handler could not
apply after its retries, with the reason; parked in the transaction that
moves the tracking row past them, so the projection keeps its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from esbridge.errors import EsbridgeError

TRACKING_TABLE = "esbridge_projection_tracking"
DEAD_LETTER_TABLE = "esbridge_projection_dead_letters"

metadata = MetaData()

tracking_table = Table(
    TRACKING_TABLE,
    metadata,
    Column("projection", String(200), primary_key=True),
    Column("upstream", String(200), primary_key=True),
    Column("notification_id", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

dead_letter_table = Table(
    DEAD_LETTER_TABLE,
    metadata,
    Column("projection", String(200), primary_key=True),
    Column("upstream", String(200), primary_key=True),
    Column("notification_id", BigInteger, primary_key=True, autoincrement=False),
    Column("topic", String(500), nullable=False),
    Column("originator_id", String(200), nullable=False),
    Column("originator_version", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("error", Text, nullable=False),
    Column("traceback", Text, nullable=False),
    Column("parked_at", DateTime(timezone=True), nullable=False),
)


class ProjectionConflictError(EsbridgeError):
    """Another runner moved this projection's tracking row: this runner's batch was rolled back.

    Run one runner per projection and upstream (stop the other one, or let
    this one restart: it resumes from the committed position).
    """


@dataclass(frozen=True)
class Position:
    """Where a projection is in an upstream log (``notification_id`` 0 = nothing applied)."""

    notification_id: int
    version: int


@dataclass(frozen=True)
class DeadLetter:
    """A notification that a projection's handler could not apply, with the reason."""

    projection: str
    upstream: str
    notification_id: int
    topic: str
    originator_id: str
    originator_version: int
    attempts: int
    error: str
    traceback: str
    parked_at: datetime


def create_tracking_tables(engine: Engine | Connection) -> None:
    """Create the tracking and dead-letter tables if they do not exist."""
    metadata.create_all(engine, checkfirst=True)


def _key(projection: str, upstream: str) -> ColumnElement[bool]:
    return and_(tracking_table.c.projection == projection, tracking_table.c.upstream == upstream)


def read_position(conn: Connection, projection: str, upstream: str) -> Position | None:
    """The committed position, or None if the projection has not applied anything yet."""
    row = conn.execute(
        select(tracking_table.c.notification_id, tracking_table.c.version).where(
            _key(projection, upstream)
        )
    ).first()
    return None if row is None else Position(int(row[0]), int(row[1]))


def advance(
    conn: Connection,
    projection: str,
    upstream: str,
    *,
    expected: Position | None,
    notification_id: int,
    version: int,
) -> None:
    """Move the tracking row from ``expected`` to ``notification_id`` (compare-and-set).

    Raises :class:`ProjectionConflictError` if the row is not at ``expected``
    (another runner committed meanwhile) and ``ValueError`` if the id does not
    increase. The caller's transaction must then roll back.
    """
    now = datetime.now(UTC)
    if expected is None:
        values = {
            "projection": projection,
            "upstream": upstream,
            "notification_id": notification_id,
            "version": version,
            "updated_at": now,
        }
        try:
            conn.execute(insert(tracking_table).values(values))
        except IntegrityError as e:  # the row exists: another runner committed first
            raise ProjectionConflictError(
                f"projection {projection!r} of {upstream!r} was started by another runner: {e}"
            ) from e
        return
    if notification_id <= expected.notification_id:
        raise ValueError(
            f"tracking of projection {projection!r} must increase: "
            f"{notification_id} <= {expected.notification_id}"
        )
    result = conn.execute(
        update(tracking_table)
        .where(
            _key(projection, upstream),
            tracking_table.c.notification_id == expected.notification_id,
        )
        .values(notification_id=notification_id, version=version, updated_at=now)
    )
    if result.rowcount != 1:
        raise ProjectionConflictError(
            f"the tracking row of projection {projection!r} of {upstream!r} is no longer at "
            f"notification {expected.notification_id}: another runner is applying it. Run one "
            "runner per projection; this one resumes from the committed position on restart."
        )


def park(conn: Connection, letter: DeadLetter) -> None:
    """Record a dead letter (in the caller's transaction, with the tracking move)."""
    conn.execute(insert(dead_letter_table).values(**letter.__dict__))


def dead_letters(
    conn: Connection, projection: str, upstream: str | None = None
) -> list[DeadLetter]:
    """The parked notifications of a projection, in notification order."""
    query = select(dead_letter_table).where(dead_letter_table.c.projection == projection)
    if upstream is not None:
        query = query.where(dead_letter_table.c.upstream == upstream)
    rows = conn.execute(query.order_by(dead_letter_table.c.notification_id)).mappings()
    return [DeadLetter(**dict(row)) for row in rows]


def forget_dead_letter(conn: Connection, projection: str, upstream: str, nid: int) -> int:
    """Delete one dead letter (after it was applied by hand or by ``retry_parked``)."""
    result = conn.execute(
        delete(dead_letter_table).where(
            and_(
                dead_letter_table.c.projection == projection,
                dead_letter_table.c.upstream == upstream,
                dead_letter_table.c.notification_id == nid,
            )
        )
    )
    return int(result.rowcount)


def reset(conn: Connection, projection: str) -> None:
    """Forget a projection's positions and dead letters (part of a rebuild)."""
    conn.execute(delete(tracking_table).where(tracking_table.c.projection == projection))
    conn.execute(delete(dead_letter_table).where(dead_letter_table.c.projection == projection))
