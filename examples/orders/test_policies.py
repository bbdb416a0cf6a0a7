"""The seed's way of testing a policy: call it directly, no runner, no database.

The policy is given a real domain event and a ``ProcessingEvent``; the test
looks at what the policy collected. The application uses the default
in-memory (POPO) persistence, so nothing is started.
"""

from __future__ import annotations

from uuid import UUID, uuid4

from eventsourcing.application import ProcessingEvent

from examples.orders.application import Orders, Payments, Reservations
from examples.orders.domainmodel import Order, Payment, Reservation


def test_payments_policy() -> None:
    # A real Order aggregate, reserved: its last event is Order.Reserved.
    order = Order()
    order.set_is_reserved(uuid4())
    reserved = order.collect_events()[-1]
    assert isinstance(reserved, Order.Reserved)

    # Check the policy makes a payment whenever an order is reserved.
    processing_event: ProcessingEvent[UUID] = ProcessingEvent()
    Payments().policy(reserved, processing_event)
    (payment,) = processing_event.aggregates.values()
    assert isinstance(payment, Payment), payment
    assert payment.order_id == order.id
    assert len(processing_event.events) == 1


def test_reservations_policy() -> None:
    order = Order()
    created = order.collect_events()[0]

    processing_event: ProcessingEvent[UUID] = ProcessingEvent()
    Reservations().policy(created, processing_event)
    (reservation,) = processing_event.aggregates.values()
    assert isinstance(reservation, Reservation)
    assert reservation.order_id == order.id


def test_orders_policy() -> None:
    # An order that exists in the Orders application (in memory).
    orders = Orders()
    order_id = orders.create_new_order()

    # Check the order is not reserved.
    assert not orders.get_order(order_id).is_reserved

    # Check the order is set as reserved when a reservation is created for it.
    reservation = Reservation(order_id=order_id)
    processing_event: ProcessingEvent[UUID] = ProcessingEvent()
    orders.policy(reservation.collect_events()[0], processing_event)
    (order,) = processing_event.aggregates.values()
    assert isinstance(order, Order)
    assert order.is_reserved
    assert order.reservation_id == reservation.id
    # Nothing is saved by the policy itself: the runner records what it collected.
    assert not orders.get_order(order_id).is_reserved


def test_other_events_change_nothing() -> None:
    processing_event: ProcessingEvent[UUID] = ProcessingEvent()
    Payments().policy(Order().collect_events()[0], processing_event)
    assert processing_event.events == []
