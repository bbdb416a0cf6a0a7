"""Fetch settings that bound how long one partition waits behind the others.

With a backlog on several partitions, librdkafka's defaults let one fetch
bring up to 1 MB of *compressed* records per partition (tens of thousands of
small messages once decompressed, the relay batches 10,000 messages per lz4
batch) and keep up to 100,000 messages prefetched. The consumer then drains
the partitions nearly one after another: measured with ``bench/fairness.py``,
a partition made no progress for 10 s (plain confluent-kafka consumer, 3 x
100,000 messages) while the others advanced; the wait grows with the backlog.

Smaller fetches per partition interleave the partitions in the prefetch
queue: a partition then waits for about one record batch of each other
partition (the broker always returns a partition's first batch whole, so the
producer's batches are the unit), whatever the backlog.

That holds while every partition is fetched from the start. A partition whose
first fetch comes late (its leader changed, it was just assigned, its events
were only now published) joins the back of the prefetch queue, which the
consumer's partitions share: behind up to ``queued.min.messages`` (100,000 by
default) messages of the others. A slow follower then left one partition
standing for 20 to 55 s after a broker failover (the cluster failover test).
The queue is bounded to 1,000 messages, and a partition that found it full
asks again after 20 ms rather than 1 s (``fetch.queue.backoff.ms``), so the
queue is refilled in turns as it drains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: librdkafka settings the consumer adapter uses unless the user set them.
FAIR_FETCH: dict[str, int] = {
    # Bytes of (compressed) records one fetch takes from one partition (default 1 MB).
    "max.partition.fetch.bytes": 131_072,
    # Messages kept prefetched, for all the consumer's partitions together (default 100,000).
    "queued.min.messages": 1_000,
    # How soon a partition asks again when it found the queue full (default 1 s).
    "fetch.queue.backoff.ms": 20,
}

#: Other names librdkafka accepts for the same settings.
ALIASES: dict[str, tuple[str, ...]] = {
    "max.partition.fetch.bytes": ("fetch.message.max.bytes",),
}


def fair_fetch_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with :data:`FAIR_FETCH` added where neither it nor an alias is set.

    The user's own values (under any of their names) always win.
    """
    result = dict(config)
    for key, value in FAIR_FETCH.items():
        names = (key, *ALIASES.get(key, ()))
        if not any(name in result for name in names):
            result[key] = value
    return result


#: One sample of a draining consumer: (seconds, each partition's consumed position).
Sample = tuple[float, Sequence[int]]


def longest_stalls(samples: Sequence[Sample], ends: Sequence[int]) -> list[float]:
    """Each partition's longest time without progress while it still had a backlog.

    ``samples`` are in time order; ``ends`` are the positions at which each
    partition's backlog is consumed. Counted from the first sample in which any
    partition had moved (joining the group and the first fetch are the same
    for every partition) until the partition reached its end, or the last
    sample if it never did. Used to measure fairness (bench/fairness.py and the
    integration test), not by the consumer itself.
    """
    firsts = samples[0][1] if samples else ()
    started = next((t for t, pos in samples if list(pos) != list(firsts)), None)
    if started is None:
        return [samples[-1][0] - samples[0][0] if samples else 0.0] * len(ends)
    stalls = []
    for p, end in enumerate(ends):
        last_move, last_position, worst = started, firsts[p], 0.0
        for t, positions in samples:
            if t < started:
                continue
            if positions[p] != last_position:
                worst = max(worst, t - last_move)
                last_move, last_position = t, positions[p]
            if positions[p] >= end:
                break
        else:
            worst = max(worst, samples[-1][0] - last_move)
        stalls.append(worst)
    return stalls
