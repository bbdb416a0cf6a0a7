"""The consumer group's rebalances: which partitions this consumer reads, from where.

librdkafka calls these callbacks inside ``poll()``/``consume()``. An assigned
partition starts at the group's offset only if Postgres covers it
(:func:`~esbridge.consumer.offsets.start_offsets`); its Postgres position, the
truth, is read in the next round (:meth:`Rebalance.init_assigned`), outside
the callback. A revoked partition's offset is committed first; a lost one
(the group moved on without us) is only forgotten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from esbridge.consumer import offsets
from esbridge.consumer.modes import Mode
from esbridge.consumer.reconcile import PartitionOrder
from esbridge.consumer.state import Assignment, HeldMessage, Partition

log = logging.getLogger("esbridge.consumer")


class Rebalance:
    """Keeps ``assignment`` in step with the group (see the module docstring).

    ``position(name)`` reads a tracking name's Postgres position; ``order(position)``
    makes the reordering state of a partition at that position.
    """

    def __init__(
        self,
        assignment: Assignment,
        mode: Mode,
        position: Callable[[str], int],
        order: Callable[[int], PartitionOrder[HeldMessage]],
    ) -> None:
        self.assignment = assignment
        self.mode = mode
        self.position = position
        self.order = order
        self.pending: list[TopicPartition] | None = None  # assigned, positions not read yet

    def subscribe(self, consumer: Consumer) -> None:
        """Subscribe ``consumer`` to the topic with these callbacks."""
        consumer.subscribe(
            [self.assignment.topic],
            on_assign=self.on_assign,
            on_revoke=self.on_revoke,
            on_lost=self.on_lost,
        )

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        topic = self.assignment.topic
        log.info("assigned %s[%s]", topic, ",".join(str(p.partition) for p in partitions))
        position_of = self._partition_position if self.mode.checks_offsets else None
        starts = offsets.start_offsets(consumer, topic, partitions, position_of)
        consumer.assign(starts)  # from here, not from an offset past what Postgres holds
        self.pending = (self.pending or []) + starts

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        topic = self.assignment.topic
        log.info("revoked %s[%s]", topic, ",".join(str(p.partition) for p in partitions))
        revoked = {p.partition for p in partitions}
        try:
            offsets.commit_offsets(consumer, self.assignment, asynchronous=False, only=revoked)
        except KafkaException as e:
            log.debug("offset commit on revoke failed: %s", e)
        self._forget(revoked)

    def on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        topic = self.assignment.topic
        log.warning("lost %s[%s]", topic, ",".join(str(p.partition) for p in partitions))
        self._forget({p.partition for p in partitions})

    def _forget(self, numbers: set[int]) -> None:
        for n in numbers:
            self.assignment.parts.pop(n, None)
        if self.pending:
            self.pending = [p for p in self.pending if p.partition not in numbers]

    def _partition_position(self, partition: int) -> int:
        return self.position(self.mode.tracking_name(partition))

    def init_assigned(self) -> None:
        """Read the Postgres positions of newly assigned partitions (they are the truth)."""
        pending, self.pending = self.pending or [], None
        if not pending:
            return
        now = time.monotonic()
        assignment = self.assignment
        for tp in pending:
            name = self.mode.tracking_name(tp.partition)
            position = self.position(name)
            assignment.positions[name] = position
            offset = tp.offset
            assignment.parts[tp.partition] = Partition(
                number=tp.partition,
                tracking_name=name,
                order=self.order(position),
                resume_offset=offsets.resume_offset(offset),
                last_seen=now,
            )
            log.info(
                "partition %s[%d]: position %d (%s), Kafka offset hint %s",
                assignment.topic,
                tp.partition,
                position,
                name,
                offsets.describe(offset),
            )
        self.mode.assigned()
