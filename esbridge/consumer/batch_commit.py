"""Committing a consumer's steps: one transaction per batch, and what to do with poison.

The consumer adapter (:mod:`esbridge.consumer.adapter`) turns messages into
:class:`~esbridge.processing.steps.Step` objects, in order; this module records them.
Each batch is one call of the sink (one Postgres transaction, the tracking
positions moved with a compare-and-set against the positions the consumer last
committed). A step whose policy raises is retried alone, as the follower's
:class:`~esbridge.deadletters.policy.DeadLetterPolicy` says (attempts, backoff
with cap and jitter), then, by default, **parked**: a dead letter is recorded
in the same transaction that moves the position past it, so it is never
processed twice and never lost. With ``park_behind``, later messages of a key
that has a parked message are parked too (``held_behind``), so an aggregate's
events are never applied out of order; ``esbridge dlq retry`` puts them back in
order. The policy may instead record the message as skipped (the key goes on)
or stop the consumer (:class:`~esbridge.errors.PoisonMessageError`, nothing
after it recorded); an undecodable message (nothing to retry) meets the same
choice at once.

Kept apart from the adapter because none of it depends on Kafka: the same rules
apply to messages from a topic and to notifications pulled from the upstream
log (prompt mode, gap filling).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from eventsourcing.persistence import IntegrityError

from esbridge.consumer.metrics import ConsumerMetrics
from esbridge.consumer.parking_report import ParkingReport
from esbridge.deadletters.policy import PARK, SKIP, DeadLetterPolicy
from esbridge.deadletters.store import (
    REASON_HELD_BEHIND,
    REASON_POLICY,
    REASON_UNDECODABLE,
    REASON_UNKNOWN_TYPE,
    STATUS_PARKED,
    STATUS_SKIPPED,
)
from esbridge.errors import PoisonMessageError
from esbridge.processing.sink import BatchSink, StepFailed
from esbridge.processing.steps import Source, Step, StepFactory, iter_batches
from esbridge.runtime import gc_pause

log = logging.getLogger("esbridge.consumer")


class Abandoned(Exception):
    """Stop was requested in the middle of a batch: nothing of it was recorded."""


@dataclass
class ConsumerCounts:
    """A consumer's counters, as :meth:`~esbridge.consumer.ConsumerAdapter.status` shows them."""

    processed: int = 0
    duplicates: int = 0
    gaps: int = 0
    reconciled: int = 0
    batches: int = 0
    parked: int = 0
    dead_letters: int = 0
    skipped: int = 0


class CommitTuning(Protocol):
    """The consumer settings that decide how steps are committed (read at each use)."""

    batch_size: int
    park_behind: bool
    dlq_refresh: float

    def policy_for(self, follower: str) -> DeadLetterPolicy:
        """The follower's dead-letter policy."""
        ...


class BatchCommitter:
    """Records steps in batches; retries, then parks, a step whose policy keeps failing.

    ``positions`` are the committed positions of the consumer's tracking names
    (the compare-and-set's expected values): this object moves them after each
    commit, and the consumer resets them when it resynchronises. ``retry_db``
    calls its argument until Postgres answers (raising :class:`Abandoned` when
    stopped meanwhile).
    """

    def __init__(
        self,
        *,
        sink: Callable[[], BatchSink],
        steps: StepFactory,
        follower: str,
        upstream: str,
        tuning: CommitTuning,
        positions: MutableMapping[str, int],
        counts: ConsumerCounts,
        metrics: ConsumerMetrics,
        retry_db: Callable[[Callable[[], Any]], Any],
        stop: threading.Event,
        rng: random.Random | None = None,
    ) -> None:
        self._sink = sink
        self._steps = steps
        self._follower = follower
        self._upstream = upstream
        self._tuning = tuning
        self._positions = positions
        self._counts = counts
        self._metrics = metrics
        self._retry_db = retry_db
        self._stop = stop
        self._rng = rng or random.Random()
        self._dlq_checked = 0.0
        self._oldest: tuple[int, datetime | None] = (0, None)
        self._oldest_read: float | None = None
        #: A warning as soon as anything is parked, rate-limited (the adapter ticks it).
        self.parking = ParkingReport(follower, upstream)

    def commit(self, steps: Sequence[Step]) -> bool:
        """Record ``steps`` in batches; False when another consumer moved a position first.

        On False the batch that collided was not recorded (nor anything after
        it): the caller re-reads its positions and resumes from them.
        """
        try:
            for batch in iter_batches(steps, self._tuning.batch_size):
                self._apply_parking(list(batch))
        except IntegrityError as e:
            log.warning("%s: re-reading positions and resuming from them", e)
            return False
        return True

    def _apply_parking(self, steps: list[Step]) -> None:
        """Apply ``steps``, retrying then parking a step whose policy keeps failing."""
        pending = self._hold_behind(self._undecodable(steps))
        while pending:
            try:
                self._apply(pending)
                return
            except StepFailed as failure:
                head = pending[: failure.index]
                failing = pending[failure.index]
                rest = pending[failure.index + 1 :]
                cause = failure.cause
            if head:
                self._apply_parking(head)
            self._retry(failing, cause)
            pending = self._hold_behind(rest)

    def _retry(self, step: Step, error: BaseException) -> None:
        """Retry ``step`` (its first attempt raised ``error``) as the policy says, then give up."""
        policy = self._tuning.policy_for(self._follower)
        for attempt in range(1, policy.max_attempts):
            delay = policy.delay(attempt, self._rng)
            log.warning(
                "policy failed on %s (attempt %d of %d, retrying in %.2f s): %s: %s",
                describe(step),
                attempt,
                policy.max_attempts,
                delay,
                type(error).__name__,
                error,
            )
            gc_pause.checkpoint()
            if self._stop.wait(delay):
                raise Abandoned("stopped while retrying a failing policy")
            try:
                self._apply([step])
                return
            except StepFailed as failure:
                error = failure.cause
        self._exhausted(step, policy, error)

    def _exhausted(self, step: Step, policy: DeadLetterPolicy, error: BaseException) -> None:
        """Every attempt failed: park, skip (recorded) or stop, as the policy says."""
        reason = f"{type(error).__name__}: {error}"
        if policy.on_exhausted not in (PARK, SKIP):
            raise self._poison(step, reason, policy.max_attempts) from error
        letter = self._letter(step, REASON_POLICY, reason, policy.max_attempts)
        assert letter.dead_letter is not None
        letter.dead_letter.traceback = "".join(traceback.format_exception(error))
        if policy.on_exhausted == SKIP:
            letter.dead_letter.status = STATUS_SKIPPED
        log.error(
            "%s %s after %d attempts: %s",
            "skipping" if policy.on_exhausted == SKIP else "parking",
            describe(step),
            policy.max_attempts,
            reason,
        )
        self._apply([letter])

    def _undecodable(self, steps: list[Step]) -> list[Step]:
        """Apply the policy's choice to messages that cannot be decoded (retrying cannot help).

        ``park`` leaves them as the step factory made them. ``stop`` records
        the steps before the first one, then raises.
        """
        policy = self._tuning.policy_for(self._follower)
        if policy.on_exhausted == PARK:
            return steps
        for index, step in enumerate(steps):
            letter = step.dead_letter
            if letter is None or step.tracking is None or letter.reason not in _UNDECODABLE:
                continue
            if policy.on_exhausted == SKIP:
                letter.status = STATUS_SKIPPED
                continue
            if index:
                self._apply_parking(steps[:index])
            raise self._poison(step, letter.error, 1)
        return steps

    def _poison(self, step: Step, reason: str, attempts: int) -> PoisonMessageError:
        """The error that stops the consumer on ``step`` (``on_exhausted="stop"``)."""
        source = step.source if isinstance(step.source, Source) else Source(step.key, None)
        log.error("stopping at %s after %d attempt(s): %s", describe(step), attempts, reason)
        return PoisonMessageError(
            f"consumer {self._follower} <- {self._upstream} stopped at {describe(step)} after "
            f"{attempts} attempt(s), as its dead-letter policy says (on_exhausted='stop'): "
            f"{reason}. Nothing after it was processed; fix the cause and restart (it is tried "
            "again), or use on_exhausted='park' or 'skip' to go on without it",
            follower=self._follower,
            upstream=self._upstream,
            key=step.key,
            nid=source.nid,
            topic=source.kafka_topic,
            partition=source.kafka_partition,
            offset=source.kafka_offset,
        )

    def _letter(self, step: Step, reason: str, error: str, attempts: int = 1) -> Step:
        """``step`` parked: the same tracking position, a dead letter instead of the event."""
        source = step.source if isinstance(step.source, Source) else Source(step.key, None)
        name = step.tracking.application_name if step.tracking else None
        letter = self._steps.dead_letter(source, name, reason, error)
        letter.attempts = attempts
        # The event's processing span goes with it: it ends when the letter is recorded.
        return Step(
            tracking=step.tracking, key=step.key, dead_letter=letter, source=source, span=step.span
        )

    def _hold_behind(self, steps: list[Step]) -> list[Step]:
        """Park steps whose key already has a parked message (per-aggregate order)."""
        if not self._tuning.park_behind:
            return steps
        parked = self._parked_keys(steps)
        if not parked and not any(_holds(s) for s in steps):
            return steps
        result: list[Step] = []
        for step in steps:
            if step.key in parked and step.event is not None:
                step = self._letter(
                    step,
                    REASON_HELD_BEHIND,
                    "an earlier message of this key is parked; replay it first "
                    "('esbridge dlq retry')",
                )
            if _holds(step):
                parked.add(step.key)  # a letter without a position holds nothing back
            result.append(step)
        return result

    def _parked_keys(self, steps: Sequence[Step]) -> set[str]:
        """The keys of ``steps`` that have a parked message (one query, only when any is parked).

        ``counts.dead_letters`` is re-read from the table every ``dlq_refresh``
        seconds (replays and other consumers change it) and counted up here.
        """
        store = getattr(self._sink(), "dead_letters", None)
        if store is None:
            return set()
        counts, now = self._counts, time.monotonic()
        if now - self._dlq_checked > self._tuning.dlq_refresh:
            counts.dead_letters = self._retry_db(lambda: store.count(self._follower))
            self._dlq_checked = now
        if not counts.dead_letters:
            return set()
        keys = {s.key for s in steps if s.event is not None}
        return self._retry_db(lambda: store.parked_keys(self._follower, self._upstream, keys))

    def parked_gauges(self) -> None:
        """Refresh the parked-messages gauges of this follower and upstream.

        The count and the oldest parking time are re-read from the table every
        ``dlq_refresh`` seconds (retries, discards and other consumers change
        them); the age is computed at each call, so it grows between reads.
        """
        store = getattr(self._sink(), "dead_letters", None)
        if store is None:
            return
        now = time.monotonic()
        if self._oldest_read is None or now - self._oldest_read > self._tuning.dlq_refresh:
            follower, upstream = self._follower, self._upstream
            self._oldest = self._retry_db(lambda: store.oldest_parked(follower, upstream))
            self._oldest_read = now
        count, oldest = self._oldest
        self._metrics.parked_messages.set(count)
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        self._metrics.parked_age.set(max(0.0, age))

    def _apply(self, steps: Sequence[Step]) -> None:
        """One transaction; retries transient database errors until it commits or we stop."""
        positions = self._positions
        names = {s.tracking.application_name for s in steps if s.tracking is not None}
        expected = {name: positions.get(name, 0) for name in names}
        self._retry_db(lambda: self._sink().apply(steps, expected))
        self._metrics.committed(steps, time.time())
        processed = 0
        counts, metrics = self._counts, self._metrics
        for step in steps:
            if step.tracking is not None:
                name = step.tracking.application_name
                positions[name] = max(positions.get(name, 0), step.tracking.notification_id)
                processed += 1
            letter = step.dead_letter
            if letter is not None and letter.status == STATUS_SKIPPED:
                counts.skipped += 1
                metrics.skipped.inc()
            elif letter is not None:
                counts.parked += 1
                counts.dead_letters += 1
                metrics.parked.inc()
                self.parking.parked(letter.reason, letter.error)
        counts.processed += processed
        counts.batches += 1
        metrics.processed.inc(processed)
        metrics.batches.inc()


#: Reasons of messages that cannot be decoded: retrying them cannot help.
_UNDECODABLE = (REASON_UNDECODABLE, REASON_UNKNOWN_TYPE)


def _holds(step: Step) -> bool:
    """Whether ``step`` parks a message with a position (later messages of its key wait)."""
    letter = step.dead_letter
    return letter is not None and step.tracking is not None and letter.status == STATUS_PARKED


def describe(step: Step) -> str:
    """Where ``step`` came from, for log lines: notification, key and Kafka coordinates."""
    source = step.source
    if isinstance(source, Source):
        where = (
            f" ({source.kafka_topic}[{source.kafka_partition}]@{source.kafka_offset})"
            if source.kafka_topic
            else ""
        )
        return f"notification {source.nid} of key {source.key}{where}"
    return f"message of key {step.key}"
