"""The 3-broker cluster of the harness: replicated as in production, and who leads what.

The failover tests (``tests/integration/relay/test_relay_failover.py``,
``tests/integration/consumer/test_consumer_failover.py``) crash its brokers;
this checks what they rely on: three replicas and ``min.insync.replicas=2``,
and that the coordinators it names are the ones the brokers chose.
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from esbridge.kafka.topics import topic_setting
from esbridge.testing.kafka_cluster import LocalKafkaCluster


def test_topics_have_three_replicas_and_need_two_in_sync(kafka_cluster: LocalKafkaCluster):
    topic = kafka_cluster.create_topic(partitions=3)
    admin = AdminClient(kafka_cluster.config())
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    assert [sorted(p.replicas) for p in partitions.values()] == [[1, 2, 3]] * 3
    assert {kafka_cluster.leader(topic, p) for p in partitions} <= {1, 2, 3}
    assert topic_setting(admin, topic, "min.insync.replicas") == "2"
    assert len(kafka_cluster.config()["bootstrap.servers"].split(",")) == 3


def test_coordinators_are_the_ones_the_brokers_chose(kafka_cluster: LocalKafkaCluster):
    topic = kafka_cluster.create_topic()
    transactional_id = f"tx-{uuid.uuid4().hex}"
    producer = Producer(kafka_cluster.config(**{"transactional.id": transactional_id}))
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, b"v", b"k")
    producer.commit_transaction(30)
    coordinator = kafka_cluster.coordinator(transactional_id)
    assert coordinator in kafka_cluster.node_ids
    # The internal topics are replicated too.
    admin = AdminClient(kafka_cluster.config())
    state = admin.list_topics("__transaction_state", timeout=10).topics["__transaction_state"]
    assert all(sorted(p.replicas) == [1, 2, 3] for p in state.partitions.values())

    group = f"g-{uuid.uuid4().hex}"
    consumer = Consumer(
        kafka_cluster.config(**{"group.id": group, "auto.offset.reset": "earliest"})
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(0.2)
        described = admin.describe_consumer_groups([group])[group].result(30)
    finally:
        consumer.close()
    assert described.coordinator.id == kafka_cluster.group_coordinator(group)
