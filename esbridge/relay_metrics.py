"""Prometheus metrics of relays (``esbridge_relay_*``), labelled by application and topic.

Metric objects are created once per registry and shared by every relay in the
process (the system runner runs several), each relay using its own labels.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from esbridge.metrics import REGISTRY

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


_families: dict[int, _Family] = {}
_lock = threading.Lock()


def _family(registry: CollectorRegistry) -> _Family:
    with _lock:
        family = _families.get(id(registry))
        if family is None:
            family = _Family(
                published=Counter(
                    "esbridge_relay_published",
                    "Notifications published (committed) to Kafka",
                    LABELS,
                    registry=registry,
                ),
                batches=Counter(
                    "esbridge_relay_batches",
                    "Batches (Kafka transactions in exactly-once mode) committed",
                    LABELS,
                    registry=registry,
                ),
                errors=Counter(
                    "esbridge_relay_errors",
                    "Errors the relay recovered from (retried)",
                    (*LABELS, "kind"),
                    registry=registry,
                ),
                position=Gauge(
                    "esbridge_relay_position",
                    "Last notification id published (committed)",
                    LABELS,
                    registry=registry,
                ),
                upstream_max=Gauge(
                    "esbridge_relay_upstream_max_nid",
                    "Largest notification id in the upstream log when last read",
                    LABELS,
                    registry=registry,
                ),
                lag=Gauge(
                    "esbridge_relay_lag",
                    "Upstream max notification id minus the published position",
                    LABELS,
                    registry=registry,
                ),
                batch_size=Histogram(
                    "esbridge_relay_batch_size",
                    "Messages per committed batch",
                    LABELS,
                    buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000),
                    registry=registry,
                ),
                prompts=Counter(
                    "esbridge_relay_prompts",
                    "Prompt messages published (prompt mode)",
                    LABELS,
                    registry=registry,
                ),
            )
            _families[id(registry)] = family
        return family


class RelayMetrics:
    """The metrics of one relay (one application and topic)."""

    def __init__(self, app: str, topic: str, registry: CollectorRegistry | None = None) -> None:
        family = _family(registry or REGISTRY)
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

    def error(self, kind: str) -> None:
        self._errors.labels(kind=kind, **self._labels).inc()
