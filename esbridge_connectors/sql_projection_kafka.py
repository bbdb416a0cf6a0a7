"""Feeding a SQL projection from a relay's Kafka topic instead of the notification log.

Why: the projection's database may not be able to reach the upstream
database, a topic is the one place many consumers read, and a rebuild from
Kafka puts no load on the upstream database.

The feed is esbridge's consumer loop (:class:`~esbridge.consumer.adapter.ConsumerAdapter`)
driving a :class:`~esbridge_connectors.sql_projection_sink.ProjectionSink`:
the same ordering, duplicate skipping, gap filling and parking as a process
application fed from Kafka. The topic's partitions are independent streams
(notification ids increase within a partition, not across), so the projection
keeps one position per partition, under the consumer's tracking names
(:func:`esbridge.names.tracking_names`): ``{upstream}`` for a one-partition
topic (the same row a log-fed runner uses, so the two feeds can be swapped)
and ``{upstream}#{partition}/{partitions}`` otherwise. A gap (a message
missing before this one) is filled from the upstream notification log when
``env`` (or ``recorder``) is given and is otherwise a
:class:`ProjectionGapError` (never skipped silently).

Rows and the partitions' positions commit in one transaction of the
projection's database. Kafka offsets are committed afterwards, as a hint of
where to resume reading; the database positions are the truth.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from eventsourcing.persistence import Mapper
from sqlalchemy.engine import Engine

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.errors import ConfigurationError, GapNotReconciledError
from esbridge.eventlog.notification_log import NotificationReader
from esbridge.kafka.topics import kafka_admin, partition_count
from esbridge.names import tracking_names
from esbridge.processing.steps import StepFactory, UpstreamDecoder
from esbridge_connectors.sql_projection import SqlProjection
from esbridge_connectors.sql_projection_sink import ProjectionSink


class ProjectionGapError(GapNotReconciledError):
    """Messages are missing from the topic and the upstream log cannot be read to fill them.

    Give the feed the upstream application's ``env`` (or ``recorder``) so it
    reads the missing notifications from the log, or replay the missing range
    to the topic (``esbridge replay``). ``topic``, ``partition``, ``position``
    and ``held_nid`` say where (see :class:`~esbridge.errors.GapNotReconciledError`).
    """


def tracking_name(upstream: str, partition: int, partitions: int) -> str:
    """The tracking row of one partition (the upstream name itself for one partition).

    The consumer adapter's naming (:func:`esbridge.names.tracking_names`):
    the partition count is part of the name because an aggregate's partition
    depends on it.
    """
    return tracking_names(upstream, partitions)[partition]


class KafkaProjectionFeed:
    """Apply a relay topic's messages to a :class:`SqlProjection`, one position per partition.

    ``mapper``: the upstream application's mapper (see
    :func:`esbridge_connectors.upstream.application_mapper`). ``env`` /
    ``recorder``: the upstream application's log, read only to fill gaps (a
    :class:`~esbridge.eventlog.remote.RemoteNotificationLog` reads it from its
    ``esbridge serve-log``).
    ``group_id``: the Kafka consumer group whose committed offsets say where to
    resume reading (default ``esbridge-projection.{name}``). ``page_size``
    notifications at most per transaction; a handler that raises is tried
    ``max_attempts`` times (``retry_delay`` seconds, doubling), then parked.
    ``consumer_options``: further :class:`~esbridge.consumer.adapter.ConsumerAdapter`
    tuning (``hold_timeout``, ``verify_messages``, ``trailing_gap_after``...).
    """

    def __init__(
        self,
        projection: SqlProjection,
        engine: Engine,
        *,
        upstream: str,
        topic: str,
        kafka_config: Mapping[str, Any],
        mapper: Mapper[Any],
        env: Mapping[str, str] | None = None,
        recorder: NotificationReader | None = None,
        group_id: str | None = None,
        page_size: int = 500,
        max_attempts: int = 3,
        retry_delay: float = 0.1,
        poll_interval: float = 0.5,
        on_version_change: Literal["error", "rebuild"] = "error",
        **consumer_options: Any,
    ) -> None:
        self.projection = projection
        self.engine = engine
        self.upstream = upstream
        self.topic = topic
        self.kafka_config = dict(kafka_config)
        self.group_id = group_id or f"esbridge-projection.{projection.name}"
        with kafka_admin(self.kafka_config) as admin:
            count = partition_count(admin, topic)
        if count is None:
            raise ConfigurationError(f"topic {topic!r} does not exist: start its relay first")
        self.partitions = count
        self.names = tracking_names(upstream, count)
        self.sink = ProjectionSink(projection, engine, on_version_change=on_version_change)
        self._steps = StepFactory(projection.name, UpstreamDecoder(mapper, upstream))
        self._env = dict(env) if env is not None else None
        self._recorder = recorder
        self._options: dict[str, Any] = {
            "batch_size": page_size,
            "retries": max(1, max_attempts - 1),
            "retry_backoff": retry_delay,
            "poll_timeout": min(poll_interval, 0.5),
            # As a log-fed runner: a parked notification holds nothing back.
            "park_behind": False,
            # Without the log a gap cannot be filled: say so at once, do not wait.
            "hold_timeout": 60.0 if self._readable_log else 0.0,
            **consumer_options,
        }
        self._earlier: dict[str, int] = {}  # counts of the adapters this feed replaced
        self._set_up = False
        self.adapter = self._new_adapter()

    @property
    def _readable_log(self) -> bool:
        return self._env is not None or self._recorder is not None

    def _new_adapter(self) -> ConsumerAdapter:
        return ConsumerAdapter(
            None,
            upstream=self.upstream,
            topic=self.topic,
            kafka_config=self.kafka_config,
            group_id=self.group_id,
            upstream_env=self._env,
            upstream_recorder=self._recorder,
            partitions=self.partitions,
            sink=self.sink,
            steps=self._steps,
            **self._options,
        )

    # -- state -------------------------------------------------------------------------

    @property
    def recorder(self) -> NotificationReader | None:
        """The upstream log's recorder, once opened to fill a gap (None without one)."""
        log = self.adapter.upstream_log
        return None if log is None else log.recorder

    @property
    def duplicates(self) -> int:
        """Redelivered and replayed messages skipped (this feed object's count)."""
        return self._counted("duplicates")

    @property
    def gaps_filled(self) -> int:
        """Gaps filled from the upstream log (this feed object's count)."""
        return self._counted("gaps_reconciled")

    @property
    def skipped(self) -> int:
        """Messages that carried no notification of the log, parked without a position."""
        return self.sink.skipped

    def _counted(self, name: str) -> int:
        total: int = getattr(self.adapter.status(), name)
        return total + self._earlier.get(name, 0)

    def _replace_adapter(self) -> None:
        """A fresh adapter (a stopped one stays stopped), keeping the counts of the old one."""
        status = self.adapter.status()
        for name in ("duplicates", "gaps_reconciled"):
            self._earlier[name] = self._earlier.get(name, 0) + getattr(status, name)
        self.adapter.close()
        self.adapter = self._new_adapter()

    def positions(self) -> list[int]:
        """The committed notification id of each partition (from the projection's database)."""
        return [self.sink.position(name) for name in self.names]

    def setup(self) -> None:
        """Create the projection's tables and tracking tables if missing; check the version."""
        self.sink.setup(self.names)
        self._set_up = True

    def rebuild(self) -> None:
        """Drop and recreate the projection's tables and read the topic from its beginning.

        Other projections are untouched. Call :meth:`process_available` (or
        :meth:`run`) afterwards to fill the tables. The consumer group's offsets
        are ignored then: they were committed at positions the projection no
        longer holds.
        """
        self.adapter.close()
        self.sink.rebuild()
        self._replace_adapter()
        self._set_up = True

    # -- processing --------------------------------------------------------------------

    def process_available(self, timeout: float = 5.0, batch: int | None = None) -> int:
        """Consume until caught up (or ``timeout`` seconds); notifications applied or parked.

        ``batch``: notifications per transaction from now on (default: ``page_size``).
        """
        if not self._set_up:
            self.setup()
        if batch is not None:
            self.adapter.tuning.batch_size = batch
        with self._gap_errors():
            return self.adapter.process_available(timeout=timeout)

    def run(self, stop_after: float | None = None) -> None:
        """Consume until :meth:`stop` or ``stop_after`` seconds (raises on a permanent failure).

        Returns with the Kafka consumer closed; the feed can be run again.
        """
        if not self._set_up:
            self.setup()
        timer = None if stop_after is None else threading.Timer(stop_after, self.adapter.stop)
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            with self._gap_errors():
                self.adapter.run()
        finally:
            if timer is not None:
                timer.cancel()
            self._replace_adapter()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch (thread-safe)."""
        self.adapter.stop()

    def close(self) -> None:
        """Leave the consumer group and close the upstream log, if opened here."""
        self.adapter.close()

    @contextmanager
    def _gap_errors(self) -> Iterator[None]:
        try:
            yield
        except GapNotReconciledError as e:
            raise ProjectionGapError(
                f"projection {self.projection.name!r}: notifications of {self.upstream!r} "
                f"after {e.position} are missing from partition {e.partition} of topic "
                f"{self.topic!r} and no upstream log was given to read them from: pass env= "
                f"(or recorder=), or replay that range ({e})",
                topic=e.topic,
                partition=e.partition,
                position=e.position,
                held_nid=e.held_nid,
            ) from e
