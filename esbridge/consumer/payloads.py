"""Payload mode: each message carries an event; messages become steps, in each partition's order.

Each message says which notification it carries (``esb_nid``) and which one
came before it on its partition (``esb_prev_nid``): :mod:`.reconcile` skips
duplicates and holds messages behind a gap. A gap is filled from the upstream
log when the consumer may read it (:meth:`PayloadMode.fill_gaps`), else the
partition is held, and fails after ``hold_timeout`` seconds; a partition whose
last events never arrived is a trailing gap (:mod:`.trailing`). Messages not
from the upstream log (another application's, an id beyond the log's highest,
a broken chain, or with ``verify_messages`` anything unlike the log's event)
are parked as foreign, moving no position.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, Message, TopicPartition
from eventsourcing.persistence import Notification, Tracking

from esbridge import wire
from esbridge.consumer.causal import CausalGate
from esbridge.consumer.modes import Mode, ModeContext
from esbridge.consumer.offsets import commit_offsets, lag
from esbridge.consumer.state import Partition
from esbridge.consumer.trailing import TrailingGaps
from esbridge.consumer.upstream import not_in_log
from esbridge.consumer.upstream_check import UpstreamCheck
from esbridge.deadletters.store import REASON_FOREIGN, REASON_MALFORMED
from esbridge.errors import GapNotReconciledError
from esbridge.names import PAYLOADS, tracking_names
from esbridge.processing.steps import Source, Step

log = logging.getLogger("esbridge.consumer")


class PayloadMode(Mode):
    """Turns messages into steps (see the module docstring)."""

    name = PAYLOADS
    checks_offsets = True

    def __init__(self, context: ModeContext) -> None:
        super().__init__(context)
        self.trailing = TrailingGaps(context)
        self.causal = CausalGate(context)
        self.upstream_check = UpstreamCheck(context.upstream, context.assignment.topic)

    def tracking_names(self, partitions: int) -> list[str]:
        return tracking_names(self.context.upstream, partitions)

    def tracking_name(self, partition: int) -> str:
        return self.context.assignment.names[partition]

    def close(self) -> None:
        self.trailing.close()

    def resynced(self, consumer: Consumer, part: Partition) -> None:
        part.causal_held, part.causal_since = [], None  # read again from the offset
        consumer.seek(
            TopicPartition(self.context.assignment.topic, part.number, part.resume_offset)
        )

    def lag(self, consumer: Consumer) -> tuple[int, float]:
        return lag(consumer, self.context.assignment)

    def caught_up(self, consumer: Consumer) -> bool:
        topic = self.context.assignment.topic
        for part in self.context.assignment.parts.values():
            if part.order.held_count or part.causal_held:
                return False
            tp = TopicPartition(topic, part.number)
            low, high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            position = consumer.position([tp])[0].offset
            if position < 0:  # nothing fetched yet: where reading starts (a logical
                position = max(part.resume_offset, low)  # "beginning" is the low mark)
            if position < high and not _only_markers_left(part, position, high):
                return False
        return True

    def round(self, consumer: Consumer, messages: list[Message]) -> int:
        context = self.context
        tuning = context.tuning
        steps: list[Step] = []
        now = time.time()
        parts = context.assignment.parts
        last: dict[int, Message] = {}  # the last message of each partition
        # Before anything of the round is parked: all of it from another application is
        # a wrong --upstream (or --topic), not a flood of foreign messages to park.
        self.upstream_check.check(messages, context.assignment.positions)
        truth = self._log_events_for(messages) if tuning.verify_messages else None
        for message in messages:
            error = message.error()
            if error is not None:
                context.client.check(error)
                continue
            number = message.partition() or 0
            part = parts.get(number)
            if part is None:
                continue  # revoked meanwhile
            last[number] = message
            self._offer(part, message, steps, now, truth)
        touched = set(last)
        for part in list(parts.values()):
            gap = part.order.gap()
            if gap is None:
                if part.number not in last:
                    self.trailing.check(consumer, part, steps)
                if part.trailing is not None:
                    self.trailing.still_held(part, now)
                continue
            touched.add(part.number)
            if context.upstream_log is not None:
                self.fill_gaps(part, steps)
            elif now - gap.since > tuning.hold_timeout:
                raise GapNotReconciledError(
                    f"partition {context.assignment.topic}[{part.number}] of "
                    f"{context.upstream!r} has been held "
                    f"for {now - gap.since:.0f} s at position {gap.after}: {gap.describe()} "
                    f"never arrived and the upstream notification log is not readable. Give "
                    "the consumer read access to the upstream database (upstream_env / "
                    "--upstream-log) so it can fill the gap, or republish the missing range",
                    topic=context.assignment.topic,
                    partition=part.number,
                    position=gap.after,
                    held_nid=gap.before,
                )
        if tuning.causal_dependencies or self.causal.holding():
            steps = self.causal.release(steps, now)
        if steps and not context.commit(steps):
            return len(messages)
        # Only now, with the batch in Postgres, may offsets move past its messages: an
        # offset committed before (and a batch that then failed) would skip them.
        mono = time.monotonic()
        for number, message in last.items():
            part = parts[number]
            part.last_offset = message.offset() or 0
            part.last_timestamp = message.timestamp()[1] / 1000.0
            part.last_seen = mono
        commit_offsets(consumer, context.assignment, asynchronous=True, only=touched)
        context.update_gauges()
        return len(messages)

    def _offer(
        self,
        part: Partition,
        message: Message,
        steps: list[Step],
        now: float,
        truth: dict[int, Notification] | None = None,
    ) -> None:
        context = self.context
        try:
            payload = wire.decode_payload(_raw_headers(message), message.key())
            if payload is None:
                return  # a prompt
        except Exception as e:
            source = _source(message, None)
            letter = context.steps.dead_letter(source, None, REASON_MALFORMED, str(e))
            steps.append(Step(tracking=None, key=source.key, dead_letter=letter, source=source))
            return
        if payload.app != context.upstream:
            self._park_foreign(
                steps,
                message,
                payload,
                f"message from application {payload.app!r} on a topic consumed as "
                f"{context.upstream!r}",
            )
            return
        upstream_log = context.upstream_log
        if upstream_log is not None and payload.nid > upstream_log.highest(payload.nid):
            self._park_foreign(
                steps,
                message,
                payload,
                f"notification id {payload.nid} is beyond the upstream log's highest id "
                f"{upstream_log.known_max}: no relay of {context.upstream!r} published it",
            )
            return
        if truth is not None and payload.nid > part.order.position:
            why = self._unlike_log(part, message, payload, truth.get(payload.nid))
            if why is not None:
                self._park_foreign(steps, message, payload, why)
                return
        order = part.order
        if order.advance(payload.nid, payload.prev_nid):  # the common case, allocation-free
            steps.append(self._message_step(part, message, payload))
            return
        offer = order.offer(payload.nid, payload.prev_nid, (message, payload), now)
        context.counts.duplicates += offer.duplicates
        context.metrics.duplicates.inc(offer.duplicates)
        for _nid, (msg, headers_) in offer.ready:
            steps.append(self._message_step(part, msg, headers_))
        for _nid, (msg, headers_) in offer.broken:
            self._park_foreign(steps, msg, headers_, _broken_chain(headers_, order.position))

    def _park_foreign(
        self, steps: list[Step], message: Message, payload: wire.PayloadHeaders, why: str
    ) -> None:
        """Park a message that is not from the upstream log: no position moves, nothing waits.

        Trusting it would move the partition's position to its ``esb_nid`` and make
        every genuine event below that id look like a duplicate (silent loss).
        """
        source = _source(message, payload)
        log.debug(  # the rate-limited warning of BatchCommitter says it, counted
            "partition %s[%s]: parking a foreign message at offset %s (key %s): %s",
            message.topic(),
            message.partition(),
            message.offset(),
            source.key,
            why,
        )
        letter = self.context.steps.dead_letter(source, None, REASON_FOREIGN, why)
        steps.append(Step(tracking=None, key=source.key, dead_letter=letter, source=source))
        self.context.metrics.foreign.inc()

    def _log_events_for(self, messages: Sequence[Message]) -> dict[int, Notification]:
        """The upstream log's events over the ids that ``messages`` claim (``verify_messages``).

        One read a batch, bounded by the log's highest id.
        """
        upstream_log = self.context.upstream_log
        assert upstream_log is not None
        nids = []
        for message in messages:
            for name, value in _raw_headers(message):
                if name == wire.H_NID:
                    if value and value.isdigit():
                        nids.append(int(value))
                    break
        if not nids:
            return {}
        after, upto = min(nids) - 1, min(max(nids), upstream_log.highest(max(nids)))
        if upto <= after:
            return {}
        return {n.id: n for page in upstream_log.read_range(after, upto) for n in page}

    def _unlike_log(
        self,
        part: Partition,
        message: Message,
        payload: wire.PayloadHeaders,
        genuine: Notification | None,
    ) -> str | None:
        """Why ``message`` is not the log's event under its id (None when it is)."""
        upstream_log = self.context.upstream_log
        assert upstream_log is not None
        if genuine is None or not self.context.steps.same_event(genuine, message, payload):
            return not_in_log(payload, genuine, upstream_log.known_max)
        if not self.context.assignment.owns(part, message.key() or b""):
            return f"its key belongs to another partition than {part.number}"
        return None

    def _message_step(
        self, part: Partition, message: Message, payload: wire.PayloadHeaders
    ) -> Step:
        return self.context.steps.step(
            _source(message, payload), Tracking(part.tracking_name, payload.nid)
        )

    def fill_gaps(self, part: Partition, steps: list[Step]) -> None:
        """Read what is missing before ``part``'s held messages from the upstream log.

        Each round reads ``(position, before]`` (``before``: the lowest held
        message), bounded by the log's highest id: a held message's own id
        proves nothing, it may be forged. The log's notification ``before``
        decides whether the held message is genuine (the same event: processed)
        or foreign (parked without a position, and the log's own event, if this
        partition has one there, is processed instead).
        """
        context = self.context
        upstream_log = context.upstream_log
        assert upstream_log is not None
        step_from = context.steps.step_from_notification
        while (gap := part.order.gap()) is not None:
            upto = min(gap.before, upstream_log.highest(gap.before))
            found = 0
            genuine: Notification | None = None
            for page in upstream_log.read_range(gap.after, upto):
                for notification in page:
                    if not context.assignment.owns(part, str(notification.originator_id).encode()):
                        continue
                    if notification.id == gap.before:
                        genuine = notification
                        continue
                    steps.append(step_from(notification, part.tracking_name))
                    found += 1
            message, payload = part.order.take(gap.before)
            if genuine is not None and context.steps.same_event(genuine, message, payload):
                steps.append(self._message_step(part, message, payload))
            else:
                self._park_foreign(steps, message, payload, not_in_log(payload, genuine, upto))
                if genuine is not None:
                    steps.append(step_from(genuine, part.tracking_name))
                    found += 1
            if gap.first_missing < gap.before:
                log.info(
                    "partition %s[%d]: filled gap %s from the upstream log (%d events)",
                    context.assignment.topic,
                    part.number,
                    gap.describe(),
                    found,
                )
                context.counts.gaps += 1
                context.metrics.gaps.inc()
            context.counts.reconciled += found
            context.metrics.reconciled.inc(found)
            released = part.order.filled(upto)
            context.counts.duplicates += released.duplicates
            for _nid, (msg, headers_) in released.ready:
                steps.append(self._message_step(part, msg, headers_))


def _only_markers_left(part: Partition, position: int, high: int) -> bool:
    # Transactional producers leave a commit marker after each transaction: it has an
    # offset but is never delivered. Nothing consumable is left if the consumer has
    # read everything up to the marker(s) after the last message it got.
    return part.last_offset >= 0 and position >= part.last_offset + 1 and high - position <= 1


def _raw_headers(message: Message) -> list[tuple[str, bytes | None]]:
    """A consumed message's headers (librdkafka gives consumed header values as bytes).

    confluent-kafka converts them on the first call and keeps the list in the
    message: later calls are free, and the list must not be changed.
    """
    headers: Any = message.headers()
    return headers or []


def _broken_chain(payload: wire.PayloadHeaders, position: int) -> str:
    return (
        f"its esb_prev_nid {payload.prev_nid} does not continue this partition's chain at "
        f"position {position} (esb_nid {payload.nid}): not published by the upstream's relay, "
        "and no upstream log is configured to check it (--upstream-log / upstream_env)"
    )


def _source(message: Message, payload: wire.PayloadHeaders | None) -> Source:
    if payload is not None:
        key = payload.originator_id  # the key, decoded already
    else:
        key = (message.key() or b"").decode("utf-8", "replace")
    return Source(
        key=key,
        value=message.value(),
        headers=_raw_headers(message),  # None values become b"" in dead letters
        kafka_topic=message.topic(),
        kafka_partition=message.partition(),
        kafka_offset=message.offset(),
        event_topic=payload.topic if payload else None,
        originator_version=payload.originator_version if payload else None,
        nid=payload.nid if payload else None,
        event_time=payload.time if payload else None,
        kafka_timestamp=_timestamp(message),
        deps=payload.deps if payload else "",
    )


def _timestamp(message: Message) -> float | None:
    """The message's Kafka timestamp in epoch seconds, when it has one."""
    kind, millis = message.timestamp()
    return millis / 1000.0 if kind != TIMESTAMP_NOT_AVAILABLE and millis > 0 else None
