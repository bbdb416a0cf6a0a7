"""``esbridge status --metrics``: the held-gaps column read from consumer processes.

A partition held behind a missing message is known only to the consumer that
holds it; ``esbridge status`` reads it from that consumer's Prometheus
endpoint (real Kafka, real Postgres, a real HTTP endpoint on loopback).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from eventsourcing.system import System
from prometheus_client import CollectorRegistry, start_http_server

from esbridge.cli import main
from esbridge.consumer.adapter import ConsumerAdapter
from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import ManualPublisher, Mirror, notifications, populate

SYSTEM = System(pipes=[[DogSchool, Mirror]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_rows(capsys: Any, *argv: str) -> tuple[int, list[list[str]], str]:
    code = main(["status", f"{__name__}:SYSTEM", *argv])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, [line.split() for line in lines[2:]], captured.err


def test_status_shows_a_held_gap_from_the_consumer_metrics(
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    for key, value in postgres_db.env.items():
        monkeypatch.setenv(key, value)
    school = DogSchool(env=postgres_db.env)
    mirror = Mirror(env=postgres_db.env)
    topic = create_topic(partitions=1)
    populate(school, 3, 2)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", 1)
    messages = publisher.messages(notifications(school))
    publisher.send(messages[:4] + messages[5:])  # notification 5 is lost
    registry = CollectorRegistry()
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    consumer = ConsumerAdapter(
        mirror,
        upstream="DogSchool",
        topic=topic,
        kafka_config={**kafka_config, "session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
        group_id=f"{topic}.g",
        registry=registry,
        hold_timeout=60.0,
    )
    try:
        deadline = time.monotonic() + 60  # the first group join on a new broker takes a while
        while not consumer.status().held_partitions and time.monotonic() < deadline:
            consumer.process_available(timeout=1)
        status = consumer.status()
        assert (status.processed, [h.position for h in status.held_partitions]) == (4, [4])

        # Without endpoints the column is unknown; with one it is the held count. No relay
        # publishes DogSchool (the messages were sent by hand): the relay column says so.
        code, [row], _ = status_rows(capsys)
        assert row[:3] == ["DogSchool", "->", "Mirror"] and row[-3:] == ["-", "0", "none"], row
        code, [row], err = status_rows(capsys, "--metrics", f"127.0.0.1:{port}")
        assert (row[4], row[-3], err) == ("4", "1", ""), row  # position 4, one held gap
        assert code == 0
        code, _, _ = status_rows(capsys, "--metrics", f"127.0.0.1:{port}", "--fail-on-lag")
        assert code == 1

        # An endpoint that cannot be read is reported, and the column says what is known.
        dead = f"127.0.0.1:{free_port()}"
        code, [row], err = status_rows(capsys, "--metrics", dead)
        assert row[-3] == "-" and f"cannot read metrics http://{dead}/metrics" in err
    finally:
        consumer.close()
        server.shutdown()
        mirror.close()
        school.close()
