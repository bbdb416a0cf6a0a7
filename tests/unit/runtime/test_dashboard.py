"""The shipped Grafana dashboard, and the PromQL reader that finds the metrics it queries."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from esbridge.runtime.dashboard import (
    DASHBOARD_FILE,
    Selector,
    dashboard,
    dashboard_text,
    expressions,
    grouping_labels,
    selectors,
)

ROOT = Path(__file__).resolve().parents[3]


def test_reads_metric_names_not_functions_keywords_labels_or_durations() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, app) (rate(a_bucket{x="1", y=~"a,}"}[5m])))'
        " / on (x) group_left (z) b offset 5m"
        ' + ignoring(q) {__name__="c", k!=""} > bool 0.5'
        " and sum without (w) (d[1h30m:1m]) or max(e_total)"
    )
    assert selectors(expr) == [
        Selector("a_bucket", frozenset({"x", "y"})),
        Selector("b", frozenset()),
        Selector("c", frozenset({"k"})),
        Selector("d", frozenset()),
        Selector("e_total", frozenset()),
    ]
    assert grouping_labels(expr) == {"le", "app", "x", "z", "q", "w"}


def test_a_selector_it_cannot_read_is_an_error_not_a_silent_miss() -> None:
    with pytest.raises(ValueError, match="cannot read the label matchers"):
        selectors("a{x}")
    with pytest.raises(ValueError, match="without a metric name"):
        selectors('{job="x"}')


def test_the_dashboard_queries_esbridge_metrics_in_every_panel() -> None:
    board = dashboard()
    titles = [p["title"] for p in board["panels"] if p["type"] != "row"]
    assert len(set(titles)) == len(titles)
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)
    queries = list(expressions(board))
    assert {t for t, _ in queries} == set(titles)  # no panel without a query
    for title, expr in queries:
        names = [s.metric for s in selectors(expr)]
        assert names and all(n.startswith("esbridge_") for n in names), (title, expr)
    metrics = {s.metric for _, e in queries for s in selectors(e)}
    for wanted in (
        "esbridge_consumer_lag_events",
        "esbridge_consumer_held_partitions",
        "esbridge_relay_published_total",
        "esbridge_consumer_processed_total",
        "esbridge_consumer_dead_letters",
        "esbridge_relay_active",
        "esbridge_end_to_end_latency_seconds_bucket",
    ):
        assert wanted in metrics


def test_the_dashboard_is_package_data_and_the_command_prints_it() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    assert DASHBOARD_FILE == "dashboards/esbridge.json"
    assert "dashboards/*.json" in package_data["esbridge.runtime"]
    esbridge = Path(sys.executable).parent / "esbridge"
    done = subprocess.run([esbridge, "dashboard"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == dashboard_text()
    assert json.loads(done.stdout)["title"] == "esbridge"
