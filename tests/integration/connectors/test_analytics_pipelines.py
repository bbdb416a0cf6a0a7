"""An analytics topic in the Schema Registry wire format, read by a Java program (not Python).

``examples/analytics_reader/AnalyticsReader.java`` (shown whole in
docs/analytics-pipelines.md) knows nothing of esbridge: Kafka's Java client
with ``isolation.level=read_committed``, the 5-byte Confluent header, the
writer's schema fetched from the real registry's REST API
(``GET /schemas/ids/{id}``), Apache Avro's ``GenericDatumReader``. It runs
here with the machine's Java 17 as a single source file, exactly as the page
says, against events the relay published with
:class:`~esbridge_connectors.registry.SchemaRegistryEncoder`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from esbridge.kafka.partitioning import partition_for_key
from esbridge.testing.avro_jars import avro_reader_classpath
from esbridge.testing.kafka_dist import java_executable
from esbridge_connectors.analytics import BINARY, CloudEventsEncoder
from esbridge_connectors.registry import AVRO, JSON_SCHEMA, SchemaRegistryEncoder
from esbridge_connectors.schemas import discover_event_classes
from esbridge_connectors.upstream import application_mapper
from tests.integration.connectors.test_analytics import Customer, Shop, record_history
from tests.integration.connectors.test_schema_registry import publish

ROOT = Path(__file__).resolve().parents[3]
READER = ROOT / "examples" / "analytics_reader" / "AnalyticsReader.java"


def run_java_reader(bootstrap: str, topic: str, registry_url: str) -> list[dict]:
    """The reader's JSON lines: it reads the topic to its end and exits."""
    command = [java_executable(), "-cp", avro_reader_classpath(), str(READER)]
    result = subprocess.run(
        [*command, bootstrap, topic, registry_url], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("fmt", [AVRO, JSON_SCHEMA])
def test_a_java_reader_gets_every_event_in_order_through_the_registry(
    fmt, postgres_db, kafka_config, create_topic, schema_registry
):
    if schema_registry.can_control:
        schema_registry.start()  # a fault test may have left it stopped
    shop = Shop(env=postgres_db.env)
    record_history(shop, 9)  # Registered, Charged, Charged (+ Upgraded every third customer)
    total = shop.recorder.max_notification_id()
    assert total == 9 * 3 + 3
    topic = create_topic(partitions=2)
    mapper = application_mapper(Shop, postgres_db.env)
    encoder = SchemaRegistryEncoder(
        shop.name,
        mapper,
        SchemaRegistryClient({"url": schema_registry.url}),
        topic=topic,
        event_classes=discover_event_classes([Customer]),
        format=fmt,
    )
    assert publish(shop.name, postgres_db.env, kafka_config, topic, encoder) == total

    lines = run_java_reader(kafka_config["bootstrap.servers"], topic, schema_registry.url)

    # Every event once, each partition in the notification log's order.
    nids = [int(line["id"].removeprefix(f"{shop.name}:")) for line in lines]
    assert sorted(nids) == list(range(1, total + 1))
    for partition in (0, 1):
        mine = [
            (line["offset"], nid)
            for line, nid in zip(lines, nids, strict=True)
            if line["partition"] == partition
        ]
        assert [n for _offset, n in mine] == sorted(n for _offset, n in mine)  # log order
        assert [o for o, _n in mine] == sorted(o for o, _n in mine)  # as the partition holds them
    for line in lines:  # the partition of its key, as every Kafka client computes it
        assert line["partition"] == partition_for_key(line["key"].encode(), 2)
    # The same data, field for field, as the plain-JSON CloudEvent of each notification.
    reference = CloudEventsEncoder(shop.name, mapper, mode=BINARY)
    by_nid = {n.id: n for n in shop.recorder.select_notifications(start=1, limit=total)}
    for line, nid in zip(lines, nids, strict=True):
        notification = by_nid[nid]
        assert line["type"] == notification.topic
        assert line["key"] == str(notification.originator_id)
        assert line["schema_id"] == encoder.registered[notification.topic].schema_id
        assert line["data"] == reference.cloudevent(notification)["data"]
    charged = [line["data"] for line in lines if line["type"].endswith("Customer.Charged")]
    assert sorted(d["amount"] for d in charged) == sorted(
        [f"{i}.50" for i in range(9)] + ["0.10"] * 9
    )
    upgraded = [line["data"] for line in lines if line["type"].endswith("Customer.Upgraded")]
    assert sorted(d["notes"]["points"] for d in upgraded) == [0, 3, 6]
    assert {d["tier"] for d in upgraded} == {"gold"}
