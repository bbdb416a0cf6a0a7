"""The consumer's latency metrics against real servers: end to end, and the LSO gap."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from esbridge.consumer.adapter import ConsumerAdapter
from examples.dogschool.application import DogSchool
from tests.integration.consumer.test_consumer import adapter, published
from tests.support.consumer_apps import Mirror

LATENCY = "esbridge_end_to_end_latency_seconds"
LSO_GAP = "esbridge_partition_lso_gap_messages"


def test_end_to_end_latency_is_observed_from_the_event_time_to_the_commit(
    school: DogSchool, mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    """Each processed event is one observation, measured from when the event happened
    upstream (not from when the consumer got it): events written 1.5 s before they
    are consumed are all observed above 1 s."""
    topic = create_topic(partitions=1)
    _dogs, total = published(school, topic, kafka_config, dogs=10, tricks=2)
    time.sleep(1.5)
    registry = CollectorRegistry()
    consumer = adapter(mirror, topic, kafka_config, registry=registry)
    labels = {"follower": consumer.name, "upstream": "DogSchool"}
    try:
        assert consumer.process_available(timeout=30) == total
    finally:
        consumer.close()
    count = registry.get_sample_value(f"{LATENCY}_count", labels)
    assert count == total
    assert registry.get_sample_value(f"{LATENCY}_bucket", {**labels, "le": "1.0"}) == 0
    assert registry.get_sample_value(f"{LATENCY}_bucket", {**labels, "le": "60.0"}) == total
    assert 1.5 <= registry.get_sample_value(f"{LATENCY}_sum", labels) / total < 60


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_lso_gap_shows_an_open_transaction_until_it_ends(
    mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    """A producer that leaves its transaction open pins the partition's last stable
    offset: the consumer reads nothing more, and the gauge shows how many offsets wait
    behind it (3 here); back to 0 once the transaction ends (aborted here)."""
    topic = create_topic(partitions=1)
    registry = CollectorRegistry()
    consumer: ConsumerAdapter = adapter(
        mirror, topic, kafka_config, registry=registry, lso_interval=0.1
    )
    labels = {"topic": topic, "partition": "0"}

    def gap() -> float | None:
        return registry.get_sample_value(LSO_GAP, labels)

    thread = threading.Thread(target=consumer.run)
    thread.start()
    producer = Producer({**kafka_config, "transactional.id": f"hung-{uuid.uuid4().hex}"})
    try:
        wait_for(lambda: gap() == 0, "the gauge of the assigned partition")
        producer.init_transactions(30)
        producer.begin_transaction()
        for _ in range(3):
            producer.produce(topic, b"{}", b"key", 0)
        assert producer.flush(10) == 0  # written, not committed
        wait_for(lambda: gap() == 3, "the open transaction's 3 offsets")
        producer.abort_transaction(30)
        wait_for(lambda: gap() == 0, "the gap to close after the abort")
    finally:
        consumer.stop()
        thread.join(30)
    assert not thread.is_alive()
