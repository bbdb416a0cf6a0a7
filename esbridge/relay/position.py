"""Where a relay is in the notification log, stored in Kafka with its messages.

A relay must not need write access to the application's database, and its
position must commit atomically with the messages it published, so it lives
in Kafka: a compacted *position topic* (default ``<topic>.esbridge-relay-position``),
key = relay id, one message per transaction, written in the **same Kafka
transaction** as the batch it describes. Either both the batch and its
position are visible to ``read_committed`` readers, or neither is.

On start, after ``init_transactions()`` has fenced any previous instance (and
aborted its open transaction), the relay reads the position topic with
``read_committed`` up to the high watermark measured at that moment and takes
the last message with its key. Reading up to the *high watermark* (not just to
the first end-of-partition, which stops at the last stable offset) matters
when other relays share the position topic: an open transaction of theirs must
not hide a later committed position of ours.

The position records, besides the last published notification id, the last
id published to each partition: the next message on a partition names it in
``esb_prev_nid``, so the chain stays unbroken across restarts.

A relay id without a position starts at the log's beginning. When the
position topic holds positions of *other* relay ids for the same topic, that
would publish the whole log into the topic a second time (a relay id changed,
or two commands deriving different default ids): the relay refuses with
:class:`~esbridge.errors.RelayIdConflictError` naming those ids, unless
``allow_other_relays`` says that a second relay is meant.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from esbridge.errors import (
    ConfigurationError,
    EsbridgeError,
    RelayIdConflictError,
    RelayPositionError,
)
from esbridge.kafka.access import authorization_error, raise_if_unauthorized
from esbridge.names import POSITION_GROUP_PREFIX
from esbridge.runtime.logs import kafka_client_config

log = logging.getLogger("esbridge.relay")

POSITION_FORMAT = 1
POSITION_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    # Small segments so that compaction keeps start-up reads short.
    "segment.ms": "600000",
    "min.cleanable.dirty.ratio": "0.1",
}


@dataclass
class RelayPosition:
    """The last notification id published (``nid``) and the last one per partition."""

    nid: int = 0
    last_per_partition: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, partitions: int) -> RelayPosition:
        return cls(0, [0] * partitions)

    def copy(self) -> RelayPosition:
        return RelayPosition(self.nid, list(self.last_per_partition))

    def last_bytes(self) -> list[bytes]:
        """``last_per_partition`` as ASCII digits: the ``esb_prev_nid`` header values."""
        return [b"%d" % nid for nid in self.last_per_partition]

    def encode(self, relay_id: str, app: str, topic: str) -> bytes:
        return json.dumps(
            {
                "format": POSITION_FORMAT,
                "relay": relay_id,
                "app": app,
                "topic": topic,
                "nid": self.nid,
                "partitions": len(self.last_per_partition),
                "last": self.last_per_partition,
                "time": time.time(),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, value: bytes) -> RelayPosition:
        """The position in ``value``; ``ValueError`` when it is not a position message."""
        try:
            data = json.loads(value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"not JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        if data.get("format") != POSITION_FORMAT:
            raise EsbridgeError(
                f"relay position message has format {data.get('format')!r}; "
                f"this esbridge reads format {POSITION_FORMAT}"
            )
        try:
            return cls(int(data["nid"]), [int(x) for x in data["last"]])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"no valid 'nid' and 'last' ({type(e).__name__}: {e})") from e


def read_position(
    config: Mapping[str, Any],
    position_topic: str,
    relay_id: str,
    partitions: int,
    timeout: float = 60.0,
    *,
    topic: str | None = None,
) -> RelayPosition:
    """The last committed position of ``relay_id`` (a fresh one when there is none).

    Raises :class:`ConfigurationError` when the stored position was written
    for another partition count. With ``topic``: raises
    :class:`RelayIdConflictError` when ``relay_id`` has no position but other
    relay ids have positions for ``topic`` (see the module docstring).
    """
    base = {
        k: v
        for k, v in config.items()
        if not k.startswith(("transactional.", "enable.idempotence", "isolation."))
        and k not in ("linger.ms", "batch.size", "compression.type", "acks", "message.max.bytes")
    }
    common = base | {
        "group.id": f"{POSITION_GROUP_PREFIX}{uuid.uuid4().hex}",
        "enable.auto.commit": False,
    }
    tp = TopicPartition(position_topic, 0)
    probe = Consumer(kafka_client_config(common | {"isolation.level": "read_uncommitted"}))
    try:
        low, high = probe.get_watermark_offsets(tp, timeout=timeout, cached=False)
    finally:
        probe.poll(0)  # librdkafka's log lines (it is assigned nothing: no message comes)
        probe.close()
    scan = _Scan(relay_id.encode())
    if high > low:
        _read_to(common, tp, high, timeout, scan)
    found = scan.found
    if found is None or found[0] is None:
        if topic is not None:
            _refuse_other_relays(relay_id, topic, position_topic, scan.relays_of(topic))
        return RelayPosition.start(partitions)
    position = _decode_at(found[0], tp, found[1], relay_id)
    if len(position.last_per_partition) != partitions:
        raise ConfigurationError(
            f"relay {relay_id!r} last published to a topic with "
            f"{len(position.last_per_partition)} partitions, now it has {partitions}: "
            "changing a topic's partition count breaks per-aggregate order; publish to a new "
            "topic (with a new relay id) instead"
        )
    return position


def _decode_at(value: bytes, tp: TopicPartition, offset: int, relay_id: str) -> RelayPosition:
    """The position stored at ``offset``, or a :class:`RelayPositionError` naming where it is."""
    try:
        return RelayPosition.decode(value)
    except ValueError as e:
        raise RelayPositionError(
            f"the last message of relay {relay_id!r} in its position topic {tp.topic!r} "
            f"(partition {tp.partition}, offset {offset}) is not a relay position: {e}. Only "
            "esbridge relays may write to a position topic: stop whatever else writes there, "
            "then write the relay's last valid position (an earlier offset with the same key) "
            "again, or give the relay a new position topic (--set position_topic=NAME) and "
            "relay id (it then publishes the log from the start)"
        ) from e


class _Scan:
    """What a read of the position topic found: the last value with ``key`` and its offset,
    and the topic of each other relay id's last position."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.found: tuple[bytes | None, int] | None = None
        self.others: dict[str, str | None] = {}  # relay id -> topic of its last position

    def take(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        if key == self.key:
            self.found = (value, offset)
        elif key is not None:
            relay = key.decode("utf-8", "replace")
            self.others.pop(relay, None)  # kept in the order of their last positions
            self.others[relay] = _topic_of(value)

    def relays_of(self, topic: str) -> list[str]:
        """The other relay ids whose last position is for ``topic``, the latest last."""
        return [relay for relay, their in self.others.items() if their == topic]


def _topic_of(value: bytes | None) -> str | None:
    """The topic a position message is for (None: not a position this reader knows)."""
    try:
        data = json.loads(value or b"")
        return str(data["topic"]) if isinstance(data, dict) and "topic" in data else None
    except ValueError:
        return None


def _refuse_other_relays(relay_id: str, topic: str, position_topic: str, others: list[str]) -> None:
    if not others:
        return
    raise RelayIdConflictError(
        f"relay {relay_id!r} has never published to topic {topic!r}, but relay id(s) "
        f"{others} did (their positions are in {position_topic!r}): starting would publish "
        "the whole notification log into the topic again. To continue that relay, pass its "
        f"id: --relay-id {others[-1]} (relay_id={others[-1]!r}). To start a second relay "
        "on the topic deliberately (its messages duplicate the first one's), pass "
        "--allow-other-relays (allow_other_relays=True)",
        relay_id=relay_id,
        topic=topic,
        other_relay_ids=others,
    )


def _read_to(
    config: dict[str, Any], tp: TopicPartition, high: int, timeout: float, scan: _Scan
) -> None:
    """Read every committed message below offset ``high`` into ``scan``."""
    consumer = Consumer(
        kafka_client_config(
            config | {"isolation.level": "read_committed", "enable.partition.eof": True}
        )
    )
    deadline = time.monotonic() + timeout
    try:
        consumer.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING)])
        while True:
            if time.monotonic() > deadline:
                raise EsbridgeError(
                    f"reading the relay position from {tp.topic!r} did not reach offset {high} "
                    f"within {timeout:.0f} s (an open transaction of another producer?)"
                )
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    offset = msg.offset()
                    if offset is not None and offset >= high:
                        return
                    continue
                _raise_if_unauthorized(config, error, tp.topic)
                raise KafkaException(error)
            offset = msg.offset()
            if offset is not None:
                scan.take(msg.key(), msg.value(), offset)
            if offset is not None and offset >= high - 1:
                return
    finally:
        consumer.close()


def _raise_if_unauthorized(config: Mapping[str, Any], error: KafkaError, topic: str) -> None:
    """A missing ACL of the position reader: READ on the position topic, DESCRIBE on its group."""
    if error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
        raise authorization_error(
            config,
            "group",
            POSITION_GROUP_PREFIX,
            "DESCRIBE",
            prefixed=True,
            needed_for="read the relay's position",
            cause=error,
        )
    raise_if_unauthorized(config, error, topic, "READ", needed_for="read the relay's position")


class RelayProgress:
    """What the relays of ``app`` have published to each partition of ``topic``, as it grows.

    A consumer without the upstream log cannot see a *trailing gap* (the last
    messages of a partition missing from the topic: no later message reveals
    them). The relay's position topic can: each committed position names the
    last notification id published to every partition, in the same Kafka
    transaction as those messages. This reader follows the position topic
    incrementally (``read_committed``) and keeps, per partition, the highest
    such id of any relay of ``app`` on ``topic``, and the highest id published
    at all (:attr:`published`): a relay has settled every gap below it (see
    :mod:`esbridge.relay.gaps`), so the log's ids up to it are final even when
    writers skip the library's table lock.
    """

    def __init__(
        self, config: Mapping[str, Any], position_topic: str, app: str, topic: str
    ) -> None:
        self.position_topic = position_topic
        self.app = app
        self.topic = topic
        self.last: dict[int, int] = {}
        self.published = 0  # the highest notification id any of them published
        self.refused = False  # no READ ACL on the position topic: it only informed
        self._end: int | None = None  # the topic's end when first read
        self._offset = -1  # the last offset read
        conf = {
            k: v
            for k, v in config.items()
            if not k.startswith(("transactional.", "group.", "enable.auto", "isolation."))
        }
        self._consumer = Consumer(
            kafka_client_config(
                conf
                | {
                    "group.id": f"{POSITION_GROUP_PREFIX}{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                }
            )
        )
        self._consumer.assign([TopicPartition(position_topic, 0, OFFSET_BEGINNING)])

    @property
    def known(self) -> bool:
        """Whether the position topic could be read (it exists, and READ is allowed)."""
        return self._end is not None and not self.refused

    def read(self, limit: int = 10_000, timeout: float = 5.0) -> dict[int, int]:
        """Read what was committed since the last call (at most ``limit`` messages a round).

        The first call reads up to the end the topic had then (at most
        ``timeout`` seconds: an open transaction of the relay holds committed
        readers back); later calls take what has arrived.
        """
        if self.refused:
            return self.last
        if self._end is None:
            try:
                self._end = self._consumer.get_watermark_offsets(
                    TopicPartition(self.position_topic, 0), timeout=timeout, cached=False
                )[1]
            except KafkaException as e:  # no such topic: a relay without one, or not yet
                log.debug("relay position topic %r: %s", self.position_topic, e)
                return self.last
        deadline = time.monotonic() + timeout
        while True:
            messages = self._consumer.consume(limit, timeout=0.1)
            for message in messages:
                self._take(message)
            offset = messages[-1].offset() if messages else None
            if offset is not None:
                self._offset = offset
            if self.refused or self._offset >= self._end - 2 or time.monotonic() > deadline:
                return self.last

    def _take(self, message: Message) -> None:
        value, error = message.value(), message.error()
        if error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            log.warning(
                "no READ on the relay position topic %r: a partition whose last messages "
                "never arrived is not detected without the upstream log (docs/security.md)",
                self.position_topic,
            )
            self.refused = True
            return
        if error is not None or value is None:
            return
        try:
            data = json.loads(value)
            if data.get("app") != self.app or data.get("topic") != self.topic:
                return
            for partition, nid in enumerate(data["last"]):
                if int(nid) > self.last.get(partition, 0):
                    self.last[partition] = int(nid)
            self.published = max(self.published, int(data["nid"]))
        except (ValueError, KeyError, TypeError):
            return  # not a position this reader understands: it only informs

    def close(self) -> None:
        self._consumer.close()
