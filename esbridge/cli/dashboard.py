"""``esbridge dashboard > esbridge.json``: print the Grafana dashboard of this version.

Import the file in Grafana (Dashboards, New, Import) and pick the Prometheus
data source that scrapes the ``--metrics-port`` of your ``esbridge run``,
``relay`` and ``consume`` processes. Its panels: lag and held gaps per edge,
throughput, latency, parked messages, and which process's relay publishes
each log. Its queries name the metrics this version exports.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from esbridge.cli.common import add_command


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "dashboard", "print the Grafana dashboard (JSON) of esbridge", __doc__
    )
    parser.set_defaults(func=print_dashboard)


def print_dashboard(args: argparse.Namespace) -> int:
    from esbridge.runtime.dashboard import dashboard_text

    sys.stdout.write(dashboard_text())
    return 0
