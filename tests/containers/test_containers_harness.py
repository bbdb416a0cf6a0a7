"""The harness's fixtures through the testcontainers backend: real PostgreSQL and Apache Kafka
in containers, round trips, transactions, and restarts (clean and SIGKILL) that keep data."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from esbridge.errors import HarnessError
from esbridge.testing.processes import pid_alive

CONTAINERS = os.environ.get("ESBRIDGE_TEST_BACKEND") == "containers"


def consume(config: dict[str, Any], topic: str, expect: int, group: str | None = None,
            timeout: float = 30.0) -> list[tuple[int, bytes]]:  # fmt: skip
    """``expect`` committed messages of ``topic`` as (partition, value); then 1 s for extras."""
    consumer = Consumer(
        config
        | {
            "group.id": group or f"g-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    extra_until: float | None = None
    try:
        while time.monotonic() < (extra_until or deadline):
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(msg.error())
            got.append((msg.partition(), msg.value()))
            if len(got) == expect and extra_until is None:
                consumer.commit(asynchronous=False)
                extra_until = time.monotonic() + 1.0
    finally:
        consumer.close()
    return got


def test_servers_come_from_containers(postgres_server, kafka_broker):
    if CONTAINERS:
        assert postgres_server.backend == "containers"
        assert kafka_broker.backend == "containers"
        assert "image" in postgres_server.describe()
        assert "image" in kafka_broker.describe()
    assert postgres_server.host == "127.0.0.1"
    assert kafka_broker.bootstrap_servers.startswith("127.0.0.1:")


def test_postgres_round_trip_with_eventsourcing(postgres_server, postgres_db):
    with postgres_server.connect(postgres_db.dbname, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int primary key, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        assert conn.execute("SELECT id, v FROM t ORDER BY id").fetchall() == [
            (1, "one"),
            (2, "two"),
        ]
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Note(Aggregate):
        @event("Written")
        def __init__(self, text: str) -> None:
            self.text = text

    app = Application(env=postgres_db.env | {"CREATE_TABLE": "y"})
    try:
        note = Note("hello")
        app.save(note)
        assert app.repository.get(note.id).text == "hello"
        assert [n.originator_id for n in app.notification_log.select(1, 10)] == [note.id]
    finally:
        app.close()


def test_kafka_transactions_commit_and_abort(kafka_config, create_topic):
    topic = create_topic(partitions=2)
    producer = Producer(kafka_config | {"transactional.id": f"tx-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(30)
    for batch, commit in ((0, True), (1, False), (2, True)):
        producer.begin_transaction()
        for i in range(10):
            producer.produce(topic, value=f"{batch}-{i}".encode(), partition=i % 2)
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)
    got = consume(kafka_config, topic, expect=20)
    assert len(got) == 20
    for partition in (0, 1):
        values = [v.decode() for p, v in got if p == partition]
        assert values == [f"{b}-{i}" for b in (0, 2) for i in range(10) if i % 2 == partition]


@pytest.mark.parametrize("kill", [False, True], ids=["clean", "sigkill"])
def test_broker_restart_keeps_data_and_offsets(kafka_broker, kafka_config, create_topic, kill):
    topic = create_topic(partitions=3)
    producer = Producer(kafka_config | {"enable.idempotence": True})
    for i in range(30):
        producer.produce(topic, value=f"a{i}".encode(), partition=i % 3)
    assert producer.flush(30) == 0
    group = f"g-{uuid.uuid4().hex[:8]}"
    assert len(consume(kafka_config, topic, expect=30, group=group)) == 30

    bootstrap = kafka_broker.bootstrap_servers
    kafka_broker.restart(kill=kill)
    assert kafka_broker.bootstrap_servers == bootstrap

    producer = Producer(kafka_config | {"enable.idempotence": True})
    for i in range(6):
        producer.produce(topic, value=f"b{i}".encode(), partition=i % 3)
    assert producer.flush(30) == 0
    # The group's committed offsets survived: it sees only the new messages.
    assert sorted(v for _, v in consume(kafka_config, topic, expect=6, group=group)) == sorted(
        f"b{i}".encode() for i in range(6)
    )
    everything = consume(kafka_config, topic, expect=36)
    for partition in range(3):
        values = [v.decode() for p, v in everything if p == partition]
        assert values == [f"a{i}" for i in range(30) if i % 3 == partition] + [
            f"b{i}" for i in range(6) if i % 3 == partition
        ]


@pytest.mark.parametrize("kill", [False, True], ids=["clean", "sigkill"])
def test_postgres_restart_keeps_data(postgres_server, postgres_db, kill):
    with postgres_server.connect(postgres_db.dbname, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int primary key)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 100)")
    port = postgres_server.port
    postgres_server.stop(kill=kill)
    with pytest.raises(Exception):  # noqa: B017 - any connection error: it is down
        postgres_server.connect(postgres_db.dbname, connect_timeout=2).close()
    postgres_server.start()
    assert postgres_server.port == port
    with postgres_server.connect(postgres_db.dbname, autocommit=True) as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM t").fetchone() == (100, 5050)


def test_missing_image_is_a_clear_error(monkeypatch):
    from esbridge.testing.containers import ContainerPostgresServer

    monkeypatch.setenv("ESBRIDGE_POSTGRES_IMAGE", "localhost/esbridge-no-such-image:1")
    server = ContainerPostgresServer()
    try:
        with pytest.raises(HarnessError) as info:
            server.start(timeout=30)
    finally:
        server.close()
    text = str(info.value)
    assert "testcontainers backend" in text
    assert "localhost/esbridge-no-such-image:1" in text
    assert "ESBRIDGE_POSTGRES_IMAGE" in text


def test_container_that_never_gets_ready_shows_its_log(postgres_server):
    from esbridge.testing.containers import ContainerPostgresServer

    server = ContainerPostgresServer(max_connections=-5)  # PostgreSQL refuses to start
    try:
        with pytest.raises(HarnessError) as info:
            server.start(timeout=60)
        container_id = server.box.container.get_wrapped_container().id
        client = server.box.engine.client
    finally:
        server.close()
    text = str(info.value)
    assert "testcontainers backend" in text and "image " in text
    assert "before it was ready" in text
    assert "max_connections" in text  # from the container's log
    assert container_id not in [c.id for c in client.containers.list(all=True)]


def test_unreachable_engine_is_a_clear_error(monkeypatch):
    from esbridge.testing import engine
    from esbridge.testing.containers import ContainerKafkaBroker

    monkeypatch.setattr(engine, "_engine", None)  # as if this were the first server
    monkeypatch.setenv("ESBRIDGE_CONTAINER_ENGINE", "docker")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(HarnessError) as info:
        ContainerKafkaBroker()
    text = str(info.value)
    assert "testcontainers backend" in text
    assert "no Docker API answers at unix:///nonexistent/docker.sock" in text
    assert "image apache/kafka:4.1.1" in text


CRASHING_SESSION = """
import os, sys
from esbridge.testing.backends import make_postgres
from esbridge.testing.engine import current_engine
server = make_postgres("containers")
service = current_engine().service
print(service.process.pid if service else 0, service.base if service else "", flush=True)
raise RuntimeError("a test session that fails after starting its containers")
"""


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def test_a_failing_session_leaves_nothing_running(tmp_path):
    """Containers and the harness's podman service are gone after a session that failed."""
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "TC_HOST")}
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_SESSION],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "a test session that fails" in result.stderr
    pid_text, _, base = result.stdout.strip().partition(" ")
    if int(pid_text):  # the harness ran its own podman service (no Docker engine here)
        assert not pid_alive(int(pid_text))
        assert not Path(base).exists()
        assert processes_mentioning(base) == []
