"""``esbridge consume --upstream-url`` as a process, filling gaps from ``esbridge serve-log``.

Three OS processes, two PostgreSQL servers: the upstream DogSchool's database
in a server of its own, read only by its ``esbridge serve-log`` process; the
follower Mirror in the session's server, fed by an ``esbridge consume``
process that gets the follower's settings, Kafka, the service's URL and a
token, and nothing of the upstream's database. Messages missing from the
topic (never published: a topic truncated by retention looks the same to a
consumer) can only come over HTTP: each is processed exactly once and in
order, counted by the consumer's own metrics.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from esbridge.testing.servers import free_port
from examples.dogschool.application import DogSchool
from tests.integration.consumer.test_consumer_remote_log import remote_school, upstream_server
from tests.support.consumer_apps import (
    ManualPublisher,
    Mirror,
    count_notifications,
    notifications,
    populate,
    verify_mirror,
)
from tests.support.remote_log import ESBRIDGE, ROOT, SCHOOL_TOKEN, serve_log_process

__all__ = ["remote_school", "upstream_server"]  # the upstream's own server and school

PARTITIONS = 3
DOGS, TRICKS = 30, 4  # 150 events


def consumer_totals(port: int) -> dict[str, float]:
    """The consumer process's counters (``esbridge_consumer_*_total``), summed over labels."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("esbridge_consumer_") and sample.name.endswith("_total"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_consume_process_fills_gaps_over_http_exactly_once_in_order(
    remote_school: DogSchool,
    mirror: Mirror,
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
    tmp_path: Path,
) -> None:
    assert remote_school.env["POSTGRES_PORT"] != postgres_db.env["POSTGRES_PORT"]  # two servers
    topic = create_topic(partitions=PARTITIONS)
    dogs = populate(remote_school, DOGS, TRICKS)
    notes = notifications(remote_school)
    assert len(notes) == DOGS * (1 + TRICKS)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", PARTITIONS)
    sent = list(publisher.messages(notes))
    last = {partition: n.id for n, (_, _, _, partition) in zip(notes, sent, strict=True)}
    missing = sent[100:130] + sent[20:25]
    del sent[100:130]  # only the log service has these
    del sent[20:25]
    publisher.send(sent)

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{SCHOOL_TOKEN} DogSchool\n")
    port = free_port()
    service = serve_log_process(remote_school.env, port, tokens)
    url = f"http://127.0.0.1:{port}"
    metrics_port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("POSTGRES_", "DOGSCHOOL_", "UPSTREAM_LOG_"))
    }
    env.update(postgres_db.env)  # the follower's database only
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=kafka_config["bootstrap.servers"],
        KAFKA_SESSION_TIMEOUT_MS="6000",
        KAFKA_HEARTBEAT_INTERVAL_MS="500",
        UPSTREAM_LOG_TOKEN=SCHOOL_TOKEN,
        PYTHONPATH=str(ROOT),
    )
    log_file = tmp_path / "consume.log"
    with log_file.open("wb") as output:
        consumer = subprocess.Popen(
            [*ESBRIDGE, "consume", "tests.support.consumer_apps:Mirror", "--upstream", "DogSchool",
             "--topic", topic, "--group", f"{topic}.g", "--partitions", str(PARTITIONS),
             "--upstream-url", url, "--app-dir", str(ROOT), "--batch-size", "20",
             "--metrics-port", str(metrics_port)],
            env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while count_notifications(mirror) < len(notes):
            assert consumer.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.2)
        totals = consumer_totals(metrics_port)
        consumer.send_signal(signal.SIGTERM)  # graceful: after the current batch
        assert consumer.wait(30) == 0, log_file.read_text()
    finally:
        for process in (consumer, service):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert totals["esbridge_consumer_processed_total"] == len(notes) == 150
    assert totals["esbridge_consumer_reconciled_events_total"] == len(missing) == 35
    assert totals["esbridge_consumer_gaps_reconciled_total"] >= 2
    assert totals["esbridge_consumer_duplicates_total"] == 0
    verify_mirror(remote_school, mirror, dogs)  # every trick once, in order
    assert count_notifications(mirror) == len(notes)  # one mirror event per upstream event
    assert len(last) == PARTITIONS
    for p in range(PARTITIONS):  # every partition's position is its last notification
        assert mirror.recorder.max_tracking_id(f"DogSchool#{p}/{PARTITIONS}") == last[p]
