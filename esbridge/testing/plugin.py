"""The esbridge pytest plugin: a real PostgreSQL and a real Kafka broker for tests.

Registered through the ``pytest11`` entry point, so any project that installs
esbridge gets these fixtures::

    def test_round_trip(postgres_db, kafka_broker, create_topic):
        topic = create_topic(partitions=3)
        app = MyApp(env=postgres_db.env)
        ...

Session fixtures start the servers once (see :mod:`esbridge.testing.backends`
for where they come from); function fixtures give each test a fresh database
and fresh topics. Fault tests call ``kafka_broker.restart()`` or
``postgres_server.stop(kill=True)``; data is kept across restarts.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from esbridge.errors import HarnessError
from esbridge.testing.backends import chosen_backend, make_kafka, make_postgres
from esbridge.testing.kafka_cluster import LocalKafkaCluster
from esbridge.testing.schema_registry import (
    ExternalSchemaRegistry,
    SchemaRegistryServer,
    make_schema_registry,
)
from esbridge.testing.secure_kafka import SecureKafkaBroker
from esbridge.testing.servers import KafkaBroker, PostgresDatabase, PostgresServer, unique_name

_started: dict[str, Any] = {}
_startup_lines: list[str] = []  # kept for the terminal summary, after the servers are closed


def _close_all() -> None:
    for key in list(_started):
        server = _started.pop(key)
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            server.close()


atexit.register(_close_all)


def _start(key: str, factory: Callable[[], Any]) -> Any:
    if key not in _started:
        try:
            t0 = time.monotonic()
            server = _started[key] = factory()
        except HarnessError as e:
            pytest.fail(str(e), pytrace=False)
        seconds = time.monotonic() - t0  # everything: initdb or storage format, start, ready
        _startup_lines.append(f"{key}: {server.describe()}, ready in {seconds:.1f} s")
    return _started[key]


def pytest_report_header(config: pytest.Config) -> str:
    try:
        return (
            f"esbridge harness: postgres={chosen_backend('postgres')} "
            f"kafka={chosen_backend('kafka')}"
        )
    except HarnessError as e:
        return f"esbridge harness: {e}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _startup_lines:
        terminalreporter.write_line(f"esbridge harness: {line}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (stopped at the end, also on failure)."""
    server = _start("postgres", make_postgres)
    yield server
    _started.pop("postgres", None)
    server.close()


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[PostgresDatabase]:
    """A fresh, empty database for one test; ``.env`` configures ``eventsourcing.postgres``."""
    if postgres_server.can_control:
        postgres_server.start()  # a previous fault test may have left it stopped
    db = postgres_server.create_database()
    yield db
    try:
        if postgres_server.can_control:
            postgres_server.start()
        postgres_server.drop_database(db.dbname)
    except Exception:
        pass


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """An Apache Kafka broker (KRaft, transactions enabled) for the whole session."""
    broker = _start("kafka", make_kafka)
    yield broker
    _started.pop("kafka", None)
    # Kafka clients that only a reference cycle keeps alive (a test's closure, a failed
    # test's traceback) are freed while the broker still answers: afterwards each would
    # log "Connect ... failed" every second until the interpreter exits.
    gc.collect()
    broker.close()


def _session_server(key: str, factory: Callable[[], Any]) -> Iterator[Any]:
    """A session fixture's server: started on first use, closed at the end of the session.

    Kafka clients that only a reference cycle keeps alive are freed first, while
    the server still answers (see :func:`kafka_broker`).
    """
    server = _start(key, factory)
    yield server
    _started.pop(key, None)
    gc.collect()
    server.close()


def _started_or_closed(server: Any, **start: Any) -> Any:
    """``server`` started (``start`` its arguments), or closed when starting failed."""
    try:
        server.start(**start)
    except BaseException:
        server.close()
        raise
    return server


def _start_secure_kafka() -> SecureKafkaBroker:
    broker: SecureKafkaBroker = _started_or_closed(SecureKafkaBroker(), timeout=90)
    return broker


@pytest.fixture(scope="session")
def secure_kafka_broker() -> Iterator[SecureKafkaBroker]:
    """A broker with SASL/SCRAM-SHA-512 over TLS and ACLs (a local process, 127.0.0.1 only).

    Started on first use by a test that asks for it (whatever the backend of
    ``kafka_broker``: it needs the harness's Kafka jars, Java and ``openssl``),
    stopped at the end of the session. A
    :class:`~esbridge.testing.secure_kafka.SecureKafkaBroker`: ``add_user()``,
    ``allow(user, "topic", name, "READ", ...)``, ``user_config(user)``,
    ``user_env(user)`` (``KAFKA_*`` variables), ``create_topic()`` (as the
    super user), ``ca_file``.
    """
    yield from _session_server("secure_kafka", _start_secure_kafka)


def _start_kafka_cluster() -> LocalKafkaCluster:
    cluster: LocalKafkaCluster = _started_or_closed(LocalKafkaCluster())
    return cluster


@pytest.fixture(scope="session")
def kafka_cluster_session() -> Iterator[LocalKafkaCluster]:
    """The 3-broker cluster of :func:`kafka_cluster`, started once per session."""
    yield from _session_server("kafka_cluster", _start_kafka_cluster)


@pytest.fixture
def kafka_cluster(kafka_cluster_session: LocalKafkaCluster) -> LocalKafkaCluster:
    """A Kafka cluster of 3 brokers (KRaft), replicated as in production, for failover tests.

    Replication factor 3 for created and internal topics,
    ``min.insync.replicas=2``; local processes on 127.0.0.1 (whatever the
    backend of ``kafka_broker``: it needs the harness's Kafka jars and Java),
    started on first use and stopped at the end of the session. A
    :class:`~esbridge.testing.kafka_cluster.LocalKafkaCluster`:
    ``create_topic()``, ``config()``, ``leader(topic, partition)``,
    ``coordinator(transactional_id)``, ``group_coordinator(group_id)``,
    ``kill(node_id)``, ``stop_broker(node_id)``, ``start_broker(node_id)``,
    ``wait_in_sync()``. Each test gets it with every broker running and
    every replica in sync, whatever the test before it left stopped.
    """
    cluster = kafka_cluster_session
    try:
        cluster.start()
        cluster.wait_in_sync()
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    return cluster


@pytest.fixture(scope="session")
def schema_registry() -> Iterator[SchemaRegistryServer | ExternalSchemaRegistry]:
    """A real Schema Registry (Apicurio Registry, Confluent API at ``.url``), session-wide.

    Started on first use (see :mod:`esbridge.testing.schema_registry`); a test
    that stops it (``stop()``, then ``start()``) gets an empty registry back.
    """
    yield from _session_server("schema_registry", make_schema_registry)


@pytest.fixture
def create_topic(kafka_broker: KafkaBroker) -> Callable[..., str]:
    """Factory: ``create_topic(partitions=1, name=None, config=None)`` -> a new topic's name."""
    if kafka_broker.can_control:
        kafka_broker.start()  # a previous fault test may have left it stopped

    def factory(
        partitions: int = 1, name: str | None = None, config: dict[str, str] | None = None
    ) -> str:
        return kafka_broker.create_topic(name=name, partitions=partitions, config=config)

    return factory


@pytest.fixture
def topic_name() -> str:
    """A topic name unique to this test (not created)."""
    return unique_name("t")


@pytest.fixture
def kafka_config(kafka_broker: KafkaBroker) -> dict[str, Any]:
    """librdkafka settings that reach the session's broker."""
    return kafka_broker.config()
