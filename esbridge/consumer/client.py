"""The consumer's Kafka client: its settings, waiting for the broker and the topic, errors.

The settings are fixed by exactly-once processing, not by the user: only
committed messages are read (``read_committed``), and offsets are committed by
hand after Postgres (:mod:`.offsets`), never automatically.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException

from esbridge.consumer import partition_flow
from esbridge.consumer.batch_commit import Abandoned
from esbridge.consumer.state import Tuning
from esbridge.errors import BrokerUnavailable, ConfigurationError, ConsumerError
from esbridge.kafka.access import authorization_error, raise_if_unauthorized
from esbridge.kafka.topics import list_topics_logged
from esbridge.runtime.logs import kafka_client_config
from esbridge.runtime.signals import waiting_for

log = logging.getLogger("esbridge.consumer")


class TopicClient:
    """Makes the Kafka consumer of ``topic`` in ``group_id``, and judges its errors."""

    def __init__(
        self,
        kafka_config: Mapping[str, Any],
        group_id: str,
        topic: str,
        upstream: str,
        tuning: Tuning,
        stop: threading.Event,
    ) -> None:
        self.kafka_config = kafka_config
        self.group_id = group_id
        self.topic = topic
        self.upstream = upstream
        self.tuning = tuning
        self.stop = stop

    def open(self, expected_partitions: int | None) -> tuple[Consumer, int]:
        """A new consumer (not subscribed yet) and the topic's partition count."""
        config = dict(self.kafka_config)
        config.update(
            {
                "group.id": self.group_id,
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": False,
            }
        )
        config.setdefault("auto.offset.reset", "earliest")
        if self.tuning.fair_partitions:  # bounds a partition's wait behind the others
            config = partition_flow.fair_fetch_config(config)
        for key in ("transactional.id", "enable.idempotence", "linger.ms", "acks"):
            config.pop(key, None)
        consumer = Consumer(kafka_client_config(config))
        servers = self.kafka_config.get("bootstrap.servers")
        try:
            with waiting_for(f"topic {self.topic!r} on the Kafka broker at {servers}"):
                return consumer, self._partition_count(consumer, expected_partitions)
        except BaseException:
            consumer.close()
            raise

    def _partition_count(self, consumer: Consumer, expected: int | None) -> int:
        """The topic's partition count; waits for the broker (``connect_timeout``), then for
        the topic to exist (``topic_timeout``)."""
        started = time.monotonic()
        deadline: float | None = None  # counted from the broker's first answer
        while True:
            try:
                metadata = list_topics_logged(consumer, self.topic)
            except KafkaException as e:
                self._broker_unreachable(e, time.monotonic() - started)
                continue
            info = metadata.topics.get(self.topic)
            refused = info.error if info is not None else None
            raise_if_unauthorized(
                self.kafka_config, refused, self.topic, "DESCRIBE", needed_for="see it"
            )
            if info is not None and info.error is None and info.partitions:
                count = len(info.partitions)
                break
            if deadline is None:
                deadline = time.monotonic() + self.tuning.topic_timeout
            if time.monotonic() > deadline or self.stop.is_set():
                raise ConfigurationError(
                    f"topic {self.topic!r} does not exist (waited "
                    f"{self.tuning.topic_timeout:.0f} s): start the relay of {self.upstream!r} "
                    "first, or create the topic"
                )
            time.sleep(0.5)
        if expected is not None and count != expected:
            raise ConfigurationError(
                f"topic {self.topic!r} has {count} partitions, but {expected} "
                "were expected: the relay and its consumers must agree on the partition count"
            )
        return count

    def _broker_unreachable(self, error: KafkaException, waited: float) -> None:
        """Log and wait a little, or raise when ``connect_timeout`` passed or we stop."""
        servers = self.kafka_config.get("bootstrap.servers")
        limit = self.tuning.connect_timeout
        if self.stop.is_set():
            raise Abandoned("stopped while waiting for the broker")
        if limit is not None and waited >= limit:
            raise BrokerUnavailable(
                f"no Kafka broker answered at {servers!r} within {waited:.0f} s ({error}); "
                "check bootstrap.servers (KAFKA_BOOTSTRAP_SERVERS) and that the broker runs"
            )
        log.warning("Kafka broker at %s unreachable (%s); retrying", servers, error)
        self.stop.wait(0.5)

    def check(self, error: KafkaError) -> None:
        """Raise for a consumed error that stops consuming (refused access, fatal); log the rest."""
        if error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
            raise authorization_error(
                self.kafka_config, "group", self.group_id, "READ", needed_for="consume", cause=error
            )
        raise_if_unauthorized(self.kafka_config, error, self.topic, "READ", needed_for="consume it")
        # A fatal error reaches poll() as an event of code _FATAL whose fatal() is False:
        # the consumer is dead all the same, and logging it would leave it silent for good.
        if error.fatal() or error.code() == KafkaError._FATAL:
            raise ConsumerError(
                f"Kafka consumer failed and cannot go on: {error}. "
                + (
                    "Its group.instance.id was taken by another member of group "
                    f"{self.group_id!r} (two workers with the same index, or a rejoin "
                    "racing a group coordinator's failover): restart this consumer, as "
                    "`esbridge run --supervise` (or systemd, Kubernetes) does; it "
                    "resumes from its tracking records"
                    if "group.instance.id" in str(error)
                    else "Restart it; it resumes from its tracking records"
                )
            )
        log.warning("Kafka: %s", error)
