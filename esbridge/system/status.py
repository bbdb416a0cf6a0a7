"""How far behind each follower of a system is: one row per edge (leader → follower).

Everything is read from Postgres, so ``esbridge status`` works from any
machine that can read the databases, whether or not the system runs:

* **upstream max nid**: the leader's highest notification id;
* **position**: the follower's tracking record(s) for that leader (one per
  partition when the topic has several partitions: see :func:`tracking_names`);
* **lag (events)**: upstream notifications the follower has not processed yet
  (only those of the event topics it follows, when it names ``topics``);
* **lag (s)**: the age of the oldest of those, from its event timestamp — how
  long the oldest unprocessed event has been waiting, 0 when caught up;
* **held gaps**: partitions a consumer holds waiting for a missing message
  (known only to the consumers' processes: read from their Prometheus
  ``/metrics`` endpoints when given, by a runner in the same process, else ``-``);
* **DLQ**: messages of the follower from this leader parked in the dead-letter
  table, with the count of each reason (``0`` when there is no such table:
  nothing was ever parked; ``unreadable`` when it could not be read, with the
  reason and the GRANT to run on stderr, and then ``--fail-on-lag`` fails: an
  unknown count is never shown as ``0``). Messages parked under an upstream
  name that is no leader of the follower (a consumer started with a wrong
  ``--upstream``) are listed under the table (:func:`parked_elsewhere`);
* **relay**: who publishes the leader's log: the process holding its relay's
  lease (:mod:`esbridge.relay.lease`), ``none`` when no relay does (nothing
  reaches the followers), ``-`` when not asked.

When the leaders' logs are served by ``esbridge serve-log`` (``remote``, from
``--upstream-url``), the leaders' databases are not read at all: the max nid
and the backlog come over HTTP, the age of the oldest event is decoded with
the leader's class (its transcodings, cipher and compressor settings, no
database), and the relay column shows ``-`` (its lease is in the leader's
database). Only the followers' databases are needed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg.errors
from eventsourcing.application import Application
from eventsourcing.persistence import Notification, ProcessRecorder
from eventsourcing.system import System

from esbridge.deadletters.store import DeadLetterStore
from esbridge.errors import ConfigurationError
from esbridge.eventlog.notification_log import (
    NotificationReader,
    close_recorder,
    open_recorder,
    read_pages,
)
from esbridge.eventlog.remote import RemoteLogSettings, RemoteNotificationLog
from esbridge.kafka.partitioning import partition_for_key
from esbridge.names import DEAD_LETTER_TABLE, tracking_names
from esbridge.relay.lease import lease_holder
from esbridge.runtime.persistence import require_postgres
from esbridge.runtime.postgres_privileges import current_role, with_advice
from esbridge.runtime.postgres_retry import connection_diagnosis
from esbridge.system.applications import construct_or_close
from esbridge.system.topic_partitions import tracked_partitions
from esbridge.system.upstream_logs import log_services

MAX_LAG_SCAN = 200_000  # notifications read to count a lag; beyond, the count is a lower bound


@dataclass
class EdgeStatus:
    leader: str
    follower: str
    upstream_max_nid: int
    positions: dict[str, int]
    lag_events: int
    lag_seconds: float
    held_gaps: int | None
    dlq: int | None
    relay: str | None = None  # the leader relay's lease holder; "" none; None: not asked
    dlq_error: str | None = None  # why the dead-letter table could not be read (dlq is None)
    #: The follower's parked messages by upstream (every one, not only this leader), then
    #: reason: ``dlq`` is this leader's sum.
    parked: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def position(self) -> int:
        """The lowest position over the edge's tracking names (all are at least this far)."""
        return min(self.positions.values()) if self.positions else 0

    @property
    def caught_up(self) -> bool:
        return self.lag_events == 0


@dataclass
class Backlog:
    count: int
    oldest: Notification | None


def unprocessed(
    upstream: NotificationReader,
    positions: Mapping[int | None, int],
    partitions: int,
    topics: Sequence[str],
    limit: int = MAX_LAG_SCAN,
) -> Backlog:
    """Upstream notifications past the follower's positions (``None`` key: one position)."""
    start = min(positions.values()) if positions else 0
    count = 0
    oldest = None
    scanned = 0
    for page in read_pages(upstream, start, topics=topics):
        for notification in page:
            if None in positions:
                position = positions[None]
            else:
                key = str(notification.originator_id).encode()
                position = positions.get(partition_for_key(key, partitions), 0)
            if notification.id > position:
                count += 1
                oldest = oldest or notification
        scanned += len(page)
        if scanned >= limit:
            break
    return Backlog(count, oldest)


def follower_positions(
    recorder: ProcessRecorder, leader: str, partitions: int
) -> dict[int | None, int]:
    names = tracking_names(leader, partitions)
    if len(names) == 1:
        return {None: recorder.max_tracking_id(names[0]) or 0}
    return {p: recorder.max_tracking_id(name) or 0 for p, name in enumerate(names)}


def event_age(app: Application[Any], notification: Notification | None) -> float:
    if notification is None:
        return 0.0
    try:
        event = app.mapper.to_domain_event(notification)
        timestamp: datetime = event.timestamp  # type: ignore[attr-defined]
        return max(0.0, time.time() - timestamp.timestamp())
    except Exception:
        return float("nan")


def relay_holder(app: Application[Any], relay_id: str) -> str | None:
    """Who holds the lease of relay ``relay_id`` of ``app`` ("" when nobody); None: unknown."""
    datastore = getattr(app.recorder, "datastore", None)
    if datastore is None or not hasattr(datastore, "get_connection"):
        return None
    try:
        with datastore.get_connection() as conn:
            return lease_holder(conn, relay_id) or ""
    except Exception:  # pg_locks not readable: say nothing rather than fail the status
        return None


def parked_counts(
    app: Application[Any], follower: str
) -> tuple[dict[str, dict[str, int]] | None, str | None]:
    """Parked messages of ``follower`` by upstream and reason, and why they could not be
    counted (None: they were).

    A missing table counts none (nothing was ever parked); any other error (a
    role without SELECT on the table, say) is returned, never shown as 0.
    """
    datastore = getattr(app.recorder, "datastore", None)
    if datastore is None or not hasattr(datastore, "transaction"):
        return None, None
    try:
        return DeadLetterStore(datastore).counts(follower), None
    except Exception as e:  # reported, with what to do
        if isinstance(e.__cause__, psycopg.errors.UndefinedTable):
            return {}, None
        text = f"cannot read {follower}'s dead-letter table {DEAD_LETTER_TABLE}: {e}"
        return None, with_advice(text, e, current_role(datastore), "SELECT")


def require_tables(name: str, app: Application[Any]) -> None:
    """Raise :class:`ConfigurationError` when ``app``'s tables are not in its database.

    An application that was never set up there (or settings that point at
    another database) would otherwise end the status in a raw
    ``relation ... does not exist``.
    """
    recorder = app.recorder
    datastore = getattr(recorder, "datastore", None)
    if datastore is None or not hasattr(datastore, "transaction"):
        return
    tables = [
        table
        for attr in ("events_table_name", "tracking_table_name")
        if (table := getattr(recorder, attr, None))
    ]
    schema = datastore.schema or "public"
    with datastore.transaction(commit=False) as curs:
        curs.execute("SELECT current_database() AS db")
        database = (curs.fetchone() or {}).get("db")
        missing = []
        for table in tables:
            curs.execute("SELECT to_regclass(%s) AS found", (f'{schema}."{table}"',))
            row = curs.fetchone()
            if row is None or row["found"] is None:
                missing.append(f"{schema}.{table}")
    if missing:
        raise ConfigurationError(
            f"{name}'s table(s) {', '.join(missing)} do not exist in database "
            f"{database!r}: {name} was never set up there. Create its tables with "
            "`esbridge run <system> --setup` (or start it once), or check that "
            f"POSTGRES_DBNAME (or {name.upper()}_POSTGRES_DBNAME) names its database"
        )


class EdgeProbe:
    """Reads one edge's positions and backlog (recorders opened once, reused per call)."""

    def __init__(
        self,
        leader: str,
        follower: str,
        follower_app: Application[Any],
        env: Mapping[str, str],
        partitions: int | None = 1,
        upstream: NotificationReader | None = None,
    ) -> None:
        """``upstream``: the leader's log, read through the caller's reader (closed by the
        caller); by default its recorder, opened with ``env``."""
        self.leader = leader
        self.follower = follower
        self.follower_app = follower_app
        recorder = follower_app.recorder
        if not isinstance(recorder, ProcessRecorder):
            raise TypeError(f"{follower!r} has no tracking records: it is not a follower")
        self.recorder = recorder
        self._own_upstream = upstream is None
        self.upstream: NotificationReader = upstream or open_recorder(leader, env)
        # None: the count the follower consumed with, from its tracking names.
        self.partitions = partitions or tracked_partitions(recorder, leader) or 1
        self.topics = list(getattr(follower_app, "topics", ()) or ())

    def close(self) -> None:
        """Close the upstream recorder's connections (if this probe opened it)."""
        if self._own_upstream:
            close_recorder(self.upstream)

    def positions(self) -> dict[int | None, int]:
        return follower_positions(self.recorder, self.leader, self.partitions)

    def backlog(self) -> Backlog:
        return unprocessed(self.upstream, self.positions(), self.partitions, self.topics)

    def status(self, leader_app: Application[Any], held_gaps: int | None = None) -> EdgeStatus:
        positions = self.positions()
        parked, dlq_error = parked_counts(self.follower_app, self.follower)
        dlq = None if parked is None else sum(parked.get(self.leader, {}).values())
        backlog = unprocessed(self.upstream, positions, self.partitions, self.topics)
        names = tracking_names(self.leader, self.partitions)
        return EdgeStatus(
            leader=self.leader,
            follower=self.follower,
            upstream_max_nid=self.upstream.max_notification_id() or 0,
            positions={names[0 if p is None else p]: v for p, v in positions.items()},
            lag_events=backlog.count,
            lag_seconds=event_age(leader_app, backlog.oldest),
            held_gaps=held_gaps,
            dlq=dlq,
            dlq_error=dlq_error,
            parked=parked or {},
        )


def edge_statuses(
    system: System,
    env: Mapping[str, str],
    *,
    partitions: Mapping[str, int | None] | int = 1,
    edges: Sequence[tuple[str, str]] | None = None,
    held_gaps: Mapping[tuple[str, str], int] | None = None,
    relay_ids: Mapping[str, str] | None = None,
    remote: RemoteLogSettings | None = None,
) -> list[EdgeStatus]:
    """The status of every edge (or of ``edges``), read from the databases.

    ``partitions``: the partition count of each leader's topic (or one for all); None
    for a leader: the count each follower's tracking records were made with.
    ``held_gaps``: held partitions per (leader, follower), from
    :func:`held_gaps_from_metrics`; edges not in it show ``None`` (unknown).
    ``relay_ids``: the relay id of each leader, to show who publishes its log.
    An application not stored in Postgres is a :class:`ConfigurationError`
    (in memory, every lag would read 0). ``remote``: read every leader's log
    from that log service instead of the leader's database (see above);
    without it, a leader that ``env`` gives a log service
    (``{LEADER}_UPSTREAM_LOG_URL`` or ``UPSTREAM_LOG_URL``, see
    :mod:`esbridge.system.upstream_logs`) is read from that service.
    """
    edges = list(edges if edges is not None else system.edges)
    leaders = {leader for leader, _ in edges}
    services = dict.fromkeys(leaders, remote) if remote is not None else log_services(leaders, env)
    in_databases = {follower for _, follower in edges}
    in_databases.update(leader for leader in leaders if leader not in services)
    for name in sorted(in_databases):
        require_postgres(name, env)
    apps: dict[str, Application[Any]] = {}
    decoders: dict[str, Application[Any]] = {}  # a remote leader's class, for its mapper
    logs: dict[str, RemoteNotificationLog] = {}
    holders: dict[str, str | None] = {}  # one lease lookup per leader, not per edge

    def app(name: str) -> Application[Any]:
        if name not in apps:
            # Settings Postgres refuses (a wrong password, no CONNECT) are named at once,
            # not reported as an unreachable server after the pool's timeout.
            connection_diagnosis(name, env)()
            apps[name] = read_only_app(system, name, env)
            require_tables(name, apps[name])
        return apps[name]

    def leader_app(name: str) -> Application[Any]:
        if name not in services:
            return app(name)
        if name not in decoders:
            decoders[name] = decoding_app(system, name, env)
        return decoders[name]

    def leader_log(name: str) -> NotificationReader | None:
        if name not in services:
            return None  # the probe opens the leader's recorder
        if name not in logs:
            logs[name] = services[name].log(name)
        return logs[name]

    try:
        result = []
        for leader, follower in edges:
            n = partitions if isinstance(partitions, int) else partitions.get(leader, 1)
            leader_app(leader)
            probe = EdgeProbe(leader, follower, app(follower), env, n, leader_log(leader))
            try:
                held = None if held_gaps is None else held_gaps.get((leader, follower))
                status = probe.status(leader_app(leader), held)
                if relay_ids is not None and leader in relay_ids and leader not in services:
                    if leader not in holders:
                        holders[leader] = relay_holder(app(leader), relay_ids[leader])
                    status.relay = holders[leader]
                result.append(status)
            finally:
                probe.close()
        return result
    finally:
        for a in (*apps.values(), *decoders.values()):
            a.close()
        for remote_log in logs.values():
            remote_log.close()


HELD_METRIC = "esbridge_consumer_held_partitions"


def metrics_url(address: str) -> str:
    """``host:port`` → ``http://host:port/metrics``; a full URL is kept as given."""
    if "://" in address:
        return address
    return f"http://{address}/metrics"


def held_gaps_from_metrics(
    addresses: Sequence[str], timeout: float = 5.0
) -> tuple[dict[tuple[str, str], int], list[str]]:
    """Held partitions per (leader, follower), summed over consumer processes' ``/metrics``.

    Why from the processes: which partition waits for a missing message is
    known only to the consumer holding it (nothing of it is in Postgres until
    the gap is filled). Returns the counts and the list of errors (one line
    per endpoint that could not be read), so a status shows what it knows.
    """
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    held: dict[tuple[str, str], int] = {}
    errors: list[str] = []
    for address in addresses:
        url = metrics_url(address)
        try:
            with urlopen(url, timeout=timeout) as response:
                text = response.read().decode()
        except OSError as e:
            errors.append(f"{url}: {e}")
            continue
        for family in text_string_to_metric_families(text):
            if family.name != HELD_METRIC:
                continue
            for sample in family.samples:
                edge = (sample.labels.get("upstream", ""), sample.labels.get("follower", ""))
                held[edge] = held.get(edge, 0) + int(sample.value)
    return held, errors


def decoding_app(system: System, name: str, env: Mapping[str, str]) -> Application[Any]:
    """The application ``name`` in memory: its mapper decodes its log's events, no database
    opened (its transcodings, cipher and compressor settings from ``env`` as usual)."""
    values = dict(env)
    values["PERSISTENCE_MODULE"] = "eventsourcing.popo"
    values.pop(f"{name.upper()}_PERSISTENCE_MODULE", None)
    return construct_or_close(system.get_app_cls(name), values)


def read_only_app(system: System, name: str, env: Mapping[str, str]) -> Application[Any]:
    """The application ``name`` constructed without creating tables (to read its state)."""
    values = dict(env)
    values["CREATE_TABLE"] = "n"
    values[f"{name.upper()}_CREATE_TABLE"] = "n"
    return construct_or_close(system.get_app_cls(name), values)


COLUMNS = (
    "edge",
    "upstream max nid",
    "position",
    "lag (events)",
    "lag (s)",
    "held gaps",
    "DLQ",
    "relay",
)


def _positions_cell(status: EdgeStatus) -> str:
    """One position, or each partition's labelled (``p0=1503 p1=1500``): which one lags shows."""
    if len(status.positions) <= 1:
        return str(status.position)
    return " ".join(f"p{i}={v}" for i, v in enumerate(status.positions.values()))


def _reasons(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))


def _dlq_cell(status: EdgeStatus) -> str:
    """The count, and when any, each reason's (``3 (foreign_message 1, policy_error 2)``)."""
    if status.dlq_error is not None:
        return "unreadable"
    if status.dlq is None:
        return "-"
    reasons = status.parked.get(status.leader)
    return f"{status.dlq} ({_reasons(reasons)})" if status.dlq and reasons else str(status.dlq)


def parked_elsewhere(statuses: Sequence[EdgeStatus]) -> list[str]:
    """Lines for messages parked under an upstream name that no edge of their follower has.

    Typically a consumer once started with a wrong ``--upstream``: its
    messages are in the follower's dead-letter table but in no edge's count.
    """
    leaders: dict[str, set[str]] = {}
    parked: dict[str, dict[str, dict[str, int]]] = {}
    for s in statuses:
        leaders.setdefault(s.follower, set()).add(s.leader)
        parked[s.follower] = s.parked
    lines = []
    for follower, by_upstream in parked.items():
        for upstream, reasons in sorted(by_upstream.items()):
            if upstream not in leaders[follower]:
                lines.append(
                    f"{follower}: {sum(reasons.values())} messages parked from {upstream!r}, "
                    f"which {follower} does not follow in this system ({_reasons(reasons)})"
                )
    return lines


def format_table(statuses: Sequence[EdgeStatus]) -> str:
    """A plain-text table, one row per edge."""
    rows = [COLUMNS]
    for s in statuses:
        rows.append(
            (
                f"{s.leader} -> {s.follower}",
                str(s.upstream_max_nid),
                _positions_cell(s),
                str(s.lag_events),
                f"{s.lag_seconds:.1f}",
                "-" if s.held_gaps is None else str(s.held_gaps),
                _dlq_cell(s),
                "-" if s.relay is None else s.relay or "none",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    elsewhere = parked_elsewhere(statuses)
    return "\n".join([*lines, *(["", *elsewhere] if elsewhere else [])])
