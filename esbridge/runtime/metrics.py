"""Prometheus metrics and status snapshots shared by relays and consumers.

Each component registers its own metrics (``esbridge_relay_*``,
``esbridge_consumer_*``) in a registry it is given, so several components in
one process (the system runner) do not collide, and tests can read values.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

F = TypeVar("F")


class MetricNamer:
    """Creates the metrics of one component in one registry.

    Every metric is named ``prefix + name`` and carries the component's labels,
    so a component's families cannot drift apart in naming or labelling.
    """

    def __init__(self, prefix: str, labels: Sequence[str], registry: CollectorRegistry) -> None:
        self.prefix = prefix
        self.labels = tuple(labels)
        self.registry = registry

    def counter(self, name: str, doc: str, extra_labels: Sequence[str] = ()) -> Counter:
        return Counter(
            self.prefix + name, doc, (*self.labels, *extra_labels), registry=self.registry
        )

    def gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(self.prefix + name, doc, self.labels, registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(
            self.prefix + name, doc, self.labels, buckets=buckets, registry=self.registry
        )


class PerRegistry(Generic[F]):
    """Metric families built once per registry and shared by every component.

    Prometheus refuses to register a metric name twice in one registry, yet a
    process (the system runner) runs several relays or consumers; each uses
    the shared families with its own labels. Keyed by the registry itself,
    weakly: a key of ``id(registry)`` outlives a registry that is gone, and a
    new registry that gets its address would be handed metrics registered in
    the dead one (it happened: a test's fresh registry read no samples).
    """

    def __init__(self, build: Callable[[CollectorRegistry], F]) -> None:
        self._build = build
        self._families: weakref.WeakKeyDictionary[CollectorRegistry, F] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def get(self, registry: CollectorRegistry | None = None) -> F:
        """The families of ``registry`` (default :data:`REGISTRY`), built on first use."""
        registry = registry or REGISTRY
        with self._lock:
            family = self._families.get(registry)
            if family is None:
                family = self._build(registry)
                self._families[registry] = family
            return family


def serve_metrics(
    port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> None:
    """Serve ``/metrics`` for Prometheus on ``addr:port`` in a daemon thread."""
    start_http_server(port, addr=addr, registry=registry)
