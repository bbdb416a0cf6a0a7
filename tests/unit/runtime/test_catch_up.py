"""Progress lines through a backlog: at its start, at most every interval, once worked off."""

from __future__ import annotations

import io
import logging
import os

import pytest

from esbridge.runtime.catch_up import CLEAR_LINE, CatchUpLog, bar, progress_text


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


def read_all(master: int) -> str:
    """All a closed pseudo-terminal holds: one read may return only part of it."""
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode()


def test_on_a_terminal_one_line_is_redrawn_and_nothing_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real pseudo-terminal: the line is cleared and redrawn, the summary ends it."""
    caplog.set_level(logging.INFO)
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as terminal:
        clock = Clock()
        progress = CatchUpLog(
            logging.getLogger("test"),
            "replay A -> t",
            "notifications",
            done=0,
            min_backlog=1,
            doing="publishing",
            done_word="published",
            clock=clock,
            terminal=terminal,
        )
        for done in (1000, 2000, 3000):
            clock.now += 1
            progress.update(done, 3000 - done)
    shown = read_all(master)
    assert lines(caplog) == []
    assert shown.count(CLEAR_LINE) == 3
    assert (
        "\r\x1b[Kreplay A -> t publishing: 1000 / 3000 notifications (1000/s, ETA 2 s) "
        "[######..............]  33%"
    ) in shown
    assert shown.endswith(
        "\r\x1b[Kreplay A -> t published: 3000 notifications in 3.0 s (1000/s)\r\n"
    )


def test_a_stream_that_is_no_terminal_gets_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    stream = io.StringIO()
    clock = Clock()
    progress = CatchUpLog(
        logging.getLogger("test"), "x", "items", done=0, terminal=stream, clock=clock
    )
    clock.now += 1
    progress.update(1000, 1000)
    assert stream.getvalue() == ""
    assert lines(caplog) == ["x catching up: 1000 / 2000 items (1000/s, ETA 1 s)"]


def test_bar_and_progress_text() -> None:
    assert bar(0, 10, width=10) == "[..........]   0%"
    assert bar(5, 10, width=10) == "[#####.....]  50%"
    assert bar(12, 10, width=10) == "[##########] 100%"
    assert bar(0, 0, width=4) == "[####] 100%"
    assert progress_text(0, 10, "events", 0.0) == "0 / 10 events"
    assert progress_text(50, 150, "events", 10.0) == "50 / 150 events (5/s, ETA 20 s)"


def test_work_stopped_by_an_error_ends_the_terminal_line() -> None:
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as terminal:
        clock = Clock()
        progress = CatchUpLog(
            logging.getLogger("test"), "x", "items", done=0, clock=clock, terminal=terminal
        )
        clock.now += 1
        progress.update(1000, 1000)
        progress.close()
        progress.close()  # once
    shown = read_all(master)
    assert shown.startswith(CLEAR_LINE + "x catching up: 1000 / 2000 items")
    assert shown.endswith("%\r\n") and shown.count("\n") == 1
