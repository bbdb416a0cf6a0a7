"""Orders, reservations and payments: the seed's system of process applications.

``System(pipes=[[Orders, Reservations, Orders, Payments, Orders]])``: the
reservations and the payments follow the orders, and the orders follow both
(a cycle). A new order gets a reservation, is marked reserved, gets a
payment, and is marked paid.
"""
