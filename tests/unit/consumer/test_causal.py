"""The causal gate (esbridge.consumer.causal): which steps go, which wait, and for how long.

Positions in Postgres are given by a dict here; the integration tests
(tests/integration/consumer/test_causal_dependencies.py) read them from real
tracking records with two group members.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from eventsourcing.persistence import Tracking
from prometheus_client import CollectorRegistry

from esbridge.consumer.causal import CausalGate
from esbridge.consumer.metrics import ConsumerMetrics
from esbridge.consumer.reconcile import PartitionOrder
from esbridge.consumer.state import Assignment, Partition, Tuning
from esbridge.errors import CausalDependencyTimeoutError
from esbridge.processing.steps import Source, Step

NAMES = ["Up#0/2", "Up#1/2"]


def gate(stored: dict[str, int], owned: tuple[int, ...] = (0, 1)) -> tuple[CausalGate, Any]:
    assignment = Assignment("t", partitions=2, names=list(NAMES))
    for p in owned:
        assignment.parts[p] = Partition(p, NAMES[p], PartitionOrder(0), 0)
    context = SimpleNamespace(
        assignment=assignment,
        metrics=ConsumerMetrics("F", "Up", "t", CollectorRegistry()),
        tuning=Tuning(causal_timeout=5.0),
        upstream="Up",
        position=lambda name: stored.get(name, 0),
    )
    return CausalGate(context), context  # type: ignore[arg-type]


def step(partition: int, nid: int, deps: str = "") -> Step:
    source = Source("k", b"", kafka_partition=partition, kafka_offset=nid, deps=deps)
    return Step(Tracking(NAMES[partition], nid), "k", source=source)


def nids(steps: list[Step]) -> list[int]:
    return [s.tracking.notification_id for s in steps if s.tracking is not None]


def test_a_dependency_later_in_the_same_batch_goes_first() -> None:
    """Fetched partition 1 first: the batch is merged in log order, so nothing waits."""
    causal, _ = gate({})
    batch = [step(1, 2, "1;0=1"), step(1, 4, "1;0=3"), step(0, 1), step(0, 3, "1;1=2")]
    assert nids(causal.release(batch, 0.0)) == [1, 2, 3, 4]


def test_an_unmet_dependency_holds_its_partition_only_until_postgres_has_it() -> None:
    stored: dict[str, int] = {}
    causal, context = gate(stored, owned=(1,))  # partition 0 belongs to another member
    batch = [step(1, 2, "1;0=1"), step(1, 4)]
    assert causal.release(batch, 0.0) == []
    part = context.assignment.parts[1]
    assert nids(part.causal_held) == [2, 4]  # the later one waits behind it
    assert context.metrics.causal_held._value.get() == 2
    assert causal.release([], 1.0) == []  # still not in Postgres
    stored[NAMES[0]] = 1  # the other member recorded notification 1
    assert nids(causal.release([step(1, 6)], 2.0)) == [2, 4, 6]
    assert part.causal_held == [] and context.metrics.causal_held._value.get() == 0


def test_waiting_past_causal_timeout_names_the_partition_waited_for() -> None:
    causal, _ = gate({NAMES[0]: 3}, owned=(1,))
    causal.release([step(1, 8, "1;0=7")], 100.0)
    causal.release([], 104.0)  # within the 5 s
    with pytest.raises(CausalDependencyTimeoutError) as raised:
        causal.release([], 105.5)
    error = raised.value
    assert (error.partition, error.nid, error.waiting_for, error.waiting_for_nid) == (1, 8, 0, 7)
    assert error.position == 3
    assert "causal_dependencies=False" in str(error)


def test_turned_off_on_a_running_consumer_what_was_held_goes_in_order() -> None:
    causal, context = gate({}, owned=(1,))
    causal.release([step(1, 2, "1;0=1")], 0.0)
    context.tuning.causal_dependencies = False
    assert causal.holding()
    assert nids(causal.release([step(1, 4, "1;0=3")], 1.0)) == [2, 4]
    assert not causal.holding()
