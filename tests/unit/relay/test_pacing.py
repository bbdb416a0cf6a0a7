"""Adaptive batching of the payload relay: how long it lingers after a transaction."""

from __future__ import annotations

import pytest

from esbridge.errors import ConfigurationError
from esbridge.relay.pacing import Pacing
from esbridge.relay.relay import Relay
from esbridge.relay.tuning import RelayTuning


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def steps(pacing: Pacing, clock: Clock, count: int, every: float, n: int) -> list[float]:
    """``n`` steps of ``count`` notifications, ``every`` seconds apart: the waits."""
    waits = []
    for _ in range(n):
        clock.now += every
        waits.append(pacing.after(count))
    return waits


def test_a_quiet_log_is_published_at_once_and_a_busy_one_lingers():
    clock = Clock()
    pacing = Pacing(RelayTuning(), clock)  # linger 50 ms from 2,000 events/s
    assert steps(pacing, clock, 10, 0.01, 500) == [0.0] * 500  # 1,000 events/s: at once
    assert pacing.rate == pytest.approx(1000, rel=0.05)
    waits = steps(pacing, clock, 30, 0.01, 100)  # 3,000 events/s: lingers within half a second
    assert waits[0] == 0.0 and waits[50:] == [0.05] * 50
    assert pacing.lingering


def test_steps_that_publish_nothing_do_not_lower_the_rate():
    """A relay that keeps up alternates a step with events and an empty one (then it
    waits for NOTIFY): the rate is the events over time, not an average of the steps."""
    clock = Clock()
    pacing = Pacing(RelayTuning(), clock)
    for _ in range(300):
        clock.now += 0.009
        pacing.after(30)
        clock.now += 0.001
        pacing.after(0)
    assert pacing.rate == pytest.approx(3000, rel=0.05)
    assert pacing.lingering


def test_a_lingering_relay_stops_only_below_half_the_rate_and_never_after_a_backlog():
    clock = Clock()
    tuning = RelayTuning(batch_size=1000)
    pacing = Pacing(tuning, clock)
    steps(pacing, clock, 150, 0.05, 20)  # 3,000 events/s
    assert steps(pacing, clock, 75, 0.05, 20)[-1] == 0.05  # 1,500/s: still lingering
    assert steps(pacing, clock, 25, 0.05, 20)[-1] == 0.0  # 500/s: at once again
    assert steps(pacing, clock, 1000, 0.05, 5) == [0.0] * 5  # full batches: a backlog
    assert pacing.after(0) == 0.0  # nothing published: the relay waits for events


def test_linger_rate_zero_always_lingers_and_linger_zero_never():
    clock = Clock()
    assert (
        steps(Pacing(RelayTuning(linger=0.2, linger_rate=0), clock), clock, 1, 1.0, 3) == [0.2] * 3
    )
    assert steps(Pacing(RelayTuning(linger=0.0), clock), clock, 500, 0.01, 10)[-1] == 0.0


def test_a_negative_linger_rate_is_refused_naming_the_setting():
    with pytest.raises(ConfigurationError, match="linger_rate must be at least 0"):
        Relay(
            "DogSchool",
            kafka_config={"bootstrap.servers": "127.0.0.1:1"},
            topic="dogschool",
            linger_rate=-1,
        )
