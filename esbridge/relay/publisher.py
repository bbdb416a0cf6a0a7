"""The Kafka side of a payload relay: batches of messages plus the relay's position.

Exactly-once mode: each batch is one Kafka transaction holding the batch's
messages *and* a position message (see :mod:`esbridge.relay.position`), so a
crash at any instant leaves either the whole batch with its position or
neither. The ``transactional.id`` is stable per relay: a restarted relay's
``init_transactions()`` aborts whatever its predecessor left open and fences
it, should it still be alive (a zombie).

At-least-once mode (brokers without transactions): an idempotent producer
sends the batch, waits until every message is acknowledged, then sends the
position. A crash between the two publishes the batch again after restart:
duplicates are possible, loss is not.

Recovery from anything but a permanent error is the same in both modes:
drop the producer, make a new one, read the committed position again and go
on from there. It is slower than finer-grained handling but has one path,
and that path is the one a restart takes, which the kill -9 tests exercise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from eventsourcing.persistence import Notification

from esbridge import wire
from esbridge.errors import (
    ConfigurationError,
    EsbridgeError,
    KafkaAuthorizationError,
    RelayError,
    RelayFencedError,
)
from esbridge.kafka.access import authorization_error, is_authorization_failure
from esbridge.relay.position import RelayPosition, read_position
from esbridge.runtime.logs import kafka_client_config
from esbridge.wire.encoding import PayloadEncoder, Row, RowError, Traces

log = logging.getLogger("esbridge.relay_publisher")

#: Errors no retry can fix: the relay stops and names the notification.
PERMANENT_CODES = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        getattr(KafkaError, "_MSG_SIZE_TOO_LARGE", KafkaError.MSG_SIZE_TOO_LARGE),
        KafkaError.INVALID_RECORD,
        KafkaError.POLICY_VIOLATION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)
FENCED_CODES = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED})

#: Producer defaults tuned for throughput (any can be overridden by the user).
PRODUCER_DEFAULTS: dict[str, Any] = {
    "linger.ms": 20,
    "batch.size": 1_000_000,
    "batch.num.messages": 10_000,
    "compression.type": "lz4",
    "queue.buffering.max.kbytes": 16_384,
    "queue.buffering.max.messages": 20_000,
    "delivery.report.only.error": True,
}

#: Seconds ``poll()`` waits when ``produce`` finds the queue full (back-pressure).
#: Successful deliveries are not reported, so the wait usually lasts this long.
BACKPRESSURE_POLL = 0.05


class TransientPublishError(Exception):
    """Publishing failed in a way a new producer may overcome (broker restart, timeout)."""


class KafkaPublisher:
    """Publishes batches of notifications and the relay position to Kafka."""

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        app: str,
        topic: str,
        position_topic: str,
        relay_id: str,
        encoder: PayloadEncoder,
        num_partitions: int,
        exactly_once: bool,
        transactional_id: str,
        init_timeout: float = 60.0,
        commit_timeout: float = 60.0,
        allow_other_relays: bool = False,
    ) -> None:
        self.config = dict(config)
        self.allow_other_relays = allow_other_relays
        self.app = app
        self.topic = topic
        self.position_topic = position_topic
        self.relay_id = relay_id
        self.encoder = encoder
        self.num_partitions = num_partitions
        self.exactly_once = exactly_once
        self.transactional_id = transactional_id
        self.init_timeout = init_timeout
        self.commit_timeout = commit_timeout
        self.committed = RelayPosition.start(num_partitions)
        self._working = self.committed.copy()
        self._last_bytes = self._working.last_bytes()
        self._producer: Producer | None = None
        self._in_transaction = False
        self.batch_count = 0
        self._delivery_error: tuple[KafkaError, int | None] | None = None

    # -- life cycle -------------------------------------------------------

    def producer_config(self) -> dict[str, Any]:
        conf = dict(PRODUCER_DEFAULTS)
        conf.update(self.config)
        conf["enable.idempotence"] = True
        conf["on_delivery"] = self._on_delivery
        if self.exactly_once:
            conf["transactional.id"] = self.transactional_id
        else:
            conf.pop("transactional.id", None)
        return conf

    def start(self, first: bool = True) -> RelayPosition:
        """Make the producer (fencing predecessors) and read the committed position.

        On the ``first`` start a broker that answers but does not set up the
        transactional id is a :class:`ConfigurationError` (it cannot do
        transactions); later (recovery), or when no broker answers, it is
        transient.
        """
        self.close()
        producer = Producer(kafka_client_config(self.producer_config()))
        if self.exactly_once:
            try:
                producer.init_transactions(self.init_timeout)
            except KafkaException as e:
                error = e.args[0]
                if error.code() in FENCED_CODES:
                    raise RelayFencedError(self._fenced_message(error)) from e
                if is_authorization_failure(error):
                    raise self._unauthorized(error) from e
                if error.retriable() and (not first or not _answers(producer)):
                    # Later starts, and a first one whose broker is gone meanwhile (a
                    # standby taking over during an outage): Kafka is down, not unfit.
                    raise TransientPublishError(f"init_transactions: {error}") from e
                raise ConfigurationError(
                    f"the Kafka broker did not set up transactional.id "
                    f"{self.transactional_id!r} within {self.init_timeout:.0f} s ({error}). "
                    "The broker may not support transactions (it needs "
                    "transaction.state.log.replication.factor <= the number of brokers, and "
                    "permission for the transactional id); use at-least-once mode "
                    "(--at-least-once, exactly_once=False) for a broker without transactions"
                ) from e
        self._producer = producer
        self._in_transaction = False
        # On the first start only: a relay that another one's refusal would stop later is
        # one started deliberately (allow_other_relays), or one started before it.
        checked = first and not self.allow_other_relays
        self.committed = read_position(
            self.config,
            self.position_topic,
            self.relay_id,
            self.num_partitions,
            topic=self.topic if checked else None,
        )
        self._working = self.committed.copy()
        self._last_bytes = self._working.last_bytes()
        self.batch_count = 0
        self._delivery_error = None
        return self.committed

    def close(self) -> None:
        """Drop the producer; an open transaction is left to the next instance to abort."""
        producer, self._producer = self._producer, None
        if producer is not None:
            # A fenced or otherwise fatally failed producer raises from every call,
            # even purge()/flush(): closing must still succeed, so nothing here raises.
            with contextlib.suppress(KafkaException):
                if self._in_transaction:
                    producer.abort_transaction(5)
            with contextlib.suppress(KafkaException):
                producer.purge()
            with contextlib.suppress(KafkaException):
                producer.flush(0)
        self._in_transaction = False

    def serve(self) -> None:
        """Hand over what the producer has queued (log lines, delivery reports); never waits.

        An idle relay calls it: otherwise librdkafka's lines about a broker
        lost meanwhile would wait for the next batch to be logged.
        """
        if self._producer is not None:
            with contextlib.suppress(KafkaException):
                self._producer.poll(0)

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            raise TransientPublishError("no producer (not started, or being recovered)")
        return self._producer

    # -- batches ----------------------------------------------------------

    @property
    def working_nid(self) -> int:
        """The last notification id added to the current batch (committed or not)."""
        return self._working.nid

    def add(self, notifications: Sequence[Notification], traces: Traces | None = None) -> None:
        """Add notifications (in id order, after the working position) to the current batch.

        ``traces``: trace context headers of traced notifications (see :class:`Traces`).
        """
        producer = self.producer
        if self.exactly_once and not self._in_transaction:
            self._begin(producer)
        produce = producer.produce
        message = self.encoder.message
        last = self._working.last_per_partition
        topic = self.topic
        try:
            for n in notifications:
                try:
                    trace = traces.get(n.id) if traces else None
                    key, value, headers, partition = message(n, last, trace)
                except Exception as e:
                    raise RelayError(
                        f"cannot read notification {n.id} of application {self.app!r} "
                        f"({type(e).__name__}: {e}); the relay stopped before it"
                    ) from e
                while True:
                    try:
                        produce(topic, value, key, partition, headers=headers)  # type: ignore[arg-type]
                        break
                    except BufferError:
                        producer.poll(BACKPRESSURE_POLL)  # back-pressure: wait for deliveries
                    except KafkaException as e:
                        raise self._rejected(e.args[0], n.id) from e
                self._working.nid = n.id
                self.batch_count += 1
        finally:
            self._last_bytes = self._working.last_bytes()

    def add_rows(self, rows: Sequence[Row], traces: Traces | None = None) -> None:
        """Like :meth:`add`, for rows from :func:`~esbridge.relay.reader.read_pages_for_publishing`.

        The fast path (no encoder hook): the encoder produces the whole page
        in one loop. The working position (last id, last id per partition)
        is updated once per page, or up to the failing row on an error.
        """
        if not rows:
            return
        producer = self.producer
        if self.exactly_once and not self._in_transaction:
            self._begin(producer)
        last = self._last_bytes
        try:
            self.encoder.produce_rows(
                rows, producer.produce, self.topic, last, self._wait_for_room, traces
            )
        except RowError as e:
            produced = [row[0] for row in rows if row[0] < e.nid]
            self._account(produced[-1] if produced else None, len(produced), last)
            cause = e.cause
            if isinstance(cause, KafkaException):
                raise self._rejected(cause.args[0], e.nid) from cause
            raise RelayError(
                f"cannot read notification {e.nid} of application {self.app!r} "
                f"({type(cause).__name__}: {cause}); the relay stopped before it"
            ) from cause
        self._account(rows[-1][0], len(rows), last)

    def _account(self, nid: int | None, count: int, last: list[bytes]) -> None:
        if nid is not None:
            self._working.nid = nid
        self.batch_count += count
        self._working.last_per_partition = [int(b) for b in last]

    def _wait_for_room(self) -> None:
        self.producer.poll(BACKPRESSURE_POLL)  # back-pressure: wait for deliveries

    def commit(self) -> int:
        """Commit the current batch with its position; the number of messages committed."""
        count = self.batch_count
        if count == 0:
            return 0
        producer = self.producer
        value = self._working.encode(self.relay_id, self.app, self.topic)
        if self.exactly_once:
            self._produce_position(producer, value)
            self._commit_transaction(producer)
        else:
            self._flush(producer)
            self._produce_position(producer, value)
            self._flush(producer)
        self.committed = self._working.copy()
        self.batch_count = 0
        return count

    def _produce_position(self, producer: Producer, value: bytes) -> None:
        while True:
            try:
                producer.produce(self.position_topic, value, self.relay_id.encode(), 0)
                return
            except BufferError:
                producer.poll(BACKPRESSURE_POLL)  # the queue is full of the batch
            except KafkaException as e:
                raise self._classify(e.args[0], "producing the relay position") from e

    def _begin(self, producer: Producer) -> None:
        try:
            producer.begin_transaction()
        except KafkaException as e:
            raise self._classify(e.args[0], "begin_transaction") from e
        self._in_transaction = True
        self.encoder.set_publish_time()

    def _commit_transaction(self, producer: Producer) -> None:
        attempts = 0
        while True:
            try:
                producer.commit_transaction(self.commit_timeout)
                self._in_transaction = False
                return
            except KafkaException as e:
                error = e.args[0]
                if is_authorization_failure(error):  # the deliveries say only "purged"
                    raise self._unauthorized(error) from e
                self._raise_delivery_error()
                attempts += 1
                if error.retriable() and attempts < 3:
                    log.warning("commit_transaction: %s; retrying", error)
                    continue
                raise self._classify(error, "commit_transaction") from e

    def _flush(self, producer: Producer) -> None:
        remaining = producer.flush(self.commit_timeout)
        self._raise_delivery_error()
        if remaining:
            raise TransientPublishError(
                f"{remaining} messages not acknowledged within {self.commit_timeout:.0f} s"
            )

    # -- errors -----------------------------------------------------------

    def _on_delivery(self, error: KafkaError | None, msg: Message) -> None:
        if error is None or self._delivery_error is not None:
            return
        text = wire.headers_dict(msg.headers()).get(wire.H_NID)  # type: ignore[arg-type]
        nid = int(text) if text and text.isdigit() else None
        self._delivery_error = (error, nid)

    def _raise_delivery_error(self) -> None:
        if self._delivery_error is None:
            return
        error, nid = self._delivery_error
        self._delivery_error = None
        if error.code() in PERMANENT_CODES:
            raise self._rejected(error, nid)
        raise TransientPublishError(f"delivery of notification {nid} failed: {error}")

    def _rejected(self, error: KafkaError, nid: int | None) -> EsbridgeError:
        if error.code() == KafkaError._FATAL:
            # The producer is dead (a relay that hung wakes to find itself fenced):
            # never a refusal of the notification, whatever the cause says.
            error = self._fatal_cause() or error
            if error.code() not in FENCED_CODES and not is_authorization_failure(error):
                return RelayFencedError(self._fenced_message(error))
        if is_authorization_failure(error):
            return self._unauthorized(error)
        if error.code() in FENCED_CODES:
            return RelayFencedError(self._fenced_message(error))
        what = f"notification {nid}" if nid is not None else "a notification"
        return RelayError(
            f"Kafka refused {what} of application {self.app!r} on topic {self.topic!r}: "
            f"{error.str()} ({error.name()}). The relay stopped; nothing after the last committed "
            f"notification ({self.committed.nid}) was published. For a message too large, raise "
            "the topic's max.message.bytes and the producer's message.max.bytes"
        )

    def _unauthorized(self, error: KafkaError) -> KafkaAuthorizationError:
        """The missing ACL: the transactional id's, or WRITE on one of the relay's topics.

        Kafka does not say which topic of a transaction it refused; the
        start-up check (:func:`~esbridge.kafka.topics.check_topic_access`) does, so
        this is for ACLs removed while the relay runs.
        """
        if error.code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
            return authorization_error(
                self.config,
                "transactional_id",
                self.transactional_id,
                "WRITE",
                needed_for="publish in transactions (exactly once)",
                cause=error,
            )
        if error.code() == KafkaError.CLUSTER_AUTHORIZATION_FAILED:
            return authorization_error(
                self.config, "cluster", "kafka-cluster", "IDEMPOTENT_WRITE", cause=error
            )
        return authorization_error(
            self.config,
            "topic",
            self.topic,
            "WRITE",
            needed_for=f"publish (and READ, WRITE on the position topic {self.position_topic!r})",
            cause=error,
        )

    def _classify(self, error: KafkaError, what: str) -> Exception:
        if error.code() == KafkaError._FATAL:
            error = self._fatal_cause() or error
        if error.code() in FENCED_CODES:
            return RelayFencedError(self._fenced_message(error))
        if error.code() in PERMANENT_CODES:
            return self._rejected(error, None)
        return TransientPublishError(f"{what}: {error}")

    def _fatal_cause(self) -> KafkaError | None:
        """Why the producer failed fatally, when a call said only ``_FATAL``.

        A fatally failed producer answers ``produce()`` with a bare
        ``_FATAL``; the cause (e.g. ``_FENCED`` by a newer relay with the same
        ``transactional.id``) came in a delivery report, or is raised again by
        the transactional calls, so it is read from there.
        """
        if self._delivery_error is not None:
            return self._delivery_error[0]
        producer = self._producer
        if producer is None or not self.exactly_once:
            return None
        try:
            producer.abort_transaction(0.1)
        except KafkaException as e:
            cause = e.args[0] if e.args else None
            if isinstance(cause, KafkaError) and cause.code() != KafkaError._FATAL:
                return cause
        return None

    def _fenced_message(self, error: KafkaError) -> str:
        return (
            f"relay for application {self.app!r} was fenced: another relay with "
            f"transactional.id {self.transactional_id!r} started ({error}). This one stopped; "
            "run one relay per application and topic"
        )


def _answers(producer: Producer) -> bool:
    """Whether a broker answers ``producer`` (a metadata request) within a few seconds."""
    try:
        producer.list_topics(timeout=5)
    except KafkaException:
        return False
    return True
