"""Progress lines through a backlog: at its start, at most every interval, once worked off."""

from __future__ import annotations

import logging

import pytest

from esbridge.runtime.catch_up import CatchUpLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_backlog_is_reported_at_start_every_interval_and_when_worked_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    progress = CatchUpLog(logging.getLogger("test"), "relay A", "notifications", clock=clock)
    progress.update(0, 10_000)
    for done in range(1000, 10_001, 1000):  # 1000 a second
        clock.now += 1
        progress.update(done, 10_000 - done)
    assert lines(caplog) == [
        "relay A catching up: 0 / 10000 notifications",
        "relay A catching up: 5000 / 10000 notifications (1000/s, ETA 5 s)",
        "relay A caught up: 10000 notifications in 10.0 s (1000/s)",
    ]


def test_a_small_lag_is_no_backlog(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    progress = CatchUpLog(logging.getLogger("test"), "consumer B", "messages", done=0, clock=clock)
    for done in range(0, 50_000, 500):
        clock.now += 1
        progress.update(done, 999)
    assert lines(caplog) == []


def test_work_done_before_the_backlog_was_seen_counts(caplog: pytest.LogCaptureFixture) -> None:
    """A consumer learns its lag after its first batch: that batch is part of the catch-up."""
    caplog.set_level(logging.INFO)
    clock = Clock()
    progress = CatchUpLog(logging.getLogger("test"), "consumer B", "messages", done=0, clock=clock)
    clock.now += 2
    progress.update(1000, 2000)
    assert lines(caplog) == ["consumer B catching up: 1000 / 3000 messages (500/s, ETA 4 s)"]
