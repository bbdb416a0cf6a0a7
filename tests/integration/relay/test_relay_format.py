"""The documented message format (docs/message-format.md), checked from the outside.

The reading side of this test knows nothing of esbridge: a plain
confluent-kafka consumer, JSON, and the rules as the document states them
(header names and values are spelled out here on purpose, not imported).
"""

from __future__ import annotations

import json
import re
import uuid
from collections import defaultdict
from datetime import datetime

import psycopg
from confluent_kafka import Consumer, TopicPartition

from tests.support.relay_support import (
    APP_NAME,
    ledger,
    ledger_relay,
    publish_and_close,
    write_events,
)

HEADER_NAMES = [
    "esb_format",
    "esb_kind",
    "esb_app",
    "esb_nid",
    "esb_prev_nid",
    "esb_topic",
    "esb_version",
    "content-type",
    "ce_specversion",
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_time",
    "ce_subject",
]


def plain_read(bootstrap: str, topic: str, count: int) -> list:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"plain-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    messages = []
    for _ in range(200):
        for m in consumer.consume(1000, 0.2):
            assert m.error() is None
            messages.append(m)
        if len(messages) >= count:
            break
    consumer.close()
    return messages


def test_payload_messages_follow_the_documented_format(postgres_db, kafka_config, create_topic):
    app = ledger(postgres_db.env)
    write_events(app, 60, accounts=6)
    topic = create_topic(partitions=2)
    publish_and_close(ledger_relay(postgres_db, kafka_config, topic))
    with psycopg.connect(postgres_db.dsn) as conn:
        rows = {
            nid: (str(oid), version, topic_, bytes(state))
            for nid, oid, version, topic_, state in conn.execute(
                "SELECT notification_id, originator_id, originator_version, topic, state "
                "FROM ledger_events"
            )
        }

    messages = plain_read(kafka_config["bootstrap.servers"], topic, 60)
    assert len(messages) == 60
    last_on_partition: dict[int, int] = defaultdict(int)
    seen_ce_ids = set()
    for m in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        names = [k for k, _ in m.headers()]
        assert names == HEADER_NAMES  # every header, once, in the documented order
        h = {k: v.decode("utf-8") for k, v in m.headers()}
        nid = int(h["esb_nid"])
        originator_id, version, event_topic, state = rows[nid]
        # key: the aggregate id as a canonical UUID string
        assert m.key().decode() == originator_id
        assert str(uuid.UUID(m.key().decode())) == m.key().decode()
        # value: the stored event bytes; here JSON, as content-type says
        assert h["content-type"] == "application/json"
        assert m.value() == state
        assert isinstance(json.loads(m.value()), dict)
        assert h["esb_format"] == "1" and h["esb_kind"] == "payload"
        assert h["esb_app"] == APP_NAME
        assert int(h["esb_prev_nid"]) == last_on_partition[m.partition()]
        last_on_partition[m.partition()] = nid
        assert h["esb_topic"] == event_topic == h["ce_type"]
        assert re.fullmatch(r"[\w.]+:[\w.]+", h["esb_topic"])
        assert int(h["esb_version"]) == version
        assert h["ce_specversion"] == "1.0"
        assert h["ce_id"] == f"{APP_NAME}:{nid}"
        assert h["ce_id"] not in seen_ce_ids
        seen_ce_ids.add(h["ce_id"])
        assert h["ce_source"] == f"esbridge://{APP_NAME}"
        assert h["ce_subject"] == originator_id
        assert datetime.fromisoformat(h["ce_time"]).tzinfo is not None  # RFC 3339 with offset


def test_causal_dependencies_follow_the_documented_format(postgres_db, kafka_config, create_topic):
    """esb_deps, last, only when some: for each other partition P, the last esb_nid published
    on P before this message, where it is above this message's esb_prev_nid."""
    app = ledger(postgres_db.env)
    write_events(app, 60, accounts=6)
    topic = create_topic(partitions=3)
    publish_and_close(ledger_relay(postgres_db, kafka_config, topic, causal_dependencies=True))
    messages = plain_read(kafka_config["bootstrap.servers"], topic, 60)
    assert len(messages) == 60
    in_log_order = sorted(messages, key=lambda m: int(dict(m.headers())["esb_nid"]))
    last_on_partition: dict[int, int] = defaultdict(int)
    with_deps = 0
    for m in in_log_order:
        names = [k for k, _ in m.headers()]
        h = {k: v.decode("utf-8") for k, v in m.headers()}
        prev = int(h["esb_prev_nid"])
        expected = [
            f"{p}={nid}"
            for p, nid in sorted(last_on_partition.items())
            if p != m.partition() and nid > prev
        ]
        if expected:
            assert names == [*HEADER_NAMES, "esb_deps"]
            assert h["esb_deps"] == "1;" + ",".join(expected)
            with_deps += 1
        else:
            assert names == HEADER_NAMES
        last_on_partition[m.partition()] = int(h["esb_nid"])
    assert with_deps > 20  # six accounts on three partitions, written in turn


def test_prompt_messages_follow_the_documented_format(postgres_db, kafka_config, create_topic):
    app = ledger(postgres_db.env)
    write_events(app, 7)
    topic = create_topic(partitions=1)
    publish_and_close(ledger_relay(postgres_db, kafka_config, topic, mode="prompts"))
    (m,) = plain_read(kafka_config["bootstrap.servers"], topic, 1)
    assert m.key() == APP_NAME.encode()
    assert json.loads(m.value()) == {"app": APP_NAME, "max_nid": 7}
    assert [(k, v.decode()) for k, v in m.headers()] == [
        ("esb_format", "1"),
        ("esb_kind", "prompt"),
        ("esb_app", APP_NAME),
        ("esb_nid", "7"),
    ]
