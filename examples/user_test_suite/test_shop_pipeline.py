"""Orders -> relay -> Kafka -> consumer -> Stock, on real servers (testcontainers)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from examples.user_test_suite.shop import Orders, Stock


def wait_for(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the pipeline did not catch up in time"
        time.sleep(0.1)


def place_many(orders: Orders, items: list[str], rounds: int) -> dict[str, list[UUID]]:
    placed: dict[str, list[UUID]] = {item: [] for item in items}
    for n in range(rounds):
        for item in items:
            placed[item].append(orders.place(item, quantity=n + 1))
    return placed


def test_orders_reach_stock_exactly_once(orders: Orders, stock: Stock, pipeline: Any) -> None:
    placed = place_many(orders, ["pen", "ink", "paper"], rounds=10)
    wait_for(lambda: all(stock.taken(i)[0] == 55 for i in placed))
    for item, ids in placed.items():
        taken, order_ids = stock.taken(item)
        assert taken == 55  # 1 + 2 + ... + 10
        # Each order taken exactly once (orders of one item may interleave across partitions).
        assert sorted(order_ids) == sorted(ids)


def test_broker_restart_loses_and_repeats_nothing(
    orders: Orders, stock: Stock, pipeline: Any, kafka_broker: Any
) -> None:
    before = place_many(orders, ["pen", "ink"], rounds=5)
    wait_for(lambda: all(stock.taken(i)[0] == 15 for i in before))

    kafka_broker.restart(kill=True)  # a crash: SIGKILL, then the same broker comes back
    after = place_many(orders, ["pen", "ink"], rounds=5)

    wait_for(lambda: all(stock.taken(i)[0] == 30 for i in before), timeout=120)
    time.sleep(2)  # anything published twice would show up now
    for item in before:
        taken, order_ids = stock.taken(item)
        assert taken == 30
        assert sorted(order_ids) == sorted(before[item] + after[item])
