"""Partitioning (esbridge.kafka.partitioning) agrees with Kafka's Java client.

The expected hashes are the published test vectors of the two reference
implementations, not values computed here:

* Apache Kafka, ``clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java``
  (``testMurmur2``), for ``org.apache.kafka.common.utils.Utils.murmur2``;
* librdkafka, ``src/rdmurmur2.c`` (``unittest_murmur2``, ``java_murmur2_results``),
  which checks its own murmur2 against the Java client's.

Java returns a signed ``int``; :func:`murmur2` returns the same 32 bits unsigned.
"""

from __future__ import annotations

import uuid

import pytest

from esbridge.kafka import partitioning
from esbridge.kafka.partitioning import key_partitioner, murmur2, partition_for_key

KAFKA_UTILS_TEST = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]

LIBRDKAFKA_UNITTEST = [
    (b"kafka", 0xD067CF64),
    (b"giberish123456789", 0x8F552B0C),
    (b"1234", 0x9FC97B14),
    (b"234", 0xE7C009CA),
    (b"34", 0x873930DA),
    (b"4", 0x5A4B5CA1),
    (b"PreAmbleWillBeRemoved,ThePrePartThatIs", 0x78424F1C),
    (b"reAmbleWillBeRemoved,ThePrePartThatIs", 0x4A62B377),
    (b"eAmbleWillBeRemoved,ThePrePartThatIs", 0xE0E4E09E),
    (b"AmbleWillBeRemoved,ThePrePartThatIs", 0x62B8B43F),
    (b"", 0x106E08D9),
]

# Keys as the relay makes them (canonical UUID text), and odd lengths for the tail cases.
KEYS = [str(uuid.UUID(int=i * 104729 + 17)).encode() for i in range(300)] + [
    b"",
    b"a",
    b"ab",
    b"abc",
    b"abcd",
    b"abcde",
    bytes(range(256)),
    "ünïcødé".encode(),
]
PARTITION_COUNTS = [1, 2, 3, 5, 6, 7, 12, 16, 31, 64, 100, 1000]


@pytest.mark.parametrize(("key", "java_int"), KAFKA_UTILS_TEST + LIBRDKAFKA_UNITTEST)
def test_murmur2_matches_the_reference_vectors(key: bytes, java_int: int) -> None:
    assert murmur2(key) == java_int & 0xFFFFFFFF


def test_murmur2_is_32_bit_unsigned() -> None:
    assert all(0 <= murmur2(key) <= 0xFFFFFFFF for key in KEYS)


@pytest.mark.parametrize(("key", "java_int"), KAFKA_UTILS_TEST + LIBRDKAFKA_UNITTEST)
def test_partition_for_key_is_the_java_default_partitioner(key: bytes, java_int: int) -> None:
    # Java: Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions
    for count in PARTITION_COUNTS:
        assert partition_for_key(key, count) == (java_int & 0x7FFFFFFF) % count


def test_partition_for_key_range_and_stability() -> None:
    for count in PARTITION_COUNTS:
        partitions = [partition_for_key(key, count) for key in KEYS]
        assert all(0 <= p < count for p in partitions)
        assert partitions == [partition_for_key(key, count) for key in KEYS]
    assert {partition_for_key(key, 1) for key in KEYS} == {0}


def test_partition_for_key_spreads_uuid_keys() -> None:
    counts = [0] * 6
    for key in KEYS[:300]:
        counts[partition_for_key(key, 6)] += 1
    assert min(counts) > 0


@pytest.mark.parametrize("count", [0, -1])
def test_partition_for_key_refuses_fewer_than_one_partition(count: int) -> None:
    with pytest.raises(ValueError, match=r"^num_partitions must be at least 1$"):
        partition_for_key(b"k", count)


@pytest.mark.parametrize("count", PARTITION_COUNTS)
def test_key_partitioner_equals_partition_for_key(count: int) -> None:
    partition_of = key_partitioner(count)
    assert [partition_of(key) for key in KEYS] == [partition_for_key(key, count) for key in KEYS]


@pytest.mark.parametrize("count", PARTITION_COUNTS[1:])
def test_librdkafka_murmur2_partitioner_agrees_when_available(count: int) -> None:
    """The ctypes path, checked directly (key_partitioner would silently fall back)."""
    function = partitioning._librdkafka_murmur2()
    if function is None:
        pytest.skip("librdkafka's rd_kafka_msg_partitioner_murmur2 is not loadable here")
    for key in KEYS:
        assert function(None, key, len(key), count, None, None) == partition_for_key(key, count)
    assert partitioning._verified_murmur2(count) is function


def test_python_partitioner_equals_partition_for_key() -> None:
    partition_of = partitioning._python_partitioner(7)
    assert [partition_of(key) for key in KEYS] == [partition_for_key(key, 7) for key in KEYS]
