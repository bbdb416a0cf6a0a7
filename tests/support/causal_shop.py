"""A shop whose orders depend on customers registered earlier, for the causal-dependency tests.

``Shop`` registers customers and places orders that name a customer, each in
its own transaction; customer ids are chosen to fall on partition 0 and order
ids on partition 1 of a two-partition topic. ``Fulfilment`` follows the shop:
it keeps a card per customer, and per order whether the customer's card was
there when the order arrived (``customer_known``): an order processed before
its customer is recorded as such, never raised, so a test counts violations
exactly. ``Fulfilment.gate`` (when set) is waited on before a customer is
processed: the test slows partition 0 for as long as it likes; in a
subprocess (``esbridge consume``), ``FULFILMENT_CUSTOMER_DELAY`` seconds are
slept before each customer instead.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, event
from eventsourcing.system import ProcessApplication

from esbridge.kafka.partitioning import partition_for_key

PARTITIONS = 2
CUSTOMERS_PARTITION = 0
ORDERS_PARTITION = 1


class Customer(Aggregate):
    @staticmethod
    def create_id(name: str) -> UUID:
        return id_on(CUSTOMERS_PARTITION, name)

    @event("Registered")
    def __init__(self, name: str) -> None:
        self.name = name


class Order(Aggregate):
    @staticmethod
    def create_id(customer_id: UUID, item: str) -> UUID:
        return id_on(ORDERS_PARTITION, item)

    @event("Placed")
    def __init__(self, customer_id: UUID, item: str) -> None:
        self.customer_id = customer_id
        self.item = item


def id_on(partition: int, label: str) -> UUID:
    """A deterministic aggregate id whose Kafka key falls on ``partition`` (of two)."""
    for salt in range(1000):
        candidate = uuid5(NAMESPACE_URL, f"/shop/{label}/{salt}")
        if partition_for_key(str(candidate).encode(), PARTITIONS) == partition:
            return candidate
    raise AssertionError("no id found")  # pragma: no cover (murmur2 spreads keys)


class Shop(Application[UUID]):
    """Each command is its own transaction: the order commits after its customer."""

    def register(self, i: int) -> UUID:
        customer = Customer(name=f"customer-{i}")
        self.save(customer)
        return customer.id

    def place(self, customer_id: UUID, i: int) -> UUID:
        order = Order(customer_id=customer_id, item=f"item-{i}")
        self.save(order)
        return order.id


class CustomerCard(Aggregate):
    @staticmethod
    def create_id(customer_id: UUID) -> UUID:
        return uuid5(NAMESPACE_URL, f"/card/{customer_id}")

    @event("Created")
    def __init__(self, customer_id: UUID) -> None:
        self.customer_id = customer_id


class OrderCard(Aggregate):
    @staticmethod
    def create_id(order_id: UUID) -> UUID:
        return uuid5(NAMESPACE_URL, f"/order-card/{order_id}")

    @event("Created")
    def __init__(self, order_id: UUID, customer_known: bool) -> None:
        self.order_id = order_id
        self.customer_known = customer_known


class Fulfilment(ProcessApplication[UUID]):
    #: Waited on (up to 60 s) before each customer is processed; None: no wait.
    gate: threading.Event | None = None

    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """Other events change nothing."""

    @policy.register(Customer.Registered)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        gate = Fulfilment.gate
        if gate is not None:
            gate.wait(60)
        time.sleep(float(os.environ.get("FULFILMENT_CUSTOMER_DELAY", "0")))
        processing_event.collect_events(CustomerCard(domain_event.originator_id))

    @policy.register(Order.Placed)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        try:
            self.repository.get(CustomerCard.create_id(domain_event.customer_id))
            known = True
        except AggregateNotFoundError:
            known = False
        processing_event.collect_events(OrderCard(domain_event.originator_id, known))

    def order_cards(self) -> list[tuple[int, bool]]:
        """(notification id, customer known) of each order card, in log order."""
        result = []
        for n in self.recorder.select_notifications(start=1, limit=10**6):
            if n.topic.endswith("OrderCard.Created"):
                card: OrderCard = self.repository.get(n.originator_id)
                result.append((n.id, card.customer_known))
        return result

    def card_topics(self) -> list[str]:
        """The follower's log, as ``customer`` / ``order`` in order."""
        kinds = {"CustomerCard.Created": "customer", "OrderCard.Created": "order"}
        return [
            kinds[n.topic.rsplit(":", 1)[-1]]
            for n in self.recorder.select_notifications(start=1, limit=10**6)
        ]
