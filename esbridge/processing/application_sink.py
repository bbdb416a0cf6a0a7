"""Applying batches of upstream events to a downstream process application, atomically.

The library's ``Follower.process_event()`` records one upstream event per
transaction (one fsync per event). Here a whole batch of upstream events is
processed by the follower's unchanged ``policy()`` and recorded in ONE
transaction together with the tracking positions reached, so the effect of
each upstream event is recorded exactly once, whatever crashes.

Two things keep batching invisible to policies:

* a batch-scoped repository overlay
  (:class:`~esbridge.processing.batch_repository.BatchRepository`): while a batch
  is processed, ``self.repository.get(id)`` returns aggregates as changed by
  earlier events of the same batch, exactly the state a policy would see one
  event at a time;
* a policy that raises is reported with its position in the batch
  (:class:`StepFailed`), so the caller records the events before it, retries
  or parks the failing one, and carries on.

The write goes through the follower's own recorder, extended by
:mod:`esbridge.processing.recorder_hook` so that tracking positions, dead
letters and replay marks ride in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from typing import Any

from eventsourcing.application import ProcessingEvent
from eventsourcing.domain import CollectEventsProtocol, DomainEventProtocol
from eventsourcing.persistence import IntegrityError, Tracking
from eventsourcing.system import Follower

from esbridge.deadletters.store import DeadLetterStore
from esbridge.processing.batch_repository import BatchRepository
from esbridge.processing.concurrent_batches import follower_batches
from esbridge.processing.recorder_hook import (
    TRACE_KWARG,
    WRITE_KWARG,
    EsbridgeWrite,
    captures_traces,
    install_recorder_hook,
)
from esbridge.processing.sink import StepFailed
from esbridge.processing.steps import Step
from esbridge.processing.taking_turns import TakingTurns
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS
from esbridge.runtime.tracing import AVAILABLE as TRACING
from esbridge.runtime.tracing import (
    TraceContext,
    call_in_span,
    end_step_spans,
    note_step_failure,
    span_trace_context,
    step_span,
)

log = logging.getLogger("esbridge.processing")

PrefetchFunc = Callable[[DomainEventProtocol[Any]], Iterable[Any]]
"""A hint: the ids of the aggregates the follower's policy will get for an upstream event.

Given to :class:`ProcessApplicationSink` (``ConsumerAdapter(prefetch=...)``), it
lets a batch read all those aggregates in one query instead of one per
aggregate. Ids it misses are read as usual; extra ids only cost a little.
"""


class _BatchProcessingEvent(ProcessingEvent[Any]):
    """``ProcessingEvent`` whose ``collect_events`` decides what an object is once per type.

    The library's version checks every collected object against two
    ``runtime_checkable`` protocols (slow attribute scans, a tenth of a
    batch's time); the answer depends on the object's class, so it is cached.
    """

    _kinds: dict[type, int] = {}  # 0: domain event, 1: aggregate with events, 2: other

    def collect_events(self, *objs: Any, **kwargs: Any) -> None:
        kinds = self._kinds
        for obj in objs:
            if obj is None:
                continue
            kind = kinds.get(type(obj))
            if kind is None:
                if isinstance(obj, DomainEventProtocol):
                    kind = 0
                elif isinstance(obj, CollectEventsProtocol):
                    kind = 1
                else:
                    kind = 2
                kinds[type(obj)] = kind
            if kind == 0:
                self.events.append(obj)
                continue
            if kind == 1:
                self.events.extend(obj.collect_events())
            self.aggregates[obj.id] = obj
        self.saved_kwargs.update(kwargs)


class ProcessApplicationSink:
    """The default :class:`BatchSink`: an eventsourcing ``ProcessApplication`` (or ``Follower``).

    Calls the follower's unchanged ``policy()`` once per event, in order, and
    records all new events + dead letters + tracking positions in one
    transaction through the follower's own recorder, then notifies like the
    library does after recording (``_take_snapshots``, ``notify``, ``_notify``).

    Several sinks of one follower (one consumer adapter per leader, each in
    its thread) run their policies at the same time; only the write (and what
    follows it) holds the follower's ``processing_lock``. A batch that read an
    aggregate another batch changed meanwhile, or whose write collides with
    another writer's version of an aggregate, records nothing and runs again
    (see :mod:`esbridge.processing.concurrent_batches`); after ``OPTIMISTIC_ATTEMPTS`` it
    runs with the lock held throughout, like the library's ``process_event``.
    A write that collided with another process's makes the sink take turns with
    the other processes for a while (:mod:`esbridge.processing.taking_turns`).
    """

    #: Runs of a batch with only its write under the lock, before it holds the lock throughout.
    OPTIMISTIC_ATTEMPTS = 3
    #: Runs of a batch whose write keeps colliding before the collision is raised (the
    #: consumer then re-reads its positions and the batch is delivered again).
    MAX_ATTEMPTS = 5

    def __init__(
        self,
        follower: Follower[Any],
        dead_letters: DeadLetterStore | None = None,
        prefetch: PrefetchFunc | None = None,
    ):
        install_recorder_hook(follower)
        self.follower = follower
        self.prefetch = prefetch
        self.dead_letters = dead_letters or DeadLetterStore(follower.recorder.datastore)  # type: ignore[attr-defined]
        self.dead_letters.create_table()
        self.batches = follower_batches(follower)
        self.reruns = 0  # batches run again after a conflict (for tests and diagnostics)
        self.turns = TakingTurns(getattr(follower.recorder, "datastore", None), follower.name)

    def position(self, tracking_name: str) -> int:
        return self.follower.recorder.max_tracking_id(tracking_name) or 0

    def apply(self, steps: Sequence[Step], expected: Mapping[str, int]) -> None:
        attempt = 1
        try:
            while not self._attempt(steps, expected, attempt):
                self.reruns += 1
                attempt += 1
        except StepFailed as e:
            # The batch runs again (smaller, or the step parked): the spans end when it is recorded.
            note_step_failure(steps[e.index], e.cause)
            raise
        end_step_spans(steps)

    def _attempt(self, steps: Sequence[Step], expected: Mapping[str, int], attempt: int) -> bool:
        """Run and record the batch once; False when it recorded nothing and must run again."""
        with self.turns.turn():  # after a collision with another process: one at a time
            return self._attempt_in_turn(steps, expected, attempt)

    def _attempt_in_turn(
        self, steps: Sequence[Step], expected: Mapping[str, int], attempt: int
    ) -> bool:
        lock = self.follower.processing_lock
        commits = self.batches.log
        ticket = commits.begin()
        try:
            if attempt > self.OPTIMISTIC_ATTEMPTS:
                with lock:
                    combined = self._process(steps, ticket, fill_lock=None)
                    assert combined is not None
                    return self._record(steps, expected, combined, attempt)
            combined = self._process(steps, ticket, fill_lock=lock)
            if combined is None:
                return False
            with lock:
                if commits.conflict(ticket, combined.reads) is not None:
                    return False
                return self._record(steps, expected, combined, attempt)
        finally:
            commits.end(ticket)

    def _process(
        self, steps: Sequence[Step], ticket: int, fill_lock: Any
    ) -> _ProcessedBatch | None:
        """Call the policy for every step; None when a policy failed on state that changed."""
        follower = self.follower
        hints = self.batches.hints
        combined = _ProcessedBatch(tracking=None)
        with _overlay(follower, fill_lock) as overlay:
            if self.prefetch is not None:
                self._prefetch(overlay, steps)
            else:
                self._prefetch_learned(overlay, steps)
            # Bound once: the library's singledispatchmethod builds a new function per access.
            policy = follower.policy
            learn = self.prefetch is None
            # Each new event's trace context: that of the event whose policy made it.
            traces: list[TraceContext | None] | None = (
                [] if captures_traces(follower.recorder) else None
            )
            for index, step in enumerate(steps):
                event = step.event
                if event is None:
                    continue
                processing_event = _BatchProcessingEvent(tracking=step.tracking)
                # Untraced steps (all of them without OpenTelemetry) call the policy directly.
                span = step_span(step) if TRACING else None
                try:
                    if span is None:
                        policy(event, processing_event)
                    else:
                        call_in_span(span, policy, event, processing_event)
                except TRANSIENT_ERRORS:
                    raise
                except Exception as e:
                    if fill_lock is not None:
                        with fill_lock:  # commits in flight are noted under the lock
                            if self.batches.log.conflict(ticket, overlay.reads) is not None:
                                return None  # it may have failed on a stale read: run again
                    raise StepFailed(index, e) from e
                if traces is not None and processing_event.events:
                    found = span_trace_context(span) if span is not None else None
                    traces.extend([found] * len(processing_event.events))
                requested = overlay.take_requested()
                if learn:  # a given hint makes learning one useless work
                    hints.learn(event, requested)
                overlay.collect(processing_event)
                combined.events.extend(processing_event.events)
                combined.aggregates.update(processing_event.aggregates)
                combined.saved_kwargs.update(processing_event.saved_kwargs)
        if traces is not None:
            combined.saved_kwargs[TRACE_KWARG] = traces
        combined.reads = overlay.reads
        return combined

    def _record(
        self,
        steps: Sequence[Step],
        expected: Mapping[str, int],
        combined: _ProcessedBatch,
        attempt: int,
    ) -> bool:
        """Write the batch (under the processing lock); False after a collision worth retrying."""
        follower = self.follower
        combined.saved_kwargs[WRITE_KWARG] = self._write(steps, expected)
        try:
            recordings = follower._record(combined)
        except IntegrityError as e:
            self._evict(combined)
            if attempt >= self.MAX_ATTEMPTS or self._positions_moved(expected):
                raise
            self.turns.collided()
            log.info("batch of %s collided with another writer (%s): running it again",
                     follower.name, e)  # fmt: skip
            return False
        self.batches.log.committed(combined.events)
        follower._take_snapshots(combined)
        follower.notify(combined.events)
        follower._notify(recordings)
        return True

    def _evict(self, combined: ProcessingEvent[Any]) -> None:
        """Drop the batch's aggregates from the cache: another writer has newer versions."""
        cache = self.batches.switch.base.cache
        if cache is None:
            return
        for aggregate_id in {e.originator_id for e in combined.events}:
            with suppress(KeyError):
                cache.get(aggregate_id, evict=True)

    def _positions_moved(self, expected: Mapping[str, int]) -> bool:
        """True when a tracking position is no longer what the batch expects (another consumer)."""
        return any(self.position(name) != position for name, position in expected.items())

    def _prefetch(self, overlay: BatchRepository, steps: Sequence[Step]) -> None:
        """Load the aggregates the hint names for this batch in one query (a hint only)."""
        hint = self.prefetch
        assert hint is not None
        ids: list[Any] = []
        try:
            for step in steps:
                if step.event is not None:
                    ids.extend(hint(step.event))
        except Exception as e:  # a wrong hint costs speed, never correctness
            log.warning("prefetch hint failed (%s: %s); reading aggregates one by one",
                        type(e).__name__, e)  # fmt: skip
            return
        overlay.prefetch(ids)

    def _prefetch_learned(self, overlay: BatchRepository, steps: Sequence[Step]) -> None:
        """Load the aggregates earlier batches' policies read for such events, in one query."""
        hints = self.batches.hints
        ids: list[Any] = []
        for step in steps:
            if step.event is not None:
                ids.extend(hints.ids(step.event))
        if len(ids) < 2:
            return  # one read either way
        try:
            overlay.prefetch(ids)
        except TRANSIENT_ERRORS:
            raise
        except Exception as e:  # a learned hint can be wrong (a value of another type)
            log.info("prefetching %d aggregates failed (%s: %s); reading them one by one",
                     len(ids), type(e).__name__, e)  # fmt: skip
            self.batches.hints.forget(s.event for s in steps if s.event is not None)

    def _write(self, steps: Sequence[Step], expected: Mapping[str, int]) -> EsbridgeWrite:
        last: dict[str, Tracking] = {}
        write = EsbridgeWrite(store=self.dead_letters)
        for step in steps:
            if step.tracking is not None:
                last[step.tracking.application_name] = step.tracking
            if step.dead_letter is not None:
                write.dead_letters.append(step.dead_letter)
            if step.replay_of is not None:
                write.replayed.append(step.replay_of)
        for name, tracking in last.items():
            previous = expected.get(name, 0)
            if tracking.notification_id > previous:
                write.trackings.append((tracking, previous))
        return write


class _ProcessedBatch(ProcessingEvent[Any]):
    """The new events of a whole batch, and the aggregate versions its policies read."""

    reads: Mapping[Any, int] = {}


class _overlay:
    """Context manager: inside, this thread's ``follower.repository`` is a :class:`BatchRepository`.

    Other threads keep seeing the real repository (or their own batch), so
    batches of several consumers of one follower can run at the same time.
    """

    def __init__(self, follower: Follower[Any], fill_lock: Any = None) -> None:
        self.switch = follower_batches(follower).switch
        self.fill_lock = fill_lock

    def __enter__(self) -> BatchRepository:
        overlay = BatchRepository(self.switch.base, self.fill_lock)
        self.switch.activate(overlay)
        return overlay

    def __exit__(self, *exc: object) -> None:
        self.switch.deactivate()
