"""The consumer adapter: a Kafka topic -> an eventsourcing process application, exactly once.

A :class:`ConsumerAdapter` feeds the messages a relay published into a
downstream ``ProcessApplication`` (its ``policy()`` unchanged) and records the
new events together with the tracking position reached in ONE Postgres
transaction per batch (:mod:`esbridge.processing.application_sink`). Whatever crashes, each
upstream event has its effect exactly once:

* the **position** of each tracking name lives in the follower's tracking
  table and moves in the same transaction as the effects, with a
  compare-and-set, so a consumer that lost its partition in a rebalance (a
  zombie) cannot record a batch twice;
* Kafka's committed offsets are only a **hint** where to resume reading:
  anything at or below the Postgres position is skipped as a duplicate, and a
  message whose ``esb_prev_nid`` is past the position reveals a **gap**
  (:mod:`esbridge.consumer.reconcile`), filled from the upstream notification log when
  the consumer may read it, else held (and, after ``hold_timeout`` seconds,
  a :class:`~esbridge.errors.GapNotReconciledError`);
* **poison** messages (undecodable, unknown event type, a policy that keeps
  raising) are retried, then parked in the dead-letter table in the same
  transaction that moves the position past them; later messages of the same
  key are parked behind them (``held_behind``) so per-aggregate order holds
  (:mod:`esbridge.consumer.batch_commit`).

Tracking names: a single-partition topic (and prompt mode) records under the
upstream application's name, exactly like the library's runners, so a system
can move between the library's runners and esbridge without reprocessing. A
topic with ``N > 1`` partitions records one position per partition, named
``"{upstream}#{p}/{N}"`` (:func:`tracking_names`): an aggregate's events all
go to one partition, and each partition is an ordered sub-log of the upstream
log.

Prompt mode: the topic carries tiny prompts; on a prompt (or every
``prompt_interval`` seconds) the owner of the prompt partition pulls from the
upstream log from its tracking position in large pages and processes them in
batches: the library's ``pull_and_process`` without one transaction per event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_STORED,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from eventsourcing.persistence import ApplicationRecorder, Notification, Tracking
from eventsourcing.system import Follower
from prometheus_client import CollectorRegistry

from esbridge import wire
from esbridge.consumer import partition_flow
from esbridge.consumer.batch_commit import Abandoned, BatchCommitter, ConsumerCounts
from esbridge.consumer.metrics import ConsumerMetrics
from esbridge.consumer.reconcile import PartitionOrder
from esbridge.deadletters.store import REASON_FOREIGN, REASON_MALFORMED
from esbridge.errors import (
    BrokerUnavailable,
    ConfigurationError,
    ConsumerError,
    GapNotReconciledError,
    PostgresUnavailableError,
)
from esbridge.eventlog.notification_log import (
    DEFAULT_PAGE_SIZE,
    close_recorder,
    open_recorder,
    read_pages,
)
from esbridge.kafka.access import authorization_error, raise_if_unauthorized
from esbridge.kafka.partitioning import key_partitioner
from esbridge.names import MODES, default_position_topic, tracking_names
from esbridge.processing.application_sink import PrefetchFunc, ProcessApplicationSink
from esbridge.processing.sink import BatchSink
from esbridge.processing.steps import Source, Step, StepFactory, UpstreamDecoder
from esbridge.relay.position import RelayProgress
from esbridge.runtime import gc_pause
from esbridge.runtime.logs import kafka_client_config
from esbridge.runtime.postgres_retry import Diagnosis, connection_diagnosis, retry_unreachable

log = logging.getLogger("esbridge.consumer")


_METADATA_PREFIX = "esb_position="


def offset_metadata(position: int) -> str:
    """The metadata of a committed offset: the Postgres position that covers it."""
    return f"{_METADATA_PREFIX}{position}"


def position_in_metadata(metadata: str | None) -> int | None:
    """The position in an offset's metadata; None for offsets not committed by esbridge."""
    if metadata and metadata.startswith(_METADATA_PREFIX):
        try:
            return int(metadata[len(_METADATA_PREFIX) :])
        except ValueError:
            return None
    return None


@dataclass
class HeldPartition:
    """A partition held behind a gap (missing notifications)."""

    partition: int
    position: int
    missing: str
    age_seconds: float
    held_messages: int


@dataclass
class ConsumerStatus:
    """A snapshot of a consumer adapter (also exported as Prometheus metrics)."""

    follower: str
    upstream: str
    topic: str
    mode: str
    group_id: str
    running: bool
    assigned: list[int]
    positions: dict[str, int]
    processed: int
    duplicates: int
    gaps_reconciled: int
    reconciled_events: int
    batches: int
    dead_letters: int
    parked: int
    held_partitions: list[HeldPartition]
    lag_events: int
    lag_seconds: float
    error: str | None = None


@dataclass
class _Partition:
    """What the consumer knows of one assigned partition."""

    number: int
    tracking_name: str
    order: PartitionOrder[tuple[Message, wire.PayloadHeaders]]
    resume_offset: int  # where reading may safely start again (Kafka offset)
    last_offset: int = -1  # last offset whose message is recorded (or skipped) in Postgres
    last_timestamp: float = 0.0
    last_seen: float = 0.0  # monotonic time of its last message, or of its assignment
    trailing: tuple[int, float] | None = None  # (relay's last id here, since): a held end


@dataclass
class _Tuning:
    batch_size: int = 1000
    poll_timeout: float = 0.2
    hold_timeout: float = 60.0
    retries: int = 3
    retry_backoff: float = 0.2
    page_size: int = DEFAULT_PAGE_SIZE * 2
    prompt_interval: float = 1.0
    trailing_gap_after: float = 10.0
    position_topic: str | None = None
    verify_messages: bool = False
    park_behind: bool = True
    topic_timeout: float = 30.0
    dlq_refresh: float = 2.0
    connect_timeout: float | None = None
    pause_gc: bool = True
    fair_partitions: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class ConsumerAdapter:
    """Consumes a relay's topic into ``follower`` exactly once (see the module docstring).

    ``upstream_env``: read-only ``POSTGRES_*`` settings of the upstream
    application (prefixed ``{UPSTREAM}_POSTGRES_*`` settings win, as in the
    library); needed for prompt mode and to fill gaps. Without it a gap holds
    its partition and fails after ``hold_timeout`` seconds.

    Tuning keywords: ``batch_size`` (messages per transaction, default 1000),
    ``poll_timeout``, ``hold_timeout`` (60 s), ``retries`` (3) and
    ``retry_backoff`` (0.2 s, doubling) for a failing policy, ``page_size``
    (log reads), ``prompt_interval`` (1 s), ``park_behind`` (True), ``pause_gc``
    (True: Python's cyclic garbage collector waits while a batch is processed,
    see :func:`~esbridge.runtime.gc_pause.gc_paused`), ``fair_partitions`` (True: smaller
    fetches per partition, so no partition waits long behind the others' backlog,
    see :mod:`~esbridge.consumer.partition_flow`),
    ``topic_timeout`` (how long to wait for the topic to exist),
    ``trailing_gap_after`` (10 s: how long a partition is idle before the
    upstream log, or the relay's ``position_topic``, is asked whether its
    last messages are missing), ``verify_messages`` (False: with the upstream
    log, check every message against it, one read a batch, so that not even a
    forgery that continues a partition's chain exactly is applied),
    ``connect_timeout`` (how long to wait for an unreachable Postgres or
    broker at start-up; None, the default, waits for ever, logging each retry),
    ``upstream_class`` (its ``env`` supplies cipher/compressor defaults),
    ``partitions`` (expected count), ``registry`` (Prometheus), ``sink``
    (another :class:`~esbridge.processing.sink.BatchSink`), ``prefetch`` (a function
    from an upstream event to the ids of the aggregates its policy gets: each
    batch then reads them in one query; see
    :data:`~esbridge.processing.application_sink.PrefetchFunc`).
    """

    def __init__(
        self,
        follower: Follower[Any],
        *,
        upstream: str,
        topic: str,
        kafka_config: Mapping[str, Any],
        group_id: str,
        mode: str = "payloads",
        upstream_env: Mapping[str, str] | None = None,
        upstream_class: type | None = None,
        partitions: int | None = None,
        registry: CollectorRegistry | None = None,
        sink: BatchSink | None = None,
        prefetch: PrefetchFunc | None = None,
        **tuning: Any,
    ) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {MODES}, not {mode!r}")
        self.follower = follower
        self.upstream = upstream
        self.topic = topic
        self.group_id = group_id
        self.mode = mode
        self.kafka_config = dict(kafka_config)
        self.upstream_env = dict(upstream_env) if upstream_env is not None else None
        self.expected_partitions = partitions
        known = set(_Tuning.__dataclass_fields__) - {"extra"}
        unknown = set(tuning) - known
        if unknown:
            raise ConfigurationError(
                f"unknown ConsumerAdapter settings {sorted(unknown)}; known: {sorted(known)}"
            )
        self.tuning = _Tuning(**tuning)
        if self.tuning.verify_messages and self.upstream_env is None:
            raise ConfigurationError(
                "verify_messages checks every message against the upstream notification log: "
                "pass upstream_env (read-only POSTGRES_* settings of the upstream application)"
            )
        if mode == "prompts" and self.upstream_env is None:
            raise ConfigurationError(
                "prompt mode pulls events from the upstream notification log: pass "
                "upstream_env (read-only POSTGRES_* settings of the upstream application)"
            )
        self.metrics = ConsumerMetrics(follower.name, upstream, topic, registry)
        if sink is not None and prefetch is not None:
            raise ConfigurationError(
                "prefetch is a hint for the default sink: give it to your sink instead"
            )
        self._sink_arg = sink
        self._prefetch = prefetch
        self.sink: BatchSink | None = None
        self.steps: StepFactory = StepFactory(
            follower, UpstreamDecoder(follower, upstream, upstream_class)
        )
        self.partitions = 0
        self.names: list[str] = []
        self._upstream_log: ApplicationRecorder | None = None
        self._known_max = 0  # the upstream log's highest id, as last read
        self._relay_progress: RelayProgress | None = None
        self._consumer: Consumer | None = None
        self._parts: dict[int, _Partition] = {}
        self._pending_assign: list[TopicPartition] | None = None
        self._positions: dict[str, int] = {}  # committed positions (the CAS "expected")
        self._counts = ConsumerCounts()
        self._stop = threading.Event()
        self._running = False
        self._error: str | None = None
        self._prompted = True
        self._last_pull = 0.0
        self._partition_of: Callable[[bytes], int] = lambda key: 0
        self._lock = threading.Lock()
        self._last_lag: tuple[int, float] = (0, 0.0)
        self._committer = BatchCommitter(
            sink=self._sink,
            steps=self.steps,
            follower=follower.name,
            upstream=upstream,
            tuning=self.tuning,
            positions=self._positions,
            counts=self._counts,
            metrics=self.metrics,
            retry_db=self._retry_db,
            stop=self._stop,
        )

    # -- lifecycle -------------------------------------------------------------------

    def run(self) -> None:
        """Consume until :meth:`stop`; raises on a permanent failure (after closing)."""
        self._running = True
        try:
            self._start()
            while not self._stop.is_set():
                self._poll_once(self.tuning.poll_timeout)
        except Abandoned:
            pass
        except BaseException as e:
            self._error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._running = False
            self.close()
            if self._error is None:
                counts = self._counts
                log.info(
                    "consumer %s <- %s stopped: %d events processed, %d duplicates skipped, "
                    "%d messages parked by this process",
                    self.follower.name,
                    self.upstream,
                    counts.processed,
                    counts.duplicates,
                    counts.parked,
                )

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch (thread-safe, idempotent)."""
        self._stop.set()

    def close(self) -> None:
        """Leave the consumer group and release connections (idempotent)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                self._commit_offsets(consumer, asynchronous=False)
            except KafkaException as e:  # only a hint: losing it costs duplicates, skipped
                log.debug("offset commit on close failed: %s", e)
            consumer.close()
        self._parts.clear()
        progress, self._relay_progress = self._relay_progress, None
        if progress is not None:
            progress.close()
        upstream_log, self._upstream_log = self._upstream_log, None
        close_recorder(upstream_log)  # now: closed at exit, its pool would hang the process

    def process_available(self, timeout: float = 10.0) -> int:
        """Consume until caught up with the topic (or the upstream log); returns events processed.

        For tests and one-shot use. Waits for the group to assign partitions
        first. Returns when every assigned partition has been read to its end
        and nothing is held, or when ``timeout`` seconds have passed.
        """
        self._start()
        before = self._counts.processed
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self._poll_once(min(self.tuning.poll_timeout, 0.2))
            if got == 0 and self._caught_up():
                break
        return self._counts.processed - before

    # -- start -----------------------------------------------------------------------

    def _start(self) -> None:
        if self._consumer is not None:
            return
        # Started while Postgres is down (restarting): wait for it, up to connect_timeout.
        wait = partial(self._wait_for_postgres, timeout=self.tuning.connect_timeout)
        if self.sink is None:
            self.sink = self._sink_arg or wait(
                f"creating the dead-letter table of {self.follower.name}",
                lambda: ProcessApplicationSink(self.follower, prefetch=self._prefetch),
            )
        if self.upstream_env is not None and self._upstream_log is None:
            upstream_env = self.upstream_env
            self._upstream_log = wait(
                f"opening the notification log of {self.upstream}",
                lambda: open_recorder(self.upstream, upstream_env),
                diagnose=connection_diagnosis(self.upstream, upstream_env),
            )
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
        try:
            self.partitions = self._partition_count(consumer)
        except BaseException:
            consumer.close()
            raise
        self.names = (
            [self.upstream]
            if self.mode == "prompts"
            else tracking_names(self.upstream, self.partitions)
        )
        self._partition_of = key_partitioner(max(1, self.partitions))
        consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._consumer = consumer
        log.info(
            "consumer %s <- %s: topic %s (%d partitions), group %s, mode %s, upstream log %s",
            self.follower.name,
            self.upstream,
            self.topic,
            self.partitions,
            self.group_id,
            self.mode,
            "readable" if self._upstream_log is not None else "not configured",
        )

    def _partition_count(self, consumer: Consumer) -> int:
        """The topic's partition count; waits for the broker (``connect_timeout``), then for
        the topic to exist (``topic_timeout``)."""
        started = time.monotonic()
        deadline: float | None = None  # counted from the broker's first answer
        while True:
            try:
                metadata = consumer.list_topics(self.topic, timeout=5)
            except KafkaException as e:
                consumer.poll(0)  # its error_cb raises a refused login or certificate
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
            if time.monotonic() > deadline or self._stop.is_set():
                raise ConfigurationError(
                    f"topic {self.topic!r} does not exist (waited "
                    f"{self.tuning.topic_timeout:.0f} s): start the relay of {self.upstream!r} "
                    "first, or create the topic"
                )
            time.sleep(0.5)
        if self.expected_partitions is not None and count != self.expected_partitions:
            raise ConfigurationError(
                f"topic {self.topic!r} has {count} partitions, but {self.expected_partitions} "
                "were expected: the relay and its consumers must agree on the partition count"
            )
        return count

    def _broker_unreachable(self, error: KafkaException, waited: float) -> None:
        """Log and wait a little, or raise when ``connect_timeout`` passed or we stop."""
        servers = self.kafka_config.get("bootstrap.servers")
        limit = self.tuning.connect_timeout
        if self._stop.is_set():
            raise Abandoned("stopped while waiting for the broker")
        if limit is not None and waited >= limit:
            raise BrokerUnavailable(
                f"no Kafka broker answered at {servers!r} within {waited:.0f} s ({error}); "
                "check bootstrap.servers (KAFKA_BOOTSTRAP_SERVERS) and that the broker runs"
            )
        log.warning("Kafka broker at %s unreachable (%s); retrying", servers, error)
        self._stop.wait(0.5)

    # -- rebalance callbacks (run inside consume()) ----------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s[%s]", self.topic, ",".join(str(p.partition) for p in partitions))
        starts = self._start_offsets(consumer, partitions)
        consumer.assign(starts)  # from here, not from an offset past what Postgres holds
        self._pending_assign = (self._pending_assign or []) + starts

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s[%s]", self.topic, ",".join(str(p.partition) for p in partitions))
        revoked = {p.partition for p in partitions}
        try:
            self._commit_offsets(consumer, asynchronous=False, only=revoked)
        except KafkaException as e:
            log.debug("offset commit on revoke failed: %s", e)
        self._forget(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("lost %s[%s]", self.topic, ",".join(str(p.partition) for p in partitions))
        self._forget({p.partition for p in partitions})

    def _forget(self, numbers: set[int]) -> None:
        for n in numbers:
            self._parts.pop(n, None)
        if self._pending_assign:
            self._pending_assign = [p for p in self._pending_assign if p.partition not in numbers]

    def _start_offsets(
        self, consumer: Consumer, partitions: list[TopicPartition]
    ) -> list[TopicPartition]:
        """Where each assigned partition starts: the group's offset only if Postgres covers it.

        Each offset esbridge commits carries, as its metadata, the tracking
        position that Postgres held when everything before the offset was
        recorded (:func:`offset_metadata`). An offset whose position is past the
        Postgres position (a batch that failed after its offsets were read, a
        database restored from a backup) would skip messages that never had
        their effect: the partition is read from its beginning instead (the
        events already processed are skipped as duplicates). Offsets committed
        without that metadata (older esbridge versions) are taken as before.
        """
        committed: dict[int, TopicPartition] = {}
        try:
            for tp in consumer.committed(partitions, timeout=10):
                committed[tp.partition] = tp
        except KafkaException as e:
            log.warning("reading committed offsets: %s (resuming from the group's offsets)", e)
        starts = []
        for tp in partitions:
            got = committed.get(tp.partition)
            offset = got.offset if got is not None and got.offset >= 0 else OFFSET_STORED
            recorded = position_in_metadata(got.metadata if got is not None else None)
            if offset >= 0 and recorded is not None and self.mode == "payloads":
                position = self._position(self._tracking_name(tp.partition))
                if recorded > position:
                    log.warning(
                        "partition %s[%d]: the group's offset %d was committed at position %d, "
                        "but Postgres holds position %d: reading the partition from its "
                        "beginning so that nothing after %d is skipped",
                        self.topic,
                        tp.partition,
                        offset,
                        recorded,
                        position,
                        position,
                    )
                    offset = OFFSET_BEGINNING
            starts.append(TopicPartition(self.topic, tp.partition, offset))
        return starts

    def _tracking_name(self, partition: int) -> str:
        return self.names[0] if self.mode == "prompts" else self.names[partition]

    def _init_assigned(self, consumer: Consumer) -> None:
        """Read the Postgres positions of newly assigned partitions (they are the truth)."""
        pending, self._pending_assign = self._pending_assign or [], None
        if not pending:
            return
        now = time.monotonic()
        for tp in pending:
            name = self._tracking_name(tp.partition)
            position = self._position(name)
            self._positions[name] = position
            offset = tp.offset
            self._parts[tp.partition] = _Partition(
                number=tp.partition,
                tracking_name=name,
                order=self._order(position),
                resume_offset=offset if offset >= 0 else OFFSET_BEGINNING,
                last_seen=now,
            )
            log.info(
                "partition %s[%d]: position %d (%s), Kafka offset hint %s",
                self.topic,
                tp.partition,
                position,
                name,
                {OFFSET_BEGINNING: "none: from the beginning", OFFSET_STORED: "none"}.get(
                    offset, offset
                ),
            )
        self._prompted = True

    # -- the loop ----------------------------------------------------------------------

    def _position(self, name: str) -> int:
        sink = self._sink()
        position: int = self._retry_db(lambda: sink.position(name))
        return position

    def _order(self, position: int) -> PartitionOrder[tuple[Message, wire.PayloadHeaders]]:
        # With the upstream log, suspect messages wait to be checked against it.
        return PartitionOrder(position, verify=self._upstream_log is not None)

    def _sink(self) -> BatchSink:
        assert self.sink is not None
        return self.sink

    def _poll_once(self, timeout: float) -> int:
        """One round: consume a batch of messages, process what is ready. Returns messages seen."""
        consumer = self._consumer
        assert consumer is not None
        # consume(n, timeout) waits the whole timeout unless n messages arrive, which
        # would add the timeout to every hop's latency: wait for the first message
        # only, then take what librdkafka has already fetched.
        first = consumer.poll(timeout)
        if first is None:
            return self._round(consumer, [])
        with gc_pause.gc_paused(self.tuning.pause_gc):
            messages = [first]
            del first
            if self.tuning.batch_size > 1:
                messages.extend(consumer.consume(self.tuning.batch_size - 1, 0))
            seen = self._round(consumer, messages)
            messages.clear()  # freed before the collector runs again: it has nothing to scan
        return seen

    def _round(self, consumer: Consumer, messages: list[Message]) -> int:
        """Process what ``messages`` made ready (and fill gaps); returns messages seen."""
        self._init_assigned(consumer)
        if self.mode == "prompts":
            return self._prompt_round(messages)
        steps: list[Step] = []
        now = time.time()
        parts = self._parts
        last: dict[int, Message] = {}  # the last message of each partition
        truth = self._log_events_for(messages) if self.tuning.verify_messages else None
        for message in messages:
            error = message.error()
            if error is not None:
                self._kafka_error(error)
                continue
            number = message.partition() or 0
            part = parts.get(number)
            if part is None:
                continue  # revoked meanwhile
            last[number] = message
            self._offer(part, message, steps, now, truth)
        touched = set(last)
        for part in list(self._parts.values()):
            gap = part.order.gap()
            if gap is None:
                if part.number not in last:
                    self._check_trailing(consumer, part, steps)
                if part.trailing is not None:
                    self._still_trailing(part, now)
                continue
            touched.add(part.number)
            if self._upstream_log is not None:
                self._fill_gaps(part, steps)
            elif now - gap.since > self.tuning.hold_timeout:
                raise GapNotReconciledError(
                    f"partition {self.topic}[{part.number}] of {self.upstream!r} has been held "
                    f"for {now - gap.since:.0f} s at position {gap.after}: {gap.describe()} "
                    f"never arrived and the upstream notification log is not readable. Give "
                    "the consumer read access to the upstream database (upstream_env / "
                    "--upstream-log) so it can fill the gap, or republish the missing range"
                )
        if steps and not self._commit(steps):
            return len(messages)
        # Only now, with the batch in Postgres, may offsets move past its messages: an
        # offset committed before (and a batch that then failed) would skip them.
        mono = time.monotonic()
        for number, message in last.items():
            part = parts[number]
            part.last_offset = message.offset() or 0
            part.last_timestamp = message.timestamp()[1] / 1000.0
            part.last_seen = mono
        self._commit_offsets(consumer, asynchronous=True, only=touched)
        self._update_gauges()
        return len(messages)

    def _offer(
        self,
        part: _Partition,
        message: Message,
        steps: list[Step],
        now: float,
        truth: dict[int, Notification] | None = None,
    ) -> None:
        try:
            payload = wire.decode_payload(_raw_headers(message), message.key())
            if payload is None:
                return  # a prompt
        except Exception as e:
            source = self._source(message, None)
            letter = self.steps.dead_letter(source, None, REASON_MALFORMED, str(e))
            steps.append(Step(tracking=None, key=source.key, dead_letter=letter, source=source))
            return
        if payload.app != self.upstream:
            self._park_foreign(
                steps,
                message,
                payload,
                f"message from application {payload.app!r} on a topic consumed as "
                f"{self.upstream!r}",
            )
            return
        if self._upstream_log is not None and payload.nid > self._upstream_max(payload.nid):
            self._park_foreign(
                steps,
                message,
                payload,
                f"notification id {payload.nid} is beyond the upstream log's highest id "
                f"{self._known_max}: no relay of {self.upstream!r} published it",
            )
            return
        if truth is not None and payload.nid > part.order.position:
            why = self._unlike_log(part, message, payload, truth.get(payload.nid))
            if why is not None:
                self._park_foreign(steps, message, payload, why)
                return
        order = part.order
        if order.advance(payload.nid, payload.prev_nid):  # the common case, allocation-free
            steps.append(self._message_step(part, message, payload))
            return
        offer = order.offer(payload.nid, payload.prev_nid, (message, payload), now)
        self._counts.duplicates += offer.duplicates
        self.metrics.duplicates.inc(offer.duplicates)
        for _nid, (msg, headers_) in offer.ready:
            steps.append(self._message_step(part, msg, headers_))
        for _nid, (msg, headers_) in offer.broken:
            self._park_foreign(steps, msg, headers_, _broken_chain(headers_, order.position))

    def _park_foreign(
        self, steps: list[Step], message: Message, payload: wire.PayloadHeaders, why: str
    ) -> None:
        """Park a message that is not from the upstream log: no position moves, nothing waits.

        Trusting it would move the partition's position to its ``esb_nid`` and make
        every genuine event below that id look like a duplicate (silent loss).
        """
        source = self._source(message, payload)
        log.warning(
            "partition %s[%s]: parking a foreign message at offset %s (key %s): %s",
            message.topic(),
            message.partition(),
            message.offset(),
            source.key,
            why,
        )
        letter = self.steps.dead_letter(source, None, REASON_FOREIGN, why)
        steps.append(Step(tracking=None, key=source.key, dead_letter=letter, source=source))
        self.metrics.foreign.inc()

    def _log_events_for(self, messages: Sequence[Message]) -> dict[int, Notification]:
        """The upstream log's events over the ids that ``messages`` claim (``verify_messages``).

        One read a batch, bounded by the log's highest id.
        """
        nids = []
        for message in messages:
            for name, value in _raw_headers(message):
                if name == wire.H_NID:
                    if value and value.isdigit():
                        nids.append(int(value))
                    break
        if not nids:
            return {}
        after, upto = min(nids) - 1, min(max(nids), self._upstream_max(max(nids)))
        if upto <= after:
            return {}
        return {n.id: n for page in self._read_range(after, upto) for n in page}

    def _unlike_log(
        self,
        part: _Partition,
        message: Message,
        payload: wire.PayloadHeaders,
        genuine: Notification | None,
    ) -> str | None:
        """Why ``message`` is not the log's event under its id (None when it is)."""
        if genuine is None or not _same_event(genuine, message, payload):
            return _not_in_log(payload, genuine, self._known_max)
        if self.partitions > 1 and self._partition_of(message.key() or b"") != part.number:
            return f"its key belongs to another partition than {part.number}"
        return None

    def _upstream_max(self, at_least: int) -> int:
        """The upstream log's highest id, re-read only when ``at_least`` is beyond the last.

        Ids commit in order, so every id up to it is final: it bounds any genuine
        notification id and every range the consumer may read from the log.
        """
        if at_least > self._known_max:
            recorder = self._upstream_log
            assert recorder is not None
            self._known_max = self._retry_db(recorder.max_notification_id) or 0
        return self._known_max

    def _source(self, message: Message, payload: wire.PayloadHeaders | None) -> Source:
        if payload is not None:
            key = payload.originator_id  # the key, decoded already
        else:
            key = (message.key() or b"").decode("utf-8", "replace")
        return Source(
            key=key,
            value=message.value(),
            headers=_raw_headers(message),  # None values become b"" in dead letters
            kafka_topic=message.topic(),
            kafka_partition=message.partition(),
            kafka_offset=message.offset(),
            event_topic=payload.topic if payload else None,
            originator_version=payload.originator_version if payload else None,
            nid=payload.nid if payload else None,
        )

    def _message_step(
        self, part: _Partition, message: Message, payload: wire.PayloadHeaders
    ) -> Step:
        return self.steps.step(
            self._source(message, payload), Tracking(part.tracking_name, payload.nid)
        )

    def _fill_gaps(self, part: _Partition, steps: list[Step]) -> None:
        """Read what is missing before ``part``'s held messages from the upstream log.

        Each round reads ``(position, before]`` (``before``: the lowest held
        message), bounded by the log's highest id: a held message's own id
        proves nothing, it may be forged. The log's notification ``before``
        decides whether the held message is genuine (the same event: processed)
        or foreign (parked without a position, and the log's own event, if this
        partition has one there, is processed instead).
        """
        while (gap := part.order.gap()) is not None:
            upto = min(gap.before, self._upstream_max(gap.before))
            found = 0
            genuine: Notification | None = None
            for page in self._read_range(gap.after, upto):
                for notification in page:
                    if self.partitions > 1 and part.number != self._partition_of(
                        str(notification.originator_id).encode()
                    ):
                        continue
                    if notification.id == gap.before:
                        genuine = notification
                        continue
                    steps.append(
                        self.steps.step_from_notification(notification, part.tracking_name)
                    )
                    found += 1
            message, payload = part.order.take(gap.before)
            if genuine is not None and _same_event(genuine, message, payload):
                steps.append(self._message_step(part, message, payload))
            else:
                self._park_foreign(steps, message, payload, _not_in_log(payload, genuine, upto))
                if genuine is not None:
                    steps.append(self.steps.step_from_notification(genuine, part.tracking_name))
                    found += 1
            if gap.first_missing < gap.before:
                log.info(
                    "partition %s[%d]: filled gap %s from the upstream log (%d events)",
                    self.topic,
                    part.number,
                    gap.describe(),
                    found,
                )
                self._counts.gaps += 1
                self.metrics.gaps.inc()
            self._counts.reconciled += found
            self.metrics.reconciled.inc(found)
            released = part.order.filled(upto)
            self._counts.duplicates += released.duplicates
            for _nid, (msg, headers_) in released.ready:
                steps.append(self._message_step(part, msg, headers_))

    def _check_trailing(self, consumer: Consumer, part: _Partition, steps: list[Step]) -> None:
        """Look for a *trailing gap*: the partition's last events never reached the topic.

        A gap shows itself when a later message arrives; at the end of a
        partition nothing later may come (messages deleted from the topic, a
        consumer started past them). So once the partition has been idle for
        ``trailing_gap_after`` seconds with nothing left to read on the topic,
        the upstream log (when readable) is asked for this partition's events
        beyond the position, and they are processed from it; without the log,
        the relay's position topic tells whether the relay published more to
        this partition than arrived, and the partition is held (logged,
        metered, and a :class:`GapNotReconciledError` after ``hold_timeout``).
        """
        if part.order.held_count:
            return
        now = time.monotonic()
        if now - part.last_seen < self.tuning.trailing_gap_after:
            return
        part.last_seen = now  # checked: the next check waits as long again
        if not self._read_to_end(consumer, part):
            return
        if self._upstream_log is not None:
            self._fill_trailing(part, steps)
            return
        published = self._published_to(part.number)
        if published <= part.order.position:
            return
        if part.trailing is None:
            log.warning(
                "partition %s[%d] of %r: the relay published up to notification %d on this "
                "partition, but nothing after position %d is on the topic (deleted by "
                "retention or compaction? read past by a Kafka offset?): holding it. Give the "
                "consumer the upstream log (upstream_env / --upstream-log) to fill it, or "
                "republish the range",
                self.topic,
                part.number,
                self.upstream,
                published,
                part.order.position,
            )
            part.trailing = (published, time.time())
        else:
            part.trailing = (published, part.trailing[1])

    def _still_trailing(self, part: _Partition, now: float) -> None:
        """Clear a trailing hold that messages closed; fail one older than ``hold_timeout``."""
        assert part.trailing is not None
        published, since = part.trailing
        if part.order.position >= published:
            part.trailing = None
        elif now - since > self.tuning.hold_timeout:
            raise GapNotReconciledError(
                f"partition {self.topic}[{part.number}] of {self.upstream!r} has been held "
                f"for {now - since:.0f} s at position {part.order.position}: the relay "
                f"published notifications up to {published} to it, which never arrived, and "
                "the upstream notification log is not readable. Give the consumer read access "
                "to the upstream database (upstream_env / --upstream-log) so it can fill the "
                "gap, or republish the missing range"
            )

    def _published_to(self, partition: int) -> int:
        """The relay's last notification id on ``partition`` (0 when it cannot be read)."""
        progress = self._relay()
        return 0 if progress is None else progress.read().get(partition, 0)

    def _relay(self) -> RelayProgress | None:
        """The reader of the relay's position topic (None when it cannot be made)."""
        if self._relay_progress is None:
            position_topic = self.tuning.position_topic or default_position_topic(self.topic)
            try:
                self._relay_progress = RelayProgress(
                    self.kafka_config, position_topic, self.upstream, self.topic
                )
            except KafkaException as e:
                log.debug("relay position topic %s not readable: %s", position_topic, e)
        return self._relay_progress

    def _fill_trailing(self, part: _Partition, steps: list[Step]) -> None:
        """Process this partition's events beyond the position from the upstream log.

        Up to the log's highest id, or, when the relay's position topic is
        readable, up to the highest id the relay published: below it the relay
        settled every gap, so no id there can still commit (writers that skip
        the library's table lock can commit an id after higher ids, and one
        read past here would then arrive later as a "duplicate").
        """
        top = self._upstream_max(part.order.position + 1)
        progress = self._relay()
        if progress is not None:
            progress.read()
            if progress.known:
                top = min(top, progress.published)
        if top <= part.order.position:
            return
        found: list[Step] = []
        for page in self._read_range(part.order.position, top):
            for notification in page:
                if self.partitions <= 1 or part.number == self._partition_of(
                    str(notification.originator_id).encode()
                ):
                    found.append(
                        self.steps.step_from_notification(notification, part.tracking_name)
                    )
        if found:
            first, last = found[0].tracking, found[-1].tracking
            assert first is not None and last is not None
            log.warning(
                "partition %s[%d]: %d events of this partition (notification ids %d..%d) are in "
                "the upstream log but did not arrive on the topic within %.0f s of its last "
                "message (a trailing gap): processing them from the log",
                self.topic,
                part.number,
                len(found),
                first.notification_id,
                last.notification_id,
                self.tuning.trailing_gap_after,
            )
            self._counts.reconciled += len(found)
            self.metrics.reconciled.inc(len(found))
            self.metrics.trailing.inc(len(found))
            steps.extend(found)
        part.order.filled(top)

    def _read_to_end(self, consumer: Consumer, part: _Partition) -> bool:
        """Whether nothing but transaction markers is left to read on ``part`` (cached)."""
        tp = TopicPartition(self.topic, part.number)
        try:
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            position = consumer.position([tp])[0].offset
        except KafkaException:
            return False
        if position < 0:  # nothing consumed yet: where reading starts
            position = max(part.resume_offset, low, 0)
        return high < 0 or position >= high - 1

    def _read_range(self, after: int, stop: int) -> list[Sequence[Notification]]:
        recorder = self._upstream_log
        assert recorder is not None
        size = self.tuning.page_size
        pages: list[Sequence[Notification]] = self._retry_db(
            lambda: list(read_pages(recorder, after, stop=stop, page_size=size))
        )
        return pages

    def _kafka_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
            raise authorization_error(
                self.kafka_config, "group", self.group_id, "READ", needed_for="consume", cause=error
            )
        raise_if_unauthorized(self.kafka_config, error, self.topic, "READ", needed_for="consume it")
        if error.fatal():
            raise ConsumerError(f"Kafka consumer failed: {error}")
        log.warning("Kafka: %s", error)

    # -- prompt mode -----------------------------------------------------------------

    def _prompt_round(self, messages: Sequence[Message]) -> int:
        for message in messages:
            error = message.error()
            if error is None:
                self._prompted = True
            else:
                self._kafka_error(error)  # a missing ACL stops it, as in payload mode
        if not self._parts:
            return len(messages)
        now = time.monotonic()
        if not self._prompted and now - self._last_pull < self.tuning.prompt_interval:
            return len(messages)
        self._prompted = False
        self._last_pull = now
        pulled = self._pull()
        consumer = self._consumer
        if consumer is not None:
            for part in self._parts.values():
                for m in messages:
                    if m.partition() == part.number:
                        part.last_offset = max(part.last_offset, m.offset() or 0)
            self._commit_offsets(consumer, asynchronous=True, only=set(self._parts))
        self._update_gauges()
        return len(messages) + pulled

    def _pull(self) -> int:
        """Pull everything after the tracking position from the upstream log; returns events."""
        assert self._upstream_log is not None
        name = self.names[0]
        position = self._position(name)
        self._positions[name] = position
        total = 0
        while not self._stop.is_set():
            page = self._retry_db(
                lambda: self._upstream_log.select_notifications(  # type: ignore[union-attr]
                    start=self._positions[name],
                    limit=self.tuning.page_size,
                    inclusive_of_start=False,
                )
            )
            if not page:
                break
            with gc_pause.gc_paused(self.tuning.pause_gc):
                steps = [self.steps.step_from_notification(n, name) for n in page]
                if not self._commit(steps):
                    break
            total += len(page)
            if len(page) < self.tuning.page_size:
                break
        return total

    # -- committing batches ----------------------------------------------------------

    def _commit(self, steps: Sequence[Step]) -> bool:
        """Record ``steps`` (:mod:`esbridge.consumer.batch_commit`); on a collision with another
        consumer's writes, restart every partition from its Postgres position: False."""
        if self._committer.commit(steps):
            return True
        self._resync()
        return False

    def _retry_db(self, call: Callable[[], Any]) -> Any:
        """``call()``, retried with backoff while Postgres is unreachable (restarts)."""
        return self._wait_for_postgres(f"consumer {self.follower.name} <- {self.upstream}", call)

    def _wait_for_postgres(
        self,
        what: str,
        call: Callable[[], Any],
        timeout: float | None = None,
        diagnose: Diagnosis | None = None,
    ) -> Any:
        """``call()``, retried while Postgres is unreachable, up to ``timeout`` (None: for ever).

        Stopping meanwhile ends :meth:`run` quietly: nothing of the batch was
        recorded, and the next start processes it.
        """

        def sleep(delay: float) -> None:
            gc_pause.checkpoint()
            time.sleep(delay)

        try:
            stopped = self._stop.is_set
            return retry_unreachable(
                what, call, timeout=timeout, stopped=stopped, diagnose=diagnose, sleep=sleep
            )
        except PostgresUnavailableError as e:
            if self._stop.is_set():
                raise Abandoned(str(e)) from e
            raise

    def _resync(self) -> None:
        """Positions moved under us (another consumer): restart every partition from Postgres."""
        consumer = self._consumer
        for part in self._parts.values():
            position = self._position(part.tracking_name)
            self._positions[part.tracking_name] = position
            part.order = self._order(position)
            if consumer is not None and self.mode == "payloads":
                consumer.seek(TopicPartition(self.topic, part.number, part.resume_offset))

    # -- Kafka offsets (hints) and status ----------------------------------------

    def _commit_offsets(
        self, consumer: Consumer, *, asynchronous: bool, only: set[int] | None = None
    ) -> None:
        offsets = []
        for part in self._parts.values():
            if only is not None and part.number not in only:
                continue
            held = part.order.held_items()
            if held:  # the lowest offset held: with reordering, not the lowest id's
                offset = min(message.offset() or 0 for message, _ in held)
            elif part.last_offset >= 0:
                offset = part.last_offset + 1
            else:
                continue
            if offset > part.resume_offset:
                part.resume_offset = offset
                position = self._positions.get(part.tracking_name, 0)
                offsets.append(
                    TopicPartition(
                        self.topic, part.number, offset, metadata=offset_metadata(position)
                    )
                )
        if offsets and asynchronous:
            consumer.commit(offsets=offsets, asynchronous=True)
        elif offsets:
            consumer.commit(offsets=offsets, asynchronous=False)

    def _lag(self) -> tuple[int, float]:
        consumer = self._consumer
        if consumer is None:
            return 0, 0.0
        events = 0
        oldest = 0.0
        for part in list(self._parts.values()):
            try:
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, part.number), cached=True
                )
            except KafkaException:
                continue
            behind = max(0, high - max(part.resume_offset, part.last_offset + 1, 0))
            if behind > 1 and self.mode == "payloads":  # 1: the last transaction marker
                events += behind
                if part.last_timestamp:
                    oldest = max(oldest, time.time() - part.last_timestamp)
        return events, oldest

    def _caught_up(self) -> bool:
        if not self._parts or self._pending_assign:
            return False
        if self.mode == "prompts":
            return not self._prompted
        consumer = self._consumer
        assert consumer is not None
        for part in self._parts.values():
            if part.order.held_count:
                return False
            tp = TopicPartition(self.topic, part.number)
            _low, high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            position = consumer.position([tp])[0].offset
            if position < 0:
                position = part.resume_offset
            if position < high and not self._only_markers_left(part, position, high):
                return False
        return True

    @staticmethod
    def _only_markers_left(part: _Partition, position: int, high: int) -> bool:
        # Transactional producers leave a commit marker after each transaction: it has an
        # offset but is never delivered. Nothing consumable is left if the consumer has
        # read everything up to the marker(s) after the last message it got.
        return part.last_offset >= 0 and position >= part.last_offset + 1 and high - position <= 1

    def _update_gauges(self) -> None:
        held = self._held()
        self.metrics.held.set(len(held))
        self.metrics.held_age.set(max((h.age_seconds for h in held), default=0.0))
        self.metrics.dlq.set(self._counts.dead_letters)
        events, seconds = self._lag()
        self._last_lag = (events, seconds)
        self.metrics.lag_events.set(events)
        self.metrics.lag_seconds.set(seconds)

    def _held(self) -> list[HeldPartition]:
        result = []
        now = time.time()
        for part in list(self._parts.values()):
            gap = part.order.gap()
            if gap is not None:
                result.append(
                    HeldPartition(
                        part.number,
                        gap.after,
                        gap.describe(),
                        now - gap.since,
                        part.order.held_count,
                    )
                )
            elif part.trailing is not None:
                published, since = part.trailing
                result.append(
                    HeldPartition(
                        part.number,
                        part.order.position,
                        f"this partition's notifications after {part.order.position} up to "
                        f"{published} (published by the relay, not on the topic)",
                        now - since,
                        0,
                    )
                )
        return result

    def status(self) -> ConsumerStatus:
        """A snapshot of counters, positions, held partitions and lag (thread-safe).

        Lag is as of the consumer's last round (Kafka is only asked from its thread).
        """
        events, seconds = self._last_lag
        counts = self._counts
        return ConsumerStatus(
            follower=self.follower.name,
            upstream=self.upstream,
            topic=self.topic,
            mode=self.mode,
            group_id=self.group_id,
            running=self._running,
            assigned=sorted(self._parts),
            positions=dict(self._positions),
            processed=counts.processed,
            duplicates=counts.duplicates,
            gaps_reconciled=counts.gaps,
            reconciled_events=counts.reconciled,
            batches=counts.batches,
            dead_letters=counts.dead_letters,
            parked=counts.parked,
            held_partitions=self._held(),
            lag_events=events,
            lag_seconds=seconds,
            error=self._error,
        )


def _raw_headers(message: Message) -> list[tuple[str, bytes | None]]:
    """A consumed message's headers (librdkafka gives consumed header values as bytes).

    confluent-kafka converts them on the first call and keeps the list in the
    message: later calls are free, and the list must not be changed.
    """
    headers: Any = message.headers()
    return headers or []


def _broken_chain(payload: wire.PayloadHeaders, position: int) -> str:
    return (
        f"its esb_prev_nid {payload.prev_nid} does not continue this partition's chain at "
        f"position {position} (esb_nid {payload.nid}): not published by the upstream's relay, "
        "and no upstream log is configured to check it (--upstream-log / upstream_env)"
    )


def _same_event(notification: Notification, message: Message, payload: wire.PayloadHeaders) -> bool:
    """Whether ``message`` carries exactly the log's ``notification`` (not a forgery)."""
    return (
        str(notification.originator_id) == payload.originator_id
        and notification.originator_version == payload.originator_version
        and notification.topic == payload.topic
        and bytes(notification.state) == (message.value() or b"")
    )


def _not_in_log(payload: wire.PayloadHeaders, genuine: Notification | None, log_max: int) -> str:
    if payload.nid > log_max:
        return f"notification id {payload.nid} is beyond the upstream log's highest id {log_max}"
    if genuine is None:
        return f"the upstream log has no notification {payload.nid} for this message's partition"
    return (
        f"the upstream log's notification {payload.nid} is another event ({genuine.topic} "
        f"v{genuine.originator_version} of {genuine.originator_id}; the message says "
        f"{payload.topic} v{payload.originator_version} of {payload.originator_id})"
    )
