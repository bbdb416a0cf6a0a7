"""Where Kafka puts a transactional id's or a group's coordinator, computed as Kafka does."""

from __future__ import annotations

from esbridge.testing.kafka_cluster import coordinator_partition, java_string_hash


def test_java_string_hash_matches_java() -> None:
    # Values of java.lang.String.hashCode().
    assert java_string_hash("") == 0
    assert java_string_hash("hello") == 99162322
    assert java_string_hash("Hello, World") == -505841268
    assert java_string_hash("polygenelubricants") == -(2**31)
    assert java_string_hash("\U0001f600") == 1772899  # two UTF-16 code units


def test_coordinator_partition_is_kafkas_abs_hash_modulo() -> None:
    assert coordinator_partition("hello", 50) == 99162322 % 50
    assert coordinator_partition("Hello, World", 3) == 505841268 % 3
    assert coordinator_partition("polygenelubricants", 7) == 0  # Utils.abs(MIN_VALUE) == 0
