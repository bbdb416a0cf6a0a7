"""Unit tests of the consumer's pure parts: offsets' metadata, tuning checks, held partitions."""

from __future__ import annotations

import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_STORED

from esbridge.consumer.offsets import (
    describe,
    offset_metadata,
    position_in_metadata,
    resume_offset,
)
from esbridge.consumer.reconcile import PartitionOrder
from esbridge.consumer.state import Assignment, Partition, Tuning
from esbridge.errors import ConfigurationError


def test_offset_metadata_round_trips_and_ignores_foreign_metadata() -> None:
    assert position_in_metadata(offset_metadata(42)) == 42
    assert position_in_metadata(None) is None
    assert position_in_metadata("") is None
    assert position_in_metadata("written by another tool") is None
    assert position_in_metadata("esb_position=x") is None


def test_start_offsets_without_a_committed_offset_read_from_the_beginning() -> None:
    assert resume_offset(7) == 7
    assert resume_offset(OFFSET_STORED) == OFFSET_BEGINNING
    assert describe(OFFSET_STORED) == "none"
    assert describe(OFFSET_BEGINNING) == "none: from the beginning"
    assert describe(7) == 7


def test_tuning_refuses_unknown_keywords_and_verification_without_the_log() -> None:
    assert Tuning.checked({"batch_size": 10}, upstream_log=False).batch_size == 10
    with pytest.raises(ConfigurationError, match="unknown ConsumerAdapter settings"):
        Tuning.checked({"batch_sise": 10}, upstream_log=True)
    with pytest.raises(ConfigurationError, match="verify_messages"):
        Tuning.checked({"verify_messages": True}, upstream_log=False)
    assert Tuning.checked({"verify_messages": True}, upstream_log=True).verify_messages


def test_held_partitions_report_gaps_and_trailing_holds() -> None:
    assignment = Assignment("t", partitions=2)
    gapped = Partition(0, "A#0/2", PartitionOrder(5), resume_offset=0)
    gapped.order.offer(9, 8, "message 9", now=0.0)  # 6..8 missing
    trailing = Partition(1, "A#1/2", PartitionOrder(3), resume_offset=0, trailing=(7, 0.0))
    quiet = Partition(2, "A#2/2", PartitionOrder(1), resume_offset=0)
    assignment.parts.update({0: gapped, 1: trailing, 2: quiet})
    held = {h.partition: h for h in assignment.held()}
    assert set(held) == {0, 1}
    assert held[0].position == 5 and held[0].held_messages == 1
    assert held[1].position == 3 and "up to 7" in held[1].missing


def test_a_single_partition_owns_every_key() -> None:
    one = Assignment("t", partitions=1, partition_of=lambda key: 1)
    part = Partition(0, "A", PartitionOrder(0), resume_offset=0)
    assert one.owns(part, b"anything")
    two = Assignment("t", partitions=2, partition_of=lambda key: len(key) % 2)
    assert two.owns(part, b"ab") and not two.owns(part, b"a")
