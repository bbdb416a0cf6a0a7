"""Progress lines while a relay or a consumer works off a backlog: n / N, rate, ETA.

Why: a relay started on a log of millions of notifications, or a consumer
started behind its topic, said nothing between its start line and its stop
line; an operator could not tell a slow catch-up from a stuck one. A backlog
of at least ``min_backlog`` items gets a line when it is first seen, then one
every ``interval`` seconds at most, and a last one when it is worked off;
a process that keeps up (a small lag) logs nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: Items behind from which a backlog is reported.
MIN_BACKLOG = 1000

#: Seconds between two progress lines.
INTERVAL = 5.0


class CatchUpLog:
    """Reports ``subject``'s progress through a backlog of ``unit`` (e.g. "notifications").

    Call :meth:`update` after each unit of work with ``done``, a count that
    only grows (the relay's position, the messages a consumer handled), and
    ``behind``, how many are left. ``done`` is the count before any work
    (None: the first update's).
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
    ) -> None:
        self.log = log
        self.subject = subject
        self.unit = unit
        self.min_backlog = min_backlog
        self.interval = interval
        self.clock = clock
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
            elapsed = now - started
            self.log.info(
                "%s caught up: %d %s in %.1f s (%s/s)",
                self.subject,
                done - start,
                self.unit,
                elapsed,
                _rate(done - start, elapsed),
            )
            self._start = None
        elif now - self._logged_at >= self.interval:
            self._logged_at = now
            self._line(done, behind, now)

    def _line(self, done: int, behind: int, now: float) -> None:
        start, started = self._start or (done, now)
        count, elapsed = done - start, now - started
        if count > 0 and elapsed > 0:
            speed = f" ({_rate(count, elapsed)}/s, ETA {behind * elapsed / count:.0f} s)"
        else:
            speed = ""
        self.log.info(
            "%s catching up: %d / %d %s%s",
            self.subject,
            count,
            count + behind,
            self.unit,
            speed,
        )


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:.0f}" if seconds > 0 else "-"
