"""Committing a consumer's steps: one transaction per batch, and what to do with poison.

The consumer adapter (:mod:`esbridge.consumer.adapter`) turns messages into
:class:`~esbridge.processing.steps.Step` objects, in order; this module records them.
Each batch is one call of the sink (one Postgres transaction, the tracking
positions moved with a compare-and-set against the positions the consumer last
committed). A step whose policy raises is retried alone (``retries`` times,
``retry_backoff`` doubling), then **parked**: a dead letter is recorded in the
same transaction that moves the position past it, so it is never processed
twice and never lost. With ``park_behind``, later messages of a key that has a
parked message are parked too (``held_behind``), so an aggregate's events are
never applied out of order; ``esbridge dlq retry`` puts them back in order.

Kept apart from the adapter because none of it depends on Kafka: the same rules
apply to messages from a topic and to notifications pulled from the upstream
log (prompt mode, gap filling).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from eventsourcing.persistence import IntegrityError

from esbridge.consumer.metrics import ConsumerMetrics
from esbridge.consumer.parking_report import ParkingReport
from esbridge.deadletters.store import REASON_HELD_BEHIND, REASON_POLICY
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


class CommitTuning(Protocol):
    """The consumer settings that decide how steps are committed (read at each use)."""

    batch_size: int
    retries: int
    retry_backoff: float
    park_behind: bool
    dlq_refresh: float


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
        self._dlq_checked = 0.0
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
        pending = self._hold_behind(steps)
        while pending:
            try:
                self._apply(pending)
                return
            except StepFailed as failure:
                head = pending[: failure.index]
                failing = pending[failure.index]
                rest = pending[failure.index + 1 :]
            if head:
                self._apply_parking(head)
            self._retry_or_park(failing)
            pending = self._hold_behind(rest)

    def _retry_or_park(self, step: Step) -> None:
        tuning = self._tuning
        delay = tuning.retry_backoff
        error: BaseException | None = None
        for _attempt in range(max(1, tuning.retries)):
            try:
                self._apply([step])
                return
            except StepFailed as failure:
                error = failure.cause
                log.warning(
                    "policy failed on %s (retrying in %.1f s): %s", describe(step), delay, failure
                )
            gc_pause.checkpoint()
            if self._stop.wait(delay):
                raise Abandoned("stopped while retrying a failing policy")
            delay = min(delay * 2, 10.0)
        reason = f"{type(error).__name__}: {error}"
        log.error("parking %s: %s", describe(step), reason)
        self._apply([self._letter(step, REASON_POLICY, reason, max(1, tuning.retries) + 1)])

    def _letter(self, step: Step, reason: str, error: str, attempts: int = 1) -> Step:
        """``step`` parked: the same tracking position, a dead letter instead of the event."""
        source = step.source if isinstance(step.source, Source) else Source(step.key, None)
        name = step.tracking.application_name if step.tracking else None
        letter = self._steps.dead_letter(source, name, reason, error)
        letter.attempts = attempts
        return Step(tracking=step.tracking, key=step.key, dead_letter=letter, source=source)

    def _hold_behind(self, steps: list[Step]) -> list[Step]:
        """Park steps whose key already has a parked message (per-aggregate order)."""
        if not self._tuning.park_behind:
            return steps
        parked = self._parked_keys(steps)
        if not parked and not any(s.dead_letter is not None and s.tracking for s in steps):
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
            if step.dead_letter is not None and step.tracking is not None:
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
            if step.dead_letter is not None:
                counts.parked += 1
                counts.dead_letters += 1
                metrics.parked.inc()
                self.parking.parked(step.dead_letter.reason, step.dead_letter.error)
        counts.processed += processed
        counts.batches += 1
        metrics.processed.inc(processed)
        metrics.batches.inc()


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
