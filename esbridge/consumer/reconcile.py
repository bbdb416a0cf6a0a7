"""Per-partition ordering: duplicates, gaps and reordering, from headers and tracking.

Pure logic, no I/O, so every case is unit-tested (``tests/unit/consumer/test_reconcile.py``).

A relay stamps each payload message with ``esb_nid`` (its notification id in
the upstream log) and ``esb_prev_nid`` (the id of the previous message it
published to the same partition). A consumer knows its *position* for the
partition: every upstream notification of this partition with an id at or
below the position has had its effect (committed, or in the batch about to
be committed). With those two numbers each message is one of:

* a **duplicate** (``nid <= position``): already processed; skip and count it;
* **in order** (``prev_nid == position``): the message continues the chain
  exactly where the partition is; process it;
* after a **gap** (``prev_nid > position``): notifications between the
  position and the message are missing (lost, or arriving later: reordered).
  The message is held back until the gap is closed, either by the missing
  messages arriving (reordering) or by reading the missing range from the
  upstream notification log;
* a **broken chain** (``prev_nid < position < nid``, or ``prev_nid >= nid``):
  the message says it follows a notification that this partition has already
  passed, so it does not continue what was processed. A relay never publishes
  that; a foreign producer, a forged or mis-pointed message does. Accepting it
  would move the position to its ``nid`` and turn every genuine event below it
  into a "duplicate": silent loss. So it is never processed on its word: with
  an upstream log it is held and verified against the log like a gap; without
  one it is handed back (:attr:`Offer.broken`) to be parked as foreign, the
  position untouched.

The same rule releases held messages: only an exact continuation of the chain
is released on its own; anything else waits for the log (``verify=True``) or
is handed back as broken.

Because the upstream recorder serialises its writers (ids commit in id
order), once a notification with id ``n`` is visible every id below it is
either committed or rolled back for good: reading the log for a range that
ends at or below the log's highest id is a definitive answer, and absent ids
are genuine gaps to pass over. A message's own ``nid`` proves nothing of the
kind (it may be forged), so the caller bounds every read by the log's highest
id (:meth:`PartitionOrder.filled` takes the bound it actually read to).
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
    BROKEN_CHAIN = "broken_chain"


def classify(position: int, nid: int, prev_nid: int) -> Verdict:
    """Classify one message with notification id ``nid`` and previous id ``prev_nid``."""
    if nid <= position:
        return Verdict.DUPLICATE
    if prev_nid == position:
        return Verdict.IN_ORDER
    if position < prev_nid < nid:
        return Verdict.GAP
    return Verdict.BROKEN_CHAIN


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
    """Result of offering a message: items now ready (in order), duplicates, broken ones.

    ``broken`` holds messages whose chain does not continue from the position
    and that cannot be verified (no upstream log): the caller parks them as
    foreign without moving the position.
    """

    ready: list[tuple[int, T]] = field(default_factory=list)
    duplicates: int = 0
    broken: list[tuple[int, T]] = field(default_factory=list)


class PartitionOrder(Generic[T]):
    """Ordering state of one partition: its position and the messages held behind a gap.

    ``item`` is whatever the caller wants back (the Kafka message); ready items
    are returned with their notification ids, strictly increasing.
    ``verify``: the caller can check messages against the upstream log, so
    messages with a broken chain are held for it (see :meth:`gap`) instead of
    being handed back in :attr:`Offer.broken`.
    """

    def __init__(self, position: int, *, verify: bool = False) -> None:
        self.position = position
        self.verify = verify
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
        message continues the chain exactly (``prev_nid == position``); the
        caller then processes it. False changes nothing: the caller offers the
        message with :meth:`offer`, which handles duplicates, gaps, broken
        chains and held messages.
        """
        if not self._held and prev_nid == self.position < nid:
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
        if verdict is Verdict.BROKEN_CHAIN and not self.verify:
            result.broken.append((nid, item))
            return result
        if verdict is not Verdict.IN_ORDER:  # a gap, or a broken chain the log will check
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

    def take(self, nid: int) -> T:
        """Remove held message ``nid`` (the caller verified it against the log)."""
        return self._held.pop(nid).item

    def filled(self, upto: int) -> Offer[T]:
        """Everything of this partition with id ``<= upto`` has been processed.

        Called after a range was read from the upstream log (and processed, or
        found empty), with ``upto`` no higher than the log's highest id at the
        read. Releases held messages that now continue the chain.
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
            verdict = classify(self.position, nid, held.prev_nid)
            if verdict is Verdict.GAP or (verdict is Verdict.BROKEN_CHAIN and self.verify):
                break
            del self._held[nid]
            if verdict is Verdict.BROKEN_CHAIN:
                result.broken.append((nid, held.item))
                continue
            self.position = nid
            result.ready.append((nid, held.item))
        if not self._held:
            self._gap_since = None
