"""Unit tests of the outbound call machinery: backoff, Retry-After, circuit breaker."""

from __future__ import annotations

import email.utils

import pytest

from esbridge.errors import ConfigurationError
from esbridge_connectors.calling import RetryPolicy, parse_retry_after
from esbridge_connectors.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


def test_backoff_is_full_jitter_under_an_exponential_cap():
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2.0, max_backoff=1.0)
    assert [policy.backoff(n, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5, 9)] == [
        0.1, 0.2, 0.4, 0.8, 1.0, 1.0,
    ]  # fmt: skip
    assert policy.backoff(3, rng=lambda: 0.0) == 0.0
    with pytest.raises(ConfigurationError):
        RetryPolicy(max_attempts=0)


def test_retry_after_in_seconds_or_as_an_http_date():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_then_lets_one_trial_through():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=10.0, clock=clock)
    for _ in range(2):
        assert breaker.acquire() == (0.0, False)
        breaker.failure()
    breaker.success()  # a success resets the count
    for _ in range(3):
        assert breaker.acquire() == (0.0, False)
        breaker.failure()
    assert breaker.state == OPEN and breaker.times_opened == 1
    wait, _ = breaker.acquire()
    assert wait == pytest.approx(10.0)
    clock.now = 10.0
    assert breaker.state == HALF_OPEN
    assert breaker.acquire() == (0.0, True)  # the trial
    assert breaker.acquire()[0] > 0  # others wait for it
    breaker.failure()  # the trial failed: open again
    assert breaker.state == OPEN and breaker.times_opened == 2
    clock.now = 20.0
    assert breaker.acquire() == (0.0, True)
    breaker.success()
    assert breaker.state == CLOSED and breaker.acquire() == (0.0, False)


def test_a_cancelled_trial_lets_the_next_caller_try():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=clock)
    breaker.failure()
    clock.now = 1.0
    assert breaker.acquire() == (0.0, True)
    breaker.cancel()
    assert breaker.acquire() == (0.0, True)
