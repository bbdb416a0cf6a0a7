"""Several threads applying batches to one follower at the same time, safely.

A follower that follows several leaders (Orders follows Reservations and
Payments) has one consumer adapter per leader, each in its own thread. The
library serialises them on the follower's ``processing_lock`` for the whole
of ``process_event`` (policy, aggregate reads, write). esbridge lets the
policies of two batches run at the same time and serialises only the write,
with optimistic concurrency control:

* :class:`RepositorySwitch` is installed once as the follower's repository:
  each thread sees its own batch overlay (``follower.repository`` inside a
  policy), every other thread the real repository;
* :class:`CommitLog` remembers which aggregate versions the batches of this
  process committed. A batch notes what it read; before it is written (under
  the processing lock) it is checked against what was committed since it
  started. A batch that read an aggregate which changed meanwhile is run
  again from the start, recording nothing; one that writes a version another
  process wrote fails on the recorder's unique ``(originator_id, version)``
  constraint in the same transaction as its tracking record, and is run
  again too. Either way each upstream event's effect is recorded once;
* :class:`LearnedHints` learns which attribute of an upstream event names the
  aggregate its policy reads (``Reservation.Created.order_id`` → the order),
  so later batches read all of them in one query (a hint: wrong or missing
  hints cost speed only).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Learn from at most this many attributes of an event (events are small records).
MAX_HINT_ATTRIBUTES = 64
#: Steps of one event class after which a hint the policy mostly ignores is switched off.
HINT_WINDOW = 50


class RepositorySwitch:
    """The follower's repository, as seen from each thread.

    A thread inside a batch (:meth:`activate`) sees its batch overlay; any
    other thread sees the real repository, never another thread's
    uncommitted batch.
    """

    def __init__(self, base: Any) -> None:
        self.base = base
        self._local = threading.local()

    def current(self) -> Any:
        overlay = getattr(self._local, "overlay", None)
        return self.base if overlay is None else overlay

    def activate(self, overlay: Any) -> None:
        self._local.overlay = overlay

    def deactivate(self) -> None:
        self._local.overlay = None

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self.current().get(*args, **kwargs)

    def __contains__(self, aggregate_id: Any) -> bool:
        return aggregate_id in self.current()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current(), name)


class CommitLog:
    """Which aggregate versions batches of one follower committed, for optimistic checks.

    A batch takes a ticket when it starts (:meth:`begin`), and before its
    write asks :meth:`conflict` whether a batch committed since then wrote a
    version newer than one it read. Entries older than every running batch
    are dropped, so the log stays as small as the overlap between batches.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._tickets = itertools.count(1)
        self._seq = 0
        self._commits: list[tuple[int, dict[Any, int]]] = []
        self._active: dict[int, int] = {}  # ticket -> commit sequence number at its start

    def begin(self) -> int:
        with self._guard:
            ticket = next(self._tickets)
            self._active[ticket] = self._seq
            return ticket

    def end(self, ticket: int) -> None:
        with self._guard:
            self._active.pop(ticket, None)
            self._prune()

    def conflict(self, ticket: int, reads: Mapping[Any, int]) -> Any | None:
        """An aggregate id read (at the version given) that a later commit changed, or None."""
        if not reads:
            return None
        with self._guard:
            start = self._active.get(ticket, self._seq)
            commits = [written for seq, written in self._commits if seq > start]
        for written in commits:
            for aggregate_id, version in reads.items():
                if written.get(aggregate_id, 0) > version:
                    return aggregate_id
        return None

    def committed(self, events: Iterable[Any]) -> None:
        """Note the versions a batch just committed (call under the follower's lock)."""
        written: dict[Any, int] = {}
        for event in events:
            written[event.originator_id] = event.originator_version
        with self._guard:
            self._seq += 1
            if self._active and written:
                self._commits.append((self._seq, written))
            self._prune()

    def _prune(self) -> None:
        oldest = min(self._active.values(), default=self._seq)
        if self._commits and self._commits[0][0] <= oldest:
            self._commits = [c for c in self._commits if c[0] > oldest]

    def __len__(self) -> int:
        return len(self._commits)


class LearnedHints:
    """For each upstream event class, the attributes whose values the policy gets by id.

    ``learn(event, ids)`` after each policy call, with the ids it passed to
    ``repository.get``; ``ids(event)`` gives the values of the learned
    attributes of a new event: the aggregates to read in advance. A hint
    that the policy mostly does not use (it reads conditionally) is switched
    off, and on again if it becomes right: reading unused aggregates would
    cost more than it saves.
    """

    def __init__(self) -> None:
        self._attributes: dict[type, tuple[str, ...]] = {}
        self._score: dict[type, list[int]] = {}  # [hinted steps, steps that used the hint]

    def learn(self, event: Any, requested: Sequence[Any]) -> None:
        kind = type(event)
        names = self._attributes.get(kind)
        if names is not None:
            score = self._score[kind]
            score[0] += 1
            if requested and any(getattr(event, n, None) in requested for n in names):
                score[1] += 1
            if score[0] >= HINT_WINDOW * 2:  # forget old history slowly
                score[0] //= 2
                score[1] //= 2
        if requested:
            self._learn(event, requested)

    def _learn(self, event: Any, requested: Sequence[Any]) -> None:
        attributes = getattr(event, "__dict__", None)
        if not attributes or len(attributes) > MAX_HINT_ATTRIBUTES:
            return
        wanted = set()
        kinds = set()
        for aggregate_id in requested:
            try:
                wanted.add(aggregate_id)
            except TypeError:  # unhashable: never a cache key either
                continue
            kinds.add(type(aggregate_id))
        if not wanted:
            return
        known = self._attributes.get(type(event), ())
        found = []
        for name, value in attributes.items():
            if type(value) in kinds and name not in known:
                try:
                    if value in wanted:
                        found.append(name)
                except TypeError:  # an unhashable value of a hashable id's type (a tuple)
                    continue
        if found:
            self._attributes[type(event)] = (*known, *found)
            self._score.setdefault(type(event), [0, 0])

    def forget(self, events: Iterable[Any]) -> None:
        """Drop what was learned for these events' classes (their hints did not work)."""
        for event in events:
            self._attributes.pop(type(event), None)
            self._score.pop(type(event), None)

    def ids(self, event: Any) -> list[Any]:
        kind = type(event)
        names = self._attributes.get(kind)
        if not names:
            return []
        hinted, used = self._score[kind]
        if hinted >= HINT_WINDOW and used * 2 < hinted:
            return []  # mostly unused: not worth reading in advance
        return [v for v in (getattr(event, n, None) for n in names) if v is not None]


class FollowerBatches:
    """What the threads applying batches to one follower share."""

    def __init__(self, follower: Any) -> None:
        repository = follower._repository
        if not isinstance(repository, RepositorySwitch):
            repository = RepositorySwitch(repository)
            follower._repository = repository
        self.switch: RepositorySwitch = repository
        self.log = CommitLog()
        self.hints = LearnedHints()


_shared: weakref.WeakKeyDictionary[Any, FollowerBatches] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def follower_batches(follower: Any) -> FollowerBatches:
    """The :class:`FollowerBatches` of ``follower`` (made and installed on first use)."""
    with _shared_lock:
        batches = _shared.get(follower)
        if batches is None:
            batches = FollowerBatches(follower)
            _shared[follower] = batches
        return batches
