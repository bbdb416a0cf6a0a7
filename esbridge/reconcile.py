"""Per-partition ordering: duplicates, gaps and reordering, from headers and tracking.

Pure logic, no I/O, so every case is unit-tested (``tests/unit/test_reconcile.py``).

A relay stamps each payload message with ``esb_nid`` (its notification id in
the upstream log) and ``esb_prev_nid`` (the id of the previous message it
published to the same partition). A consumer knows its *position* for the
partition: every upstream notification of this partition with an id at or
below the position has had its effect (committed, or in the batch about to
be committed). With those two numbers each message is one of:

* a **duplicate** (``nid <= position``): already processed; skip and count it;
* **in order** (``prev_nid <= position``): nothing of this partition is
  missing between the position and the message; process it;
* after a **gap** (``prev_nid > position``): notifications between the
  position and the message are missing (lost, or arriving later: reordered).
  The message is held back until the gap is closed, either by the missing
  messages arriving (reordering) or by reading the missing range from the
  upstream notification log (:meth:`PartitionOrder.filled`).

Because the upstream recorder serialises its writers (ids commit in id
order), once a notification with id ``nid`` is visible every id below it is
either committed or rolled back for good: reading the log for the range
``(position, nid)`` is a definitive answer, and absent ids are genuine gaps to
pass over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T")


class Verdict(Enum):
    """What a message is, relative to the partition's position."""

    DUPLICATE = "duplicate"
    IN_ORDER = "in_order"
    GAP = "gap"


def classify(position: int, nid: int, prev_nid: int) -> Verdict:
    """Classify one message with notification id ``nid`` and previous id ``prev_nid``."""
    if nid <= position:
        return Verdict.DUPLICATE
    if prev_nid <= position:
        return Verdict.IN_ORDER
    return Verdict.GAP


@dataclass(frozen=True)
class Gap:
    """Notifications with ids strictly between ``after`` and ``before`` may be missing."""

    after: int
    before: int
    since: float

    @property
    def first_missing(self) -> int:
        return self.after + 1

    @property
    def last_missing(self) -> int:
        return self.before - 1

    def describe(self) -> str:
        """The missing range in words, for error messages and logs."""
        if self.first_missing == self.last_missing:
            return f"notification id {self.first_missing}"
        return f"notification ids {self.first_missing}..{self.last_missing}"


@dataclass
class _Held(Generic[T]):
    prev_nid: int
    item: T


@dataclass
class Offer(Generic[T]):
    """Result of offering one message: items now ready (in order) and duplicates seen."""

    ready: list[tuple[int, T]] = field(default_factory=list)
    duplicates: int = 0


class PartitionOrder(Generic[T]):
    """Ordering state of one partition: its position and the messages held behind a gap.

    ``item`` is whatever the caller wants back (the Kafka message); ready items
    are returned with their notification ids, strictly increasing.
    """

    def __init__(self, position: int) -> None:
        self.position = position
        self._held: dict[int, _Held[T]] = {}
        self._gap_since: float | None = None

    @property
    def held_count(self) -> int:
        return len(self._held)

    def held_items(self) -> list[T]:
        """Items held back, in notification id order."""
        return [self._held[nid].item for nid in sorted(self._held)]

    def advance(self, nid: int, prev_nid: int) -> bool:
        """The common case, without allocating: True when the message is next in order.

        True (and the position moves to ``nid``) when nothing is held and the
        message is in order; the caller then processes it. False changes
        nothing: the caller offers the message with :meth:`offer`, which
        handles duplicates, gaps and held messages.
        """
        if not self._held and prev_nid <= self.position < nid:
            self.position = nid
            return True
        return False

    def offer(self, nid: int, prev_nid: int, item: T, now: float) -> Offer[T]:
        """Offer a message; returns what became ready (possibly held items too)."""
        result: Offer[T] = Offer()
        if nid in self._held:
            result.duplicates += 1
            return result
        verdict = classify(self.position, nid, prev_nid)
        if verdict is Verdict.DUPLICATE:
            result.duplicates += 1
            return result
        if verdict is Verdict.GAP:
            self._held[nid] = _Held(prev_nid, item)
            if self._gap_since is None:
                self._gap_since = now
            return result
        self.position = nid
        result.ready.append((nid, item))
        self._release(result)
        if self._held:
            self._gap_since = now  # a new gap: its age starts now
        return result

    def gap(self) -> Gap | None:
        """The current gap (missing ids before the lowest held message), if any."""
        if not self._held:
            return None
        before = min(self._held)
        return Gap(after=self.position, before=before, since=self._gap_since or 0.0)

    def filled(self, upto: int) -> Offer[T]:
        """Everything of this partition with id ``<= upto`` has been processed.

        Called after the missing range was read from the upstream log (and
        processed, or found empty). Releases held messages that are now in order.
        """
        result: Offer[T] = Offer()
        if upto > self.position:
            self.position = upto
        self._release(result)
        return result

    def _release(self, result: Offer[T]) -> None:
        while self._held:
            nid = min(self._held)
            held = self._held[nid]
            if nid <= self.position:
                del self._held[nid]
                result.duplicates += 1
                continue
            if held.prev_nid > self.position:
                break
            del self._held[nid]
            self.position = nid
            result.ready.append((nid, held.item))
        if not self._held:
            self._gap_since = None
