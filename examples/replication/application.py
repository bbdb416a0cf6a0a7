"""The original application (with a plain aggregate) and its replica."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.domain import Aggregate, event
from eventsourcing.system import ProcessApplication


class Thing(Aggregate):
    @event("Created")
    def __init__(self, name: str) -> None:
        self.name = name

    @event("Renamed")
    def rename(self, name: str) -> None:
        self.name = name


class Original(Application[UUID]):
    def create_thing(self, name: str) -> UUID:
        thing = Thing(name)
        self.save(thing)
        return thing.id

    def rename_thing(self, thing_id: UUID, name: str) -> None:
        thing: Thing = self.repository.get(thing_id)
        thing.rename(name)
        self.save(thing)


class Replica(ProcessApplication[UUID]):
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        # The copy keeps the originator id and version: the replica's
        # optimistic concurrency control refuses a second copy of an event.
        processing_event.collect_events(domain_event)
