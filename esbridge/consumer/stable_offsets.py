"""How far a partition's last stable offset trails its high watermark: transactions still open.

A ``read_committed`` consumer reads a partition only up to its last stable
offset (LSO): the first offset of the oldest transaction still open. Offsets
between the LSO and the high watermark are written but not readable yet. In a
healthy system the gap opens and closes with each of the relay's transactions
(milliseconds); a transaction left open (a producer hung between its messages
and its commit, until the broker's ``transaction.timeout.ms`` aborts it) pins
the LSO, and every follower of the partition stops with no error and no lag
in its own position: this gap is how to see it.

librdkafka gives both numbers to a ``read_committed`` consumer (measured, and
librdkafka >= 1.7.1 documents it): ``get_watermark_offsets(cached=True)``
returns the high watermark from the last fetch response, while
``cached=False`` asks the partition leader (ListOffsets with the consumer's
isolation level) and returns the LSO. The query is a round trip per partition,
on the consumer's thread, so it runs at most every ``interval`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import Gauge

from esbridge.consumer.state import Assignment

#: Seconds one partition's LSO query may take before it is skipped for this time.
QUERY_TIMEOUT = 1.0


def lso_gap(consumer: Consumer, topic: str, partition: int) -> int | None:
    """High watermark - last stable offset of ``topic[partition]``; None when unknown.

    ``consumer`` must read ``read_committed`` (the consumer adapter's always do).
    The high watermark is the one of librdkafka's last fetch, which may be a
    little older than the LSO just asked: a negative difference is 0.
    """
    tp = TopicPartition(topic, partition)
    try:
        _low, high = consumer.get_watermark_offsets(tp, cached=True)
        _low, stable = consumer.get_watermark_offsets(tp, cached=False, timeout=QUERY_TIMEOUT)
    except KafkaException:
        return None
    if high is None or stable is None or high < 0 or stable < 0:
        return None
    return max(0, high - stable)


class LsoGapProbe:
    """Sets each assigned partition's LSO gap gauge, at most every ``interval()`` seconds."""

    def __init__(self, interval: Callable[[], float], gauge: Callable[[int], Gauge]) -> None:
        self._interval = interval
        self._gauge = gauge
        self._next = 0.0

    def tick(self, consumer: Consumer, assignment: Assignment) -> None:
        """Measure now if the interval passed (call it from the consumer's thread)."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._interval()
        for number in list(assignment.parts):
            gap = lso_gap(consumer, assignment.topic, number)
            if gap is not None:
                self._gauge(number).set(gap)
