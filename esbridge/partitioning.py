"""Which partition an aggregate's events go to.

The relay needs the partition before it produces (the ``esb_prev_nid`` header
names the previous message on the same partition), and a consumer reconciling
a gap from the notification log must pick the same events, so both compute it
here. It is the Java client's default partitioner (murmur2 of the key bytes,
as librdkafka's ``murmur2_random``), so producers in other languages that key
by the aggregate id agree with it.
"""

from __future__ import annotations


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (as ``org.apache.kafka.common.utils.Utils.murmur2``)."""
    length = len(data)
    seed = 0x9747B28C
    m = 0x5BD1E995
    r = 24
    h = (seed ^ length) & 0xFFFFFFFF
    length4 = length // 4
    for i in range(length4):
        i4 = i * 4
        k = (
            (data[i4 + 0] & 0xFF)
            + ((data[i4 + 1] & 0xFF) << 8)
            + ((data[i4 + 2] & 0xFF) << 16)
            + ((data[i4 + 3] & 0xFF) << 24)
        )
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    extra = length % 4
    index = length & ~3
    if extra == 3:
        h ^= (data[index + 2] & 0xFF) << 16
    if extra >= 2:
        h ^= (data[index + 1] & 0xFF) << 8
    if extra >= 1:
        h ^= data[index] & 0xFF
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_for_key(key: bytes, num_partitions: int) -> int:
    """The partition of ``key`` on a topic with ``num_partitions`` partitions."""
    if num_partitions < 1:
        raise ValueError("num_partitions must be at least 1")
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions
