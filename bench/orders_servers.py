"""Orders/s of the orders system with one shared Postgres server vs a server per application.

The orders/reservations/payments system, each application in its own OS process
(``esbridge run --app NAME``), measured twice in the same invocation as
``bench/orders.py`` measures it (the same stream of orders, the rate from the
orders' own event timestamps, first created -> last paid, median of ``--runs``):

* **shared**: the three applications' databases in one Postgres server;
* **separate**: each application in a Postgres server of its own, each worker
  given only its own server's settings, every follower reading its leaders' logs
  over HTTP from one ``esbridge serve-log`` per application with a token of its
  own (``esbridge run --upstream-url``; docs/remote-log.md), as services that own
  their databases are deployed.

It prints both rates and their ratio. Which layout goes first alternates per
mode, so that a drift of the machine's load favours neither.

    python bench/orders_servers.py [--orders 2000] [--runs 3] [--mode payloads|prompts|both]
                                   [--no-cache]

Servers: started here through ``esbridge.testing.make_postgres/make_kafka`` (fsync on).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.orders import ORDERS_CACHE, check_exactly_once, measure, summary
from esbridge.testing import make_kafka, make_postgres
from examples.orders.application import Orders
from examples.orders.demo import SystemProcesses, Timings

#: The applications given a server of their own (Orders uses the first server).
OWN_SERVERS = ("Reservations", "Payments")


def run_processes(
    args: argparse.Namespace,
    env: dict[str, str],
    kafka: Any,
    mode: str,
    databases: dict[str, dict[str, str]] | None = None,
) -> list[Timings]:
    """The system in OS processes (``databases``: one per application), ``args.runs`` times."""
    with SystemProcesses(
        env,
        kafka.config(),
        partitions=args.partitions,
        mode=mode,
        workers=args.workers,
        relay_settings=args.relay_set,
        databases=databases,
    ) as processes:
        orders = Orders(env=processes.env)
        try:
            started = time.monotonic()
            results, ids = measure(
                orders,
                processes.env,
                args.orders,
                args.runs,
                args.batch,
                args.timeout,
                processes.poll,
            )
            where = "shared server" if databases is None else "separate servers"
            print(
                f"  (esbridge {mode}, {where}: runs took {time.monotonic() - started:.1f} s)",
                flush=True,
            )
        finally:
            orders.close()
    check_exactly_once(processes.env, ids, f"esbridge ({mode})")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=2000, help="orders per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per layout and mode")
    parser.add_argument("--mode", choices=["payloads", "prompts", "both"], default="both")
    parser.add_argument("--no-cache", action="store_true", help="no aggregate cache for Orders")
    # As bench/orders.py's defaults: 1 partition, 1 worker, 10 orders a transaction.
    parser.set_defaults(partitions=1, workers=1, batch=10, timeout=120.0, relay_set=[])
    args = parser.parse_args(argv)
    settings = {} if args.no_cache else dict(ORDERS_CACHE)
    modes = ["payloads", "prompts"] if args.mode == "both" else [args.mode]

    print("starting PostgreSQL servers (fsync on) and Kafka ...", flush=True)
    postgres = make_postgres(fsync=True)
    own = {app: make_postgres(fsync=True) for app in OWN_SERVERS}
    kafka = make_kafka()
    try:
        for server in (postgres, *own.values(), kafka):
            print(f"  {server.describe()}", flush=True)
        shared: dict[str, list[Timings]] = {}
        separate: dict[str, list[Timings]] = {}
        for index, mode in enumerate(modes):
            databases = {"Orders": dict(postgres.create_database().env)}
            databases.update({app: dict(s.create_database().env) for app, s in own.items()})
            one_server = {**postgres.create_database().env, **settings}
            for variant in ("shared", "separate") if index % 2 == 0 else ("separate", "shared"):
                if variant == "shared":
                    shared[mode] = run_processes(args, one_server, kafka, mode)
                else:
                    separate[mode] = run_processes(args, dict(settings), kafka, mode, databases)
        print()
        print(
            f"orders system, created -> paid, {args.partitions} partition(s), "
            f"{args.workers} worker process(es) per application, orders created {args.batch} "
            f"per transaction; Orders aggregate cache {'off' if args.no_cache else 'on'}; "
            "separate: a Postgres server per application, logs read over HTTP (esbridge "
            "serve-log, one per application); every order reserved and paid exactly once "
            "in every run"
        )
        for mode in modes:
            one, _, _ = summary(f"esbridge {mode:9s}, one shared server   ", shared[mode])
            each, _, _ = summary(f"esbridge {mode:9s}, a server per app    ", separate[mode])
            print(f"  ratio separate/shared ({mode}): {each / one:.2f}x")
        return 0
    finally:
        kafka.close()
        for server in own.values():
            server.close()
        postgres.close()


if __name__ == "__main__":
    sys.exit(main())
