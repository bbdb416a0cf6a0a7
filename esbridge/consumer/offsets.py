"""Kafka's committed offsets: hints where to resume reading, never the truth.

The truth is each tracking name's position in the follower's Postgres. An
offset is committed only after the batch before it is in Postgres, and carries
as its metadata (``esb_position=N``) the position that covered it then. On
assignment, an offset whose position is past what Postgres holds (a database
restored from a backup) is ignored and the partition read from its beginning:
the events already processed are skipped as duplicates, none is skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_STORED,
    Consumer,
    KafkaException,
    TopicPartition,
)

from esbridge.consumer.state import Assignment

log = logging.getLogger("esbridge.consumer")

_METADATA_PREFIX = "esb_position="


def offset_metadata(position: int) -> str:
    """The metadata of a committed offset: the Postgres position that covers it."""
    return f"{_METADATA_PREFIX}{position}"


def position_in_metadata(metadata: str | None) -> int | None:
    """The position in an offset's metadata; None for offsets not committed by esbridge."""
    if metadata and metadata.startswith(_METADATA_PREFIX):
        try:
            return int(metadata[len(_METADATA_PREFIX) :])
        except ValueError:
            return None
    return None


def resume_offset(offset: int) -> int:
    """Where reading may safely start again, given an assigned partition's start ``offset``."""
    return offset if offset >= 0 else OFFSET_BEGINNING


def describe(offset: int) -> int | str:
    """An assigned partition's start offset, for the log."""
    return {OFFSET_BEGINNING: "none: from the beginning", OFFSET_STORED: "none"}.get(offset, offset)


def start_offsets(
    consumer: Consumer,
    topic: str,
    partitions: list[TopicPartition],
    position_of: Callable[[int], int] | None,
) -> list[TopicPartition]:
    """Where each assigned partition starts: the group's offset only if Postgres covers it.

    ``position_of(partition)`` reads the partition's Postgres position; None
    when offsets need no check (prompt mode reads the log, not the topic). An
    offset whose recorded position is past the Postgres position (a batch that
    failed after its offsets were read, a database restored from a backup)
    would skip messages that never had their effect: the partition is read
    from its beginning instead. Offsets committed without the metadata (older
    esbridge versions) are taken as before.
    """
    committed: dict[int, TopicPartition] = {}
    try:
        for tp in consumer.committed(partitions, timeout=10):
            committed[tp.partition] = tp
    except KafkaException as e:
        log.warning("reading committed offsets: %s (resuming from the group's offsets)", e)
    starts = []
    for tp in partitions:
        got = committed.get(tp.partition)
        offset = got.offset if got is not None and got.offset >= 0 else OFFSET_STORED
        recorded = position_in_metadata(got.metadata if got is not None else None)
        if offset >= 0 and recorded is not None and position_of is not None:
            position = position_of(tp.partition)
            if recorded > position:
                log.warning(
                    "partition %s[%d]: the group's offset %d was committed at position %d, "
                    "but Postgres holds position %d: reading the partition from its "
                    "beginning so that nothing after %d is skipped",
                    topic,
                    tp.partition,
                    offset,
                    recorded,
                    position,
                    position,
                )
                offset = OFFSET_BEGINNING
        starts.append(TopicPartition(topic, tp.partition, offset))
    return starts


def commit_offsets(
    consumer: Consumer,
    assignment: Assignment,
    *,
    asynchronous: bool,
    only: set[int] | None = None,
) -> None:
    """Commit, for each partition (of ``only``), the offset up to which Postgres has it all.

    A partition holding messages behind a gap, or steps waiting for causal
    dependencies, commits the lowest offset held (with reordering, not the
    lowest id's), so a restart reads them again.
    """
    offsets = []
    for part in assignment.parts.values():
        if only is not None and part.number not in only:
            continue
        held = part.order.held_items()
        if held:
            offset = min(message.offset() or 0 for message, _ in held)
        elif part.last_offset >= 0:
            offset = part.last_offset + 1
        else:
            continue
        if part.causal_held:  # waiting for other partitions: a restart reads them again
            waiting = [getattr(s.source, "kafka_offset", None) for s in part.causal_held]
            if None in waiting:
                continue  # events read from the log wait too: keep the offset where it is
            offset = min(offset, *(o for o in waiting if o is not None))
        if offset > part.resume_offset:
            part.resume_offset = offset
            position = assignment.positions.get(part.tracking_name, 0)
            offsets.append(
                TopicPartition(
                    assignment.topic, part.number, offset, metadata=offset_metadata(position)
                )
            )
    if offsets and asynchronous:
        consumer.commit(offsets=offsets, asynchronous=True)
    elif offsets:
        consumer.commit(offsets=offsets, asynchronous=False)


def lag(consumer: Consumer, assignment: Assignment) -> tuple[int, float]:
    """Messages left to read on the assigned partitions, and the age of the oldest read last.

    From librdkafka's cached watermarks: call it from the consumer's thread only.
    """
    events = 0
    oldest = 0.0
    for part in list(assignment.parts.values()):
        try:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(assignment.topic, part.number), cached=True
            )
        except KafkaException:
            continue
        behind = max(0, high - max(part.resume_offset, part.last_offset + 1, 0))
        if behind > 1:  # 1: the last transaction marker
            events += behind
            if part.last_timestamp:
                oldest = max(oldest, time.time() - part.last_timestamp)
    return events, oldest
