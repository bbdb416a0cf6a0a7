"""A circuit breaker for calls to one external API.

Why: when an API is down, every call waits for its timeout and then retries,
so a follower would keep hammering a dead server and spend its time in
timeouts. After ``failure_threshold`` consecutive failures the breaker
*opens*: calls are not attempted for ``reset_timeout`` seconds (callers wait,
and the wait does not count against any call's retry budget, because the
fault is the API's, not the event's). Then it is *half-open*: one trial call
goes through; its success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from esbridge.errors import ConfigurationError

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Thread-safe closed / open / half-open breaker (one per API, shared by all callers)."""

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or reset_timeout <= 0:
            raise ConfigurationError(
                "CircuitBreaker needs failure_threshold >= 1 and reset_timeout > 0"
            )
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False
        self.times_opened = 0

    @property
    def state(self) -> str:
        with self._lock:
            return self._state()

    def _state(self) -> str:
        if self._opened_at is None:
            return CLOSED
        if self._clock() - self._opened_at < self.reset_timeout:
            return OPEN
        return HALF_OPEN

    def acquire(self) -> tuple[float, bool]:
        """``(0.0, trial)`` if a call may go now (its result must be reported), else ``(wait, _)``.

        In half-open state exactly one caller gets ``(0.0, True)`` (the trial);
        the others wait until the trial reports.
        """
        with self._lock:
            state = self._state()
            if state == CLOSED:
                return 0.0, False
            if state == OPEN:
                assert self._opened_at is not None
                return max(0.01, self.reset_timeout - (self._clock() - self._opened_at)), False
            if self._trial_running:
                return 0.05, False
            self._trial_running = True
            return 0.0, True

    def success(self) -> None:
        """The API answered (any status that says it is alive): close the breaker."""
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial_running = False

    def cancel(self) -> None:
        """A caller that acquired the breaker did not call after all (it is stopping)."""
        with self._lock:
            self._trial_running = False

    def failure(self) -> None:
        """The API failed (timeout, connection error, 5xx): count it, maybe open."""
        with self._lock:
            self._failures += 1
            if self._trial_running or (
                self._opened_at is None and self._failures >= self.failure_threshold
            ):
                self._opened_at = self._clock()
                self.times_opened += 1
            self._trial_running = False
