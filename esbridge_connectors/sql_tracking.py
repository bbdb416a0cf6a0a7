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

Dead letters: notifications a handler could not apply after its retries, with
the reason; parked in the transaction that moves the tracking row past them,
so the projection keeps its place. They go to esbridge's one dead-letter table
(``esbridge_dead_letters``, the columns of :mod:`esbridge.deadletters.store`,
``follower`` = the projection's name) as esbridge's one
:class:`~esbridge.deadletters.store.DeadLetter`, so a projection's parked
notifications read like any follower's. The previous layout parked them in
``esbridge_projection_dead_letters``: :func:`create_tracking_tables` moves its
rows over in the caller's transaction, then renames it
``esbridge_projection_dead_letters_migrated`` (kept, not dropped, so nothing is
lost if the move has to be checked by hand; a second run finds nothing to move).
A dead-letter table created before the columns of
:data:`esbridge.deadletters.store.ADDED_COLUMNS` existed gets them the same way
(added, nullable, in the caller's transaction).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import BYTEA, JSONB
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from esbridge.deadletters.store import (
    ADDED_COLUMNS,
    REASON_POLICY,
    STATUS_PARKED,
    DeadLetter,
    decode_headers,
    encode_headers,
)
from esbridge.errors import EsbridgeError
from esbridge.names import DEAD_LETTER_TABLE

TRACKING_TABLE = "esbridge_projection_tracking"
PREVIOUS_DEAD_LETTER_TABLE = "esbridge_projection_dead_letters"
"""Where the previous layout parked projection dead letters (migrated on setup)."""
MIGRATED_DEAD_LETTER_TABLE = "esbridge_projection_dead_letters_migrated"

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

# The columns and indexes of esbridge's dead-letter table (esbridge/deadletters/store.py),
# in types every SQLAlchemy dialect has; on PostgreSQL the same types as its DDL.
dead_letter_table = Table(
    DEAD_LETTER_TABLE,
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("follower", Text, nullable=False),
    Column("upstream", Text, nullable=False),
    Column("tracking_name", Text),
    Column("nid", BigInteger),
    Column("key", Text, nullable=False),
    Column("value", LargeBinary().with_variant(BYTEA(), "postgresql")),
    Column(
        "headers",
        JSON().with_variant(JSONB(), "postgresql"),
        nullable=False,
        server_default=text("'[]'"),
    ),
    Column("kafka_topic", Text),
    Column("kafka_partition", Integer),
    Column("kafka_offset", BigInteger),
    Column("event_topic", Text),
    Column("originator_version", BigInteger),
    Column("reason", Text, nullable=False),
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("1")),
    Column("status", Text, nullable=False, server_default=text(f"'{STATUS_PARKED}'")),
    Column("parked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("replayed_at", DateTime(timezone=True)),
    Column("traceback", Text),
    Column("discarded_at", DateTime(timezone=True)),
    Column("discarded_by", Text),
    Column("discard_reason", Text),
)
assert {name for name, _kind in ADDED_COLUMNS} <= set(dead_letter_table.c.keys())
Index(
    f"{DEAD_LETTER_TABLE}_nid_uniq",
    dead_letter_table.c.follower,
    dead_letter_table.c.upstream,
    dead_letter_table.c.nid,
    unique=True,
    postgresql_where=dead_letter_table.c.nid.isnot(None),
    sqlite_where=dead_letter_table.c.nid.isnot(None),
)
Index(
    f"{DEAD_LETTER_TABLE}_parked_key",
    dead_letter_table.c.follower,
    dead_letter_table.c.upstream,
    dead_letter_table.c.key,
    postgresql_where=dead_letter_table.c.status == STATUS_PARKED,
    sqlite_where=dead_letter_table.c.status == STATUS_PARKED,
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


def create_tracking_tables(engine: Engine | Connection) -> None:
    """Create the tracking and dead-letter tables if they do not exist; migrate old dead letters."""
    metadata.create_all(engine, checkfirst=True)
    if isinstance(engine, Connection):
        _add_columns(engine)
        _migrate_dead_letters(engine)
    else:
        with engine.begin() as conn:
            _add_columns(conn)
            _migrate_dead_letters(conn)


def _add_columns(conn: Connection) -> None:
    """Add the dead-letter columns of this release that an older table lacks (see module doc)."""
    present = {c["name"] for c in inspect(conn).get_columns(DEAD_LETTER_TABLE)}
    for name, _kind in ADDED_COLUMNS:
        if name not in present:
            kind = dead_letter_table.c[name].type.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {DEAD_LETTER_TABLE} ADD COLUMN {name} {kind}"))


def _migrate_dead_letters(conn: Connection) -> None:
    """Move the previous layout's dead letters into the one dead-letter table (see module doc).

    In the caller's transaction: the rows are copied, then the old table is
    renamed, so either both happen or neither does, and a second run finds no
    old table.
    """
    if not inspect(conn).has_table(PREVIOUS_DEAD_LETTER_TABLE):
        return
    old = Table(PREVIOUS_DEAD_LETTER_TABLE, MetaData(), autoload_with=conn)
    rows = conn.execute(select(old).order_by(old.c.notification_id)).mappings().all()
    for row in rows:
        park(
            conn,
            DeadLetter(
                follower=row["projection"],
                upstream=row["upstream"],
                key=row["originator_id"],
                reason=REASON_POLICY,
                error=_with_traceback(row["error"], row["traceback"]),
                tracking_name=row["upstream"],
                nid=int(row["notification_id"]),
                event_topic=row["topic"],
                originator_version=int(row["originator_version"]),
                attempts=int(row["attempts"]),
                parked_at=row["parked_at"],
            ),
        )
    conn.execute(
        text(f"ALTER TABLE {PREVIOUS_DEAD_LETTER_TABLE} RENAME TO {MIGRATED_DEAD_LETTER_TABLE}")
    )


def _with_traceback(error: str, traceback: str) -> str:
    """The error line and its traceback in the one ``error`` column (cut as the store cuts)."""
    return (f"{error}\n{traceback}" if traceback else error)[:4000]


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
    values: dict[str, object] = {
        "follower": letter.follower,
        "upstream": letter.upstream,
        "tracking_name": letter.tracking_name,
        "nid": letter.nid,
        "key": letter.key,
        "value": letter.value,
        "headers": json.loads(encode_headers(letter.headers)),
        "kafka_topic": letter.kafka_topic,
        "kafka_partition": letter.kafka_partition,
        "kafka_offset": letter.kafka_offset,
        "event_topic": letter.event_topic,
        "originator_version": letter.originator_version,
        "reason": letter.reason,
        "error": letter.error[:4000],
        "attempts": letter.attempts,
        "status": letter.status,
        "parked_at": letter.parked_at or datetime.now(UTC),
    }
    conn.execute(insert(dead_letter_table).values(values))


def dead_letters(
    conn: Connection, projection: str, upstream: str | None = None
) -> list[DeadLetter]:
    """The parked notifications of a projection, in notification order."""
    t = dead_letter_table
    query = select(t).where(t.c.follower == projection, t.c.status == STATUS_PARKED)
    if upstream is not None:
        query = query.where(t.c.upstream == upstream)
    rows = conn.execute(query.order_by(t.c.nid, t.c.id)).mappings()
    return [
        DeadLetter(
            follower=row["follower"],
            upstream=row["upstream"],
            key=row["key"],
            reason=row["reason"],
            error=row["error"],
            value=row["value"],
            headers=decode_headers(row["headers"]),
            tracking_name=row["tracking_name"],
            kafka_topic=row["kafka_topic"],
            kafka_partition=row["kafka_partition"],
            kafka_offset=row["kafka_offset"],
            nid=row["nid"],
            event_topic=row["event_topic"],
            originator_version=row["originator_version"],
            attempts=row["attempts"],
            status=row["status"],
            id=row["id"],
            parked_at=row["parked_at"],
        )
        for row in rows
    ]


def forget_dead_letter(conn: Connection, projection: str, upstream: str, nid: int) -> int:
    """Delete one dead letter (after it was applied by hand or by ``retry_parked``)."""
    t = dead_letter_table
    result = conn.execute(
        delete(t).where(and_(t.c.follower == projection, t.c.upstream == upstream, t.c.nid == nid))
    )
    return int(result.rowcount)


def reset(conn: Connection, projection: str) -> None:
    """Forget a projection's positions and dead letters (part of a rebuild)."""
    conn.execute(delete(tracking_table).where(tracking_table.c.projection == projection))
    conn.execute(delete(dead_letter_table).where(dead_letter_table.c.follower == projection))
