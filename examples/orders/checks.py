"""The seed's assertions: a new order ends up reserved and paid, exactly once."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from eventsourcing.system import Runner

from examples.orders.application import Orders, Payments, Reservations
from examples.orders.domainmodel import Payment, Reservation


def check_orders(
    runner: Runner, settle: Callable[[], None] = lambda: None, num_orders: int = 3
) -> list[UUID]:
    orders = runner.get(Orders)
    order_ids = [orders.create_new_order() for _ in range(num_orders)]
    settle()
    for order_id in order_ids:
        order = orders.get_order(order_id)
        assert order.is_reserved
        assert order.is_paid
        assert order.reservation_id is not None and order.payment_id is not None
        # The reservation and the payment are in their own applications,
        # and refer back to the order.
        reservation: Reservation = runner.get(Reservations).repository.get(order.reservation_id)
        payment: Payment = runner.get(Payments).repository.get(order.payment_id)
        assert reservation.order_id == order_id
        assert payment.order_id == order_id
    return order_ids
