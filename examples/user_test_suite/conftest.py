"""A user's test suite on esbridge's fixtures, with servers from testcontainers.

Installing esbridge registers its pytest plugin: ``postgres_db``,
``kafka_broker``, ``create_topic`` and friends need no import. Choose
testcontainers for both servers with ``ESBRIDGE_TEST_BACKEND=containers``
(``auto``, the default, picks it when a Docker API answers); see
``docs/testcontainers.md`` for Docker Desktop, Linux Docker and podman.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.relay.relay import Relay
from esbridge.testing.backends import chosen_backend
from esbridge.testing.containers import require_container_engine
from examples.user_test_suite.shop import Orders, Stock


@pytest.fixture(scope="session", autouse=True)
def _container_engine() -> None:
    """Skip (laptop without Docker or podman) or fail (CI) when no container engine can run."""
    if "containers" in (chosen_backend("postgres"), chosen_backend("kafka")):
        require_container_engine()


@pytest.fixture
def orders(postgres_db: Any) -> Iterator[Orders]:
    app = Orders(env=postgres_db.env)
    yield app
    app.close()


@pytest.fixture
def stock(postgres_db: Any) -> Iterator[Stock]:
    app = Stock(env=postgres_db.env)
    yield app
    app.close()


class Running:
    """Runs ``target.run()`` in a thread; :meth:`close` stops it and re-raises its error."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.target.run()
        except BaseException as e:
            self.error = e

    def close(self) -> None:
        self.target.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), f"{type(self.target).__name__} did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def pipeline(
    orders: Orders, stock: Stock, postgres_db: Any, kafka_broker: Any, create_topic: Any
) -> Iterator[None]:
    """A relay (Orders -> Kafka) and a consumer (Kafka -> Stock) running in threads."""
    topic = create_topic(partitions=2)
    config = kafka_broker.config()
    relay = Relay("Orders", kafka_config=config, topic=topic, env=postgres_db.env)
    consumer = ConsumerAdapter(
        stock,
        upstream="Orders",
        topic=topic,
        kafka_config=config | {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
        group_id=f"{topic}.stock",
        upstream_env=postgres_db.env,
    )
    running = [Running(relay), Running(consumer)]
    yield
    for part in running:
        part.close()
