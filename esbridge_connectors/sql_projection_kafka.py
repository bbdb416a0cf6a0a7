"""Feeding a SQL projection from a relay's Kafka topic instead of the notification log.

Why: the projection's database may not be able to reach the upstream
database, a topic is the one place many consumers read, and a rebuild from
Kafka puts no load on the upstream database.

The topic's partitions are independent streams (notification ids increase
within a partition, not across), so the projection keeps one position per
partition: tracking names ``{upstream}`` for a one-partition topic (the same
row a log-fed runner uses, so the two feeds can be swapped) and
``{upstream}#{partition}/{partitions}`` otherwise: the same names an esbridge
consumer adapter uses (:func:`esbridge.names.tracking_names`). Each message
is checked against its partition's position with the relay's
``esb_nid``/``esb_prev_nid`` headers (:mod:`esbridge.consumer.reconcile`): redeliveries
and replays are skipped, a gap (a message missing before this one) is filled
from the upstream notification log when a ``recorder``/``env`` is given and is
otherwise a
:class:`ProjectionGapError` (never skipped silently).

Rows and the partition's position commit in one transaction (the
:class:`~esbridge_connectors.sql_projection.ProjectionRunner` of that
partition does it). Kafka offsets are committed afterwards, as a hint of where
to resume reading; the database position is the truth.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.error import KafkaException
from eventsourcing.persistence import ApplicationRecorder, Mapper, Notification
from sqlalchemy.engine import Engine

from esbridge import wire
from esbridge.consumer.reconcile import PartitionOrder
from esbridge.errors import ConfigurationError, EsbridgeError, MessageFormatError
from esbridge.eventlog.notification_log import open_recorder, read_pages, release_recorder
from esbridge.kafka.partitioning import key_partitioner
from esbridge.kafka.topics import kafka_admin, partition_count
from esbridge.names import tracking_names
from esbridge.runtime.logs import kafka_client_config
from esbridge_connectors.sql_projection import ProjectionRunner, SqlProjection

log = logging.getLogger("esbridge.connectors.projection")


class ProjectionGapError(EsbridgeError):
    """Messages are missing from the topic and the upstream log cannot be read to fill them.

    Give the feed the upstream application's ``env`` (or ``recorder``) so it
    reads the missing notifications from the log, or replay the missing range
    to the topic (``esbridge replay``).
    """


def tracking_name(upstream: str, partition: int, partitions: int) -> str:
    """The tracking row of one partition (the upstream name itself for one partition).

    The consumer adapter's naming (:func:`esbridge.names.tracking_names`):
    the partition count is part of the name because an aggregate's partition
    depends on it.
    """
    return tracking_names(upstream, partitions)[partition]


_COORDINATOR_NOT_READY = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
}


def committed_offsets(
    consumer: Consumer, wanted: list[TopicPartition], deadline_s: float = 30.0
) -> list[TopicPartition]:
    """The group's committed offsets of ``wanted``: only a hint of where to resume reading.

    A broker that has just started answers ``NOT_COORDINATOR`` (or "loading")
    until its offsets topic is ready: those are retried until ``deadline_s``;
    after that (or on any other error) reading starts from the beginning of
    each partition, which is slower but correct, because the positions in the
    projection's database decide what is applied.
    """
    stop = time.monotonic() + deadline_s
    while True:
        try:
            return list(consumer.committed(wanted, timeout=10))
        except KafkaException as e:
            error = e.args[0] if e.args else None
            retriable = isinstance(error, KafkaError) and (
                error.retriable() or error.code() in _COORDINATOR_NOT_READY
            )
            if not retriable or time.monotonic() >= stop:
                log.warning("reading committed offsets: %s (reading from the beginning)", e)
                return [TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in wanted]
            time.sleep(0.2)


class UnreadableMessageError(MessageFormatError):
    """A message on the topic that carries no notification the feed can read.

    Not an esbridge message at all (no ``esb_format`` header), or an esbridge
    payload whose headers are missing or malformed. The feed skips it (and
    counts it in ``skipped``): no notification of the log is lost by that,
    since the next message of the partition names its predecessor
    (``esb_prev_nid``), so a notification the skipped message carried is a gap,
    filled from the upstream log or a :class:`ProjectionGapError`.
    """


def notification_from_message(message: Message) -> tuple[Notification, int]:
    """The upstream notification a relay payload message carries (default format only),
    and the id of the notification before it in its partition (``esb_prev_nid``).

    Raises :class:`UnreadableMessageError` for a message that carries no
    readable notification, and :class:`MessageFormatError` for a topic that is
    not a payload topic in the default format (prompts, CloudEvents, a newer
    format): the feed was pointed at the wrong topic, or must be upgraded.
    """
    headers = wire.headers_dict(cast(Any, message.headers()))
    if wire.H_FORMAT not in headers:
        raise UnreadableMessageError(
            f"the message at {_where(message)} has no 'esb_format' header: it was not "
            "published by an esbridge relay"
        )
    if wire.message_kind(headers) != wire.KIND_PAYLOAD:
        raise wire_error("a prompt message", message)
    try:
        meta = wire.decode_payload_headers(headers, message.key())
    except MessageFormatError as e:
        raise UnreadableMessageError(f"the message at {_where(message)}: {e}") from None
    if meta.content_type.startswith("application/cloudevents"):
        raise wire_error("an analytics (CloudEvents) message", message)
    try:
        originator_id: Any = uuid.UUID(meta.originator_id)
    except ValueError:
        originator_id = meta.originator_id
    notification = Notification(
        id=meta.nid,
        originator_id=originator_id,
        originator_version=meta.originator_version,
        topic=meta.topic,
        state=message.value() or b"",
    )
    return notification, meta.prev_nid


def wire_error(what: str, message: Message) -> EsbridgeError:
    return MessageFormatError(
        f"{what} at {_where(message)}: a projection reads the relay's payload topic in the "
        "default format"
    )


def _where(message: Message) -> str:
    return f"{message.topic()}[{message.partition()}]@{message.offset()}"


class KafkaProjectionFeed:
    """Apply a relay topic's messages to a :class:`SqlProjection`, one position per partition.

    ``env``/``recorder``: the upstream application's log, read only to fill
    gaps. ``group_id``: the Kafka consumer group whose committed offsets say
    where to resume reading (default ``esbridge-projection.{name}``).
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
        recorder: ApplicationRecorder | None = None,
        group_id: str | None = None,
        **runner_options: Any,
    ) -> None:
        self.projection = projection
        self.engine = engine
        self.upstream = upstream
        self.topic = topic
        self.kafka_config = dict(kafka_config)
        self.group_id = group_id or f"esbridge-projection.{projection.name}"
        self._env = env
        self._recorder = recorder
        self._given_recorder = recorder  # the caller's: never closed here
        with kafka_admin(self.kafka_config) as admin:
            count = partition_count(admin, topic)
        if count is None:
            raise ConfigurationError(f"topic {topic!r} does not exist: start its relay first")
        self.partitions = count
        self.partition_of = key_partitioner(count)
        self.runners = [
            ProjectionRunner(
                projection,
                engine,
                upstream=tracking_name(upstream, p, count),
                mapper=mapper,
                **runner_options,
            )
            for p in range(count)
        ]
        self._orders: list[PartitionOrder[Notification]] = []
        self._consumer: Consumer | None = None
        self.duplicates = 0
        self.gaps_filled = 0
        self.skipped = 0  # messages that carried no readable notification
        self._stopping = threading.Event()

    # -- state -------------------------------------------------------------------------

    @property
    def recorder(self) -> ApplicationRecorder | None:
        if self._recorder is None and self._env is not None:
            self._recorder = open_recorder(self.upstream, self._env)
        return self._recorder

    def positions(self) -> list[int]:
        """The committed notification id of each partition (from the projection's database)."""
        return [runner.position() for runner in self.runners]

    def setup(self) -> None:
        for runner in self.runners:
            runner.setup()
        verify = self._env is not None or self._given_recorder is not None
        self._orders = [PartitionOrder(runner.position(), verify=verify) for runner in self.runners]

    def rebuild(self) -> None:
        """Drop and recreate the projection's tables and read the topic from its beginning.

        Other projections are untouched. Call :meth:`process_available` (or
        :meth:`run`) afterwards to fill the tables.
        """
        self.close()
        self.runners[0].rebuild(catch_up=False)
        self.setup()
        consumer = self._make_consumer()
        consumer.assign(
            [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(self.partitions)]
        )
        self._consumer = consumer

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch (thread-safe)."""
        self._stopping.set()

    def close(self) -> None:
        """Close the Kafka consumer and the upstream log, if opened here (after :meth:`run`)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()
        self._recorder = release_recorder(self._recorder, self._given_recorder)
        for runner in self.runners:
            runner.close()

    def _make_consumer(self) -> Consumer:
        conf = {k: v for k, v in self.kafka_config.items() if not k.startswith("transactional")}
        conf.update(
            {
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
            }
        )
        return Consumer(kafka_client_config(conf))

    def _start(self) -> Consumer:
        if self._consumer is None:
            self.setup()
            consumer = self._make_consumer()
            wanted = [TopicPartition(self.topic, p) for p in range(self.partitions)]
            committed = committed_offsets(consumer, wanted)
            start = [
                TopicPartition(
                    self.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                )
                for tp in committed
            ]
            consumer.assign(start)
            self._consumer = consumer
        return self._consumer

    # -- processing --------------------------------------------------------------------

    def process_available(self, timeout: float = 5.0, batch: int = 500) -> int:
        """Consume until no message arrives for ``timeout`` seconds; notifications applied."""
        consumer = self._start()
        applied = 0
        while True:
            messages = consumer.consume(batch, timeout=timeout)
            if not messages:
                return applied
            applied += self._process(consumer, messages)

    def run(self, stop_after: float | None = None) -> None:
        """Consume until :meth:`stop` (or until ``stop_after`` seconds passed)."""
        deadline = None if stop_after is None else time.monotonic() + stop_after
        consumer = self._start()
        while not self._stopping.is_set() and (deadline is None or time.monotonic() < deadline):
            messages = consumer.consume(500, timeout=0.5)
            if messages:
                self._process(consumer, messages)

    def _process(self, consumer: Consumer, messages: list[Message]) -> int:
        ready: dict[int, list[Notification]] = {}
        offsets: dict[int, int] = {}
        for m in messages:
            error = m.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise EsbridgeError(f"Kafka error while feeding projection: {error}")
            p = m.partition()
            assert p is not None
            offsets[p] = (m.offset() or 0) + 1
            try:
                n, prev = notification_from_message(m)
            except UnreadableMessageError as e:
                self._skip(e)
                continue
            order = self._orders[p]
            offer = order.offer(n.id, prev, n, time.monotonic())
            self.duplicates += offer.duplicates
            for _nid, foreign in offer.broken:
                self._foreign(p, foreign, "its esb_prev_nid does not continue the partition")
            ready.setdefault(p, []).extend(item for _, item in offer.ready)
            if order.gap() is not None:
                ready[p].extend(self._fill_gap(p, order))
        applied = 0
        for p, notifications in ready.items():
            if notifications:
                a, parked, _ = self.runners[p].apply(notifications)
                applied += a + parked
        if offsets:
            consumer.commit(
                offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()],
                asynchronous=False,
            )
        return applied

    def _skip(self, error: UnreadableMessageError) -> None:
        self.skipped += 1
        log.error(
            "projection %s: skipped %s. No notification is lost by that: one it carried is "
            "found missing when the next message of its partition arrives (and read from the "
            "upstream log, or a ProjectionGapError)",
            self.projection.name,
            error,
        )

    def _foreign(self, partition: int, notification: Notification, why: str) -> None:
        self.skipped += 1
        log.error(
            "projection %s: skipped a foreign message on partition %d (notification id %d, "
            "key %s): %s. It moved no position",
            self.projection.name,
            partition,
            notification.id,
            notification.originator_id,
            why,
        )

    def _fill_gap(self, partition: int, order: PartitionOrder[Notification]) -> list[Notification]:
        """Read what is missing before the held messages from the log, checking each held one.

        Reads are bounded by the log's highest id (a held message's own id may
        be forged), and a held message is applied only if the log has the same
        event under its id; otherwise the log's event is applied instead.
        """
        recorder = self.recorder
        result: list[Notification] = []
        while (gap := order.gap()) is not None:
            if recorder is None:
                raise ProjectionGapError(
                    f"projection {self.projection.name!r}: {gap.describe()} of "
                    f"{self.upstream!r} are missing from partition {partition} of topic "
                    f"{self.topic!r} and no upstream log was given to read them from: pass "
                    "env= (or recorder=), or replay that range"
                )
            upto = min(gap.before, recorder.max_notification_id() or 0)
            found = [
                n
                for page in read_pages(recorder, gap.after, stop=upto)
                for n in page
                if self.partition_of(str(n.originator_id).encode()) == partition
            ]
            held = order.take(gap.before)
            genuine = found.pop() if found and found[-1].id == gap.before else None
            if genuine is not None and _same(genuine, held):
                found.append(held)
            else:
                self._foreign(partition, held, "the upstream log does not have it under its id")
                if genuine is not None:
                    found.append(genuine)
            result.extend(found)
            self.gaps_filled += 1
            result.extend(item for _, item in order.filled(upto).ready)
        return result


def _same(a: Notification, b: Notification) -> bool:
    return (
        a.originator_id == b.originator_id
        and a.originator_version == b.originator_version
        and a.topic == b.topic
        and bytes(a.state) == bytes(b.state)
    )
