"""How far a partition's last stable offset trails its high watermark: transactions still open.

A ``read_committed`` consumer reads a partition only up to its last stable
offset (LSO): the first offset of the oldest transaction still open. Offsets
between the LSO and the high watermark are written but not readable yet. In a
healthy system the gap opens and closes with each of the relay's transactions
(milliseconds); a transaction left open (a producer hung between its messages
and its commit, until the broker's ``transaction.timeout.ms`` aborts it) pins
the LSO, and every follower of the partition waits with no error and no lag
in its own position: this gap is how to see it.

Both offsets come from the admin client's ``list_offsets`` (``OffsetSpec.latest()``),
asked at the same moment with each isolation level: ``READ_COMMITTED`` answers
the LSO, ``READ_UNCOMMITTED`` the high watermark. Not from the consumer's own
``get_watermark_offsets(cached=False)``, which answers the LSO too: that call
blocks the consumer's thread, and its request waits on the broker connection
behind the consumer's fetch long-poll (measured: 340 ms in ``bench/consume.py``,
a tenth of the run). The admin client has its own connection and answers with
futures, collected at a later round; so the query costs the consumer nothing
and runs at most every ``interval`` seconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any

from confluent_kafka import IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from prometheus_client import Gauge

from esbridge.kafka.topics import kafka_admin

#: Seconds the broker may take to answer; a query not answered is dropped.
REQUEST_TIMEOUT = 10.0

#: One query in flight: partition -> (high watermark future, LSO future).
Pending = dict[int, tuple[Future[Any], Future[Any]]]


class LsoGapProbe:
    """Sets each assigned partition's LSO gap gauge, at most every ``interval()`` seconds."""

    def __init__(
        self,
        kafka_config: Mapping[str, Any],
        interval: Callable[[], float],
        gauge: Callable[[int], Gauge],
    ) -> None:
        self._config = kafka_config
        self._interval = interval
        self._gauge = gauge
        self._next = 0.0
        self._pending: Pending | None = None
        self._admin: AdminClient | None = None
        self._exit = contextlib.ExitStack()

    def tick(self, topic: str, partitions: Iterable[int]) -> None:
        """Record an answered query; ask again if the interval passed. Never waits."""
        pending = self._pending
        if pending is not None:
            if not all(high.done() and stable.done() for high, stable in pending.values()):
                return
            self._pending = None
            self._record(pending)
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._interval()
        numbers = list(partitions)
        if numbers:
            self._pending = self._ask(topic, numbers)

    def close(self) -> None:
        """Drop the admin client (handing over its log lines); a later tick makes a new one."""
        self._pending, self._admin = None, None
        self._exit.close()

    def _ask(self, topic: str, numbers: list[int]) -> Pending | None:
        if self._admin is None:
            self._admin = self._exit.enter_context(kafka_admin(self._config))
        admin = self._admin

        def latest(level: IsolationLevel) -> dict[TopicPartition, Future[Any]]:
            request = {TopicPartition(topic, n): OffsetSpec.latest() for n in numbers}
            futures: dict[TopicPartition, Future[Any]] = admin.list_offsets(
                request, isolation_level=level, request_timeout=REQUEST_TIMEOUT
            )
            return futures

        try:
            high = latest(IsolationLevel.READ_UNCOMMITTED)
            stable = latest(IsolationLevel.READ_COMMITTED)
        except KafkaException:
            return None  # asked again after the interval
        by_number = {tp.partition: future for tp, future in stable.items()}
        return {tp.partition: (f, by_number[tp.partition]) for tp, f in high.items()}

    def _record(self, pending: Pending) -> None:
        for number, (high, stable) in pending.items():
            try:
                watermark, last_stable = high.result().offset, stable.result().offset
            except KafkaException:
                continue  # a partition the broker could not answer for: kept as it was
            if watermark >= 0 and last_stable >= 0:
                self._gauge(number).set(max(0, watermark - last_stable))
