"""A shop and its invoices: Shop records orders, Invoices issues one invoice per order."""

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, event
from eventsourcing.system import ProcessApplication, System


class Order(Aggregate):
    @event("Placed")
    def __init__(self, customer: str, amount: int) -> None:
        self.customer = customer
        self.amount = amount  # in cents


class Invoice(Aggregate):
    @staticmethod
    def create_id(order_id: UUID) -> UUID:
        """One invoice per order: its id follows from the order's."""
        return uuid5(NAMESPACE_URL, f"/invoices/{order_id}")

    @event("Issued")
    def __init__(self, order_id: UUID, customer: str, amount: int) -> None:
        self.order_id = order_id
        self.customer = customer
        self.amount = amount


class Shop(Application[UUID]):
    def place_order(self, customer: str, amount: int) -> UUID:
        order = Order(customer, amount)
        self.save(order)
        return order.id


class Invoices(ProcessApplication[UUID]):
    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """Events not registered below need no invoice."""

    @policy.register(Order.Placed)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        invoice = Invoice(domain_event.originator_id, domain_event.customer, domain_event.amount)
        processing_event.collect_events(invoice)

    def invoice_for(self, order_id: UUID) -> Invoice:
        invoice: Invoice = self.repository.get(Invoice.create_id(order_id))
        return invoice


system = System(pipes=[[Shop, Invoices]])
