"""Prometheus metrics of consumer adapters (``esbridge_consumer_*`` and two more).

Labelled by follower, upstream application and topic. Metric objects are
created once per registry and shared by every consumer in the process (the
system runner runs several), each consumer using its own labels.

Two are named for what they measure rather than for the consumer:
``esbridge_end_to_end_latency_seconds`` (labels follower, upstream), from when
an event happened upstream to the commit of its effects downstream, whatever
hops lie between; and ``esbridge_partition_lso_gap_messages`` (labels topic,
partition), the partition's high watermark minus its last stable offset as a
``read_committed`` consumer sees them: offsets written but not readable yet
(a transaction still open; one left open pins it, see
:mod:`esbridge.consumer.stable_offsets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from esbridge.processing.steps import Step
from esbridge.runtime.metrics import BulkHistogram, MetricNamer, PerRegistry

LABELS = ("follower", "upstream", "topic")
EDGE_LABELS = ("follower", "upstream")
PARTITION_LABELS = ("topic", "partition")

#: Seconds: from a few milliseconds (an idle system) to minutes (a backlog caught up).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
)  # fmt: skip


@dataclass(frozen=True)
class _Family:
    processed: Counter
    duplicates: Counter
    gaps: Counter
    reconciled: Counter
    batches: Counter
    parked: Counter
    skipped: Counter
    parked_messages: Gauge
    parked_age: Gauge
    foreign: Counter
    trailing: Counter
    held: Gauge
    held_age: Gauge
    causal_held: Gauge
    causal_waits: Counter
    dlq: Gauge
    lag_events: Gauge
    lag_seconds: Gauge
    end_to_end: BulkHistogram
    lso_gap: Gauge


def _build(registry: CollectorRegistry) -> _Family:
    make = MetricNamer("esbridge_consumer_", LABELS, registry)
    return _Family(
        processed=make.counter("processed", "Upstream events processed (committed)"),
        duplicates=make.counter("duplicates", "Messages skipped as already processed"),
        gaps=make.counter("gaps_reconciled", "Gaps filled from the upstream log"),
        reconciled=make.counter(
            "reconciled_events", "Events read from the upstream log to fill gaps"
        ),
        batches=make.counter("batches", "Postgres transactions committed"),
        parked=make.counter("parked", "Messages parked in the dead-letter table"),
        skipped=make.counter(
            "skipped",
            "Messages that kept failing, recorded as skipped (a 'skip' dead-letter policy)",
        ),
        parked_messages=make.gauge(
            "parked_messages",
            "Messages of this upstream parked in the follower's dead-letter table, waiting",
        ),
        parked_age=make.gauge(
            "parked_oldest_age_seconds",
            "Age of the oldest message of this upstream parked in the dead-letter table "
            "(0 when none)",
        ),
        foreign=make.counter(
            "foreign_messages",
            "Messages parked as foreign: not in the upstream log they claim (no position moved)",
        ),
        trailing=make.counter(
            "trailing_gaps",
            "Notifications found in the upstream log behind an idle partition's end and filled",
        ),
        held=make.gauge("held_partitions", "Partitions held behind a gap"),
        held_age=make.gauge("held_age_seconds", "Age of the oldest held gap"),
        causal_held=make.gauge(
            "causal_held_events",
            "Events ready but waiting for their causal dependencies (esb_deps) on other "
            "partitions to be processed",
        ),
        causal_waits=make.counter(
            "causal_waits",
            "Times a partition's next event had to wait for a causal dependency on another "
            "partition",
        ),
        dlq=make.gauge("dead_letters", "Parked messages of this follower"),
        lag_events=make.gauge("lag_events", "Messages on the topic not yet consumed"),
        lag_seconds=make.gauge("lag_seconds", "Age of the last processed message while behind"),
        end_to_end=BulkHistogram(
            "esbridge_end_to_end_latency_seconds",
            "From an event's time upstream (its ce_time header, else its Kafka timestamp) "
            "to the commit of its effects downstream",
            EDGE_LABELS,
            LATENCY_BUCKETS,
            registry,
        ),
        lso_gap=MetricNamer("esbridge_partition_", PARTITION_LABELS, registry).gauge(
            "lso_gap_messages",
            "High watermark minus last stable offset as the consumer sees them "
            "(offsets of transactions still open; a hung transaction pins it)",
        ),
    )


_FAMILIES = PerRegistry(_build)


class ConsumerMetrics:
    """The metrics of one consumer adapter."""

    def __init__(
        self, follower: str, upstream: str, topic: str, registry: CollectorRegistry | None = None
    ) -> None:
        family = _FAMILIES.get(registry)
        labels = {"follower": follower, "upstream": upstream, "topic": topic}
        self.processed = family.processed.labels(**labels)
        self.duplicates = family.duplicates.labels(**labels)
        self.gaps = family.gaps.labels(**labels)
        self.reconciled = family.reconciled.labels(**labels)
        self.batches = family.batches.labels(**labels)
        self.parked = family.parked.labels(**labels)
        self.skipped = family.skipped.labels(**labels)
        self.parked_messages = family.parked_messages.labels(**labels)
        self.parked_age = family.parked_age.labels(**labels)
        self.foreign = family.foreign.labels(**labels)
        self.trailing = family.trailing.labels(**labels)
        self.held = family.held.labels(**labels)
        self.held_age = family.held_age.labels(**labels)
        self.causal_held = family.causal_held.labels(**labels)
        self.causal_waits = family.causal_waits.labels(**labels)
        self.dlq = family.dlq.labels(**labels)
        self.lag_events = family.lag_events.labels(**labels)
        self.lag_seconds = family.lag_seconds.labels(**labels)
        self._end_to_end = family.end_to_end
        self._edge = (follower, upstream)
        self._lso_gap = family.lso_gap
        self._topic = topic

    def lso_gap(self, partition: int) -> Gauge:
        """The LSO gap gauge of ``partition`` of this consumer's topic."""
        return self._lso_gap.labels(topic=self._topic, partition=str(partition))

    def committed(self, steps: Sequence[Step], now: float) -> None:
        """Observe the end-to-end latency of ``steps`` just committed at ``now`` (epoch s).

        Only steps that moved a position and were not parked (a replay of a parked
        message has no position: it happened long ago by design), and whose event
        time is known: the message's ``ce_time`` header, else its Kafka timestamp,
        else the decoded event's ``timestamp`` (prompt mode, gaps filled from the log).
        """
        latencies = []
        parse = datetime.fromisoformat
        for step in steps:
            if step.tracking is None or step.dead_letter is not None:
                continue
            source = step.source
            text = getattr(source, "event_time", None)
            happened: float | None = None
            if text:
                with suppress(ValueError):  # not a time: the Kafka timestamp, below
                    happened = parse(text).timestamp()
            if happened is None:
                happened = getattr(source, "kafka_timestamp", None) or _event_timestamp(step)
            if happened is not None:
                latencies.append(max(0.0, now - happened))
        if latencies:
            self._end_to_end.observe_many(self._edge, latencies)


def _event_timestamp(step: Step) -> float | None:
    """The decoded event's own time (steps that came from the log, not from a message)."""
    when = getattr(step.event, "timestamp", None)
    return when.timestamp() if isinstance(when, datetime) else None
