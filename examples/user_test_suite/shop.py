"""The user's own code under test: an order desk and a stock keeper that follows it.

``Orders`` is a plain event-sourced application; ``Stock`` is a process
application whose policy takes items off the shelf for each order. In
production a relay publishes ``Orders``' log to Kafka and a consumer feeds
``Stock`` from that topic; the tests in this directory do exactly that.
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, event
from eventsourcing.system import ProcessApplication


class Order(Aggregate):
    @event("Placed")
    def __init__(self, item: str, quantity: int) -> None:
        self.item = item
        self.quantity = quantity


class Shelf(Aggregate):
    """How many of one item have been taken (one shelf per item, id derived from the name)."""

    @staticmethod
    def create_id(item: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/shelves/{item}")

    @event("Opened")
    def __init__(self, item: str) -> None:
        self.item = item
        self.taken = 0
        self.orders: list[UUID] = []

    @event("Taken")
    def take(self, order_id: UUID, quantity: int) -> None:
        self.taken += quantity
        self.orders.append(order_id)


class Orders(Application[UUID]):
    def place(self, item: str, quantity: int) -> UUID:
        order = Order(item, quantity)
        self.save(order)
        return order.id


class Stock(ProcessApplication[UUID]):
    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """Other events change nothing."""

    @policy.register(Order.Placed)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        try:
            shelf: Shelf = self.repository.get(Shelf.create_id(domain_event.item))
        except AggregateNotFoundError:
            shelf = Shelf(domain_event.item)
        shelf.take(domain_event.originator_id, domain_event.quantity)
        processing_event.collect_events(shelf)

    def taken(self, item: str) -> tuple[int, list[UUID]]:
        """Items taken and the orders that took them, in the order they were processed."""
        try:
            shelf: Shelf = self.repository.get(Shelf.create_id(item))
        except AggregateNotFoundError:
            return 0, []
        return shelf.taken, list(shelf.orders)
