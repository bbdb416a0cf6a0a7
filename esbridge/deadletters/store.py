"""The dead-letter store: parked messages, kept in the follower's own database.

A message that cannot be processed (undecodable, unknown event type, a policy
that keeps raising) is *parked*: a row in ``esbridge_dead_letters`` with the
reason, the error, the original key, value bytes and headers, and where it came
from (Kafka topic/partition/offset, upstream notification id). The row is
written in the same transaction as the tracking record that moves past the
message, so a parked message is never lost and never parked twice.

By default later messages with the same key (the same upstream aggregate) are
parked behind it (reason ``held_behind``), so per-aggregate order is never
broken (a row without a tracking position, such as a foreign or malformed
message, has no place in that order and holds nothing back); ``esbridge dlq
retry`` runs parked rows through the follower again, in order per key.
A table (not a topic) was chosen because parking must commit atomically with
the tracking record, which lives in Postgres.

Statuses: ``parked`` (waiting), ``replayed`` (a retry applied it), ``skipped``
(the follower's :class:`~esbridge.deadletters.policy.DeadLetterPolicy` said
``skip``: recorded, the key went on without it) and ``discarded`` (an operator
gave it up with ``esbridge dlq discard``: who, when and why are kept in the
row; it is never deleted). Only ``parked`` rows hold their key, count, and are
retried.

Tables created by an earlier release lack the newer columns (``traceback``,
``discarded_*``): :meth:`DeadLetterStore.create_table` adds them (nullable,
nothing rewritten), so every process that opens the store migrates the table
once, under the same advisory lock as its creation.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.sql import SQL, Identifier

from esbridge.names import DEAD_LETTER_TABLE

TABLE = DEAD_LETTER_TABLE

REASON_MALFORMED = "malformed_message"
REASON_UNDECODABLE = "undecodable"
REASON_UNKNOWN_TYPE = "unknown_event_type"
REASON_POLICY = "policy_error"
REASON_HELD_BEHIND = "held_behind"
# A message that does not belong to the upstream log it claims to come from (another
# application, a broken esb_prev_nid chain, a notification id the log does not have or
# holds a different event under). Parked without a position: it has no place in the
# order, so it never moves a position, never holds its key's later messages back and is
# never retried (it can only be inspected).
REASON_FOREIGN = "foreign_message"

STATUS_PARKED = "parked"
#: A row that a retry applied. Stored value (and column ``replayed_at``) keep the name
#: they had before "retry" named the command: rows written since stay readable.
STATUS_REPLAYED = "replayed"
#: Recorded under a ``skip`` policy: the key's later messages went on without it.
STATUS_SKIPPED = "skipped"
#: Given up by an operator (``esbridge dlq discard``): kept for audit, never retried.
STATUS_DISCARDED = "discarded"

_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.{table} (
    id bigserial PRIMARY KEY,
    follower text NOT NULL,
    upstream text NOT NULL,
    tracking_name text,
    nid bigint,
    key text NOT NULL,
    value bytea,
    headers jsonb NOT NULL DEFAULT '[]',
    kafka_topic text,
    kafka_partition integer,
    kafka_offset bigint,
    event_topic text,
    originator_version bigint,
    reason text NOT NULL,
    error text NOT NULL,
    attempts integer NOT NULL DEFAULT 1,
    status text NOT NULL DEFAULT 'parked',
    parked_at timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz
);
{migrate}
CREATE UNIQUE INDEX IF NOT EXISTS {uniq} ON {schema}.{table} (follower, upstream, nid)
    WHERE nid IS NOT NULL;
CREATE INDEX IF NOT EXISTS {bykey} ON {schema}.{table} (follower, upstream, key)
    WHERE status = 'parked';
"""


#: Columns added after the table's first release: (name, type). Added to older tables.
ADDED_COLUMNS = (
    ("traceback", "text"),
    ("discarded_at", "timestamptz"),
    ("discarded_by", "text"),
    ("discard_reason", "text"),
)
_MIGRATE = "\n".join(
    f"ALTER TABLE {{schema}}.{{table}} ADD COLUMN IF NOT EXISTS {name} {kind};"
    for name, kind in ADDED_COLUMNS
)


@dataclass
class DeadLetter:
    """One parked message (``id`` is set once stored)."""

    follower: str
    upstream: str
    key: str
    reason: str
    error: str
    value: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    tracking_name: str | None = None
    nid: int | None = None
    kafka_topic: str | None = None
    kafka_partition: int | None = None
    kafka_offset: int | None = None
    event_topic: str | None = None
    originator_version: int | None = None
    attempts: int = 1
    status: str = STATUS_PARKED
    id: int | None = None
    parked_at: datetime | None = None
    traceback: str | None = None
    discarded_at: datetime | None = None
    discarded_by: str | None = None
    discard_reason: str | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly view (for ``esbridge dlq list``)."""
        return {
            "id": self.id,
            "follower": self.follower,
            "upstream": self.upstream,
            "key": self.key,
            "nid": self.nid,
            "event_topic": self.event_topic,
            "reason": self.reason,
            "error": self.error,
            "attempts": self.attempts,
            "status": self.status,
            "kafka": self.kafka,
            "parked_at": self.parked_at.isoformat() if self.parked_at else None,
        }

    @property
    def kafka(self) -> str | None:
        """``topic[partition]@offset``, or None for a message not read from Kafka."""
        if not self.kafka_topic:
            return None
        return f"{self.kafka_topic}[{self.kafka_partition}]@{self.kafka_offset}"


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> str:
    """Message headers as the table's JSON: ``[[name, base64 value], ...]``."""
    return json.dumps([[k, base64.b64encode(v or b"").decode()] for k, v in headers])


def decode_headers(raw: Any) -> list[tuple[str, bytes]]:
    """The headers :func:`encode_headers` stored (a JSON string, or the decoded list)."""
    items = json.loads(raw) if isinstance(raw, str) else raw
    return [(k, base64.b64decode(v)) for k, v in items or ()]


_COLUMNS = (
    "follower, upstream, tracking_name, nid, key, value, headers, kafka_topic, "
    "kafka_partition, kafka_offset, event_topic, originator_version, reason, error, attempts, "
    "status, traceback"
)
_READ_COLUMNS = _COLUMNS + ", parked_at, discarded_at, discarded_by, discard_reason"


class DeadLetterStore:
    """Reads and writes ``esbridge_dead_letters`` through an eventsourcing ``PostgresDatastore``.

    Writes that must be atomic with events and tracking go through
    :meth:`insert` / :meth:`mark_replayed` with the caller's cursor.
    """

    def __init__(self, datastore: Any) -> None:
        self.datastore = datastore
        schema = Identifier(datastore.schema or "public")
        self._table = SQL("{0}.{1}").format(schema, Identifier(TABLE))
        self._ddl = SQL(_DDL).format(
            schema=schema,
            table=Identifier(TABLE),
            uniq=Identifier(f"{TABLE}_nid_uniq"),
            bykey=Identifier(f"{TABLE}_parked_key"),
            migrate=SQL(_MIGRATE).format(schema=schema, table=Identifier(TABLE)),
        )

    def create_table(self) -> None:
        """Create the table and its indexes unless all of them exist.

        Checked first because ``CREATE ... IF NOT EXISTS`` needs the CREATE
        privilege on the schema and, for an index, ownership of the table
        even when nothing is created: a follower whose administrator created
        the table needs only SELECT, INSERT and UPDATE on it (see
        docs/security.md).
        """
        if self.exists():
            return
        # Serialise concurrent creators: CREATE TABLE IF NOT EXISTS races on pg_type.
        with self.datastore.transaction(commit=True) as curs:
            curs.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (TABLE,))
            curs.execute(self._ddl)

    def exists(self) -> bool:
        """Whether the table, both its indexes and every column of this release exist."""
        schema = self.datastore.schema or "public"
        names = [f"{TABLE}", f"{TABLE}_nid_uniq", f"{TABLE}_parked_key"]
        added = [name for name, _kind in ADDED_COLUMNS]
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                "SELECT count(to_regclass(format('%%I.%%I', %s::text, n))) AS n, "
                # pg_attribute, not information_schema: that hides the columns of a
                # table the role has no privilege on, and this check must not need any.
                "(SELECT count(*) FROM pg_attribute WHERE attrelid = "
                "to_regclass(format('%%I.%%I', %s::text, %s::text)) AND attname = ANY(%s) "
                "AND NOT attisdropped) AS columns "
                "FROM unnest(%s::text[]) AS n",
                (schema, schema, TABLE, added, names),
            )
            row = curs.fetchone()
        return bool(row) and int(row["n"]) == len(names) and int(row["columns"]) == len(added)

    def insert(self, curs: Any, letters: Iterable[DeadLetter]) -> None:
        """Park ``letters`` within the caller's transaction (idempotent per notification id)."""
        statement = SQL(
            "INSERT INTO {0} (" + _COLUMNS + ") VALUES "
            "(%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING"
        ).format(self._table)
        for d in letters:
            curs.execute(
                statement,
                (
                    d.follower, d.upstream, d.tracking_name, d.nid, d.key, d.value,
                    encode_headers(d.headers), d.kafka_topic, d.kafka_partition,
                    d.kafka_offset, d.event_topic, d.originator_version, d.reason,
                    d.error[:4000], d.attempts, d.status,
                    d.traceback[-20000:] if d.traceback else None,
                ),
            )  # fmt: skip

    def mark_replayed(self, curs: Any, ids: Iterable[int]) -> None:
        """Mark rows done (status ``replayed``) within the caller's transaction; fails if one
        was not parked.

        The check makes two concurrent retries of one row impossible: the
        second one's transaction (with its new events) rolls back.
        """
        from eventsourcing.persistence import IntegrityError

        for letter_id in ids:
            curs.execute(
                SQL(
                    "UPDATE {0} SET status = 'replayed', replayed_at = now() "
                    "WHERE id = %s AND status = 'parked' RETURNING id"
                ).format(self._table),
                (letter_id,),
            )
            if curs.fetchone() is None:
                raise IntegrityError(f"dead letter {letter_id} is no longer parked")

    def record_attempt(self, letter_id: int, error: str) -> None:
        """A retry failed again: count it and keep the latest error."""
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                SQL("UPDATE {0} SET attempts = attempts + 1, error = %s WHERE id = %s").format(
                    self._table
                ),
                (error[:4000], letter_id),
            )

    def list(
        self,
        follower: str | None = None,
        *,
        status: str | None = STATUS_PARKED,
        ids: Sequence[int] | None = None,
        limit: int | None = None,
        keys: Sequence[str] | None = None,
        since: int | datetime | None = None,
    ) -> list[DeadLetter]:
        """Stored rows in parking order (oldest first).

        ``keys``: only rows of these keys. ``since``: only rows from this id on
        (an int) or parked at or after this time (a datetime).
        """
        where = ["TRUE"]
        params: list[Any] = []
        if follower is not None:
            where.append("follower = %s")
            params.append(follower)
        if status is not None:
            where.append("status = %s")
            params.append(status)
        if ids:
            where.append("id = ANY(%s)")
            params.append(list(ids))
        if keys:
            where.append("key = ANY(%s)")
            params.append(list(keys))
        if isinstance(since, datetime):
            where.append("parked_at >= %s")
            params.append(since)
        elif since is not None:
            where.append("id >= %s")
            params.append(int(since))
        query = SQL(
            "SELECT id, "
            + _READ_COLUMNS
            + " FROM {0} WHERE "
            + " AND ".join(where)
            + " ORDER BY id"
            + (f" LIMIT {int(limit)}" if limit else "")
        ).format(self._table)
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(query, params)
            rows = curs.fetchall()
        return [self._row(r) for r in rows]

    def parked_keys(self, follower: str, upstream: str, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` have a parked message (later messages must queue behind it)."""
        keys = list(set(keys))
        if not keys:
            return set()
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                SQL(
                    "SELECT DISTINCT key FROM {0} WHERE follower = %s AND upstream = %s "
                    "AND status = 'parked' AND tracking_name IS NOT NULL AND key = ANY(%s)"
                ).format(self._table),
                (follower, upstream, keys),
                prepare=True,
            )
            return {r["key"] for r in curs.fetchall()}

    def discard(
        self, follower: str, ids: Sequence[int], *, by: str, reason: str
    ) -> Sequence[DeadLetter]:
        """Mark parked or skipped rows ``discarded`` (who, when, why); returns them.

        Nothing is deleted: the row stays for audit, out of retries and counts.
        Raises :class:`LookupError` naming the ids that are not ``follower``'s
        parked or skipped rows; then nothing is discarded.
        """
        wanted = sorted(set(ids))
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                SQL(
                    "UPDATE {0} SET status = %s, discarded_at = now(), discarded_by = %s, "
                    "discard_reason = %s WHERE follower = %s AND id = ANY(%s) "
                    "AND status IN (%s, %s) RETURNING id"
                ).format(self._table),
                (
                    STATUS_DISCARDED, by, reason, follower, wanted,
                    STATUS_PARKED, STATUS_SKIPPED,
                ),
            )  # fmt: skip
            done = {int(r["id"]) for r in curs.fetchall()}
            missing = [i for i in wanted if i not in done]
            if missing:
                raise LookupError(missing)  # rolls the transaction back
        return self.list(follower, status=STATUS_DISCARDED, ids=wanted)

    def oldest_parked(self, follower: str, upstream: str) -> tuple[int, datetime | None]:
        """How many rows of ``follower`` from ``upstream`` are parked, and when the oldest was."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                SQL(
                    "SELECT count(*) AS n, min(parked_at) AS oldest FROM {0} "
                    "WHERE follower = %s AND upstream = %s AND status = 'parked'"
                ).format(self._table),
                (follower, upstream),
                prepare=True,
            )
            row = curs.fetchone()
        if not row:
            return 0, None
        return int(row["n"]), row["oldest"]

    def count(self, follower: str, status: str = STATUS_PARKED) -> int:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                SQL("SELECT count(*) AS n FROM {0} WHERE follower = %s AND status = %s").format(
                    self._table
                ),
                (follower, status),
            )
            row = curs.fetchone()
        return int(row["n"]) if row else 0

    def counts(self, follower: str, status: str = STATUS_PARKED) -> dict[str, dict[str, int]]:
        """``follower``'s rows by upstream, then reason (for ``esbridge status``).

        By upstream as stored, so rows parked under a name that is no upstream
        of the follower (a consumer started with a wrong ``--upstream``) show too.
        """
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                SQL(
                    "SELECT upstream, reason, count(*) AS n FROM {0} "
                    "WHERE follower = %s AND status = %s GROUP BY upstream, reason "
                    "ORDER BY upstream, reason"
                ).format(self._table),
                (follower, status),
            )
            rows = curs.fetchall()
        result: dict[str, dict[str, int]] = {}
        for r in rows:
            result.setdefault(r["upstream"], {})[r["reason"]] = int(r["n"])
        return result

    @staticmethod
    def _row(r: Any) -> DeadLetter:
        return DeadLetter(
            id=r["id"],
            follower=r["follower"],
            upstream=r["upstream"],
            tracking_name=r["tracking_name"],
            nid=r["nid"],
            key=r["key"],
            value=bytes(r["value"]) if r["value"] is not None else None,
            headers=decode_headers(r["headers"]),
            kafka_topic=r["kafka_topic"],
            kafka_partition=r["kafka_partition"],
            kafka_offset=r["kafka_offset"],
            event_topic=r["event_topic"],
            originator_version=r["originator_version"],
            reason=r["reason"],
            error=r["error"],
            attempts=r["attempts"],
            status=r["status"],
            parked_at=r["parked_at"],
            traceback=r["traceback"],
            discarded_at=r["discarded_at"],
            discarded_by=r["discarded_by"],
            discard_reason=r["discard_reason"],
        )
