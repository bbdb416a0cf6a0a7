"""Causal dependencies across partitions, against real Kafka and Postgres.

A shop registers customers (partition 0) and places orders naming them
(partition 1), each in its own transaction, interleaved: customer 1, order 1,
customer 2, order 2... The relay publishes with ``causal_dependencies=True``.
Two members of one consumer group feed the same follower database, one
partition each, and partition 0 (the customers) is slowed: its policy waits
on a gate the test opens. With causal dependencies (the consumer's default)
the member owning the orders holds them until the customers' tracking record
in Postgres passes them, so no order is ever processed before its customer
and the follower's log repeats the shop's order exactly. With the consumer's
opt-out (``causal_dependencies=False``) every order overtakes its customer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import CollectorRegistry

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.errors import CausalDependencyTimeoutError
from esbridge.kafka.partitioning import partition_for_key
from esbridge.names import tracking_names
from esbridge.relay.relay import Relay
from tests.support.causal_shop import (
    CUSTOMERS_PARTITION,
    ORDERS_PARTITION,
    PARTITIONS,
    Fulfilment,
    Shop,
)
from tests.support.consumer_apps import count_notifications
from tests.support.relay_support import publish_and_close, wait_for

ORDERS = 10
FAST = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
HELD = "esbridge_consumer_causal_held_events"


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    Fulfilment.gate = threading.Event()
    yield Fulfilment.gate
    Fulfilment.gate.set()  # a member still waiting lets go
    Fulfilment.gate = None


class Member:
    """One member of the follower's consumer group, running in a thread."""

    def __init__(self, env: Any, topic: str, kafka_config: dict[str, Any], **tuning: Any):
        self.app = Fulfilment(env=env)
        self.registry = CollectorRegistry()
        self.adapter = ConsumerAdapter(
            self.app,
            upstream="Shop",
            topic=topic,
            kafka_config={**kafka_config, **FAST},
            group_id=f"{topic}.fulfilment",
            registry=self.registry,
            poll_timeout=0.05,
            **tuning,
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.adapter.run()
        except BaseException as e:
            self.error = e

    def assigned(self) -> list[int]:
        return self.adapter.status().assigned

    def held(self) -> float | None:
        labels = {"follower": "Fulfilment", "upstream": "Shop", "topic": self.adapter.topic}
        return self.registry.get_sample_value(HELD, labels)

    def stop(self) -> None:
        self.adapter.stop()
        self.thread.join(30)
        self.app.close()


@pytest.fixture
def members(postgres_db: Any, gate: threading.Event) -> Iterator[Callable[..., list[Member]]]:
    started: list[Member] = []

    def start(topic: str, kafka_config: dict[str, Any], **tuning: Any) -> list[Member]:
        pair = [Member(postgres_db.env, topic, kafka_config, **tuning) for _ in range(2)]
        started.extend(pair)
        wait_for(
            lambda: (
                sorted(p for m in pair for p in m.assigned()) == [0, 1]
                and all(m.assigned() for m in pair)
            ),
            60,
            "each member to own one partition",
        )
        return pair

    yield start
    gate.set()  # a member stuck in the slowed policy finishes its batch and stops
    for member in started:
        member.stop()


def shop_published(postgres_db: Any, kafka_config: dict[str, Any], topic: str) -> None:
    """Customer i then order i, ORDERS times, each its own transaction, published causally."""
    shop = Shop(env=postgres_db.env)
    try:
        for i in range(ORDERS):
            shop.place(shop.register(i), i)
        relay = Relay(
            "Shop",
            kafka_config=kafka_config,
            topic=topic,
            env=postgres_db.env,
            causal_dependencies=True,
        )
        assert publish_and_close(relay) == 2 * ORDERS
    finally:
        shop.close()


def committed_offset(kafka_config: dict[str, Any], topic: str, partition: int) -> int | None:
    probe = Consumer({**kafka_config, "group.id": f"{topic}.fulfilment"})
    try:
        (tp,) = probe.committed([TopicPartition(topic, partition)], timeout=10)
        return tp.offset if tp.offset >= 0 else None
    finally:
        probe.close()


def owner_of(pair: list[Member], partition: int) -> Member:
    return next(m for m in pair if partition in m.assigned())


def test_an_order_waits_for_its_customer_on_another_member(
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
    gate: threading.Event,
    members: Callable[..., list[Member]],
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    pair = members(topic, kafka_config)
    shop_published(postgres_db, kafka_config, topic)
    orders = owner_of(pair, ORDERS_PARTITION)
    # Customer 1 is stuck in the slowed member; order 1 waits for it, and so, behind it
    # on their partition, do all the orders.
    wait_for(lambda: orders.held() == ORDERS, 30, "every order to be held")
    time.sleep(1.0)  # a member ignoring the dependency would have processed them by now
    assert orders.app.order_cards() == []
    # The group's offset stays at the first held order: a member taking over reads them.
    assert committed_offset(kafka_config, topic, ORDERS_PARTITION) in (None, 0)
    gate.set()
    view = Fulfilment(env=postgres_db.env)
    try:
        wait_for(lambda: count_notifications(view) == 2 * ORDERS, 60, "all to be processed")
        cards = view.order_cards()
        assert len(cards) == ORDERS
        assert [known for _, known in cards] == [True] * ORDERS
        # The log order across partitions, exactly: customer 1, order 1, customer 2...
        assert view.card_topics() == ["customer", "order"] * ORDERS
    finally:
        view.close()
    assert [m.error for m in pair] == [None, None]
    assert orders.held() == 0


def test_without_causal_dependencies_orders_overtake_their_customers(
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
    gate: threading.Event,
    members: Callable[..., list[Member]],
) -> None:
    """The opt-out: the same messages (with esb_deps), partitions processed independently."""
    topic = create_topic(partitions=PARTITIONS)
    pair = members(topic, kafka_config, causal_dependencies=False)
    shop_published(postgres_db, kafka_config, topic)
    orders = owner_of(pair, ORDERS_PARTITION)
    wait_for(lambda: len(orders.app.order_cards()) == ORDERS, 30, "the orders, unheld")
    gate.set()
    view = Fulfilment(env=postgres_db.env)
    try:
        wait_for(lambda: count_notifications(view) == 2 * ORDERS, 60, "all to be processed")
        assert [known for _, known in view.order_cards()] == [False] * ORDERS
        assert view.card_topics() == ["order"] * ORDERS + ["customer"] * ORDERS
    finally:
        view.close()
    assert [m.error for m in pair] == [None, None]


def test_a_dependency_never_processed_stops_the_consumer_with_a_clear_error(
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
    gate: threading.Event,
    members: Callable[..., list[Member]],
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    pair = members(topic, kafka_config, causal_timeout=1.5)
    shop_published(postgres_db, kafka_config, topic)
    orders = owner_of(pair, ORDERS_PARTITION)
    wait_for(lambda: orders.error is not None, 30, "the orders' member to give up")
    error = orders.error
    assert isinstance(error, CausalDependencyTimeoutError), error
    assert (error.partition, error.waiting_for) == (ORDERS_PARTITION, CUSTOMERS_PARTITION)
    assert (error.nid, error.waiting_for_nid, error.position) == (2, 1, 0)
    assert "partition 0" in str(error) and "causal_dependencies=False" in str(error)
    assert orders.app.order_cards() == []  # nothing recorded past the waiting event


ROOT = Path(__file__).resolve().parents[3]
KILLED_RUN_ORDERS = 25


@pytest.mark.slow
def test_kill_9_of_a_member_mid_run_keeps_the_log_order_exactly(
    postgres_db: Any, kafka_broker: Any, create_topic: Any, kafka_config: dict[str, Any],
    tmp_path: Path,
) -> None:  # fmt: skip
    """Two ``esbridge consume`` processes; one is killed -9 while they take turns, a new one
    joins: every event once, every order after its customer, the log's order exactly."""
    topic = create_topic(partitions=PARTITIONS)
    shop = Shop(env=postgres_db.env)
    try:
        for i in range(KILLED_RUN_ORDERS):
            shop.place(shop.register(i), i)
        relay = Relay(
            "Shop", kafka_config=kafka_config, topic=topic, env=postgres_db.env,
            causal_dependencies=True,
        )  # fmt: skip
        assert publish_and_close(relay) == 2 * KILLED_RUN_ORDERS
        last = {  # each partition's last notification id: where its tracking must end
            partition_for_key(str(n.originator_id).encode(), PARTITIONS): n.id
            for n in shop.recorder.select_notifications(start=1, limit=1000)
        }
    finally:
        shop.close()
    env = {
        **os.environ,
        **postgres_db.env,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        "KAFKA_SESSION_TIMEOUT_MS": "3000",  # a killed member's partitions move on soon
        "KAFKA_HEARTBEAT_INTERVAL_MS": "300",
        "FULFILMENT_CUSTOMER_DELAY": "0.05",  # partition 0 is the slow one
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    view = Fulfilment(env=postgres_db.env)  # creates the follower's tables once
    procs: list[subprocess.Popen[bytes]] = []

    def start(n: int) -> None:
        log = open(tmp_path / f"member-{n}.log", "wb")  # noqa: SIM115
        command = [
            sys.executable, "-c", "import sys; from esbridge.cli import main; sys.exit(main())",
            "consume", "tests.support.causal_shop:Fulfilment", "--app-dir", str(ROOT),
            "--upstream", "Shop", "--topic", topic, "--group", f"{topic}.fulfilment",
            "--partitions", str(PARTITIONS), "--causal-timeout", "60",
        ]  # fmt: skip
        procs.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=log))
        log.close()

    try:
        start(1)
        start(2)
        wait_for(lambda: count_notifications(view) >= 16, 60, "the members to be mid-run")
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
        start(3)
        wait_for(
            lambda: (
                count_notifications(view) == 2 * KILLED_RUN_ORDERS
                or any(p.poll() not in (None, -signal.SIGKILL) for p in procs)
            ),
            90,
            "every event to be processed",
        )
        assert [p.poll() for p in procs[1:]] == [None, None], [
            (tmp_path / f"member-{n}.log").read_text()[-3000:] for n in (2, 3)
        ]
        time.sleep(1.0)  # nothing more comes: not a single duplicate effect
        assert count_notifications(view) == 2 * KILLED_RUN_ORDERS
        assert [known for _, known in view.order_cards()] == [True] * KILLED_RUN_ORDERS
        assert view.card_topics() == ["customer", "order"] * KILLED_RUN_ORDERS
        names = tracking_names("Shop", PARTITIONS)
        assert [view.recorder.max_tracking_id(name) for name in names] == [
            last[CUSTOMERS_PARTITION],
            last[ORDERS_PARTITION],
        ]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        view.close()
