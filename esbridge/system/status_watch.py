"""``esbridge status --watch``: the status table redrawn in place, with catch-up bars.

Why: during a catch-up an operator reran ``esbridge status`` by hand to see
whether the lag shrank, and did the arithmetic for when it would end. Each
sample here is the same :func:`~esbridge.system.status.edge_statuses` read;
successive samples of an edge give its rate and ETA. An edge's progress
counts from the sample where its backlog was first seen (as the relay's and
consumer's catch-up lines, :mod:`esbridge.runtime.catch_up`, whose numbers
and bar are reused), and starts again once it is caught up.

On a terminal the screen is cleared and redrawn at every sample; otherwise
(a pipe, a log file) each sample prints one plain line per edge. Ctrl-C ends
the watch with status 0: stopping to look is no failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from esbridge.runtime.catch_up import bar, progress_text
from esbridge.system.status import EdgeStatus, format_table

#: Moves a terminal's cursor home and clears the screen below it.
REDRAW = "\x1b[H\x1b[J"


@dataclass
class EdgeCatchUp:
    """One edge's way through its backlog, from successive samples.

    ``processed``: the upstream max nid minus the lag, a count that only grows
    while the follower works (new upstream events raise the max and the lag alike).
    """

    start: tuple[int, float] | None = None  # processed and when, as the backlog was seen

    def line(self, status: EdgeStatus, now: float) -> str:
        """The edge's catch-up: a bar, n / N events, rate, ETA, events behind; or caught up."""
        processed = status.upstream_max_nid - status.lag_events
        if status.caught_up:
            self.start = None
            return f"{bar(1, 1)}  caught up at {status.upstream_max_nid}"
        if self.start is None:
            self.start = (processed, now)
        first, since = self.start
        count = max(0, processed - first)
        total = count + status.lag_events
        numbers = progress_text(count, total, "events", now - since)
        return f"{bar(count, total)}  {numbers}, {status.lag_events} behind"


def edge_name(status: EdgeStatus) -> str:
    return f"{status.leader} -> {status.follower}"


class StatusWatch:
    """Renders samples of a system's status: a screen on a terminal, lines otherwise."""

    def __init__(self, out: TextIO, interval: float, title: str) -> None:
        self.out = out
        self.interval = interval
        self.title = title
        self.terminal = out.isatty()
        self.edges: dict[tuple[str, str], EdgeCatchUp] = {}

    def catch_up_lines(self, statuses: Sequence[EdgeStatus], now: float) -> list[tuple[str, str]]:
        return [
            (
                edge_name(s),
                self.edges.setdefault((s.leader, s.follower), EdgeCatchUp()).line(s, now),
            )
            for s in statuses
        ]

    def show(self, statuses: Sequence[EdgeStatus], now: float, clock_time: str) -> None:
        lines = self.catch_up_lines(statuses, now)
        if self.terminal:
            width = max((len(name) for name, _ in lines), default=0)
            screen = [
                f"{self.title}  every {self.interval:g} s, Ctrl-C to stop  {clock_time}",
                "",
                format_table(statuses),
                "",
                "catch-up",
                *(f"{name.ljust(width)}  {text}" for name, text in lines),
            ]
            self.out.write(REDRAW + "\n".join(screen) + "\n")
        else:
            for name, text in lines:
                self.out.write(f"{clock_time} {name}: {text}\n")
        self.out.flush()


def watch(
    sample: Callable[[], Sequence[EdgeStatus]],
    out: TextIO,
    interval: float,
    *,
    title: str = "esbridge status",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Show ``sample()`` every ``interval`` seconds until Ctrl-C; returns 0."""
    view = StatusWatch(out, interval, title)
    try:
        while True:
            statuses = sample()
            view.show(statuses, clock(), time.strftime("%H:%M:%S"))
            sleep(interval)
    except KeyboardInterrupt:
        if view.terminal:  # the shell's prompt on a line of its own, after the ^C
            out.write("\n")
            out.flush()
        return 0
