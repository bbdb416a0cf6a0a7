"""BulkHistogram: a batch's values at once, exposed as an ordinary Prometheus histogram."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from esbridge.runtime.metrics import BulkHistogram

BOUNDS = (0.01, 0.1, 1.0)
VALUES = [0.0, 0.01, 0.011, 0.1, 0.5, 1.0, 7.0, 7.0]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_the_same_samples_as_prometheus_client_s_histogram():
    """A value equal to a bound counts in that bound's bucket (``le``), as Prometheus says."""
    bulk_registry, plain_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("x_seconds", "doc", ("a",), BOUNDS, bulk_registry)
    plain = Histogram("x_seconds", "doc", ("a",), buckets=BOUNDS, registry=plain_registry)
    bulk.observe_many(("1",), VALUES[:3])
    bulk.observe_many(("1",), VALUES[3:])
    bulk.observe_many(("2",), [])
    for value in VALUES:
        plain.labels(a="1").observe(value)
    assert samples(bulk_registry) == samples(plain_registry)
    assert bulk_registry.get_sample_value("x_seconds_bucket", {"a": "1", "le": "0.01"}) == 2
    assert bulk_registry.get_sample_value("x_seconds_count", {"a": "1"}) == len(VALUES)
