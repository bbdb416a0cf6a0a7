"""The dog school (a plain application) and the trick counters (a process application)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.system import ProcessApplication

from examples.dogschool.domainmodel import Counter, Dog


class DogSchool(Application[UUID]):
    def register_dog(self, name: str) -> UUID:
        dog = Dog(name)
        self.save(dog)
        return dog.id

    def add_trick(self, dog_id: UUID, trick: str) -> None:
        dog: Dog = self.repository.get(dog_id)
        dog.add_trick(trick=trick)
        self.save(dog)

    def get_dog(self, dog_id: UUID) -> dict[str, Any]:
        dog: Dog = self.repository.get(dog_id)
        return {"name": dog.name, "tricks": tuple(dog.tricks)}


class Counters(ProcessApplication[UUID]):
    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """Default policy: other events change nothing."""

    @policy.register(Dog.TrickAdded)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        trick = domain_event.trick
        try:
            counter: Counter = self.repository.get(Counter.create_id(trick))
        except AggregateNotFoundError:
            counter = Counter(trick)
        counter.increment()
        processing_event.collect_events(counter)

    def get_count(self, trick: str) -> int:
        try:
            counter: Counter = self.repository.get(Counter.create_id(trick))
        except AggregateNotFoundError:
            return 0
        return counter.count
