"""The repository a policy sees inside a batch (esbridge.processing.batch_repository).

No database: the repository is an in-memory eventsourcing application's
(``POPO`` persistence). ``prefetch`` reads Postgres in one query, so it is
covered by the integration tests; here it only has to do nothing when the
recorder is not a Postgres one.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate, event

from esbridge.processing.batch_repository import BatchRepository, copy_aggregate

# -- copy_aggregate -------------------------------------------------------------------


class Dog(Aggregate):
    @event("Registered")
    def __init__(self, name: str) -> None:
        self.name = name
        self.tricks: list[str] = []
        self.friends: dict[str, Any] = {}
        self.born = datetime(2020, 1, 2, tzinfo=UTC)
        self.owner = UUID(int=7)

    @event("TrickAdded")
    def add_trick(self, trick: str) -> None:
        self.tricks.append(trick)


class Slotted:
    __slots__ = ("value",)

    def __init__(self, value: list[int]) -> None:
        self.value = value


class CustomCopy:
    def __init__(self) -> None:
        self.items = [1]
        self.copied = False

    def __deepcopy__(self, memo: dict[int, Any]) -> CustomCopy:
        new = CustomCopy()
        new.items = list(self.items)
        new.copied = True
        return new


@dataclass
class Plain:
    shared: list[int]
    same: list[int]
    empty: list[int]
    nested: dict[str, list[int]]


def test_copy_aggregate_equals_deepcopy_and_shares_only_immutables() -> None:
    dog = Dog("Fido")
    dog.add_trick("roll over")
    copied = copy_aggregate(dog)
    assert type(copied) is Dog
    assert copied.__dict__ == copy.deepcopy(dog).__dict__
    assert copied.tricks is not dog.tricks
    assert copied.friends is not dog.friends
    assert copied.born is dog.born  # immutable: shared, not rebuilt
    assert copied.owner is dog.owner
    copied.add_trick("sit")
    assert dog.tricks == ["roll over"]
    assert dog.version == 2 and copied.version == 3


def test_copy_aggregate_keeps_shared_references_shared() -> None:
    shared = [1, 2]
    empty: list[int] = []
    original = Plain(shared=shared, same=shared, empty=empty, nested={"a": shared, "e": empty})
    copied = copy_aggregate(original)
    assert copied == original
    assert copied.shared is copied.same is copied.nested["a"]
    assert copied.shared is not shared
    assert copied.empty is copied.nested["e"] and copied.empty is not empty


def test_copy_aggregate_respects_custom_copying() -> None:
    custom = CustomCopy()
    copied = copy_aggregate(custom)
    assert copied.copied is True and copied.items == [1] and copied.items is not custom.items
    slotted = Slotted([1])
    copied_slotted = copy_aggregate(slotted)
    assert copied_slotted.value == [1] and copied_slotted.value is not slotted.value
    assert copy_aggregate((1, [2])) == (1, [2])  # no __dict__: plain deepcopy


# -- BatchRepository ------------------------------------------------------------------


class Kennel(Application[UUID]):
    pass


@pytest.fixture(
    params=[
        {},
        {"AGGREGATE_CACHE_MAXSIZE": "10"},
        {"AGGREGATE_CACHE_MAXSIZE": "10", "AGGREGATE_CACHE_FASTFORWARD": "n"},
    ],
    ids=["no-cache", "cache", "cache-no-fastforward"],
)
def app(request: pytest.FixtureRequest) -> Kennel:
    return Kennel(env={"PERSISTENCE_MODULE": "eventsourcing.popo", **request.param})


def pending_step(*aggregates: Any) -> ProcessingEvent[Any]:
    processing_event: ProcessingEvent[Any] = ProcessingEvent()
    processing_event.collect_events(*aggregates)
    return processing_event


def test_get_reads_through_and_notes_versions(app: Kennel) -> None:
    dog = Dog("Fido")
    dog.add_trick("sit")
    app.save(dog)
    batch = BatchRepository(app.repository)
    got = batch.get(dog.id)
    assert (got.name, got.tricks, got.version) == ("Fido", ["sit"], 2)
    assert batch.reads == {dog.id: 2}
    assert batch.take_requested() == [dog.id]
    assert batch.take_requested() == []


def test_get_of_a_missing_aggregate_notes_version_zero(app: Kennel) -> None:
    batch = BatchRepository(app.repository)
    missing = uuid4()
    with pytest.raises(AggregateNotFoundError):
        batch.get(missing)
    assert batch.reads == {missing: 0}
    assert (missing in batch) is False
    assert batch.take_requested() == [missing, missing]


def test_get_sees_what_earlier_steps_of_the_batch_changed(app: Kennel) -> None:
    dog = Dog("Fido")
    app.save(dog)
    batch = BatchRepository(app.repository)
    step = batch.get(dog.id)
    step.add_trick("sit")
    batch.collect(pending_step(step))
    # Not committed: the real repository still has version 1.
    assert app.repository.get(dog.id).version == 1
    seen = batch.get(dog.id)
    assert (seen.version, seen.tricks) == (2, ["sit"])
    assert seen is not step  # a copy, like the library's cache gives
    assert batch.get(dog.id, version=1).tricks == []
    assert batch.get(dog.id, version=2).tricks == ["sit"]
    assert dog.id in batch
    assert batch.reads == {dog.id: 1}  # only the committed read is noted


def test_aggregate_created_in_the_batch(app: Kennel) -> None:
    batch = BatchRepository(app.repository)
    puppy = Dog("Rex")
    puppy.add_trick("beg")
    batch.collect(pending_step(puppy))
    assert puppy.id in batch
    got = batch.get(puppy.id)
    assert (got.name, got.tricks, got.version) == ("Rex", ["beg"], 2)
    assert batch.get(puppy.id, version=1).tricks == []
    assert batch.reads == {}
    with pytest.raises(AggregateNotFoundError):
        app.repository.get(puppy.id)


def test_prefetch_does_nothing_without_a_postgres_recorder(app: Kennel) -> None:
    dog = Dog("Fido")
    app.save(dog)
    batch = BatchRepository(app.repository)
    assert batch.prefetch([dog.id, uuid4()]) == 0
    assert batch.get(dog.id).name == "Fido"


def test_get_never_hands_out_the_cached_object(app: Kennel) -> None:
    dog = Dog("Fido")
    app.save(dog)
    batch = BatchRepository(app.repository, fill_lock=threading.Lock())
    first = batch.get(dog.id)
    first.add_trick("sit")  # a step mutating what it got, not yet saved
    assert batch.get(dog.id).tricks == []
    assert app.repository.get(dog.id).tricks == []


def test_other_attributes_come_from_the_real_repository(app: Kennel) -> None:
    batch = BatchRepository(app.repository)
    assert batch.event_store is app.repository.event_store
    assert batch.cache is app.repository.cache
