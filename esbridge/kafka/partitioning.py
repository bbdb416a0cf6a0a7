"""Which partition an aggregate's events go to.

The relay needs the partition before it produces (the ``esb_prev_nid`` header
names the previous message on the same partition), and a consumer reconciling
a gap from the notification log must pick the same events, so both compute it
here. It is the Java client's default partitioner (murmur2 of the key bytes,
as librdkafka's ``murmur2_random``), so producers in other languages that key
by the aggregate id agree with it.
"""

from __future__ import annotations

import ctypes
import glob
import os
import uuid
from collections.abc import Callable
from functools import cache


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


def _python_partitioner(num_partitions: int) -> Callable[[bytes], int]:
    return lambda key: partition_for_key(key, num_partitions)


@cache
def _librdkafka_murmur2() -> Callable[..., int] | None:
    """librdkafka's ``rd_kafka_msg_partitioner_murmur2`` through ctypes, if loadable."""
    try:
        import confluent_kafka

        here = os.path.dirname(confluent_kafka.__file__)
        candidates = glob.glob(os.path.join(here, "..", "confluent_kafka.libs", "librdkafka*.so*"))
        candidates += ["librdkafka.so.1"]
        for path in candidates:
            try:
                lib = ctypes.CDLL(path)
                function = lib.rd_kafka_msg_partitioner_murmur2
            except (OSError, AttributeError):
                continue
            # No argtypes: ctypes' default conversions (None -> NULL, bytes ->
            # char *, int -> C int, widened by libffi) cost ~0.4 us less per call;
            # key_partitioner() checks the results against the Python one.
            function.restype = ctypes.c_int32
            return function
    except Exception:  # pragma: no cover - any failure means: use the Python one
        return None
    return None


@cache
def _verified_murmur2(num_partitions: int) -> Callable[..., int] | None:
    """librdkafka's murmur2 partitioner if it agrees with :func:`partition_for_key`."""
    function = _librdkafka_murmur2()
    if function is None:
        return None
    samples = [str(uuid.UUID(int=i * 7919)).encode() for i in range(64)] + [b"", b"a", b"abc"]
    if any(
        function(None, k, len(k), num_partitions, None, None)
        != partition_for_key(k, num_partitions)
        for k in samples
    ):
        return None
    return function


def key_partitioner(num_partitions: int) -> Callable[[bytes], int]:
    """A fast ``key -> partition`` equal to :func:`partition_for_key` for this count."""
    if num_partitions == 1:
        return lambda key: 0
    function = _verified_murmur2(num_partitions)
    if function is None:
        return _python_partitioner(num_partitions)
    return lambda key: function(None, key, len(key), num_partitions, None, None)
