"""Progress lines while a relay or a consumer works off a backlog: n / N, rate, ETA.

Why: a relay started on a log of millions of notifications, or a consumer
started behind its topic, said nothing between its start line and its stop
line; an operator could not tell a slow catch-up from a stuck one. A backlog
of at least ``min_backlog`` items gets a line when it is first seen, then one
every ``interval`` seconds at most, and a last one when it is worked off;
a process that keeps up (a small lag) logs nothing.

On a terminal (a ``terminal`` stream that is a TTY: one-shot commands such as
``esbridge replay`` give their stderr) the same progress is one line redrawn
in place at every update instead, and the summary ends it. The numbers
(n / N, rate, ETA, a bar) are computed here only: ``esbridge status --watch``
renders its catch-up bars with :func:`progress_text` and :func:`bar` too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TextIO

#: Items behind from which a backlog is reported.
MIN_BACKLOG = 1000

#: Seconds between two progress lines.
INTERVAL = 5.0

#: Seconds between two redraws of a terminal's progress line.
REDRAW = 0.2

#: Clears a terminal's current line and returns to its start.
CLEAR_LINE = "\r\x1b[K"


def speed(count: float, seconds: float) -> float | None:
    """Items per second, None while nothing can be said (no time or nothing done)."""
    return count / seconds if seconds > 0 and count > 0 else None


def progress_text(count: int, total: int, unit: str, seconds: float) -> str:
    """``count / total unit (rate/s, ETA s)``: ``count`` done of ``total`` in ``seconds``."""
    rate = speed(count, seconds)
    tail = f" ({rate:.0f}/s, ETA {(total - count) / rate:.0f} s)" if rate else ""
    return f"{count} / {total} {unit}{tail}"


def bar(done: int, total: int, width: int = 20) -> str:
    """``[#######.............]  35%``: ``done`` of ``total`` (a total of 0 is done)."""
    fraction = 1.0 if total <= 0 else min(1.0, max(0.0, done / total))
    filled = int(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%"


class CatchUpLog:
    """Reports ``subject``'s progress through a backlog of ``unit`` (e.g. "notifications").

    Call :meth:`update` after each unit of work with ``done``, a count that
    only grows (the relay's position, the messages a consumer handled), and
    ``behind``, how many are left. ``done`` is the count before any work
    (None: the first update's). ``doing``/``done_word``: the words of the
    lines ("catching up", "caught up"; a replay says "publishing", "published").
    ``terminal``: where a one-shot command shows a redrawn line when it is a TTY.
    """

    def __init__(
        self,
        log: logging.Logger,
        subject: str,
        unit: str,
        *,
        done: int | None = None,
        min_backlog: int = MIN_BACKLOG,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        doing: str = "catching up",
        done_word: str = "caught up",
        terminal: TextIO | None = None,
    ) -> None:
        self.log = log
        self.subject = subject
        self.unit = unit
        self.min_backlog = min_backlog
        self.interval = interval
        self.clock = clock
        self.doing = doing
        self.done_word = done_word
        self.terminal = terminal if terminal is not None and terminal.isatty() else None
        self._previous = done  # ``done`` and when, at the last update
        self._previous_at = clock()
        self._start: tuple[int, float] | None = None  # where the backlog began, and when
        self._logged_at = 0.0

    def update(self, done: int, behind: int) -> None:
        now = self.clock()
        previous, previous_at = self._previous, self._previous_at
        self._previous, self._previous_at = done, now
        if previous is None:
            previous, previous_at = done, now
        if self._start is None:
            if behind < self.min_backlog:
                return
            self._start = (previous, previous_at)
            self._logged_at = now
            self._line(done, behind, now)
            return
        if behind <= 0:
            start, started = self._start
            self._finished(done - start, now - started)
            self._start = None
        elif now - self._logged_at >= (REDRAW if self.terminal else self.interval):
            self._logged_at = now
            self._line(done, behind, now)

    def close(self) -> None:
        """End a terminal's progress line left open (the work stopped on an error)."""
        if self.terminal is not None and self._start is not None:
            self.terminal.write("\n")
            self.terminal.flush()
        self._start = None

    def _finished(self, count: int, elapsed: float) -> None:
        rate = speed(count, elapsed)
        text = (
            f"{self.subject} {self.done_word}: {count} {self.unit} in {elapsed:.1f} s "
            f"({'-' if rate is None else f'{rate:.0f}'}/s)"
        )
        if self.terminal is not None:
            self.terminal.write(f"{CLEAR_LINE}{text}\n")
            self.terminal.flush()
        else:
            self.log.info("%s", text)

    def _line(self, done: int, behind: int, now: float) -> None:
        start, started = self._start or (done, now)
        count, elapsed = done - start, now - started
        numbers = progress_text(count, count + behind, self.unit, elapsed)
        text = f"{self.subject} {self.doing}: {numbers}"
        if self.terminal is not None:
            self.terminal.write(f"{CLEAR_LINE}{text} {bar(count, count + behind)}")
            self.terminal.flush()
        else:
            self.log.info("%s", text)
