"""Replay/backfill against a real PostgreSQL log and a real Kafka topic.

The relay (:class:`esbridge.relay.Relay`) publishes the whole log; a replay of a range then
republishes part of it to the same topic. Read back by a plain consumer, every
replayed message has exactly the key, partition and headers of the relay's
message for the same notification, so a consumer that tracks
``esb_nid``/``esb_prev_nid`` per partition (esbridge's reconcile rules, and
the consumer adapter, the SQL projection's Kafka feed) classifies every replayed message as a
duplicate and sees no gap. A backfill of a fresh topic equals the relay's
output message for message. The CLI does the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import create_engine

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.consumer.reconcile import PartitionOrder
from esbridge.errors import ConfigurationError
from esbridge.relay.relay import Relay
from esbridge_connectors.replay import Replay
from tests.support.sql_projection_domain import DogSchool, dog_feed, table_contents

ROOT = Path(__file__).resolve().parents[3]
PARTITIONS = 3
ESBRIDGE = str(Path(sys.executable).with_name("esbridge"))  # the console script


def relay_publish(school, kafka_config, topic: str) -> int:
    """Publish the whole log with the relay; the count."""
    relay = Relay(school.name, kafka_config=kafka_config, topic=topic, env=school.env)
    try:
        return relay.publish_available()
    finally:
        relay.close()


def read_all(kafka_config, topic: str, expected: int) -> list:
    consumer = Consumer(
        {**kafka_config, "group.id": "plain-reader", "isolation.level": "read_committed"}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    found: list = []
    try:
        idle = 0
        while idle < (3 if len(found) >= expected else 30):
            batch = consumer.consume(500, timeout=1.0)
            idle = 0 if batch else idle + 1
            found.extend(m for m in batch if m.error() is None)
    finally:
        consumer.close()
    return found


def nid_of(message) -> int:
    return int(dict(message.headers())["esb_nid"])


@pytest.fixture
def school(postgres_db) -> DogSchool:
    school = DogSchool(env=postgres_db.env)
    for i in range(40):
        school.register(f"dog-{i}", tricks=i % 4)
    return school


def test_replayed_range_has_the_relays_keys_and_headers_and_is_deduplicated(
    school, postgres_db, kafka_config, create_topic
):
    total = school.recorder.max_notification_id()
    topic = create_topic(partitions=PARTITIONS)
    assert relay_publish(school, kafka_config, topic) == total

    replay = Replay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env)
    log: Any = replay.recorder  # opened by the replay (from env): closed when run returns
    result = replay.run(17, 61)
    assert (result.count, result.first, result.last) == (45, 17, 61)
    assert log.datastore.pool.closed

    messages = read_all(kafka_config, topic, total + 45)
    assert len(messages) == total + 45
    originals: dict[int, object] = {}
    replayed = []
    for m in messages:
        nid = nid_of(m)
        if nid in originals:
            replayed.append(m)
        else:
            originals[nid] = m
    assert sorted(originals) == list(range(1, total + 1))
    assert sorted(nid_of(m) for m in replayed) == list(range(17, 62))
    for copy in replayed:
        original = originals[nid_of(copy)]
        assert copy.key() == original.key()
        assert copy.partition() == original.partition()
        assert copy.headers() == original.headers()
        assert copy.value() == original.value()

    # A consumer's per-partition reconciliation: every replayed message is a duplicate,
    # nothing is held behind a gap, and each notification is processed once, in order.
    processed: list[int] = []
    duplicates = 0
    for p in range(PARTITIONS):
        order: PartitionOrder[int] = PartitionOrder(0)
        in_partition = sorted((m for m in messages if m.partition() == p), key=lambda m: m.offset())
        for m in in_partition:
            headers = dict(m.headers())
            offer = order.offer(nid_of(m), int(headers["esb_prev_nid"]), nid_of(m), 0.0)
            processed.extend(nid for nid, _ in offer.ready)
            duplicates += offer.duplicates
        assert order.gap() is None
    assert duplicates == 45
    assert sorted(processed) == list(range(1, total + 1))


def test_replay_is_deduplicated_by_a_projection_fed_from_the_topic(
    school, postgres_db, postgres_server, kafka_config, create_topic, tmp_path
):
    total = school.recorder.max_notification_id()
    topic = create_topic(partitions=PARTITIONS)
    relay_publish(school, kafka_config, topic)
    engine = create_engine(postgres_server.create_database().url)
    # No upstream log: a gap would be an error, so none may occur.
    feed = dog_feed(engine, topic, kafka_config, postgres_db.env, log=False)
    try:
        assert feed.process_available(timeout=3) == total
        before = table_contents(engine)
        Replay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env).run(1)
        assert feed.process_available(timeout=3) == 0
        assert feed.duplicates == total
        assert table_contents(engine) == before
    finally:
        feed.close()
        engine.dispose()


def test_backfill_of_a_new_topic_equals_the_relay_output(
    school, postgres_db, kafka_config, create_topic
):
    total = school.recorder.max_notification_id()
    relayed = create_topic(partitions=PARTITIONS)
    relay_publish(school, kafka_config, relayed)
    backfilled = create_topic(partitions=PARTITIONS)
    Replay("DogSchool", kafka_config=kafka_config, topic=backfilled, env=postgres_db.env).run()

    def by_partition(topic: str) -> dict[int, list]:
        result: dict[int, list] = {p: [] for p in range(PARTITIONS)}
        for m in sorted(read_all(kafka_config, topic, total), key=lambda m: m.offset()):
            result[m.partition()].append((m.key(), m.headers(), m.value()))
        return result

    assert by_partition(backfilled) == by_partition(relayed)


def test_cli_replays_a_range(school, postgres_db, kafka_config, create_topic):
    topic = create_topic(partitions=PARTITIONS)
    env = dict(os.environ)
    env.update(postgres_db.env)
    env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_config["bootstrap.servers"]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [ESBRIDGE, "replay", "DogSchool", "--topic", topic,
         "--from", "3", "--to", "12", "--analytics", "binary",
         "--app-class", "tests.support.sql_projection_domain:DogSchool"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["count"], summary["first"], summary["last"]) == (10, 3, 12)
    messages = read_all(kafka_config, topic, 10)
    assert sorted(nid_of(m) for m in messages) == list(range(3, 13))
    for m in messages:
        headers = dict(m.headers())
        assert headers["content-type"] == b"application/json"
        assert json.loads(m.value())["originator_id"] == m.key().decode()

    missing = subprocess.run(
        [ESBRIDGE, "replay", "DogSchool", "--topic", "no-such-topic"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2
    assert "topic 'no-such-topic' does not exist" in missing.stderr


def test_cli_takes_the_application_class_as_the_relay_does(
    school, postgres_db, kafka_config, create_topic
):
    """``replay package.module:Class`` read ``public.package.module:class_events`` before."""
    topic = create_topic(partitions=PARTITIONS)
    env = dict(os.environ)
    env.update(postgres_db.env)
    env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_config["bootstrap.servers"]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [ESBRIDGE, "replay", "tests.support.sql_projection_domain:DogSchool", "--topic", topic,
         "--to", "5", "--analytics", "binary"],  # the class gives the transcodings too
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["app"], summary["count"]) == ("DogSchool", 5)
    assert len(read_all(kafka_config, topic, 5)) == 5


def test_an_import_path_is_no_application_name(kafka_config):
    with pytest.raises(ConfigurationError, match="is an import path, not an application's name"):
        Replay(
            "tests.support.sql_projection_domain:DogSchool", kafka_config=kafka_config, topic="x"
        )


def test_bad_ranges_are_refused(postgres_db, kafka_config):
    replay = Replay("DogSchool", kafka_config=kafka_config, topic="x", env=postgres_db.env)
    with pytest.raises(ConfigurationError, match="invalid range"):
        replay.run(0)
    with pytest.raises(ConfigurationError, match="invalid range"):
        replay.run(5, 4)


def test_replay_is_deduplicated_by_the_consumer_adapter(postgres_db, kafka_config, create_topic):
    """A follower that processed everything records nothing new for a replayed range."""
    from examples.dogschool.application import DogSchool as ExampleSchool
    from tests.support.consumer_apps import Mirror, populate, verify_mirror

    school = ExampleSchool(env=postgres_db.env)
    mirror = Mirror(env=postgres_db.env)
    dogs = populate(school, 12, 4)
    total = school.recorder.max_notification_id()
    topic = create_topic(partitions=PARTITIONS)
    relay_publish(school, kafka_config, topic)
    consumer = ConsumerAdapter(
        mirror,
        upstream=school.name,
        topic=topic,
        kafka_config={**kafka_config, "session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
        group_id=f"{topic}.mirror",
    )
    try:
        assert consumer.process_available(timeout=30) == total
        recorded = mirror.recorder.max_notification_id()
        Replay(school.name, kafka_config=kafka_config, topic=topic, env=postgres_db.env).run(10, 40)
        assert consumer.process_available(timeout=10) == 0
        status = consumer.status()
        assert status.duplicates == 31
        assert status.gaps_reconciled == 0
        assert mirror.recorder.max_notification_id() == recorded
        verify_mirror(school, mirror, dogs)
    finally:
        consumer.close()
        school.close()
        mirror.close()
