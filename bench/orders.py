"""Orders/s end to end (created -> paid) for the orders/reservations/payments system.

esbridge: each application in its own OS process (``esbridge run --app NAME``),
connected through Kafka. Baseline, in the same run and on the same Postgres
server (another database): the same System under the library's own
``MultiThreadedRunner``. Both get the same stream of orders (``--batch``
orders created per transaction, as fast as the Orders application takes them);
the rate is measured from the orders' own event timestamps (first created ->
last paid), like the seed's multiprocessing example. Several runs each; the
median is reported, with p50/p99 of the order processing time (created -> paid).

    python bench/orders.py [--orders 2000] [--baseline-orders 150] [--runs 3]
                           [--mode payloads|prompts|both] [--partitions N --workers N]
                           [--no-cache] [--relay-set NAME=VALUE ...]

Both runners get the same application settings. By default that includes the
library's aggregate cache for Orders (``ORDERS_AGGREGATE_CACHE_MAXSIZE``, with
``ORDERS_AGGREGATE_CACHE_FASTFORWARD=n``): the Orders policy reads the order it
updates once per event, and the cache serves the read of an order this process
wrote last (the "paid" step) from memory. Fast-forward off is sound here because
each order is changed once by each of two events that are causally ordered (paid
only after reserved), so a cached order is never stale when it is read; a stale
read would anyway fail on the version's unique constraint, never record twice
(esbridge then drops it from the cache and runs the batch again).
``--no-cache`` measures without it. The "reserved" step reads orders that the
submitting process created, which no cache holds: esbridge's consumer learns
that ``Reservation.Created.order_id`` names the order its policy reads and reads
a whole batch's orders in one query (see ``esbridge.processing.concurrent_batches``).

To see where a worker's time goes, set ``ESBRIDGE_PROFILE_DIR`` in the
environment: every relay and consumer thread of the worker processes then runs
under cProfile and writes ``{pid}-{kind}-{leader}-{follower}.prof`` there when it
stops (read with ``python -m pstats``).

Servers: started here through ``esbridge.testing.make_postgres/make_kafka`` (fsync
on), or external ones named by ``ESBRIDGE_POSTGRES_DSN`` / ``ESBRIDGE_KAFKA_BOOTSTRAP``
(see ``esbridge.testing.backends``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventsourcing.system import MultiThreadedRunner

from esbridge.testing import make_kafka, make_postgres
from examples.orders.application import Orders
from examples.orders.demo import (
    SystemProcesses,
    Timings,
    count_effects,
    drive_orders,
    order_timings,
    paid_counter,
)
from examples.orders.system import system

#: The library's aggregate cache for the Orders application (see the module docstring).
ORDERS_CACHE = {
    "ORDERS_AGGREGATE_CACHE_MAXSIZE": "100000",
    "ORDERS_AGGREGATE_CACHE_FASTFORWARD": "n",
}


def measure(
    orders: Any, env: dict[str, str], count: int, runs: int, batch: int, timeout: float, tick: Any
) -> tuple[list[Timings], list[Any]]:
    """``runs`` batches of ``count`` orders through a running system; their timings."""
    paid = paid_counter(env)
    try:
        drive_orders(orders, paid, batch, batch=batch, timeout=timeout, on_tick=tick)  # warm-up
        results, all_ids = [], []
        for _ in range(runs):
            ids = drive_orders(orders, paid, count, batch=batch, timeout=timeout, on_tick=tick)
            results.append(order_timings(orders, ids))
            all_ids.extend(ids)
        return results, all_ids
    finally:
        paid.close()


def summary(name: str, results: list[Timings]) -> tuple[float, float, float]:
    rates = [t.rate for t in results]
    p50 = statistics.median(t.percentile(50) for t in results)
    p99 = statistics.median(t.percentile(99) for t in results)
    rate = statistics.median(rates)
    print(
        f"{name}: {rate:8.1f} orders/s (median of {len(rates)} runs: "
        f"{', '.join(f'{r:.1f}' for r in rates)}); created->paid p50 {p50 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms ({results[0].count} orders per run)"
    )
    return rate, p50, p99


def check_exactly_once(env: dict[str, str], ids: list[Any], name: str) -> None:
    problems = count_effects(env, ids).problems()
    if problems:
        raise SystemExit(f"{name}: EXACTLY-ONCE VIOLATED: {'; '.join(problems)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=2000, help="orders per esbridge run")
    parser.add_argument(
        "--baseline-orders", type=int, default=150, help="orders per MultiThreadedRunner run"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=10, help="orders created per transaction")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="processes per application")
    parser.add_argument(
        "--mode",
        choices=["payloads", "prompts", "both"],
        default="both",
        help="relay mode(s) measured (default both)",
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--relay-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="relay tuning of the esbridge workers (esbridge run --relay-set), e.g. linger=0.05",
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="no aggregate cache for Orders (in both runners)",
    )
    args = parser.parse_args(argv)
    settings = {} if args.no_cache else ORDERS_CACHE

    print("starting PostgreSQL (fsync on) and Kafka ...", flush=True)
    postgres = make_postgres(fsync=True)
    kafka = make_kafka()
    try:
        print(f"  {postgres.describe()}\n  {kafka.describe()}", flush=True)
        modes = ["payloads", "prompts"] if args.mode == "both" else [args.mode]
        esb: dict[str, list[Timings]] = {}
        for mode in modes:
            esb_env = {**postgres.create_database().env, **settings}
            with SystemProcesses(
                esb_env,
                kafka.config(),
                partitions=args.partitions,
                mode=mode,
                workers=args.workers,
                relay_settings=args.relay_set,
            ) as processes:
                orders = Orders(env=processes.env)
                try:
                    started = time.monotonic()
                    esb[mode], esb_ids = measure(
                        orders,
                        processes.env,
                        args.orders,
                        args.runs,
                        args.batch,
                        args.timeout,
                        processes.poll,
                    )
                    print(
                        f"  (esbridge {mode} runs took {time.monotonic() - started:.1f} s)",
                        flush=True,
                    )
                finally:
                    orders.close()
            check_exactly_once(processes.env, esb_ids, f"esbridge ({mode})")

        lib_env = {**postgres.create_database().env, **settings}
        runner: MultiThreadedRunner[Any] = MultiThreadedRunner(system, env=lib_env)
        with runner:
            lib_orders = runner.get(Orders)
            noop: Callable[[], None] = lambda: None  # noqa: E731
            lib, lib_ids = measure(
                lib_orders,
                lib_env,
                args.baseline_orders,
                args.runs,
                args.batch,
                args.timeout,
                noop,
            )
        check_exactly_once(lib_env, lib_ids, "MultiThreadedRunner")

        print()
        print(
            f"orders system, created -> paid, {args.partitions} partition(s), "
            f"{args.workers} worker process(es) per application, orders created {args.batch} "
            "per transaction; Orders aggregate cache "
            f"{'off' if args.no_cache else 'on'} in both runners; every order reserved and "
            "paid exactly once in every run"
        )
        lib_rate, _, _ = summary("eventsourcing MultiThreadedRunner          ", lib)
        for mode in modes:
            label = "1 OS process" if args.workers == 1 else f"{args.workers} OS processes"
            rate, _, _ = summary(f"esbridge, {label} per app, {mode:9s}  ", esb[mode])
            print(f"  ratio ({mode}): {rate / lib_rate:.1f}x")
        return 0
    finally:
        kafka.close()
        postgres.close()


if __name__ == "__main__":
    sys.exit(main())
