"""Prompt mode: tiny "application X has notifications up to id N" messages.

Followers pull the events from the log themselves, so a prompt carries no
event and may be lost or repeated: bursts are coalesced (at most one prompt
per ``prompt_interval``) and the latest prompt is repeated every
``prompt_repeat`` seconds, so a lost prompt only delays a follower. All of an
application's prompts go to one partition (its key's), in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient
from eventsourcing.persistence import ApplicationRecorder

from esbridge import wire
from esbridge.kafka.partitioning import partition_for_key
from esbridge.kafka.topics import check_topic_access, ensure_topic
from esbridge.relay.gaps import GapGuard
from esbridge.relay.publisher import TransientPublishError
from esbridge.relay.status import Progress
from esbridge.relay.strategy import Retry, publish_access
from esbridge.relay.tuning import RelayTuning
from esbridge.runtime.logs import kafka_client_config


class PromptPublishing:
    """Sends a prompt when the log grew (coalesced) or the repeat period passed."""

    guarantee = "may be lost or repeated"
    #: A prompt failure needs no new producer: the next step sends the prompt again.
    restartable = False

    def __init__(
        self,
        app: str,
        *,
        topic: str,
        kafka_config: Mapping[str, Any],
        tuning: RelayTuning,
        partitions: int | None,
        progress: Progress,
        sleep: Callable[[float], None],
    ) -> None:
        self.app = app
        self.topic = topic
        self.kafka_config = kafka_config
        self.tuning = tuning
        self.partitions = partitions
        self.progress = progress
        self._sleep = sleep
        self._producer: Producer | None = None
        self._recorder: ApplicationRecorder | None = None
        self._partition = 0
        self._last_prompt = (0, 0.0)  # (max_nid, monotonic time) of the last prompt sent

    @property
    def started(self) -> bool:
        return self._producer is not None

    def check_topics(self, admin: AdminClient) -> int:
        """The topic (one partition unless configured), and the ACL to write to it."""
        wanted = self.partitions or 1
        create = self.tuning.create_topics
        rf = self.tuning.replication_factor
        client = self.kafka_config
        count = ensure_topic(admin, self.topic, wanted if create else None, rf, client=client)
        check_topic_access(admin, client, publish_access(self.topic, self.app))
        return count

    def start(
        self,
        partitions: int,
        recorder: ApplicationRecorder,
        gap_guard: GapGuard | None,
        *,
        took_over: bool,
        retry: Retry,
        timeout: float | None,
    ) -> None:
        """A plain idempotent producer: prompts need no transactions nor a stored position."""
        self._recorder = recorder
        self._partition = partition_for_key(self.app.encode(), partitions)
        conf = {**self.kafka_config, "enable.idempotence": True, "linger.ms": 0}
        self._producer = Producer(kafka_client_config(conf))

    def restart(self) -> None:
        """Never called (not :attr:`restartable`): the producer reconnects by itself."""

    def step(self) -> int:
        """Send a prompt when the log grew (coalesced) or the repeat period passed."""
        recorder, producer, progress = self._recorder, self._producer, self.progress
        assert recorder is not None and producer is not None
        max_nid = recorder.max_notification_id() or 0
        progress.upstream_max = max_nid
        last_nid, last_time = self._last_prompt
        now = time.monotonic()
        grew = max_nid > last_nid
        if not grew and now - last_time < self.tuning.prompt_repeat:
            progress.update_lag()
            return 0
        wait = self.tuning.prompt_interval - (now - last_time)
        if grew and wait > 0:
            self._sleep(wait)  # coalesce a burst into one prompt
            max_nid = recorder.max_notification_id() or 0
        key, value, headers = wire.Prompt(self.app, max_nid).encode()
        try:
            producer.produce(
                self.topic,
                value,
                key,
                self._partition,
                headers=headers,  # type: ignore[arg-type]
            )
            producer.poll(0)
        except (BufferError, KafkaException) as e:
            raise TransientPublishError(f"producing a prompt: {e}") from e
        self._last_prompt = (max_nid, time.monotonic())
        progress.prompted(max_nid)
        return 1 if grew else 0

    def after_step(self, count: int) -> None:
        """No lingering: a prompt is one small message, coalesced in :meth:`step` already."""

    def idle_wait(self) -> float:
        return min(self.tuning.poll_interval, self.tuning.prompt_repeat)

    def publish_available(self) -> int:
        """One prompt says it all; delivered before returning."""
        count = self.step()
        if self._producer is not None:
            self._producer.flush(30)
        return count

    def serve(self) -> None:
        """Nothing: the prompt producer is polled at each prompt."""

    def suspend(self) -> None:
        """Nothing: a prompt sent while another relay publishes harms no follower."""

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(5)
            self._producer = None
