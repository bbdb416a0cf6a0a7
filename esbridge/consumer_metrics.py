"""Prometheus metrics of consumer adapters (``esbridge_consumer_*``).

Labelled by follower, upstream application and topic. Metric objects are
created once per registry and shared by every consumer in the process (the
system runner runs several), each consumer using its own labels.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from esbridge.metrics import REGISTRY

LABELS = ("follower", "upstream", "topic")


@dataclass(frozen=True)
class _Family:
    processed: Counter
    duplicates: Counter
    gaps: Counter
    reconciled: Counter
    batches: Counter
    parked: Counter
    held: Gauge
    held_age: Gauge
    dlq: Gauge
    lag_events: Gauge
    lag_seconds: Gauge


_families: dict[int, _Family] = {}
_lock = threading.Lock()


def _family(registry: CollectorRegistry) -> _Family:
    with _lock:
        family = _families.get(id(registry))
        if family is None:

            def counter(name: str, doc: str) -> Counter:
                return Counter(f"esbridge_consumer_{name}", doc, LABELS, registry=registry)

            def gauge(name: str, doc: str) -> Gauge:
                return Gauge(f"esbridge_consumer_{name}", doc, LABELS, registry=registry)

            family = _Family(
                processed=counter("processed", "Upstream events processed (committed)"),
                duplicates=counter("duplicates", "Messages skipped as already processed"),
                gaps=counter("gaps_reconciled", "Gaps filled from the upstream log"),
                reconciled=counter(
                    "reconciled_events", "Events read from the upstream log to fill gaps"
                ),
                batches=counter("batches", "Postgres transactions committed"),
                parked=counter("parked", "Messages parked in the dead-letter table"),
                held=gauge("held_partitions", "Partitions held behind a gap"),
                held_age=gauge("held_age_seconds", "Age of the oldest held gap"),
                dlq=gauge("dead_letters", "Parked messages of this follower"),
                lag_events=gauge("lag_events", "Messages on the topic not yet consumed"),
                lag_seconds=gauge("lag_seconds", "Age of the last processed message while behind"),
            )
            _families[id(registry)] = family
        return family


class ConsumerMetrics:
    """The metrics of one consumer adapter."""

    def __init__(
        self, follower: str, upstream: str, topic: str, registry: CollectorRegistry | None = None
    ) -> None:
        family = _family(registry or REGISTRY)
        labels = {"follower": follower, "upstream": upstream, "topic": topic}
        self.processed = family.processed.labels(**labels)
        self.duplicates = family.duplicates.labels(**labels)
        self.gaps = family.gaps.labels(**labels)
        self.reconciled = family.reconciled.labels(**labels)
        self.batches = family.batches.labels(**labels)
        self.parked = family.parked.labels(**labels)
        self.held = family.held.labels(**labels)
        self.held_age = family.held_age.labels(**labels)
        self.dlq = family.dlq.labels(**labels)
        self.lag_events = family.lag_events.labels(**labels)
        self.lag_seconds = family.lag_seconds.labels(**labels)
