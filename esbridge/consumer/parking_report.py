"""A warning as soon as a consumer parks a message, counted and rate-limited.

Parked messages are not lost (they wait in the dead-letter table), but they
are not processed either: somebody has to look. So the first one parked is
logged at once, at WARNING, with its reason; a flood (a whole topic parked in
seconds) gives one line every ``interval`` seconds with the counts by reason
since the last line, not one line a message.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger("esbridge.consumer")

#: Seconds between two warnings about parked messages (counts accumulate meanwhile).
DEFAULT_INTERVAL = 10.0


class ParkingReport:
    """Counts parked messages by reason and logs them at WARNING, at most once an interval."""

    def __init__(
        self,
        follower: str,
        upstream: str,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.follower = follower
        self.upstream = upstream
        self.interval = interval
        self.total = 0
        self._clock = clock
        self._pending: Counter[str] = Counter()
        self._example = ""
        self._last: float | None = None  # when the last warning was logged

    def parked(self, reason: str, error: str) -> None:
        """One message was parked (recorded in the dead-letter table) for ``reason``."""
        self._pending[reason] += 1
        self.total += 1
        if not self._example:
            self._example = error
        self.tick()

    def tick(self) -> None:
        """Log what is pending if the interval since the last warning has passed."""
        if self._pending and (self._last is None or self._clock() - self._last >= self.interval):
            self.flush()

    def flush(self) -> None:
        """Log what is pending now (at stop: nothing counted goes unsaid)."""
        if not self._pending:
            return
        count = sum(self._pending.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in self._pending.most_common())
        log.warning(
            "consumer %s <- %s parked %d message%s in the dead-letter table (%s; %d by this "
            "process in all), e.g. %s. They are not processed until retried: "
            "'esbridge dlq list <module>:%s' lists them",
            self.follower,
            self.upstream,
            count,
            "" if count == 1 else "s",
            reasons,
            self.total,
            self._example[:500],
            self.follower,
        )
        self._pending.clear()
        self._example = ""
        self._last = self._clock()
