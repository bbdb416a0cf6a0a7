"""One logical call to an external HTTP API: idempotency key, retries, backoff, breaker.

A *logical call* is what one upstream event asks for. It may take several
HTTP *attempts*; every attempt carries the same idempotency key, so an API
that honours idempotency keys applies the call's effect once however many
attempts reach it (including attempts whose answer was lost to a timeout).

Classification of an attempt's result:

* 2xx: success.
* 408, 425, 429, 500, 502, 503, 504, timeouts, connection errors: *retryable*, up to
  ``RetryPolicy.max_attempts`` attempts, waiting an exponential backoff with
  full jitter between them, or the server's ``Retry-After`` (seconds or an
  HTTP date) on 429/503 when it says so (capped at ``max_retry_after``).
* any other status (4xx, 3xx, and 5xx such as 501 Not Implemented or 505):
  *permanent*: the request itself is wrong, repeating it cannot help.

Waiting while the circuit breaker is open is not an attempt, and neither is
an attempt that cannot connect at all (connection refused, connect timeout):
an unreachable API delays calls but never uses up an event's retry budget.
Timeouts after connecting and 5xx do use it (the request itself may be what
makes the server fail), so one poison event is parked after ``max_attempts``.
"""

from __future__ import annotations

import email.utils
import json
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from esbridge.errors import ConfigurationError, EsbridgeError
from esbridge.runtime.tracing import client_span
from esbridge_connectors.circuit import CircuitBreaker

SUCCEEDED = "succeeded"
PERMANENT = "permanent"
EXHAUSTED = "exhausted"

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
RETRY_AFTER_STATUS = frozenset({429, 503})


class CallInterrupted(EsbridgeError):
    """The caller was asked to stop in the middle of a call; nothing is recorded for it.

    The event's call is made again (same idempotency key) when the follower restarts.
    """


@dataclass(frozen=True)
class OutboundRequest:
    """What to send for one event. ``url`` may be relative to the follower's base URL."""

    method: str
    url: str
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None  # per attempt; None: the follower's default


@dataclass(frozen=True)
class CallOutcome:
    """The end of a logical call: ``status`` is succeeded, permanent or exhausted."""

    status: str
    attempts: int
    status_code: int | None = None
    response: Any = None  # the relevant part of a successful response (JSON-able)
    error: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is retried."""

    max_attempts: int = 6
    initial_backoff: float = 0.2
    max_backoff: float = 10.0
    multiplier: float = 2.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff < 0 or self.max_backoff < 0:
            raise ConfigurationError(
                "RetryPolicy needs max_attempts >= 1 and non-negative backoff times"
            )

    def backoff(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform in [0, min(max_backoff, initial * multiplier**(attempt-1))]."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return ceiling * rng()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


def default_response_part(response: httpx.Response) -> Any:
    """The JSON body of a success (if JSON and under 64 KiB), else ``None``."""
    if "json" not in response.headers.get("content-type", "") or len(response.content) > 65536:
        return None
    try:
        return json.loads(response.content)
    except ValueError:
        return None


class Caller:
    """Makes logical calls through one ``httpx.Client`` (thread-safe: share it)."""

    def __init__(
        self,
        client: httpx.Client,
        *,
        retry: RetryPolicy,
        breaker: CircuitBreaker,
        idempotency_header: str = "Idempotency-Key",
        response_part: Callable[[httpx.Response], Any] = default_response_part,
        stop: threading.Event | None = None,
    ) -> None:
        self.client = client
        self.retry = retry
        self.breaker = breaker
        self.idempotency_header = idempotency_header
        self.response_part = response_part
        self.stop = stop or threading.Event()

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise CallInterrupted("stopped while waiting to retry a call")

    def call(self, request: OutboundRequest, idempotency_key: str) -> CallOutcome:
        """Attempt ``request`` until success, a permanent failure, or the budget is spent."""
        headers = dict(request.headers)
        headers[self.idempotency_header] = idempotency_key
        timeout: Any = httpx.USE_CLIENT_DEFAULT if request.timeout is None else request.timeout
        attempts = 0  # HTTP attempts made (reported)
        budget_used = 0  # attempts that count against RetryPolicy.max_attempts
        while True:
            wait, _trial = self.breaker.acquire()
            if wait > 0:
                self._sleep(wait)
                continue
            if self.stop.is_set():
                self.breaker.cancel()
                raise CallInterrupted("stopped before a call")
            attempts += 1
            retry_after: float | None = None
            counts = True  # does this attempt use up the event's retry budget?
            try:
                # The trace context (if any) goes with the call: a CLIENT span per attempt.
                with client_span(request.method, request.url, headers) as span:
                    response = self.client.request(
                        request.method,
                        request.url,
                        json=request.json,
                        content=request.content,
                        headers=headers,
                        timeout=timeout,
                    )
                    if span is not None:
                        span.set_attribute("http.response.status_code", response.status_code)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                # The API cannot be reached at all: its fault, never the event's.
                self.breaker.failure()
                counts = False
                status_code, error = None, f"cannot reach the API: {type(e).__name__}: {e}"
            except httpx.TimeoutException as e:
                self.breaker.failure()
                status_code, error = None, f"timeout: {type(e).__name__}: {e}"
            except httpx.TransportError as e:
                self.breaker.failure()
                status_code, error = None, f"transport error: {type(e).__name__}: {e}"
            else:
                status_code = response.status_code
                if 200 <= status_code < 300:
                    self.breaker.success()
                    return CallOutcome(
                        SUCCEEDED, attempts, status_code, self.response_part(response)
                    )
                error = f"HTTP {status_code}: {response.text[:500]}"
                if status_code not in RETRYABLE_STATUS:
                    self.breaker.success()  # the API is alive; the request is wrong
                    return CallOutcome(PERMANENT, attempts, status_code, error=error)
                if status_code == 429:
                    self.breaker.success()  # rate limited, not down
                else:
                    self.breaker.failure()
                if status_code in RETRY_AFTER_STATUS:
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
            if counts:
                budget_used += 1
            if budget_used >= self.retry.max_attempts:
                return CallOutcome(
                    EXHAUSTED,
                    attempts,
                    status_code,
                    error=f"gave up after {attempts} attempts; last: {error}",
                )
            if retry_after is not None:
                self._sleep(min(retry_after, self.retry.max_retry_after))
            else:
                self._sleep(self.retry.backoff(max(budget_used, 1)))
