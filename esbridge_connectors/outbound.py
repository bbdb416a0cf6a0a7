"""Outbound API calls: a follower that calls an external HTTP API for chosen events.

The seed ("Integration with APIs") says why this is hard: if the follower
crashes after the API call but before its tracking record commits, the call
is made again. esbridge cannot make an external side effect atomic with a
database commit; what it does is:

* every event's call carries an **idempotency key** derived from the upstream
  application name and the event's notification id (``"{app}:{nid}"``, the
  same text as the message's CloudEvents ``ce_id``), identical on every
  attempt and after every restart, so an API that honours idempotency keys
  applies each event's call **exactly once**; an API that does not may see a
  call **more than once** (at-least-once);
* the **outcome** (an :class:`OutboundCall` aggregate: ``Created`` then
  ``Succeeded`` with the relevant part of the response, or ``Failed`` with the
  reason) is recorded in the follower's application **atomically with the
  tracking record**, so each outcome is recorded exactly once;
* permanent failures (4xx) and exhausted retries are recorded as ``Failed``
  *and* parked in the dead-letter store (same transaction), and the follower
  moves on: one bad event never blocks the others.

Three ways to feed it, all with the same follower class:

* :class:`OutboundWorker`: follows the upstream notification log directly
  (``python -m esbridge_connectors.outbound``);
* esbridge's Kafka consumer adapter, with :class:`OutboundSink` as its sink
  (calls for different aggregates of a batch run concurrently);
* the library's own runners (``SingleThreadedRunner``...): ``policy()`` makes
  the call synchronously, one event at a time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from eventsourcing.application import AggregateNotFoundError, ProcessingEvent
from eventsourcing.domain import Aggregate, DomainEventProtocol, event
from eventsourcing.persistence import Tracking
from eventsourcing.system import ProcessApplication

from esbridge.deadletters.store import REASON_POLICY, DeadLetter, DeadLetterStore
from esbridge.errors import ConfigurationError
from esbridge.eventlog.follower import LogWaker
from esbridge.eventlog.notification_log import close_recorder, open_recorder, read_pages
from esbridge.processing.application_sink import ProcessApplicationSink
from esbridge.processing.sink import StepFailed
from esbridge.processing.steps import Step, StepFactory
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS
from esbridge.runtime.signals import stop_on_signals
from esbridge.runtime.tracing import processing
from esbridge.wire import H_APP
from esbridge_connectors.calling import (
    SUCCEEDED,
    Caller,
    CallOutcome,
    OutboundRequest,
    RetryPolicy,
    default_response_part,
)
from esbridge_connectors.circuit import CircuitBreaker

logger = logging.getLogger(__name__)

CALL_NAMESPACE = uuid.UUID("0b7f6a52-3c1e-5d8a-9e4f-7a2b1c0d9e83")
"""uuid5 namespace of :class:`OutboundCall` ids (fixed forever)."""

REASON_OUTBOUND_PERMANENT = "outbound_permanent"
REASON_OUTBOUND_EXHAUSTED = "outbound_exhausted"

__all__ = [
    "CallOutcome",
    "OutboundCall",
    "OutboundFollower",
    "OutboundRequest",
    "OutboundSink",
    "OutboundWorker",
    "RetryPolicy",
]


class OutboundCall(Aggregate):
    """The record of one event's call. Id: uuid5 of the idempotency key."""

    @event("Created")
    def __init__(
        self,
        idempotency_key: str,
        upstream: str,
        notification_id: int,
        subject: str,
        event_topic: str,
        method: str,
        url: str,
    ) -> None:
        self.idempotency_key = idempotency_key
        self.upstream = upstream
        self.notification_id = notification_id
        self.subject = subject
        self.event_topic = event_topic
        self.method = method
        self.url = url
        self.status = "pending"
        self.status_code: int | None = None
        self.response: Any = None
        self.error = ""
        self.attempts = 0

    @staticmethod
    def create_id(idempotency_key: str, *_: Any, **__: Any) -> uuid.UUID:
        return uuid.uuid5(CALL_NAMESPACE, idempotency_key)

    @event("Succeeded")
    def succeeded(self, status_code: int | None, response: Any, attempts: int) -> None:
        self.status = SUCCEEDED
        self.status_code = status_code
        self.response = response
        self.attempts += attempts

    @event("Failed")
    def failed(self, reason: str, status_code: int | None, error: str, attempts: int) -> None:
        self.status = reason
        self.status_code = status_code
        self.error = error
        self.attempts += attempts

    def record(self, outcome: CallOutcome) -> None:
        if outcome.succeeded:
            self.succeeded(outcome.status_code, outcome.response, outcome.attempts)
        else:
            self.failed(outcome.status, outcome.status_code, outcome.error, outcome.attempts)


@dataclass(frozen=True)
class CallIdentity:
    """Which upstream event a call is for, and so its idempotency key."""

    upstream: str
    notification_id: int
    key: str


@dataclass
class _Prepared:
    identity: CallIdentity
    request: OutboundRequest
    outcome: CallOutcome


MAX_PREPARED = 100_000
"""Outcomes kept for unrecorded batches at most (beyond: forgotten, the calls are repeated)."""


class OutboundFollower(ProcessApplication[uuid.UUID]):
    """Subclass it: set ``base_url`` (or ``OUTBOUND_BASE_URL``) and write :meth:`request`.

    Settings (class attributes; the environment overrides the ones named):
    ``base_url`` (``OUTBOUND_BASE_URL``), ``timeout`` per attempt in seconds
    (``OUTBOUND_TIMEOUT``), ``retry`` (:class:`RetryPolicy`),
    ``breaker_threshold`` / ``breaker_reset`` (circuit breaker),
    ``concurrency`` (aggregates called in parallel within a batch),
    ``idempotency_header``, ``key_prefix`` (prepended to every key: set it
    when two followers of one application call the same API).
    """

    base_url: str = ""
    timeout: float = 10.0
    retry: RetryPolicy = RetryPolicy()
    breaker_threshold: int = 5
    breaker_reset: float = 5.0
    concurrency: int = 8
    idempotency_header: str = "Idempotency-Key"
    key_prefix: str = ""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)
        base_url = self.env.get("OUTBOUND_BASE_URL") or self.base_url
        if not base_url:
            raise ConfigurationError(
                f"{type(self).__name__} has no API address: set the class attribute base_url "
                "or the environment variable OUTBOUND_BASE_URL"
            )
        timeout = float(self.env.get("OUTBOUND_TIMEOUT") or self.timeout)
        self.stop_calls = threading.Event()
        self.http = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max(self.concurrency, 1) * 2),
        )
        self.breaker = CircuitBreaker(self.breaker_threshold, self.breaker_reset)
        self.caller = Caller(
            self.http,
            retry=self.retry,
            breaker=self.breaker,
            idempotency_header=self.idempotency_header,
            response_part=self.response_part,
            stop=self.stop_calls,
        )
        # Outcomes of calls made for batches not recorded yet, by idempotency key (so a
        # batch retried after a database failure is not called again), and the events
        # of the batch being applied (id -> (event, key); the event is kept alive so
        # that its id() is not reused meanwhile).
        self._prepared: dict[str, _Prepared] = {}
        self._batch: dict[int, tuple[Any, str]] = {}

    # --- what users override ------------------------------------------------

    def request(self, domain_event: DomainEventProtocol[Any]) -> OutboundRequest | None:
        """The call to make for ``domain_event``, or ``None`` (no call for this event)."""
        return None

    def response_part(self, response: httpx.Response) -> Any:
        """What of a successful response to record (JSON-able). Default: its JSON body."""
        return default_response_part(response)

    # --- the policy -----------------------------------------------------------

    def identity(self, upstream: str, notification_id: int) -> CallIdentity:
        return CallIdentity(
            upstream, notification_id, f"{self.key_prefix}{upstream}:{notification_id}"
        )

    def policy(
        self, domain_event: DomainEventProtocol[Any], processing_event: ProcessingEvent[Any]
    ) -> None:
        event_and_key = self._batch.get(id(domain_event))
        prepared = None
        if event_and_key is not None and event_and_key[0] is domain_event:
            prepared = self._prepared.get(event_and_key[1])
        if prepared is not None:
            identity, request, outcome = prepared.identity, prepared.request, prepared.outcome
        else:
            maybe = self.request(domain_event)
            if maybe is None:
                return
            request = maybe
            tracking = processing_event.tracking
            if tracking is None:
                raise ConfigurationError(
                    "an outbound call needs the event's notification id (its tracking "
                    "record) to derive the idempotency key"
                )
            identity = self.identity(tracking.application_name, tracking.notification_id)
            outcome = self.caller.call(request, identity.key)
        call_id = OutboundCall.create_id(identity.key)
        call: OutboundCall
        try:
            call = self.repository.get(call_id)
        except AggregateNotFoundError:
            call = OutboundCall(
                identity.key,
                identity.upstream,
                identity.notification_id,
                str(domain_event.originator_id),
                _topic_of(domain_event),
                request.method,
                request.url,
            )
        call.record(outcome)
        processing_event.collect_events(call)

    # --- batches: calls made before the batch's transaction -------------------

    def prepare(self, steps: Sequence[Step]) -> None:
        """Make the calls of ``steps`` (concurrently across aggregates, in order within one).

        Outcomes are kept until :meth:`forget`, so a batch whose transaction
        fails (database down) is recorded later without calling again.
        """
        if len(self._prepared) > MAX_PREPARED:
            self._prepared.clear()
        groups: dict[str, list[tuple[CallIdentity, OutboundRequest, Step]]] = {}
        for step in steps:
            if step.event is None:
                continue
            try:
                request = self.request(step.event)
            except Exception:
                continue  # policy() raises it again, with the step's index
            if request is None:
                continue
            identity = self.identity(*step_identity(step))
            self._batch[id(step.event)] = (step.event, identity.key)
            if identity.key not in self._prepared:
                groups.setdefault(step.key, []).append((identity, request, step))
        if not groups:
            return

        def run(calls: list[tuple[CallIdentity, OutboundRequest, Step]]) -> None:
            for identity, request, step in calls:
                with processing(step):  # the call is part of the event's processing span
                    outcome = self.caller.call(request, identity.key)
                self._prepared[identity.key] = _Prepared(identity, request, outcome)

        with ThreadPoolExecutor(max(1, min(self.concurrency, len(groups)))) as pool:
            for future in [pool.submit(run, calls) for calls in groups.values()]:
                future.result()

    def prepared_outcome(self, step: Step) -> CallOutcome | None:
        event_and_key = self._batch.get(id(step.event)) if step.event is not None else None
        if event_and_key is None or event_and_key[0] is not step.event:
            return None
        prepared = self._prepared.get(event_and_key[1])
        return prepared.outcome if prepared is not None else None

    def forget(self, steps: Iterable[Step], *, recorded: bool) -> None:
        """The batch of ``steps`` is over; drop its outcomes if they were ``recorded``."""
        for step in steps:
            if step.event is None:
                continue
            event_and_key = self._batch.pop(id(step.event), None)
            if recorded and event_and_key is not None:
                self._prepared.pop(event_and_key[1], None)

    def close(self) -> None:
        self.stop_calls.set()
        self.http.close()
        super().close()


def _topic_of(domain_event: Any) -> str:
    cls = type(domain_event)
    return f"{cls.__module__}:{cls.__qualname__}"


def step_identity(step: Step) -> tuple[str, int]:
    """(upstream application, notification id) of a step, from its source or tracking.

    Kafka messages name their application in a header (the tracking name may
    be per partition); notifications read from the log carry their id.
    """
    source = step.source
    upstream: str | None = None
    for name, value in getattr(source, "headers", None) or ():
        if name == H_APP and value:
            upstream = value.decode()
    nid = getattr(source, "nid", None)
    if upstream is None and step.tracking is not None:
        upstream = step.tracking.application_name
    if nid is None and step.tracking is not None:
        nid = step.tracking.notification_id
    if upstream is None or nid is None:
        raise ConfigurationError(
            f"cannot derive an idempotency key for the message with key {step.key!r}: "
            "it names no upstream application or notification id"
        )
    return upstream, int(nid)


class OutboundSink:
    """A batch sink (:class:`~esbridge.processing.sink.BatchSink`) for an
    :class:`OutboundFollower`.

    Makes the batch's calls first (outside any transaction), then records all
    outcomes, the dead letters of failed calls and the tracking position in
    one transaction through
    :class:`~esbridge.processing.application_sink.ProcessApplicationSink`.
    """

    def __init__(
        self, follower: OutboundFollower, dead_letters: DeadLetterStore | None = None
    ) -> None:
        self.follower = follower
        self.inner = ProcessApplicationSink(follower, dead_letters)
        self.dead_letters = self.inner.dead_letters

    def position(self, tracking_name: str) -> int:
        return self.inner.position(tracking_name)

    def apply(self, steps: Sequence[Step], expected: Mapping[str, int]) -> None:
        recorded = False
        try:
            self.follower.prepare(steps)
            for step in steps:
                outcome = self.follower.prepared_outcome(step)
                if outcome is not None and not outcome.succeeded and step.dead_letter is None:
                    step.dead_letter = self._letter(step, outcome)
            self.inner.apply(steps, expected)
            recorded = True
        finally:
            self.follower.forget(steps, recorded=recorded)

    def _letter(self, step: Step, outcome: CallOutcome) -> DeadLetter:
        upstream, nid = step_identity(step)
        source = step.source
        reason = (
            REASON_OUTBOUND_PERMANENT
            if outcome.status == "permanent"
            else REASON_OUTBOUND_EXHAUSTED
        )
        return DeadLetter(
            follower=self.follower.name,
            upstream=upstream,
            key=step.key,
            reason=reason,
            error=outcome.error,
            value=getattr(source, "value", None),
            headers=list(getattr(source, "headers", None) or ()),
            tracking_name=step.tracking.application_name if step.tracking else None,
            nid=nid,
            kafka_topic=getattr(source, "kafka_topic", None),
            kafka_partition=getattr(source, "kafka_partition", None),
            kafka_offset=getattr(source, "kafka_offset", None),
            event_topic=getattr(source, "event_topic", None),
            originator_version=getattr(source, "originator_version", None),
            attempts=outcome.attempts,
        )


class OutboundWorker:
    """Feeds an :class:`OutboundFollower` from an upstream application's notification log.

    Reads pages of ``batch_size`` after the follower's tracking position,
    applies each page through :class:`OutboundSink` (calls, then one
    transaction), and waits for new notifications (LISTEN/NOTIFY, polling
    every ``poll_interval`` too). A policy that raises is retried
    ``policy_attempts`` times, then parked (``policy_error``) and passed.
    A database that is down is waited for (the batch is retried; calls
    already made are not repeated while the process lives).
    """

    def __init__(
        self,
        follower: OutboundFollower,
        upstream: str,
        *,
        env: Mapping[str, str] | None = None,
        upstream_class: type | None = None,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        policy_attempts: int = 3,
    ) -> None:
        self.follower = follower
        self.upstream = upstream
        self.recorder = open_recorder(upstream, dict(env if env is not None else follower.env))
        self.steps = StepFactory.for_follower(follower, upstream, upstream_class)
        self.sink = OutboundSink(follower)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.policy_attempts = policy_attempts
        self._stop = threading.Event()
        self._waker: LogWaker | None = None

    def run_once(self) -> int:
        """Process everything recorded so far; return how many notifications were read."""
        count = 0
        position = self.sink.position(self.upstream)
        for page in read_pages(self.recorder, position, page_size=self.batch_size):
            steps = [self.steps.step_from_notification(n, self.upstream) for n in page]
            self._apply(steps, position)
            position = page[-1].id
            count += len(page)
            if self._stop.is_set():
                break
        return count

    def run_forever(self) -> None:
        """Follow the log until :meth:`stop`; survive database outages."""
        waker = self._waker = LogWaker(self.recorder, name=f"outbound-waker:{self.upstream}")
        delay = 0.2
        try:
            while not self._stop.is_set():
                waker.clear()
                try:
                    self.run_once()
                    delay = 0.2
                except TRANSIENT_ERRORS as e:
                    logger.warning("database unavailable (%s); retrying in %.1f s", e, delay)
                    self._stop.wait(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                waker.wait(self.poll_interval)
        finally:
            waker.stop()

    def stop(self) -> None:
        """Stop soon: interrupts waits between retries; an unrecorded batch is redone later."""
        self._stop.set()
        self.follower.stop_calls.set()
        if self._waker is not None:
            self._waker.wake()

    def close(self) -> None:
        """Close the upstream log's connections (after :meth:`run_forever` returned)."""
        close_recorder(self.recorder)

    def _apply(self, steps: Sequence[Step], position: int) -> None:
        """Apply ``steps``; on a failing policy, record what precedes it, retry, then park."""
        failures = 0
        while steps:
            try:
                self.sink.apply(steps, {self.upstream: position})
                return
            except StepFailed as e:
                if e.index > 0:
                    self.sink.apply(steps[: e.index], {self.upstream: position})
                    position = _last_position(steps[: e.index], position)
                    steps = steps[e.index :]
                    failures = 0
                failures += 1
                if failures < self.policy_attempts:
                    time.sleep(min(0.1 * 2**failures, 2.0))
                    continue
                logger.error("parking notification after %d failures: %s", failures, e)
                self.sink.apply([self._parked(steps[0], e)], {self.upstream: position})
                position = _last_position(steps[:1], position)
                steps = steps[1:]
                failures = 0

    def _parked(self, step: Step, error: StepFailed) -> Step:
        upstream, nid = step_identity(step)
        source = step.source
        letter = DeadLetter(
            follower=self.follower.name,
            upstream=upstream,
            key=step.key,
            reason=REASON_POLICY,
            error=f"{type(error.cause).__name__}: {error.cause}",
            value=getattr(source, "value", None),
            tracking_name=step.tracking.application_name if step.tracking else None,
            nid=nid,
            event_topic=getattr(source, "event_topic", None),
            originator_version=getattr(source, "originator_version", None),
            attempts=self.policy_attempts,
        )
        return Step(tracking=step.tracking, key=step.key, dead_letter=letter, source=source)


def _last_position(steps: Sequence[Step], position: int) -> int:
    trackings: list[Tracking] = [s.tracking for s in steps if s.tracking is not None]
    return trackings[-1].notification_id if trackings else position


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m esbridge_connectors.outbound module:factory UPSTREAM``: run a worker.

    ``factory()`` returns the :class:`OutboundFollower`; settings come from
    the environment (``POSTGRES_*``, ``OUTBOUND_BASE_URL``...). Stops on
    SIGTERM/SIGINT; a batch cut short is redone at the next start, with the
    same idempotency keys.
    """
    parser = argparse.ArgumentParser(prog="python -m esbridge_connectors.outbound")
    parser.add_argument("factory", help="module:function returning an OutboundFollower")
    parser.add_argument("upstream", help="name of the upstream application to follow")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    module_name, _, attribute = args.factory.partition(":")
    follower = getattr(importlib.import_module(module_name), attribute)()
    worker = OutboundWorker(follower, args.upstream, batch_size=args.batch_size)
    stop_on_signals(lambda name: worker.stop())
    try:
        worker.run_forever()
    finally:
        worker.close()
        follower.close()


if __name__ == "__main__":
    main()
