"""The system definition: ``esbridge run examples.orders.system:system --app Orders``."""

from eventsourcing.system import System

from examples.orders.application import Orders, Payments, Reservations

system = System(pipes=[[Orders, Reservations, Orders, Payments, Orders]])
