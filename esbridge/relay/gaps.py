"""Gaps in the notification log: the relay never moves past an id that may still commit.

``eventsourcing``'s Postgres recorder serialises writers with ``LOCK TABLE ...
IN EXCLUSIVE MODE``, so ids commit in id order and a gap is a rolled-back
insert that never fills. Writers that skip the lock (``POSTGRES_ENABLE_DB_FUNCTIONS=y``,
or any other program inserting into the events table) may commit an id *after*
higher ids: a relay reading "ids greater than my position" would pass over it
for ever, and nothing downstream could tell.

So a relay treats every gap it has not *settled* as possibly in flight. A gap
costs nothing to find: a page whose ids are contiguous (last id minus the
position equals the row count) has none, which is the hot path. At a gap, the
relay publishes up to it and asks Postgres which transactions are writing to
the events table: every transaction that allocated an id holds a lock on the
table (``RowExclusiveLock``, taken before ``nextval``) until it ends, and
``pg_locks`` lists them. The same statement reads the log's highest id. Once
each of those transactions has ended, every gap below that id is final: an
id that appears now committed late (it is published, in order, since nothing
above it was; logged and counted as a late commit), and an id still absent was
rolled back. No gap waits for transactions that started later, so a busy log
never stalls; a gap with no writer in progress costs one query.

Reading ``pg_locks`` needs no privilege: the relay still needs only ``SELECT``
on the events table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, TypeVar

from eventsourcing.persistence import ApplicationRecorder
from psycopg import sql
from psycopg.rows import tuple_row

from esbridge.relay.metrics import RelayMetrics
from esbridge.relay.reader import postgres_events_table

log = logging.getLogger("esbridge.relay_gaps")

T = TypeVar("T")

#: Seconds between the warnings about a gap still held open by the same transactions.
STILL_WAITING_WARNING = 30.0

#: Writers of the events table: every lock on it but a reader's, granted, of another session.
_WRITERS = (
    "SELECT virtualtransaction, pid FROM pg_locks "
    "WHERE locktype = 'relation' AND granted AND mode <> 'AccessShareLock' "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND relation = {table}::regclass AND pid IS DISTINCT FROM pg_backend_pid()"
)


class GapGuard:
    """Decides how much of a page the relay may publish, given the gaps it contains.

    One per relay, kept across steps: it remembers up to which id gaps are
    final (:attr:`settled`) and the transactions a gap waits for.
    """

    def __init__(
        self, app: str, datastore: Any, schema: str, table: str, metrics: RelayMetrics
    ) -> None:
        self.app = app
        self.table = f"{schema}.{table}"
        self.metrics = metrics
        self._datastore = datastore
        qualified = sql.Literal(f'"{schema}"."{table}"')
        self._check = sql.SQL(
            "SELECT (SELECT max(notification_id) FROM {schema}.{table}), "
            "array(SELECT virtualtransaction FROM ({writers}) w), "
            "array(SELECT DISTINCT pid FROM ({writers}) w WHERE pid IS NOT NULL)"
        ).format(
            schema=sql.Identifier(schema),
            table=sql.Identifier(table),
            writers=sql.SQL(_WRITERS).format(table=qualified),
        )
        self._poll = sql.SQL(
            "SELECT count(*), array_agg(DISTINCT pid) FILTER (WHERE pid IS NOT NULL) "
            "FROM ({writers}) w WHERE virtualtransaction = ANY(%s)"
        ).format(writers=sql.SQL(_WRITERS).format(table=qualified))
        #: Every gap at or below this id is final (no transaction can fill it any more).
        self.settled = 0
        self._waiting: tuple[int, list[str]] | None = None  # bound, transactions
        self._waiting_since = 0.0
        self._warned = 0.0
        self._gaps: list[tuple[int, int]] = []  # unsettled gaps seen at the last cut

    @classmethod
    def for_recorder(
        cls, app: str, recorder: ApplicationRecorder, metrics: RelayMetrics
    ) -> GapGuard | None:
        """A guard for ``eventsourcing``'s Postgres recorder; None for other recorders.

        Other recorders (in memory, SQLite) serialise their writers in the process
        or the database file: their ids commit in order.
        """
        found = postgres_events_table(recorder)
        return None if found is None else cls(app, *found, metrics)

    @property
    def waiting(self) -> bool:
        """True while a gap waits for transactions in progress (the relay polls briefly)."""
        return self._waiting is not None

    @property
    def gaps(self) -> list[tuple[int, int]]:
        """The unsettled gaps (first, last id) seen at the last cut, not yet read again."""
        return list(self._gaps)

    def ready(self) -> bool:
        """False while the transactions a gap waits for are still in progress."""
        if self._waiting is None:
            return True
        bound, vxids = self._waiting
        in_progress, pids = self._query(self._poll, (vxids,))
        if in_progress:
            now = time.monotonic()
            if now - self._warned >= STILL_WAITING_WARNING:
                self._warned = now
                log.warning(
                    "relay %s: still waiting, after %.0f s, for transactions writing to %s "
                    "(Postgres pids %s), which may commit notification ids %s; the relay "
                    "publishes nothing past them until those transactions commit or roll back",
                    self.app,
                    now - self._waiting_since,
                    self.table,
                    ", ".join(map(str, sorted(pids or ()))),
                    _ranges(self._gaps),
                )
            return False
        self._waiting = None
        self.settled = max(self.settled, bound)
        log.info(
            "relay %s: the transactions writing to %s ended after %.3f s; gaps up to %d are final",
            self.app,
            self.table,
            time.monotonic() - self._waiting_since,
            bound,
        )
        return True

    def usable(self, position: int, page: Sequence[T], id_of: Callable[[T], int]) -> int:
        """How many leading items of ``page`` (ids after ``position``) may be published.

        All of them unless an unsettled gap comes first: then those before it.
        """
        last = id_of(page[-1])
        if self._gaps:
            self._note_late(page, id_of)
        if last - position == len(page) or last <= self.settled:
            return len(page)  # no gap, or only final ones
        prev = position
        cut = len(page)
        gaps: list[tuple[int, int]] = []
        for i, item in enumerate(page):
            nid = id_of(item)
            if nid > prev + 1 and nid > self.settled + 1:
                gaps.append((max(prev, self.settled) + 1, nid - 1))
                cut = min(cut, i)
            prev = nid
        if gaps:
            self._gaps = gaps  # those missing now: any that appears later committed late
        return cut

    def settle(self) -> bool:
        """After a cut: True if the gaps are final now (re-read them), False to wait.

        One statement reads the log's highest id and the transactions writing to
        the events table: any transaction holding an id below that highest id
        allocated it before, so it is among them (or has ended).
        """
        row = self._query(self._check, ())
        bound, vxids, pids = int(row[0] or 0), list(row[1]), list(row[2])
        if not vxids:
            self.settled = max(self.settled, bound)
            return True
        self._waiting = (bound, vxids)
        self._waiting_since = self._warned = time.monotonic()
        self.metrics.gap_waits.inc()
        gaps = self._gaps
        log.info(
            "relay %s: notification ids %s are missing while %d transactions write to %s "
            "(Postgres pids %s); publishing nothing past them until those transactions end",
            self.app,
            _ranges(gaps),
            len(vxids),
            self.table,
            ", ".join(map(str, pids)),
        )
        return False

    def _query(self, query: sql.Composed, params: tuple[Any, ...]) -> tuple[Any, ...]:
        with self._datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute(query, params).fetchone()
        assert row is not None  # an aggregate query: always one row
        return row

    def _note_late(self, page: Sequence[T], id_of: Callable[[T], int]) -> None:
        """Log and count the ids of ``page`` that were missing at the last cut (late commits)."""
        gaps = self._gaps
        first, last = id_of(page[0]), id_of(page[-1])
        if first > gaps[-1][1]:
            self._gaps = []
            return
        late = [
            nid
            for nid in map(id_of, page)
            if nid <= gaps[-1][1] and any(lo <= nid <= hi for lo, hi in gaps)
        ]
        self._gaps = [(max(lo, last + 1), hi) for lo, hi in gaps if hi > last]
        if late:
            self.metrics.late_commits.inc(len(late))
            log.warning(
                "relay %s: notification ids %s committed after higher ids (late commits: "
                "writers without the library's table lock, e.g. POSTGRES_ENABLE_DB_FUNCTIONS=y); "
                "published now, in order, since the relay had waited at the gap",
                self.app,
                ", ".join(map(str, late)),
            )


def _ranges(gaps: Sequence[tuple[int, int]]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in gaps)


def guarded_pages(
    pages_from: Callable[[int], Iterator[Sequence[T]]],
    after: int,
    guard: GapGuard | None,
    id_of: Callable[[T], int],
) -> Generator[Sequence[T], None, None]:
    """The pages of ``pages_from(after)``, ending before any gap that may still fill.

    At such a gap: pages up to it, then, if the gap is final already, the log
    read again from there; otherwise the pages end, and the next call (the
    relay's next step) continues once the transactions it waits for ended.
    """
    if guard is None:
        yield from pages_from(after)
        return
    position = after
    while guard.ready():
        pages = pages_from(position)
        cut = False
        try:
            for page in pages:
                count = guard.usable(position, page, id_of)
                cut = count < len(page)
                if count:
                    page = page[:count] if cut else page
                    position = id_of(page[-1])
                    yield page
                if cut:
                    break
        finally:
            close = getattr(pages, "close", None)
            if close is not None:
                close()  # now: it may hold a pooled connection
        if not cut or not guard.settle():
            return
