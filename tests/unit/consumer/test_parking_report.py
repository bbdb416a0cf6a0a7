"""Parked messages are said at once at WARNING, then at most once an interval, counted."""

from __future__ import annotations

import logging
from typing import Any

from esbridge.consumer.parking_report import ParkingReport


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def warnings(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_first_parking_at_once_then_a_flood_in_one_line_an_interval(caplog: Any) -> None:
    clock = Clock()
    report = ParkingReport("Invoices", "Shop", interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="esbridge.consumer"):
        report.parked("policy_error", "ValueError: boom")
        assert len(warnings(caplog)) == 1
        for i in range(45_299):
            clock.now += 0.0001
            report.parked("held_behind" if i % 2 else "policy_error", f"error {i}")
        assert len(warnings(caplog)) == 1  # the flood waits for the interval
        clock.now += 10.0
        report.tick()
        report.flush()  # nothing left: no line
    lines = warnings(caplog)
    assert len(lines) == 2, lines
    assert lines[0] == (
        "consumer Invoices <- Shop parked 1 message in the dead-letter table (policy_error 1; "
        "1 by this process in all), e.g. ValueError: boom. They are not processed until "
        "retried: 'esbridge dlq list <module>:Invoices' lists them"
    )
    assert lines[1].startswith(
        "consumer Invoices <- Shop parked 45299 messages in the dead-letter table "
        "(policy_error 22650, held_behind 22649; 45300 by this process in all), e.g. error 0."
    )
    assert report.total == 45_300


def test_what_is_pending_is_said_when_flushed(caplog: Any) -> None:
    clock = Clock()
    report = ParkingReport("Invoices", "Shop", interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="esbridge.consumer"):
        report.flush()
        assert warnings(caplog) == []
        report.parked("foreign_message", "a")
        report.parked("foreign_message", "b")
        report.flush()
    assert [line.split(" in the ")[0] for line in warnings(caplog)] == [
        "consumer Invoices <- Shop parked 1 message",
        "consumer Invoices <- Shop parked 1 message",
    ]
