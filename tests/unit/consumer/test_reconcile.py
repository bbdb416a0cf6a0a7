"""Per-partition ordering (esbridge.consumer.reconcile): every verdict, exactly.

Plain objects only: the items are strings naming the message, so each test
reads as "these messages arrived, these came out, in this order".
"""

from __future__ import annotations

import pytest

from esbridge.consumer.reconcile import Gap, Offer, PartitionOrder, Verdict, classify

# -- classify -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position", "nid", "prev_nid", "verdict"),
    [
        # nid at or below the position: already processed, whatever prev_nid says
        (10, 10, 7, Verdict.DUPLICATE),
        (10, 3, 2, Verdict.DUPLICATE),
        (10, 10, 10, Verdict.DUPLICATE),
        (10, 5, 99, Verdict.DUPLICATE),
        (0, 0, 0, Verdict.DUPLICATE),
        # prev_nid is exactly the position: continues the chain
        (10, 11, 10, Verdict.IN_ORDER),
        (10, 500, 10, Verdict.IN_ORDER),  # ids need not be contiguous
        (0, 1, 0, Verdict.IN_ORDER),
        # position < prev_nid < nid: something between is missing
        (10, 13, 12, Verdict.GAP),
        (10, 13, 11, Verdict.GAP),
        (0, 7, 6, Verdict.GAP),
        # prev_nid < position < nid: says it follows something already passed
        (10, 13, 9, Verdict.BROKEN_CHAIN),
        (10, 11, 0, Verdict.BROKEN_CHAIN),
        # prev_nid >= nid: a chain cannot point forward or to itself
        (10, 13, 13, Verdict.BROKEN_CHAIN),
        (10, 13, 20, Verdict.BROKEN_CHAIN),
        (0, 5, 5, Verdict.BROKEN_CHAIN),
    ],
)
def test_classify(position: int, nid: int, prev_nid: int, verdict: Verdict) -> None:
    assert classify(position, nid, prev_nid) is verdict


def test_verdict_values() -> None:
    # The values appear in logs and metrics labels.
    assert [v.value for v in Verdict] == ["duplicate", "in_order", "gap", "broken_chain"]


# -- Gap ------------------------------------------------------------------------------


def test_gap_range_and_description() -> None:
    gap = Gap(after=10, before=14, since=1.5)
    assert (gap.first_missing, gap.last_missing) == (11, 13)
    assert gap.describe() == "notification ids 11..13"
    assert Gap(after=10, before=12, since=0.0).describe() == "notification id 11"


# -- in order -------------------------------------------------------------------------


def test_in_order_messages_are_ready_one_by_one() -> None:
    order: PartitionOrder[str] = PartitionOrder(0)
    assert order.offer(1, 0, "m1", now=1.0) == Offer(ready=[(1, "m1")])
    assert order.offer(4, 1, "m4", now=2.0) == Offer(ready=[(4, "m4")])
    assert order.position == 4
    assert order.held_count == 0
    assert order.gap() is None


def test_advance_takes_only_the_exact_next_message() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    assert order.advance(12, 10) is True
    assert order.position == 12
    assert order.advance(12, 10) is False  # a duplicate: offer() decides
    assert order.advance(15, 13) is False  # a gap
    assert order.advance(15, 9) is False  # a broken chain
    assert order.advance(12, 12) is False  # prev_nid == position but nid not above it
    assert order.position == 12
    assert order.held_count == 0


def test_advance_refuses_while_messages_are_held() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    order.offer(14, 12, "m14", now=1.0)
    assert order.advance(12, 10) is False  # offer() must release m14 after it
    assert order.position == 10
    assert order.offer(12, 10, "m12", now=2.0) == Offer(ready=[(12, "m12"), (14, "m14")])


# -- duplicates -----------------------------------------------------------------------


def test_duplicates_are_counted_and_change_nothing() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    assert order.offer(10, 8, "again", now=1.0) == Offer(duplicates=1)
    assert order.offer(3, 0, "old", now=1.0) == Offer(duplicates=1)
    assert order.position == 10
    assert order.held_count == 0


def test_a_held_message_offered_again_is_a_duplicate() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    assert order.offer(14, 12, "first", now=1.0) == Offer()
    assert order.offer(14, 12, "second", now=2.0) == Offer(duplicates=1)
    assert order.held_items() == ["first"]


def test_held_messages_the_log_already_covered_are_dropped_as_duplicates() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    order.offer(14, 12, "m14", now=1.0)
    order.offer(16, 14, "m16", now=1.0)
    # The log was read (and processed) up to 15: m14 was in it.
    # m16 does not continue from 15 (its prev is 14 < 15 < 16): a broken
    # chain, handed back because this partition cannot verify.
    assert order.filled(15) == Offer(duplicates=1, broken=[(16, "m16")])
    assert order.position == 15
    assert order.held_count == 0


def test_held_messages_the_log_covered_in_verify_mode() -> None:
    order: PartitionOrder[str] = PartitionOrder(10, verify=True)
    order.offer(14, 12, "m14", now=1.0)
    order.offer(16, 14, "m16", now=1.0)
    assert order.filled(15) == Offer(duplicates=1)
    assert order.held_items() == ["m16"]  # still to be checked against the log
    assert order.gap() == Gap(after=15, before=16, since=1.0)


# -- gaps and reordering --------------------------------------------------------------


def test_a_gap_holds_the_message_and_reports_the_missing_range() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    assert order.offer(14, 12, "m14", now=5.0) == Offer()
    assert order.position == 10
    assert order.held_count == 1
    assert order.held_items() == ["m14"]
    assert order.gap() == Gap(after=10, before=14, since=5.0)


def test_reordered_messages_are_released_in_chain_order() -> None:
    order: PartitionOrder[str] = PartitionOrder(0)
    assert order.offer(5, 3, "m5", now=1.0) == Offer()
    assert order.offer(3, 2, "m3", now=2.0) == Offer()
    assert order.held_items() == ["m3", "m5"]
    assert order.gap() == Gap(after=0, before=3, since=1.0)  # age of the first hold
    assert order.offer(2, 0, "m2", now=3.0) == Offer(ready=[(2, "m2"), (3, "m3"), (5, "m5")])
    assert order.position == 5
    assert order.gap() is None


def test_release_stops_at_the_next_gap_whose_age_starts_then() -> None:
    order: PartitionOrder[str] = PartitionOrder(0)
    order.offer(2, 1, "m2", now=1.0)
    order.offer(6, 4, "m6", now=2.0)
    assert order.offer(1, 0, "m1", now=7.0) == Offer(ready=[(1, "m1"), (2, "m2")])
    assert order.position == 2
    assert order.held_items() == ["m6"]
    assert order.gap() == Gap(after=2, before=6, since=7.0)


def test_filled_closes_a_gap_from_the_log() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    order.offer(14, 12, "m14", now=1.0)
    order.offer(15, 14, "m15", now=1.0)
    # The caller read ids 11..12 from the log (processed what it found).
    assert order.filled(12) == Offer(ready=[(14, "m14"), (15, "m15")])
    assert order.position == 15
    assert order.held_count == 0
    assert order.gap() is None


def test_filled_below_the_gap_leaves_it_open() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    order.offer(14, 12, "m14", now=1.0)
    assert order.filled(11) == Offer()
    assert order.position == 11
    assert order.gap() == Gap(after=11, before=14, since=1.0)


def test_filled_never_moves_the_position_back() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    assert order.filled(4) == Offer()
    assert order.position == 10


def test_take_removes_a_verified_message() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    order.offer(14, 12, "m14", now=1.0)
    order.offer(16, 14, "m16", now=1.0)
    assert order.take(14) == "m14"
    assert order.held_items() == ["m16"]
    with pytest.raises(KeyError):
        order.take(14)


# -- broken chains --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nid", "prev_nid"),
    [
        (13, 9),  # prev_nid < position < nid
        (11, 0),  # prev_nid < position < nid
        (13, 13),  # prev_nid == nid
        (13, 20),  # prev_nid > nid
    ],
)
def test_broken_chain_without_a_log_is_handed_back(nid: int, prev_nid: int) -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    assert order.offer(nid, prev_nid, "foreign", now=1.0) == Offer(broken=[(nid, "foreign")])
    assert order.position == 10  # untouched: genuine events below nid stay unprocessed
    assert order.held_count == 0
    assert order.gap() is None


@pytest.mark.parametrize(("nid", "prev_nid"), [(13, 9), (11, 0), (13, 13), (13, 20)])
def test_broken_chain_with_a_log_is_held_for_verification(nid: int, prev_nid: int) -> None:
    order: PartitionOrder[str] = PartitionOrder(10, verify=True)
    assert order.offer(nid, prev_nid, "suspect", now=4.0) == Offer()
    assert order.position == 10
    assert order.held_items() == ["suspect"]
    assert order.gap() == Gap(after=10, before=nid, since=4.0)


def test_held_broken_chain_is_handed_back_on_release_without_a_log() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    order.offer(14, 12, "m14", now=1.0)
    order.offer(16, 13, "m16", now=1.0)  # a gap now (10 < 13 < 16), broken once at 14
    assert order.offer(12, 10, "m12", now=2.0) == Offer(
        ready=[(12, "m12"), (14, "m14")], broken=[(16, "m16")]
    )
    assert order.position == 14
    assert order.held_count == 0
    assert order.gap() is None


def test_held_broken_chain_keeps_waiting_for_the_log_in_verify_mode() -> None:
    order: PartitionOrder[str] = PartitionOrder(10, verify=True)
    order.offer(14, 12, "m14", now=1.0)
    order.offer(16, 13, "m16", now=1.0)
    assert order.offer(12, 10, "m12", now=2.0) == Offer(ready=[(12, "m12"), (14, "m14")])
    assert order.position == 14
    assert order.held_items() == ["m16"]
    assert order.gap() == Gap(after=14, before=16, since=2.0)
    # The caller checks m16 against the log, takes it, and fills up to it.
    assert order.take(16) == "m16"
    assert order.filled(16) == Offer()
    assert order.position == 16
    assert order.gap() is None


def test_verify_mode_handles_ordinary_messages_alike() -> None:
    order: PartitionOrder[str] = PartitionOrder(0, verify=True)
    assert order.offer(1, 0, "m1", now=1.0) == Offer(ready=[(1, "m1")])
    assert order.offer(1, 0, "m1", now=1.0) == Offer(duplicates=1)
    assert order.offer(3, 2, "m3", now=1.0) == Offer()
    assert order.offer(2, 1, "m2", now=1.0) == Offer(ready=[(2, "m2"), (3, "m3")])


def test_ready_ids_strictly_increase_through_a_shuffle() -> None:
    # A chain 0 -> 2 -> 3 -> 7 -> 8 -> 11, offered in a scrambled order.
    chain = [(2, 0), (3, 2), (7, 3), (8, 7), (11, 8)]
    order: PartitionOrder[int] = PartitionOrder(0)
    ready: list[int] = []
    for nid, prev in [chain[3], chain[1], chain[4], chain[0], chain[2]]:
        result = order.offer(nid, prev, nid, now=0.0)
        assert not result.broken
        ready += [n for n, _ in result.ready]
    assert ready == [2, 3, 7, 8, 11]
    assert order.position == 11
