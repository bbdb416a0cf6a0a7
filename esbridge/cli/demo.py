"""``esbridge demo``: the orders system in one OS process per application (``make demo``).

Starts a local PostgreSQL and Kafka (the test harness's provisioning),
runs Orders, Reservations and Payments each in its own ``esbridge run``
process, submits a stream of orders and reports orders processed, orders/s,
min/mean/max order processing time (created -> paid), the exactly-once check
and the lag of every edge; then stops everything.

The demo is example code, ``examples/orders/demo.py`` in the source tree, not
part of the installed package: run it from a source checkout (``make demo``),
or give the checkout with ``--app-dir``.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

import esbridge
from esbridge.cli.common import add_command, use_app_dir
from esbridge.errors import ConfigurationError

DEMO_MODULE = "examples.orders.demo"


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
    parser.add_argument(
        "--app-dir",
        help="the esbridge source checkout that holds examples/ "
        "(default: the one esbridge is imported from)",
    )
    parser.set_defaults(func=demo)


def demo_module(app_dir: str | None) -> Any:
    """``examples.orders.demo`` from ``app_dir``, else from the checkout esbridge runs from.

    A wheel install has no ``examples/`` beside the package: say so instead of
    failing on an import error.
    """
    root = Path(app_dir) if app_dir else Path(esbridge.__file__).resolve().parents[1]
    if not (root / "examples" / "orders" / "demo.py").is_file():
        raise ConfigurationError(
            f"esbridge demo runs examples/orders/demo.py from the esbridge source tree, and "
            f"{root} has none: run it from a source checkout (make demo), or pass the "
            "checkout's directory with --app-dir"
        )
    use_app_dir(str(root))
    return importlib.import_module(DEMO_MODULE)


def demo(args: argparse.Namespace) -> int:
    example = demo_module(args.app_dir)
    report = example.run_demo(
        example.DemoOptions(
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
