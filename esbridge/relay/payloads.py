"""Payload mode: every notification becomes one Kafka message (format v1, :mod:`esbridge.wire`).

Published by :class:`~esbridge.relay.publisher.KafkaPublisher`: exactly once
with Kafka transactions (the relay's position commits in the same
transaction, on a compacted position topic), or at least once with an
idempotent producer. Pages end before a gap that a transaction in progress
may still fill (:mod:`esbridge.relay.gaps`), so no notification is passed over.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import threading
import time
from collections.abc import Callable, Generator, Mapping
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from eventsourcing.persistence import ApplicationRecorder

from esbridge.errors import ConfigurationError, EsbridgeError, RelayError
from esbridge.eventlog.notification_log import read_pages, upstream_environment
from esbridge.kafka.topics import check_topic_access, ensure_topic, topic_setting
from esbridge.relay.gaps import GapGuard, guarded_pages
from esbridge.relay.pacing import Pacing
from esbridge.relay.position import POSITION_TOPIC_CONFIG
from esbridge.relay.publisher import KafkaPublisher, TransientPublishError
from esbridge.relay.reader import TraceReader, read_pages_for_publishing, split_traces
from esbridge.relay.status import Progress
from esbridge.relay.strategy import Retry, publish_access
from esbridge.relay.tuning import RelayTuning
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS
from esbridge.wire.encoding import Encoder, PayloadEncoder, content_type_for

log = logging.getLogger("esbridge.relay")  # the relay's logger, whichever module logs

#: Seconds between the checks whether a gap's writers ended (instead of ``poll_interval``).
GAP_POLL = 0.05

_row_id = operator.itemgetter(0)
_notification_id = operator.attrgetter("id")


class PayloadPublishing:
    """Publishes the notifications themselves, in transactions with the relay's position."""

    def __init__(
        self,
        app: str,
        *,
        topic: str,
        kafka_config: Mapping[str, Any],
        env: Mapping[str, str],
        tuning: RelayTuning,
        relay_id: str,
        position_topic: str,
        exactly_once: bool,
        partitions: int | None,
        encoder_hook: Encoder | None,
        progress: Progress,
        stop: threading.Event,
        sleep: Callable[[float], None],
    ) -> None:
        self.app = app
        self.topic = topic
        self.kafka_config = kafka_config
        self.env = env
        self.tuning = tuning
        self.relay_id = relay_id
        self.position_topic = position_topic
        self.exactly_once = exactly_once
        self.partitions = partitions
        self.encoder_hook = encoder_hook
        self.progress = progress
        self.guarantee = "exactly once" if exactly_once else "at least once"
        self._stop = stop
        self._sleep = sleep
        self._pacing = Pacing(tuning)
        self._publisher: KafkaPublisher | None = None
        self._recorder: ApplicationRecorder | None = None
        self._gap_guard: GapGuard | None = None
        self._traces: TraceReader | None = None
        self._producer_overrides: dict[str, Any] = {}

    @property
    def started(self) -> bool:
        return self._publisher is not None

    @property
    def restartable(self) -> bool:
        return self._publisher is not None

    # -- set-up -----------------------------------------------------------

    def check_topics(self, admin: AdminClient) -> int:
        """The topic (with the configured partitions) and the position topic, and their ACLs."""
        create = self.tuning.create_topics
        rf = self.tuning.replication_factor
        client = self.kafka_config
        partitions = ensure_topic(
            admin, self.topic, self.partitions if create else None, rf, client=client
        )
        if self.partitions is not None and partitions != self.partitions:
            raise ConfigurationError(
                f"topic {self.topic!r} has {partitions} partitions, but {self.partitions} "
                "were configured"
            )
        ensure_topic(admin, self.position_topic, 1, rf, POSITION_TOPIC_CONFIG, client=client)
        position = ("READ+WRITE", "store and read the relay's position")
        access = {**publish_access(self.topic, self.app), self.position_topic: position}
        check_topic_access(admin, client, access)
        self._producer_overrides = self._size_limits(admin)
        return partitions

    def _size_limits(self, admin: AdminClient) -> dict[str, Any]:
        """Cap the producer's message size at the topic's ``max.message.bytes``.

        Then librdkafka refuses a too-large message at ``produce()``, so the
        relay names that notification, and sizes batches so the broker never
        refuses a whole batch of small ones.
        """
        if "message.max.bytes" in self.kafka_config:
            return {}
        try:
            value = topic_setting(admin, self.topic, "max.message.bytes")
        except Exception as e:  # describe_configs not allowed: keep librdkafka's default
            log.info(
                "relay %s: cannot read max.message.bytes of %s (%s); the producer's "
                "message.max.bytes applies (DESCRIBE_CONFIGS on the topic lets the relay read it)",
                self.app,
                self.topic,
                e,
            )
            return {}
        if not value or int(value) >= 1_000_000:
            return {}
        limit = int(value)
        return {"message.max.bytes": limit, "batch.size": limit}

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
        self._recorder, self._gap_guard = recorder, gap_guard
        # Trace context is published only for an application that records it (side table).
        self._traces = retry(
            "look for the trace context table",
            lambda: TraceReader.for_recorder(recorder),
            timeout,
        )
        self._publisher = self._make_publisher(partitions)
        # After standing by, the relay before this one used the broker's transactions:
        # a timeout now is an outage, not a broker unfit for them.
        retry(
            "start the Kafka producer",
            lambda: self._start_publisher(first=not took_over),
            timeout,
        )

    def _make_publisher(self, partitions: int) -> KafkaPublisher:
        content_type = content_type_for(upstream_environment(self.app, self.env))
        encoder = PayloadEncoder(
            self.app,
            partitions,
            content_type,
            self.encoder_hook,
            causal=self.tuning.causal_dependencies,
        )
        return KafkaPublisher(
            {**self.kafka_config, **self._producer_overrides},
            app=self.app,
            topic=self.topic,
            position_topic=self.position_topic,
            relay_id=self.relay_id,
            encoder=encoder,
            num_partitions=partitions,
            exactly_once=self.exactly_once,
            transactional_id=self.relay_id,
            init_timeout=self.tuning.init_timeout,
            commit_timeout=self.tuning.commit_timeout,
            allow_other_relays=self.tuning.allow_other_relays,
        )

    def restart(self) -> None:
        self._start_publisher(first=False)

    def _start_publisher(self, first: bool) -> None:
        assert self._publisher is not None
        try:
            position = self._publisher.start(first=first)
        except (ConfigurationError, RelayError):
            raise
        except (KafkaException, EsbridgeError) as e:  # reading the position: broker went away
            raise TransientPublishError(f"reading the relay position: {e}") from e
        self.progress.resumed(position.nid)

    # -- publishing -------------------------------------------------------

    def step(self) -> int:
        """Publish what is in the log after the position, in transactions; the count."""
        publisher, recorder = self._publisher, self._recorder
        assert publisher is not None and recorder is not None
        tuning, progress = self.tuning, self.progress
        total = 0
        started = time.monotonic()
        pages = self._pages(recorder, publisher.working_nid)
        try:
            for last_nid in pages:
                progress.saw(last_nid)
                if (
                    publisher.batch_count >= tuning.batch_size
                    or time.monotonic() - started >= tuning.batch_seconds
                ):
                    total += self._commit(publisher)
                    started = time.monotonic()
                if self._stop.is_set():
                    break
        except TRANSIENT_ERRORS:
            # Keep what was read: commit it (consistent: position = last added) first.
            self._commit(publisher)
            raise
        except RelayError:
            publisher.close()
            raise
        finally:
            # Closing fetches a page read ahead; a failure there (Postgres gone)
            # must not hide the error that ended the loop, nor a clean stop.
            with contextlib.suppress(Exception):
                pages.close()
        total += self._commit(publisher)
        if total == 0:
            progress.saw(recorder.max_notification_id() or 0)
            progress.update_lag()
        return total

    def _pages(self, recorder: ApplicationRecorder, after: int) -> Generator[int, None, None]:
        """Add the log after ``after`` to the publisher, page by page; yields each page's last id.

        Without an encoder hook, pages are rows produced by the encoder's fast
        loop (:meth:`~esbridge.wire.encoding.PayloadEncoder.produce_rows`);
        with a hook, notifications are read and encoded one by one. Either way
        the pages end before a gap that may still fill (:mod:`esbridge.relay.gaps`).
        """
        publisher = self._publisher
        assert publisher is not None
        page_size = self.tuning.page_size
        guard = self._gap_guard
        traces = self._traces
        if self.encoder_hook is not None:
            for notifications in guarded_pages(
                lambda start: read_pages(recorder, start, page_size=page_size),
                after,
                guard,
                _notification_id,
            ):
                found = traces.read(notifications[0].id, notifications[-1].id) if traces else None
                publisher.add(notifications, found)
                yield notifications[-1].id
            return
        traced = traces is not None
        pages = guarded_pages(
            lambda start: read_pages_for_publishing(
                recorder, start, page_size=page_size, traced=traced
            ),
            after,
            guard,
            _row_id,
        )
        try:
            for rows in pages:
                if traced:
                    plain, found = split_traces(rows)
                    publisher.add_rows(plain, found)
                else:
                    publisher.add_rows(rows)
                yield rows[-1][0]
        finally:
            pages.close()  # now, not when garbage-collected: it holds a pooled connection

    def _commit(self, publisher: KafkaPublisher) -> int:
        count = publisher.commit()
        if count:
            self.progress.committed(count, publisher.committed.nid)
            log.debug("relay %s: committed %d up to %d", self.app, count, self.progress.position)
        return count

    def after_step(self, count: int) -> None:
        """Linger after a transaction while events come fast (:mod:`esbridge.relay.pacing`)."""
        wait = self._pacing.after(count)
        if wait > 0:
            self._sleep(wait)

    def idle_wait(self) -> float:
        guard = self._gap_guard
        if guard is not None and guard.waiting:
            return min(self.tuning.poll_interval, GAP_POLL)  # a rollback sends no NOTIFY
        return self.tuning.poll_interval

    def publish_available(self) -> int:
        """Transactions until the log (up to a gap that may still fill) is published."""
        total = 0
        while True:
            count = self.step()
            total += count
            if count == 0:
                return total

    # -- the producer -----------------------------------------------------

    def serve(self) -> None:
        if self._publisher is not None:
            self._publisher.serve()

    def suspend(self) -> None:
        if self._publisher is not None:
            self._publisher.close()  # its successor aborts whatever it left open

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
