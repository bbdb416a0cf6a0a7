"""Prometheus metrics of relays (``esbridge_relay_*``), labelled by application and topic.

Metric objects are created once per registry and shared by every relay in the
process (the system runner runs several), each relay using its own labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from esbridge.runtime.metrics import MetricNamer, PerRegistry

LABELS = ("app", "topic")


@dataclass(frozen=True)
class _Family:
    published: Counter
    batches: Counter
    errors: Counter
    position: Gauge
    upstream_max: Gauge
    lag: Gauge
    batch_size: Histogram
    prompts: Counter
    active: Gauge
    gap_waits: Counter
    late_commits: Counter


def _build(registry: CollectorRegistry) -> _Family:
    make = MetricNamer("esbridge_relay_", LABELS, registry)
    return _Family(
        published=make.counter("published", "Notifications published (committed) to Kafka"),
        batches=make.counter(
            "batches", "Batches (Kafka transactions in exactly-once mode) committed"
        ),
        errors=make.counter(
            "errors", "Errors the relay recovered from (retried)", extra_labels=("kind",)
        ),
        position=make.gauge("position", "Last notification id published (committed)"),
        upstream_max=make.gauge(
            "upstream_max_nid", "Largest notification id in the upstream log when last read"
        ),
        lag=make.gauge("lag", "Upstream max notification id minus the published position"),
        batch_size=make.histogram(
            "batch_size",
            "Messages per committed batch",
            buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000),
        ),
        prompts=make.counter("prompts", "Prompt messages published (prompt mode)"),
        active=make.gauge(
            "active",
            "1 while the relay publishes (holding its lease, or taking none), 0 while it stands by",
        ),
        gap_waits=make.counter(
            "gap_waits",
            "Gaps at which the relay waited for transactions writing to the events table",
        ),
        late_commits=make.counter(
            "late_commits",
            "Notifications that committed after higher ids (found in a gap the relay waited at)",
        ),
    )


_FAMILIES = PerRegistry(_build)


class RelayMetrics:
    """The metrics of one relay (one application and topic)."""

    def __init__(self, app: str, topic: str, registry: CollectorRegistry | None = None) -> None:
        family = _FAMILIES.get(registry)
        labels = {"app": app, "topic": topic}
        self._errors = family.errors
        self._labels = labels
        self.published = family.published.labels(**labels)
        self.batches = family.batches.labels(**labels)
        self.position = family.position.labels(**labels)
        self.upstream_max = family.upstream_max.labels(**labels)
        self.lag = family.lag.labels(**labels)
        self.batch_size = family.batch_size.labels(**labels)
        self.prompts = family.prompts.labels(**labels)
        self.active = family.active.labels(**labels)
        self.gap_waits = family.gap_waits.labels(**labels)
        self.late_commits = family.late_commits.labels(**labels)

    def error(self, kind: str) -> None:
        self._errors.labels(kind=kind, **self._labels).inc()
