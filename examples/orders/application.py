"""The three process applications and their policies.

The policies never call ``save()``: they collect new events on the
``processing_event``, which the runner records atomically with the tracking
record of the upstream event (that is what makes the process reliable).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.application import ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.system import ProcessApplication

from examples.orders.domainmodel import Order, Payment, Reservation


class Orders(ProcessApplication[UUID]):
    def create_new_order(self) -> UUID:
        order = Order()
        self.save(order)
        return order.id

    def create_new_orders(self, count: int) -> list[UUID]:
        """Create ``count`` orders in one save (one transaction): a batch of commands."""
        orders = [Order() for _ in range(count)]
        self.save(*orders)
        return [order.id for order in orders]

    def get_order(self, order_id: UUID) -> Order:
        order: Order = self.repository.get(order_id)
        return order

    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """Other events change nothing."""

    @policy.register(Reservation.Created)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        order = self.get_order(domain_event.order_id)
        order.set_is_reserved(domain_event.originator_id)
        processing_event.collect_events(order)

    @policy.register(Payment.Created)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        order = self.get_order(domain_event.order_id)
        order.set_is_paid(domain_event.originator_id)
        processing_event.collect_events(order)


class Reservations(ProcessApplication[UUID]):
    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """Other events change nothing."""

    @policy.register(Order.Created)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        processing_event.collect_events(Reservation(order_id=domain_event.originator_id))


class Payments(ProcessApplication[UUID]):
    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """Other events change nothing."""

    @policy.register(Order.Reserved)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        processing_event.collect_events(Payment(order_id=domain_event.originator_id))
