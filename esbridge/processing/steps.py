"""Batch steps: one upstream notification's place in a batch, and how it is built.

Every sink (a process application, an outbound follower, a SQL projection)
receives the same :class:`Step` objects from the consumer loop. A step is
built from a Kafka message or a notification by :class:`StepFactory`, which
decodes the upstream stored event exactly as ``Follower.follow()`` would
(:class:`UpstreamDecoder`) and turns what cannot be decoded into a parking
step instead of an exception, so one bad message never stops a partition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from confluent_kafka import Message
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, Notification, StoredEvent, Tracking
from eventsourcing.system import Follower
from eventsourcing.utils import TopicError

from esbridge.deadletters.store import REASON_UNDECODABLE, REASON_UNKNOWN_TYPE, DeadLetter
from esbridge.errors import ServerUnavailableError
from esbridge.wire import PayloadHeaders


@dataclass
class Step:
    """One upstream notification's place in a batch.

    ``tracking`` is the position reached after this step (``None`` for replays
    of parked messages and for malformed messages that have no position).
    ``event`` is ``None`` when the step only advances the position (an event
    the follower does not follow, a gap passed over) or parks a message.
    """

    tracking: Tracking | None
    key: str
    event: DomainEventProtocol[Any] | None = None
    dead_letter: DeadLetter | None = None
    replay_of: int | None = None
    source: Any = None  # the Kafka message or notification, for the caller's bookkeeping
    #: The OpenTelemetry ``process`` span, once started (:mod:`esbridge.runtime.tracing`).
    span: Any = field(default=None, compare=False, repr=False)


class UpstreamDecoder:
    """Turns upstream stored-event bytes into domain events, as ``Follower.follow()`` does.

    Built from a follower (:meth:`for_follower`) or, for a sink that is not a
    process application (a SQL projection), from the upstream application's
    mapper itself.
    """

    def __init__(self, mapper: Mapper[Any], upstream_name: str) -> None:
        self.mapper = mapper
        self.upstream_name = upstream_name

    @classmethod
    def for_follower(
        cls, follower: Follower[Any], upstream_name: str, upstream_class: type | None = None
    ) -> UpstreamDecoder:
        """The decoder ``follower`` would use for ``upstream_name``.

        The mapper is built from the follower's environment read under the
        upstream application's name (so ``{UPSTREAM}_CIPHER_KEY`` etc. apply),
        with the follower's transcoder and mapper class. ``upstream_class``
        contributes its class-level ``env`` defaults (cipher/compressor topics).
        """
        base_env = dict(getattr(upstream_class, "env", {}) or {})
        base_env.update(follower.env)
        env = follower.construct_env(upstream_name, base_env)
        factory = follower.construct_factory(env)
        mapper = factory.mapper(follower.construct_transcoder(), mapper_class=type(follower.mapper))
        return cls(mapper, upstream_name)

    def decode(self, stored: StoredEvent) -> DomainEventProtocol[Any]:
        return self.mapper.to_domain_event(stored)


@dataclass
class Source:
    """Where a message came from, for dead letters and offset bookkeeping."""

    key: str
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = field(default_factory=list)
    kafka_topic: str | None = None
    kafka_partition: int | None = None
    kafka_offset: int | None = None
    event_topic: str | None = None
    originator_version: int | None = None
    nid: int | None = None
    #: When the event happened, for the end-to-end latency metric: the message's
    #: ``ce_time`` header (RFC 3339), and its Kafka timestamp (epoch seconds).
    event_time: str | None = None
    kafka_timestamp: float | None = None
    #: The message's ``esb_deps`` header: what it waits for on other partitions ("": none).
    deps: str = ""


class StepFactory:
    """Builds batch steps for one follower (or sink) ``follower_name`` of one upstream application.

    ``topics``: the event topics the follower follows (empty: all); the others
    become steps that only move the position, never decoded.
    """

    def __init__(
        self, follower_name: str, decoder: UpstreamDecoder, topics: Iterable[str] = ()
    ) -> None:
        self.decoder = decoder
        self.follower_name = follower_name
        self.upstream = decoder.upstream_name
        self.topics = set(topics)

    @classmethod
    def for_follower(
        cls, follower: Follower[Any], upstream_name: str, upstream_class: type | None = None
    ) -> StepFactory:
        """The steps of a process application (or any ``Follower``) following ``upstream_name``."""
        decoder = UpstreamDecoder.for_follower(follower, upstream_name, upstream_class)
        return cls(follower.name, decoder, follower.topics or ())

    def dead_letter(
        self, source: Source, tracking_name: str | None, reason: str, error: str
    ) -> DeadLetter:
        return DeadLetter(
            follower=self.follower_name,
            upstream=self.upstream,
            key=source.key,
            reason=reason,
            error=error,
            value=source.value,
            headers=[(k, v or b"") for k, v in source.headers],
            tracking_name=tracking_name,
            nid=source.nid,
            kafka_topic=source.kafka_topic,
            kafka_partition=source.kafka_partition,
            kafka_offset=source.kafka_offset,
            event_topic=source.event_topic,
            originator_version=source.originator_version,
        )

    def step(self, source: Source, tracking: Tracking | None) -> Step:
        """Decode ``source``; undecodable input becomes a parking step (never an exception)."""
        assert source.event_topic is not None and source.originator_version is not None
        name = tracking.application_name if tracking else None
        if self.topics and source.event_topic not in self.topics:
            return Step(tracking=tracking, key=source.key, source=source)
        try:
            event = self.decode(source)
        except ServerUnavailableError:
            raise  # a server the decoder needs is down: not the message's fault, never parked
        except TopicError as e:
            letter = self.dead_letter(
                source,
                name,
                REASON_UNKNOWN_TYPE,
                f"event type {source.event_topic!r} cannot be imported here ({e}); deploy "
                "the upstream event classes to the consumer, then run 'esbridge dlq retry'",
            )
            return Step(tracking=tracking, key=source.key, dead_letter=letter, source=source)
        except Exception as e:
            letter = self.dead_letter(source, name, REASON_UNDECODABLE, f"{type(e).__name__}: {e}")
            return Step(tracking=tracking, key=source.key, dead_letter=letter, source=source)
        return Step(tracking=tracking, key=source.key, event=event, source=source)

    def decode(self, source: Source) -> DomainEventProtocol[Any]:
        """The domain event ``source`` carries: its value is the upstream's stored state.

        A factory for another message format overrides this (and
        :meth:`same_event`); notifications read from the upstream log come
        here too, with no headers.
        """
        assert source.event_topic is not None and source.originator_version is not None
        stored = StoredEvent(
            originator_id=originator_id(source.key),
            originator_version=source.originator_version,
            topic=source.event_topic,
            state=source.value or b"",
        )
        return self.decoder.decode(stored)

    def same_event(
        self, notification: Notification, message: Message, payload: PayloadHeaders
    ) -> bool:
        """Whether ``message`` carries exactly the upstream log's ``notification`` (not a forgery).

        The consumer asks when it checks messages against the log
        (``verify_messages``) and when it fills a gap before a held message.
        """
        return (
            str(notification.originator_id) == payload.originator_id
            and notification.originator_version == payload.originator_version
            and notification.topic == payload.topic
            and bytes(notification.state) == (message.value() or b"")
        )

    def step_from_notification(self, notification: Notification, tracking_name: str) -> Step:
        source = Source(
            key=str(notification.originator_id),
            value=notification.state,
            event_topic=notification.topic,
            originator_version=notification.originator_version,
            nid=notification.id,
        )
        return self.step(source, Tracking(tracking_name, notification.id))


_last_id: tuple[str, Any] = ("", "")  # consecutive messages often share a key (one save)


def originator_id(key: str) -> Any:
    """The upstream originator id from a message key (the mapper converts it as the event needs)."""
    global _last_id
    last = _last_id
    if last[0] == key:
        return last[1]  # UUIDs are immutable: sharing one is safe
    try:
        value: Any = UUID(key)
    except ValueError:
        value = key
    _last_id = (key, value)
    return value


def iter_batches(steps: Sequence[Step], size: int) -> Iterator[Sequence[Step]]:
    """``steps`` in slices of at most ``size``."""
    for i in range(0, len(steps), size):
        yield steps[i : i + size]
