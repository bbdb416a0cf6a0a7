"""Applications and helpers for the consumer adapter's integration tests.

``Mirror`` follows the dog school and keeps, per dog, the list of its tricks in
the order the events were applied. Comparing each mirror with its dog proves
that every upstream event had exactly one effect, in per-aggregate order.
``Fragile`` is a mirror whose policy raises on the trick ``"poison"`` until
``Fragile.healed`` is set (poison-message tests).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from confluent_kafka import Producer
from eventsourcing.application import ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import Notification
from eventsourcing.system import ProcessApplication

from esbridge.kafka.partitioning import partition_for_key
from esbridge.wire.encoding import PayloadEncoder
from examples.dogschool.application import DogSchool
from examples.dogschool.domainmodel import Dog


class DogMirror(Aggregate):
    @staticmethod
    def create_id(dog_id: UUID) -> UUID:
        return uuid5(NAMESPACE_URL, f"/mirror/{dog_id}")

    @event("Created")
    def __init__(self, dog_id: UUID, name: str) -> None:
        self.dog_id = dog_id
        self.name = name
        self.tricks: list[str] = []

    @event("Copied")
    def copy(self, trick: str) -> None:
        self.tricks.append(trick)


class Mirror(ProcessApplication[UUID]):
    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """Other events change nothing."""

    @policy.register(Dog.Registered)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        mirror = DogMirror(domain_event.originator_id, domain_event.name)
        processing_event.collect_events(mirror)

    @policy.register(Dog.TrickAdded)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        self.check(domain_event)
        mirror: DogMirror = self.repository.get(DogMirror.create_id(domain_event.originator_id))
        mirror.copy(domain_event.trick)
        processing_event.collect_events(mirror)

    def check(self, domain_event: Any) -> None:
        """Hook for subclasses that fail on purpose."""

    def tricks(self, dog_id: UUID) -> list[str]:
        mirror: DogMirror = self.repository.get(DogMirror.create_id(dog_id))
        return list(mirror.tricks)


class Fragile(Mirror):
    healed = False
    #: When the policy met "poison" (monotonic clock): the attempts, for backoff tests.
    poison_attempts: list[float] = []

    def check(self, domain_event: Any) -> None:
        if domain_event.trick == "poison" and not Fragile.healed:
            Fragile.poison_attempts.append(time.monotonic())
            raise ValueError("cannot learn poison")


def populate(
    school: DogSchool, dogs: int, tricks_per_dog: int, *, seed: int = 1, chunk: int = 200
) -> list[UUID]:
    """Register ``dogs`` dogs and teach each ``tricks_per_dog`` tricks, interleaved.

    Saves many aggregates per call (one transaction each) so large logs build fast.
    """
    rng = random.Random(seed)
    ids: list[UUID] = []
    for start in range(0, dogs, chunk):
        batch = [Dog(f"dog-{i}") for i in range(start, min(dogs, start + chunk))]
        school.save(*batch)
        ids.extend(d.id for d in batch)
    for round_ in range(tricks_per_dog):
        order = list(ids)
        rng.shuffle(order)
        for start in range(0, len(order), chunk):
            batch = [school.repository.get(i) for i in order[start : start + chunk]]
            for dog in batch:
                dog.add_trick(trick=f"trick-{round_}-{rng.randrange(50)}")
            school.save(*batch)
    return ids


def verify_mirror(school: DogSchool, mirror: Mirror, dog_ids: Iterable[UUID]) -> None:
    """Every dog's tricks were applied to its mirror exactly once and in order."""
    for dog_id in dog_ids:
        dog = school.get_dog(dog_id)
        assert mirror.tricks(dog_id) == list(dog["tricks"]), dog_id


def verify_logs(school: DogSchool, mirror: Mirror) -> int:
    """Every dog's tricks were applied to its mirror exactly once and in order; the dog count.

    The bulk form of :func:`verify_mirror` for large logs: it reads both
    notification logs in one pass each (not two aggregates per dog) and
    compares, dog by dog, the upstream ``TrickAdded`` tricks in version order
    with the mirror's ``Copied`` tricks in version order. Both streams must
    have contiguous versions from 1 (no event lost or recorded twice).
    """
    dogs = _streams(school, "Dog.Registered", "Dog.TrickAdded")
    mirrors = _streams(mirror, "DogMirror.Created", "DogMirror.Copied")
    by_dog = {created.dog_id: (created, copied) for created, copied in mirrors.values()}
    assert len(by_dog) == len(mirrors), "two mirrors of one dog"
    assert by_dog.keys() == dogs.keys(), "mirrors missing or extra"
    for dog_id, (registered, tricks) in dogs.items():
        created, copied = by_dog[dog_id]
        assert (created.name, copied) == (registered.name, tricks), dog_id
    return len(dogs)


def partition_targets(school: DogSchool, partitions: int) -> list[int]:
    """The last notification id of each partition (where each tracking position must end)."""
    last = [0] * partitions
    for n in school.recorder.select_notifications(start=1, limit=10**7):
        last[partition_for_key(str(n.originator_id).encode(), partitions)] = n.id
    return last


def count_notifications(app: Any) -> int:
    """How many notifications ``app``'s log holds.

    Not ``max_notification_id()``: a rolled-back transaction (a consumer killed
    mid-batch, a batch retried after a conflict, a Postgres restart) burns ids
    of the sequence and leaves a permanent gap.
    """
    count, start = 0, 1
    while page := app.recorder.select_notifications(start=start, limit=5000):
        count += len(page)
        start = page[-1].id + 1
    return count


def _streams(app: Any, created: str, changed: str) -> dict[UUID, tuple[Any, list[str]]]:
    """Each aggregate's creation event and the tricks of its change events, by version.

    Event classes are matched by qualified name: a consumer subprocess may have
    imported this module under another name (``consumer_apps``), so its topics
    resolve to other class objects.
    """
    streams: dict[UUID, tuple[Any, list[str]]] = {}
    versions: dict[UUID, int] = {}
    start = 1
    while True:
        page = app.recorder.select_notifications(start=start, limit=5000)
        if not page:
            return streams
        for note in page:
            domain_event: Any = app.mapper.to_domain_event(note)
            aggregate_id = domain_event.originator_id
            version = domain_event.originator_version
            kind = type(domain_event).__qualname__
            if kind == created:
                assert aggregate_id not in streams and version == 1, domain_event
                streams[aggregate_id] = (domain_event, [])
            else:
                assert kind == changed, domain_event
                assert version == versions[aggregate_id] + 1, domain_event
                streams[aggregate_id][1].append(domain_event.trick)
            versions[aggregate_id] = version
        start = page[-1].id + 1


def notifications(school: DogSchool) -> list[Notification]:
    return list(school.recorder.select_notifications(start=1, limit=10**7))


class ManualPublisher:
    """Publishes notifications in esbridge's format v1 *as told*: for fault injection.

    Unlike the relay it lets a test send duplicates, skip messages or reorder them.
    """

    def __init__(self, kafka_config: dict[str, Any], topic: str, app: str, partitions: int):
        self.topic = topic
        self.encoder = PayloadEncoder(app, partitions)
        self.last = [0] * partitions
        self.producer = Producer({**kafka_config, "enable.idempotence": True, "linger.ms": 5})

    def messages(
        self, notes: Sequence[Notification]
    ) -> list[tuple[bytes, bytes, list[tuple[str, bytes]], int]]:
        """Encode ``notes`` in log order (the ``esb_prev_nid`` chain as a relay builds it)."""
        return [self.encoder.message(n, self.last) for n in notes]

    def send(self, messages: Iterable[tuple[bytes, bytes, list[tuple[str, bytes]], int]]) -> None:
        for key, value, headers, partition in messages:
            self.producer.produce(
                self.topic, key=key, value=value, headers=headers, partition=partition
            )
            self.producer.poll(0)
        assert self.producer.flush(30) == 0

    def send_raw(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        self.producer.produce(self.topic, key=key, value=value, headers=headers, partition=0)
        assert self.producer.flush(30) == 0
