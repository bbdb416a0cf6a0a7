"""Prometheus metrics of consumer adapters (``esbridge_consumer_*``).

Labelled by follower, upstream application and topic. Metric objects are
created once per registry and shared by every consumer in the process (the
system runner runs several), each consumer using its own labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from esbridge.runtime.metrics import MetricNamer, PerRegistry

LABELS = ("follower", "upstream", "topic")


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
    dlq: Gauge
    lag_events: Gauge
    lag_seconds: Gauge


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
        dlq=make.gauge("dead_letters", "Parked messages of this follower"),
        lag_events=make.gauge("lag_events", "Messages on the topic not yet consumed"),
        lag_seconds=make.gauge("lag_seconds", "Age of the last processed message while behind"),
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
        self.dlq = family.dlq.labels(**labels)
        self.lag_events = family.lag_events.labels(**labels)
        self.lag_seconds = family.lag_seconds.labels(**labels)
