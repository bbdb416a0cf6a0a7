"""Trailing gaps: a partition's last events never reached the topic.

A gap shows itself when a later message arrives; at the end of a partition
nothing later may come (messages deleted from the topic, a consumer started
past them). So once a partition has been idle for ``trailing_gap_after``
seconds with nothing left to read on the topic, the upstream log (when
readable) is asked for this partition's events beyond the position, and they
are processed from it; without the log, the relay's position topic
(:class:`~esbridge.relay.position.RelayProgress`) tells whether the relay
published more to this partition than arrived, and the partition is held
(logged, metered, and a :class:`~esbridge.errors.GapNotReconciledError` after
``hold_timeout``).
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, KafkaException, TopicPartition

from esbridge.consumer.modes import ModeContext
from esbridge.consumer.state import Partition
from esbridge.errors import GapNotReconciledError
from esbridge.names import default_position_topic
from esbridge.processing.steps import Step
from esbridge.relay.position import RelayProgress

log = logging.getLogger("esbridge.consumer")


class TrailingGaps:
    """Finds and fills (or holds) the trailing gaps of a payload-mode consumer's partitions."""

    def __init__(self, context: ModeContext) -> None:
        self.context = context
        self._relay_progress: RelayProgress | None = None

    def close(self) -> None:
        """Close the reader of the relay's position topic, if one was made."""
        progress, self._relay_progress = self._relay_progress, None
        if progress is not None:
            progress.close()

    def check(self, consumer: Consumer, part: Partition, steps: list[Step]) -> None:
        """Look for a trailing gap on ``part``, idle for ``trailing_gap_after`` seconds."""
        context = self.context
        if part.order.held_count:
            return
        now = time.monotonic()
        if now - part.last_seen < context.tuning.trailing_gap_after:
            return
        part.last_seen = now  # checked: the next check waits as long again
        if not self._read_to_end(consumer, part):
            return
        if context.upstream_log is not None:
            self._fill(part, steps)
            return
        published = self._published_to(part.number)
        if published <= part.order.position:
            return
        if part.trailing is None:
            log.warning(
                "partition %s[%d] of %r: the relay published up to notification %d on this "
                "partition, but nothing after position %d is on the topic (deleted by "
                "retention or compaction? read past by a Kafka offset?): holding it. Give the "
                "consumer the upstream log (upstream_env / --upstream-log) to fill it, or "
                "republish the range",
                context.assignment.topic,
                part.number,
                context.upstream,
                published,
                part.order.position,
            )
            part.trailing = (published, time.time())
        else:
            part.trailing = (published, part.trailing[1])

    def still_held(self, part: Partition, now: float) -> None:
        """Clear a trailing hold that messages closed; fail one older than ``hold_timeout``."""
        assert part.trailing is not None
        published, since = part.trailing
        context = self.context
        if part.order.position >= published:
            part.trailing = None
        elif now - since > context.tuning.hold_timeout:
            raise GapNotReconciledError(
                f"partition {context.assignment.topic}[{part.number}] of {context.upstream!r} "
                f"has been held "
                f"for {now - since:.0f} s at position {part.order.position}: the relay "
                f"published notifications up to {published} to it, which never arrived, and "
                "the upstream notification log is not readable. Give the consumer read access "
                "to the upstream database (upstream_env / --upstream-log) so it can fill the "
                "gap, or republish the missing range",
                topic=context.assignment.topic,
                partition=part.number,
                position=part.order.position,
            )

    def _published_to(self, partition: int) -> int:
        """The relay's last notification id on ``partition`` (0 when it cannot be read)."""
        progress = self._relay()
        return 0 if progress is None else progress.read().get(partition, 0)

    def _relay(self) -> RelayProgress | None:
        """The reader of the relay's position topic (None when it cannot be made)."""
        if self._relay_progress is None:
            context = self.context
            topic = context.assignment.topic
            position_topic = context.tuning.position_topic or default_position_topic(topic)
            try:
                self._relay_progress = RelayProgress(
                    context.client.kafka_config, position_topic, context.upstream, topic
                )
            except KafkaException as e:
                log.debug("relay position topic %s not readable: %s", position_topic, e)
        return self._relay_progress

    def _fill(self, part: Partition, steps: list[Step]) -> None:
        """Process this partition's events beyond the position from the upstream log.

        Up to the log's highest id, or, when the relay's position topic is
        readable, up to the highest id the relay published: below it the relay
        settled every gap, so no id there can still commit (writers that skip
        the library's table lock can commit an id after higher ids, and one
        read past here would then arrive later as a "duplicate").
        """
        context = self.context
        upstream_log = context.upstream_log
        assert upstream_log is not None
        top = upstream_log.highest(part.order.position + 1)
        progress = self._relay()
        if progress is not None:
            progress.read()
            if progress.known:
                top = min(top, progress.published)
        if top <= part.order.position:
            return
        found: list[Step] = []
        for page in upstream_log.read_range(part.order.position, top):
            for notification in page:
                if context.assignment.owns(part, str(notification.originator_id).encode()):
                    found.append(
                        context.steps.step_from_notification(notification, part.tracking_name)
                    )
        if found:
            first, last = found[0].tracking, found[-1].tracking
            assert first is not None and last is not None
            log.warning(
                "partition %s[%d]: %d events of this partition (notification ids %d..%d) are in "
                "the upstream log but did not arrive on the topic within %.0f s of its last "
                "message (a trailing gap): processing them from the log",
                context.assignment.topic,
                part.number,
                len(found),
                first.notification_id,
                last.notification_id,
                context.tuning.trailing_gap_after,
            )
            context.counts.reconciled += len(found)
            context.metrics.reconciled.inc(len(found))
            context.metrics.trailing.inc(len(found))
            steps.extend(found)
        part.order.filled(top)

    def _read_to_end(self, consumer: Consumer, part: Partition) -> bool:
        """Whether nothing but transaction markers is left to read on ``part`` (cached)."""
        tp = TopicPartition(self.context.assignment.topic, part.number)
        try:
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            position = consumer.position([tp])[0].offset
        except KafkaException:
            return False
        if high < 0:
            # Not known yet (no fetch answered since the assignment, or since a leader
            # change): no conclusion, or a partition still being read looks trailing.
            return False
        if position < 0:  # nothing consumed yet: where reading starts
            position = max(part.resume_offset, low, 0)
        return position >= high - 1
