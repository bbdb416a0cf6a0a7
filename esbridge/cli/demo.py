"""``esbridge demo``: the orders system in one OS process per application (``make demo``).

Starts a local PostgreSQL and Kafka (the test harness's provisioning),
runs Orders, Reservations and Payments each in its own ``esbridge run``
process, submits a stream of orders and reports orders processed, orders/s,
min/mean/max order processing time (created -> paid), the exactly-once check
and the lag of every edge; then stops everything.
"""

from __future__ import annotations

import argparse
from typing import Any

from esbridge.cli.common import add_command


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "demo",
        "run the orders/reservations/payments system across OS processes",
        __doc__,
    )
    parser.add_argument("--orders", type=int, default=1000, help="orders to submit (default 1000)")
    parser.add_argument(
        "--partitions", type=int, default=1, help="partitions per topic (default 1)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes per application, sharing the partitions (default 1)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="orders submitted per second (default 0: as fast as possible)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=10,
        help="orders created per transaction by the submitter (default 10)",
    )
    parser.add_argument(
        "--mode",
        choices=["payloads", "prompts"],
        default="payloads",
        help="relays publish the events themselves, or prompts to pull them (default payloads)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="give up after this many seconds"
    )
    parser.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    from esbridge.demo import DemoOptions, run_demo

    report = run_demo(
        DemoOptions(
            orders=args.orders,
            partitions=args.partitions,
            rate=args.rate,
            mode=args.mode,
            workers=args.workers,
            timeout=args.timeout,
            batch=args.batch,
        )
    )
    return 1 if report.effects.problems() else 0
