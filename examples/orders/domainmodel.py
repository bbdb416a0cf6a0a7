"""The aggregates: an order (reserved, then paid), a reservation and a payment."""

from __future__ import annotations

from uuid import UUID

from eventsourcing.domain import Aggregate, event


class Order(Aggregate):
    @event("Created")
    def __init__(self) -> None:
        self.is_reserved = False
        self.is_paid = False
        self.reservation_id: UUID | None = None
        self.payment_id: UUID | None = None

    @event("Reserved")
    def set_is_reserved(self, reservation_id: UUID) -> None:
        assert not self.is_reserved, f"Order {self.id} already reserved."
        self.is_reserved = True
        self.reservation_id = reservation_id

    @event("Paid")
    def set_is_paid(self, payment_id: UUID) -> None:
        assert not self.is_paid, f"Order {self.id} already paid."
        self.is_paid = True
        self.payment_id = payment_id


class Reservation(Aggregate):
    @event("Created")
    def __init__(self, order_id: UUID) -> None:
        self.order_id = order_id


class Payment(Aggregate):
    @event("Created")
    def __init__(self, order_id: UUID) -> None:
        self.order_id = order_id
