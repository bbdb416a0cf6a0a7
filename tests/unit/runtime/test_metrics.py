"""Metric families shared per registry: each new registry gets its own, never a dead one's."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, Counter

from esbridge.runtime.metrics import PerRegistry


def test_a_new_registry_never_gets_the_metrics_of_a_registry_that_is_gone() -> None:
    """As in a test suite: each test makes a registry, uses it, and lets it go."""
    families = PerRegistry(lambda registry: Counter("things", "Things", registry=registry))
    addresses = set()
    for _ in range(50):
        registry = CollectorRegistry()
        addresses.add(id(registry))
        families.get(registry).inc()
        assert registry.get_sample_value("things_total") == 1.0
        del registry
        gc.collect()
    assert len(addresses) < 50  # CPython did give new registries the addresses of dead ones


def test_components_of_one_registry_share_its_families() -> None:
    families = PerRegistry(lambda registry: Counter("things", "Things", registry=registry))
    registry = CollectorRegistry()
    assert families.get(registry) is families.get(registry)
