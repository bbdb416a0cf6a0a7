"""Kafka offsets never run ahead of Postgres, and a partition's missing end is found.

A batch whose Postgres commit fails (a privilege revoked, a trigger raising,
Postgres killed while the consumer stops) must leave the group's committed
offsets where Postgres is, so that the restarted consumer reads those messages
again, with or without the upstream log. Offsets committed past the Postgres
position some other way (a database restored from a backup) are detected by
the position each offset carries in its metadata. And a partition whose last
events never reached the topic (a *trailing gap*) is filled from the upstream
log once it has been idle for ``trailing_gap_after`` seconds.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from eventsourcing.persistence import PersistenceError

from esbridge import wire
from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.consumer.offsets import offset_metadata
from esbridge.errors import GapNotReconciledError
from esbridge.names import tracking_names
from esbridge.relay.relay import Relay
from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import (
    ManualPublisher,
    Mirror,
    count_notifications,
    notifications,
    populate,
    verify_mirror,
)
from tests.support.relay_support import publish_and_close

PARTITIONS = 3
FAST = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def adapter(mirror: Mirror, topic: str, kafka_config: dict[str, Any], **kw: Any) -> Any:
    return ConsumerAdapter(
        mirror,
        upstream="DogSchool",
        topic=topic,
        kafka_config={**kafka_config, **FAST},
        group_id=f"{topic}.g",
        **kw,
    )


def positions(mirror: Mirror) -> list[int]:
    return [
        mirror.recorder.max_tracking_id(name) or 0
        for name in tracking_names("DogSchool", PARTITIONS)
    ]


def committed(kafka_config: dict[str, Any], topic: str) -> list[TopicPartition]:
    probe = Consumer({**kafka_config, "group.id": f"{topic}.g"})
    try:
        wanted = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return list(probe.committed(wanted, timeout=10))
    finally:
        probe.close()


def assert_offsets_within_postgres(
    kafka_config: dict[str, Any], topic: str, messages: list[Any], mirror: Mirror
) -> None:
    """No committed offset skips a message whose notification Postgres has not recorded."""
    held = positions(mirror)
    for tp in committed(kafka_config, topic):
        on_partition = [m for m in messages if m[3] == tp.partition]
        recorded = sum(1 for m in on_partition if int(dict(m[2])[wire.H_NID]) <= held[tp.partition])
        assert tp.offset < 0 or tp.offset <= recorded, (tp, held)


def consume_rest(
    mirror: Mirror, topic: str, kafka_config: dict[str, Any], env: Any, expected: int
) -> None:
    consumer = adapter(mirror, topic, kafka_config, upstream_env=env)
    try:
        deadline = time.monotonic() + 30
        while count_notifications(mirror) != expected:  # failed batches burnt some ids
            assert time.monotonic() < deadline, positions(mirror)
            consumer.process_available(timeout=2)
    finally:
        consumer.close()


def published(school: DogSchool, kafka_config: dict[str, Any], topic: str) -> Any:
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", PARTITIONS)
    return publisher, publisher.messages(notifications(school))


def test_a_batch_refused_by_a_revoked_privilege_leaves_the_offsets_behind(
    school: DogSchool,
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
    upstream_env: Any,
) -> None:
    role = f"follower_{postgres_db.dbname}"[:60]
    admin = psycopg.connect(postgres_db.dsn, autocommit=True)
    admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    admin.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
    own = {"POSTGRES_USER": role, "POSTGRES_PASSWORD": "pw", "POSTGRES_SCHEMA": role}
    mirror = Mirror(env={**postgres_db.env, **own})
    try:
        topic = create_topic(partitions=PARTITIONS)
        dogs = populate(school, 10, 2)
        publisher, messages = published(school, kafka_config, topic)
        publisher.send(messages[:12])
        first = adapter(mirror, topic, kafka_config)
        first.process_available(timeout=15)
        first.close()
        assert mirror.recorder.max_notification_id() == 12
        admin.execute(f"REVOKE UPDATE ON {role}.mirror_tracking FROM {role}")
        publisher.send(messages[12:])
        second = adapter(mirror, topic, kafka_config)
        with pytest.raises(PersistenceError, match="permission denied"):
            second.run()
        assert mirror.recorder.max_notification_id() == 12  # nothing of the failed batch
        assert_offsets_within_postgres(kafka_config, topic, messages, mirror)
        admin.execute(f"GRANT UPDATE ON {role}.mirror_tracking TO {role}")
        consume_rest(mirror, topic, kafka_config, upstream_env, 30)
        verify_mirror(school, mirror, dogs)
    finally:
        mirror.close()
        admin.close()


def test_a_trigger_raising_in_the_commit_leaves_the_offsets_behind(
    school: DogSchool,
    mirror: Mirror,
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
) -> None:
    admin = psycopg.connect(postgres_db.dsn, autocommit=True)
    admin.execute("CREATE TABLE refuse (on_ boolean)")
    admin.execute(
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
        "IF EXISTS (SELECT 1 FROM refuse) THEN RAISE EXCEPTION 'refused by trigger'; END IF; "
        "RETURN NEW; END $$ LANGUAGE plpgsql"
    )
    admin.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON mirror_events "
        "FOR EACH ROW EXECUTE FUNCTION refuse()"
    )
    try:
        topic = create_topic(partitions=PARTITIONS)
        dogs = populate(school, 10, 2)
        publisher, messages = published(school, kafka_config, topic)
        publisher.send(messages[:15])
        consumer = adapter(mirror, topic, kafka_config)
        consumer.process_available(timeout=15)
        consumer.close()
        admin.execute("INSERT INTO refuse VALUES (true)")
        publisher.send(messages[15:])
        with pytest.raises(PersistenceError, match="refused by trigger"):
            adapter(mirror, topic, kafka_config).run()
        assert mirror.recorder.max_notification_id() == 15
        assert_offsets_within_postgres(kafka_config, topic, messages, mirror)
        admin.execute("DELETE FROM refuse")
        consume_rest(mirror, topic, kafka_config, None, 30)
        verify_mirror(school, mirror, dogs)
    finally:
        admin.close()


def test_stopped_while_postgres_is_down_mid_commit_then_restarted(
    school: DogSchool,
    postgres_db: Any,
    postgres_server: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
) -> None:
    # Short connection waits: each attempt of the dead server ends within a second.
    mirror = Mirror(env={**postgres_db.env, "POSTGRES_CONNECT_TIMEOUT": "1"})
    try:
        topic = create_topic(partitions=PARTITIONS)
        dogs = populate(school, 30, 3)
        publisher, messages = published(school, kafka_config, topic)
        publisher.send(messages[:40])
        consumer = adapter(mirror, topic, kafka_config, batch_size=10)
        consumer.process_available(timeout=15)
        publisher.send(messages[40:])
        postgres_server.stop(kill=True)  # the next batch's commit cannot happen
        runs = threading.Thread(target=consumer.run)
        runs.start()
        time.sleep(3)  # it polls, builds a batch and retries its commit
        consumer.stop()
        runs.join(60)
        assert not runs.is_alive()
        postgres_server.start()
        assert mirror.recorder.max_notification_id() == 40
        assert_offsets_within_postgres(kafka_config, topic, messages, mirror)
        consume_rest(mirror, topic, kafka_config, None, 120)
        verify_mirror(school, mirror, dogs)
    finally:
        mirror.close()


def test_an_offset_committed_past_postgres_is_not_trusted(
    school: DogSchool,
    mirror: Mirror,
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
) -> None:
    """Postgres restored from a backup: the group's offsets are past its positions."""
    topic = create_topic(partitions=PARTITIONS)
    dogs = populate(school, 10, 2)
    publisher, messages = published(school, kafka_config, topic)
    publisher.send(messages)
    ahead = Consumer({**kafka_config, "group.id": f"{topic}.g"})
    ahead.commit(
        offsets=[TopicPartition(topic, p, 5, metadata=offset_metadata(25)) for p in range(3)],
        asynchronous=False,
    )
    ahead.close()
    consumer = adapter(mirror, topic, kafka_config)
    consumer.process_available(timeout=15)
    consumer.close()
    verify_mirror(school, mirror, dogs)
    assert mirror.recorder.max_notification_id() == 30


@pytest.mark.parametrize("partitions", [1, PARTITIONS])
def test_a_trailing_gap_is_filled_from_the_log(
    school: DogSchool,
    mirror: Mirror,
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
    partitions: int,
) -> None:
    topic = create_topic(partitions=partitions)
    dogs = populate(school, 10, 2)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", partitions)
    messages = publisher.messages(notifications(school))
    ends = {m[3]: i for i, m in enumerate(messages)}  # each partition's last message
    publisher.send([m for i, m in enumerate(messages) if i not in ends.values()])
    consumer = adapter(mirror, topic, kafka_config, upstream_env=postgres_db.env)
    consumer.tuning.trailing_gap_after = 1.0
    runs = threading.Thread(target=consumer.run)
    runs.start()
    try:
        deadline = time.monotonic() + 30
        while mirror.recorder.max_notification_id() != 30:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        consumer.stop()
        runs.join(30)
    verify_mirror(school, mirror, dogs)
    status = consumer.status()
    assert status.reconciled_events == len(ends) and status.processed == 30


def test_a_consumer_started_past_the_relay_s_messages_is_not_silent(
    school: DogSchool,
    mirror: Mirror,
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
    upstream_env: Any,
) -> None:
    """Offsets set to the end by another tool: the relay's position topic (no log) or the
    upstream log shows that the partitions' events never arrived."""
    topic = create_topic(partitions=PARTITIONS)
    dogs = populate(school, 10, 2)
    relay = Relay("DogSchool", kafka_config=kafka_config, topic=topic, env=school.env)
    assert publish_and_close(relay) == 30
    probe = Consumer({**kafka_config, "group.id": f"{topic}.g"})
    ends = [
        TopicPartition(topic, p, probe.get_watermark_offsets(TopicPartition(topic, p))[1])
        for p in range(PARTITIONS)
    ]
    probe.commit(offsets=ends, asynchronous=False)  # no esbridge metadata: trusted
    probe.close()
    consumer = adapter(
        mirror,
        topic,
        kafka_config,
        upstream_env=upstream_env,
        trailing_gap_after=1.0,
        hold_timeout=12.0,
    )
    if upstream_env is not None:
        consume_rest(mirror, topic, kafka_config, postgres_db.env, 30)
        verify_mirror(school, mirror, dogs)
        return
    failure: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as e:
            failure.append(e)

    runs = threading.Thread(target=run)
    runs.start()
    deadline = time.monotonic() + 20
    while not (held := consumer.status().held_partitions):
        assert time.monotonic() < deadline and runs.is_alive(), failure
        time.sleep(0.1)
    assert all("published by the relay, not on the topic" in h.missing for h in held)
    runs.join(30)
    [error] = failure  # once held for longer than hold_timeout
    assert isinstance(error, GapNotReconciledError)
    assert "published notifications up to" in str(error)
    assert error.partition in (0, 1, 2) and error.position == 0 and error.held_nid is None
    assert positions(mirror) == [0, 0, 0]
