"""Every metric and label the shipped Grafana dashboard queries is in what esbridge exports.

A real ``esbridge run`` (a relay and a consumer, one process) works through a
few events against the real Postgres and Kafka; its ``/metrics`` is scraped
over HTTP and parsed with prometheus_client's own parser, and the dashboard's
PromQL is read with :func:`esbridge.runtime.dashboard.selectors`. A renamed
metric or label fails here, not on an operator's screen.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from esbridge.runtime.dashboard import (
    dashboard,
    expressions,
    grouping_labels,
    selectors,
    variable_selectors,
)
from esbridge.testing.servers import free_port, unique_name
from examples.dogschool.application import DogSchool
from examples.dogschool.domainmodel import Dog
from tests.support.relay_support import ESBRIDGE, ROOT, subprocess_env

#: Labels Prometheus adds to every series it scrapes (the target's), never in /metrics.
TARGET_LABELS = frozenset({"instance", "job"})

EVENTS = 30


def scrape(port: int) -> dict[str, set[str]]:
    """Sample name → the label names its samples carry, from ``/metrics`` on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def wait_for_processed(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            text = ""
        for family in text_string_to_metric_families(text):
            if family.name == "esbridge_consumer_processed" and any(
                s.name.endswith("_total") and s.value >= EVENTS for s in family.samples
            ):
                return
        time.sleep(0.3)


def test_every_metric_and_label_the_dashboard_queries_is_exported(
    postgres_db: Any, kafka_broker: Any, tmp_path: Path
) -> None:
    school = DogSchool(env=postgres_db.env)
    school.save(*(Dog(f"dog {i}") for i in range(EVENTS)))
    school.close()
    port = free_port()
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                ESBRIDGE,
                "run",
                "examples.dogschool.system:system",
                "--topic-prefix",
                unique_name("dashboard") + ".",
                "--metrics-port",
                str(port),
            ],
            env=subprocess_env(postgres_db, kafka_broker),
            cwd=ROOT,
            stderr=out,
        )
    board = dashboard()
    queries = [(title, expr, selectors(expr)) for title, expr in expressions(board)]
    queries += [("variables", "", variable_selectors(board))]
    queried = {s.metric for _, _, found in queries for s in found}
    try:
        wait_for_processed(port, process, log)
        # Some series appear a little later (the LSO gap is asked every 5 s in the
        # background): scrape until every queried metric is there, or for 30 s.
        deadline = time.monotonic() + 30
        while not queried <= set(exported := scrape(port)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(30)

    checked: set[str] = set()
    problems = []
    for title, expr, found in queries:
        for selector in found:
            if selector.metric not in exported:
                problems.append(f"{title}: {selector.metric} is not exported")
                continue
            checked.add(selector.metric)
            missing = selector.labels - exported[selector.metric]
            if missing:
                problems.append(f"{title}: {selector.metric} has no label {sorted(missing)}")
        present = [s.metric for s in found if s.metric in exported]
        if expr and present:
            labels = set().union(*(exported[m] for m in present))
            missing = grouping_labels(expr) - labels - TARGET_LABELS
            if missing:
                problems.append(f"{title}: no metric of {expr!r} has label {sorted(missing)}")
    assert not problems, "\n".join(problems)
    # The check checked something: each kind of panel's metrics were in the scrape.
    assert {
        "esbridge_consumer_lag_events",
        "esbridge_consumer_held_partitions",
        "esbridge_relay_published_total",
        "esbridge_consumer_processed_total",
        "esbridge_consumer_dead_letters",
        "esbridge_relay_active",
        "esbridge_end_to_end_latency_seconds_bucket",
        "esbridge_partition_lso_gap_messages",
        "esbridge_consumer_parked_messages",
        "esbridge_consumer_parked_oldest_age_seconds",
    } <= checked
