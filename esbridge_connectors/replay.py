"""Replay (backfill): republish a notification-id range of an application to a topic.

Why: a new consumer needs history the topic no longer holds (retention), a
repaired consumer needs a range again, or a new analytics topic needs a
backfill. The relay cannot do it (its position only moves forward), and
re-running a relay from scratch would republish everything.

A replay reads the range from the application's notification log (read-only,
like a relay) and publishes each notification with **exactly the key,
partition and headers the relay gave it**: the same encoder
(:class:`esbridge.wire.encoding.PayloadEncoder`, or the analytics one), and
the same ``esb_prev_nid`` chain, reconstructed by reading the log backwards
from the start of the range until every partition's previous notification is
found. So a consumer that has already processed a replayed notification sees
``esb_nid <= position`` and skips it as a duplicate, and one that has not
processes it in order. The one header that can differ is ``ce_time`` for an
application whose events are compressed or encrypted (the relay then stamps
the publish time).

Publishing uses an idempotent producer (no duplicates from producer retries)
and waits for every acknowledgement; a replay that fails part way is simply
run again: everything it republishes is deduplicated downstream. The relay's
own position (in its position topic) is never touched, so a replay can run
while the relay runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, cast

from confluent_kafka import KafkaError, Message, Producer
from eventsourcing.persistence import Notification

from esbridge import wire
from esbridge.errors import ConfigurationError, EsbridgeError
from esbridge.eventlog.notification_log import (
    NotificationReader,
    open_recorder,
    read_pages,
    release_recorder,
    upstream_environment,
)
from esbridge.kafka.topics import kafka_admin, partition_count
from esbridge.runtime.catch_up import CatchUpLog
from esbridge.runtime.logs import kafka_client_config
from esbridge.wire.encoding import Encoder, PayloadEncoder, content_type_for

log = logging.getLogger("esbridge.connectors.replay")


class ReplayError(EsbridgeError):
    """A replay stopped: Kafka refused or did not acknowledge a message (see the message).

    Everything before the notification named was acknowledged. Fix the cause
    and run the same range again: consumers deduplicate what was published twice.
    """


@dataclass(frozen=True)
class ReplayResult:
    """What a replay published: ``count`` messages, notification ids ``first``..``last``."""

    app: str
    topic: str
    start: int
    stop: int | None
    count: int
    first: int | None
    last: int | None


def previous_per_partition(
    recorder: NotificationReader,
    before: int,
    partition_of: Callable[[bytes], int],
    num_partitions: int,
    *,
    window: int = 1000,
) -> list[int]:
    """For each partition, the id of the last notification before ``before`` sent to it (0: none).

    This is the relay's ``esb_prev_nid`` chain at ``before``: the log is read
    backwards in windows until every partition has been seen or the log's
    start is reached.
    """
    result = [0] * num_partitions
    missing = set(range(num_partitions))
    high = before - 1
    while missing and high >= 1:
        low = max(1, high - window + 1)
        page = recorder.select_notifications(start=low, limit=high - low + 1, stop=high)
        for n in reversed(page):
            p = partition_of(str(n.originator_id).encode())
            if p in missing:
                result[p] = n.id
                missing.discard(p)
        high = low - 1
        window = min(window * 2, 100_000)
    return result


class Replay:
    """Republish notifications of application ``app_name`` to ``topic``.

    ``env``: the application's ``POSTGRES_*`` settings (default: ``os.environ``),
    or give its ``recorder``: any reader of its log, such as a
    :class:`~esbridge.eventlog.remote.RemoteNotificationLog` when the log is
    read from its ``esbridge serve-log`` (the caller's: never closed here).
    ``encoder``: the same encoder hook the topic's relay was given
    (``Relay(..., encoder=...)``), e.g. a
    :class:`~esbridge_connectors.analytics.CloudEventsEncoder` for an analytics
    topic; ``None`` for the default format. The topic must exist; its
    partition count decides the partitions, as for the relay.

    Progress (count, rate, ETA) is logged every few seconds, or redrawn on one
    line of ``progress`` (e.g. ``sys.stderr``) when that is a terminal.
    """

    def __init__(
        self,
        app_name: str,
        *,
        kafka_config: Mapping[str, Any],
        topic: str,
        env: Mapping[str, str] | None = None,
        recorder: NotificationReader | None = None,
        encoder: Encoder | None = None,
        page_size: int = 1000,
        timeout: float = 60.0,
        progress: TextIO | None = None,
    ) -> None:
        import os

        if ":" in app_name:
            raise ConfigurationError(
                f"{app_name!r} is an import path, not an application's name: give the name "
                "(the application class's name attribute, e.g. 'DogSchool')"
            )
        self.app = app_name
        self.kafka_config = dict(kafka_config)
        self.topic = topic
        self.env = dict(os.environ if env is None else env)
        self._recorder = recorder
        self._given_recorder = recorder  # the caller's: never closed here
        self.encoder_hook = encoder
        self.page_size = page_size
        self.timeout = timeout
        self._error: tuple[KafkaError, int | None] | None = None
        self.progress = progress

    @property
    def recorder(self) -> NotificationReader:
        if self._recorder is None:
            self._recorder = open_recorder(self.app, self.env)
        return self._recorder

    def partitions(self) -> int:
        """The topic's partition count; :class:`ConfigurationError` when it does not exist."""
        with kafka_admin(self.kafka_config) as admin:
            count = partition_count(admin, self.topic)
        if count is None:
            raise ConfigurationError(
                f"topic {self.topic!r} does not exist: replay publishes to an existing topic "
                "(the relay's, or one created with the relay's partition count)"
            )
        return count

    def make_encoder(self, num_partitions: int) -> PayloadEncoder:
        """The encoder this topic's relay uses (built as :class:`esbridge.relay.Relay` does)."""
        content_type = content_type_for(upstream_environment(self.app, self.env))
        return PayloadEncoder(self.app, num_partitions, content_type, self.encoder_hook)

    def run(self, start: int = 1, stop: int | None = None) -> ReplayResult:
        """Republish notifications with ids ``start``..``stop`` (inclusive; None: to the end).

        Returns when every message is acknowledged. Raises :class:`ReplayError`
        when Kafka refuses a message or does not acknowledge within ``timeout``.
        """
        if start < 1 or (stop is not None and stop < start):
            raise ConfigurationError(
                f"invalid range {start}..{stop}: notification ids start at 1 and stop >= start"
            )
        try:
            return self._run(start, stop)
        finally:
            self._recorder = release_recorder(self._recorder, self._given_recorder)

    def _run(self, start: int, stop: int | None) -> ReplayResult:
        num_partitions = self.partitions()
        encoder = self.make_encoder(num_partitions)
        chain = previous_per_partition(
            self.recorder, start, encoder.partition_of, num_partitions, window=self.page_size
        )
        producer = Producer(kafka_client_config(self._producer_config()))
        count = 0
        first: int | None = None
        last: int | None = None
        end = self.recorder.max_notification_id() or 0
        end = end if stop is None else min(stop, end)
        progress = CatchUpLog(
            log,
            f"replay {self.app} -> {self.topic}",
            "notifications",
            done=0,
            min_backlog=1,
            doing="publishing",
            done_word="published",
            terminal=self.progress,
        )
        try:
            for page in read_pages(self.recorder, start - 1, stop=stop, page_size=self.page_size):
                self._publish(producer, encoder, page, chain)
                self._flush(producer)
                count += len(page)
                first = page[0].id if first is None else first
                last = page[-1].id
                end = max(end, last)
                # Ids left to the end as the replay started: the count of notifications in them.
                progress.update(count, end - last)
        finally:
            progress.close()  # an error's message on a line of its own
        return ReplayResult(self.app, self.topic, start, stop, count, first, last)

    # -- producing ---------------------------------------------------------------------

    def _producer_config(self) -> dict[str, Any]:
        conf = {k: v for k, v in self.kafka_config.items() if k != "transactional.id"}
        conf.setdefault("linger.ms", 20)
        conf.setdefault("compression.type", "lz4")
        conf["enable.idempotence"] = True
        conf["on_delivery"] = self._on_delivery
        return conf

    def _publish(
        self,
        producer: Producer,
        encoder: PayloadEncoder,
        page: Sequence[Notification],
        chain: list[int],
    ) -> None:
        for n in page:
            try:
                key, value, headers, partition = encoder.message(n, chain)
            except Exception as e:
                raise ReplayError(
                    f"cannot read notification {n.id} of application {self.app!r} "
                    f"({type(e).__name__}: {e}); the replay stopped before it"
                ) from e
            while True:
                try:
                    producer.produce(self.topic, value, key, partition, headers=cast(Any, headers))
                    break
                except BufferError:
                    producer.poll(0.05)

    def _on_delivery(self, error: KafkaError | None, msg: Message) -> None:
        if error is not None and self._error is None:
            found = wire.headers_dict(cast(Any, msg.headers())).get(wire.H_NID)
            nid = int(found) if found else None
            self._error = (error, nid)

    def _flush(self, producer: Producer) -> None:
        remaining = producer.flush(self.timeout)
        if self._error is not None:
            error, nid = self._error
            raise ReplayError(
                f"Kafka refused notification {nid} of application {self.app!r} on topic "
                f"{self.topic!r}: {error.str()}. Fix the cause and replay the range again"
            )
        if remaining:
            raise ReplayError(
                f"{remaining} messages to topic {self.topic!r} were not acknowledged within "
                f"{self.timeout:.0f} s: check the broker and replay the range again"
            )


def replay(
    app_name: str,
    *,
    kafka_config: Mapping[str, Any],
    topic: str,
    start: int = 1,
    stop: int | None = None,
    env: Mapping[str, str] | None = None,
    encoder: Encoder | None = None,
) -> ReplayResult:
    """Republish notifications ``start``..``stop`` of ``app_name`` (see :class:`Replay`)."""
    return Replay(app_name, kafka_config=kafka_config, topic=topic, env=env, encoder=encoder).run(
        start, stop
    )
