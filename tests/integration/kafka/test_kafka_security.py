"""Relays and consumers against a broker with SASL_SSL and ACLs: the minimal ACLs work,
and a missing ACL, a wrong password or an untrusted CA stops the command at once, exit 2,
naming what to fix (docs/security.md).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from esbridge.kafka.acls import AclGrant, consumer_acls, relay_acls
from esbridge.names import default_position_topic, default_relay_id
from esbridge.relay.position import POSITION_TOPIC_CONFIG
from esbridge.testing.secure_kafka import KafkaUser, SecureKafkaBroker
from esbridge.testing.servers import unique_name
from esbridge.testing.tls import make_ca
from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import Mirror, count_notifications, populate, verify_mirror
from tests.support.relay_support import ESBRIDGE, ROOT, subprocess_env

DOGS = 20
TRICKS = 3
#: A refused command must end in seconds: before, they retried for ever or for a minute.
FAIL_FAST = 30.0
MIRROR = "tests.support.consumer_apps:Mirror"
#: esbridge status reads each topic's partition count from Kafka, refused like the others.
STATUS = [ESBRIDGE, "status", "tests.integration.runtime.test_postgres_privileges:SYSTEM"]


def relay_command(topic: str) -> list[str]:
    return [ESBRIDGE, "relay", "examples.dogschool.application:DogSchool", "--topic", topic]


def consume_command(topic: str, group: str) -> list[str]:
    return [
        ESBRIDGE,
        "consume",
        MIRROR,
        "--upstream",
        "DogSchool",
        "--topic",
        topic,
        "--group",
        group,
    ]


def relay_id(topic: str) -> str:
    return default_relay_id("DogSchool", topic)


def command_env(
    postgres_db: Any, broker: SecureKafkaBroker, user: KafkaUser, **kafka: Any
) -> dict[str, str]:
    env = subprocess_env(postgres_db, broker)
    env.update(broker.user_env(user, **kafka))
    return env


def refused(command: list[str], env: dict[str, str]) -> str:
    """Run ``command``, which must exit 2 within :data:`FAIL_FAST` s; its stderr."""
    started = time.monotonic()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-3000:]
    assert elapsed < FAIL_FAST, (elapsed, done.stderr[-3000:])
    assert "no Kafka broker answered" not in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr


def topics(broker: SecureKafkaBroker, partitions: int = 2) -> str:
    """A relay topic and its position topic, made by the super user (relays need no CREATE)."""
    topic = broker.create_topic(partitions=partitions)
    broker.create_topic(default_position_topic(topic), 1, dict(POSITION_TOPIC_CONFIG))
    return topic


RELAY_GRANTS = {"topic": 0, "position": 1, "transactional_id": 2, "group": 3}


def grant(broker: SecureKafkaBroker, user: KafkaUser, grants: list[AclGrant]) -> None:
    """Add ``grants`` (from :mod:`esbridge.kafka.acls`, what ``esbridge acls`` prints)."""
    for g in grants:
        broker.allow(user, g.resource_type, g.name, *g.operations, prefixed=g.prefixed)


def grant_relay(broker: SecureKafkaBroker, user: KafkaUser, topic: str, *, skip: str = "") -> None:
    """The relay's minimal ACLs (esbridge.kafka.acls), but the one named by ``skip``."""
    grants = relay_acls(user.principal, topic, relay_id(topic))
    assert len(grants) == len(RELAY_GRANTS)
    grant(broker, user, [g for i, g in enumerate(grants) if RELAY_GRANTS.get(skip) != i])


def grant_consumer(
    broker: SecureKafkaBroker, user: KafkaUser, topic: str, group: str, *, skip: str = ""
) -> None:
    """The consumer's minimal ACLs (esbridge.kafka.acls), but the one named by ``skip``;
    the optional one (its relay's position topic) only when nothing is skipped."""
    grants = consumer_acls(user.principal, topic, group)
    kinds = {"topic": grants[0], "group": grants[1]}
    grant(
        broker, user, [g for g in grants if g is not kinds.get(skip) and not (skip and g.optional)]
    )


@pytest.fixture
def school(postgres_db: Any) -> Any:
    school = DogSchool(env=postgres_db.env)
    yield school
    school.close()


@pytest.mark.parametrize("mode", ["payloads", "prompts"])
def test_relay_and_consumer_with_the_minimal_acls_deliver_exactly_once(
    secure_kafka_broker: SecureKafkaBroker,
    postgres_db: Any,
    school: Any,
    tmp_path: Path,
    mode: str,
) -> None:
    broker = secure_kafka_broker
    dog_ids = populate(school, DOGS, TRICKS)
    topic = topics(broker, partitions=2 if mode == "payloads" else 1)
    group = unique_name("g")
    relay_user, consumer_user = broker.add_user(), broker.add_user()
    if mode == "payloads":
        grant_relay(broker, relay_user, topic)
    else:  # prompts: no transactions, no position
        grant(broker, relay_user, relay_acls(relay_user.principal, topic, "-", mode=mode))
    grant(broker, consumer_user, consumer_acls(consumer_user.principal, topic, group, mode=mode))
    logs = tmp_path / "relay.log", tmp_path / "consumer.log"
    processes = []
    for command, user, log in (
        ([*relay_command(topic), "--mode", mode], relay_user, logs[0]),
        ([*consume_command(topic, group), "--mode", mode], consumer_user, logs[1]),
    ):
        with log.open("wb") as out:
            processes.append(
                subprocess.Popen(
                    command,
                    env=command_env(postgres_db, broker, user),
                    cwd=ROOT,
                    stdout=out,
                    stderr=out,
                )
            )
    mirror = Mirror(env=postgres_db.env)
    try:
        expected = DOGS * (1 + TRICKS)  # one mirror event per upstream event
        deadline = time.monotonic() + 120
        while (count := count_notifications(mirror)) < expected:
            for process, log in zip(processes, logs, strict=True):
                assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{count} of {expected} events processed"
            time.sleep(0.3)
        verify_mirror(school, mirror, dog_ids)
        time.sleep(1)
        assert count_notifications(mirror) == expected  # nothing applied twice
    finally:
        mirror.close()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(60) for process in processes]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
    for log in logs:  # DESCRIBE_CONFIGS is optional: the relay then keeps its size limit
        lines = log.read_text().lower().splitlines()
        refusals = [line for line in lines if "authorization failed" in line]
        assert all("cannot read max.message.bytes" in line for line in refusals), refusals


@pytest.mark.parametrize(
    ("skip", "resource", "operation"),
    [
        ("topic", "topic {topic!r}", "WRITE"),
        ("position", "topic '{topic}.esbridge-relay-position'", "READ"),
        ("transactional_id", "transactional id '{topic}.relay.dogschool'", "WRITE"),
    ],
)
def test_a_relay_without_an_acl_stops_naming_it(
    secure_kafka_broker: SecureKafkaBroker,
    postgres_db: Any,
    school: Any,
    skip: str,
    resource: str,
    operation: str,
) -> None:
    broker = secure_kafka_broker
    populate(school, 2, 1)
    topic = topics(broker)
    user = broker.add_user()
    grant_relay(broker, user, topic, skip=skip)
    if skip == "topic":
        broker.allow(user, "topic", topic, "DESCRIBE")  # it sees the topic, may not write
    if skip == "position":
        broker.allow(user, "topic", default_position_topic(topic), "WRITE")  # may not read
    stderr = refused(relay_command(topic), command_env(postgres_db, broker, user))
    named = resource.format(topic=topic)
    assert f"Kafka refused {user.principal} {operation} on {named}" in stderr, stderr[-3000:]
    assert f"--operation {operation}" in stderr
    assert "KafkaAuthorizationError" in stderr


def test_a_relay_whose_write_acl_is_removed_stops_naming_it(
    secure_kafka_broker: SecureKafkaBroker, postgres_db: Any, school: Any, tmp_path: Path
) -> None:
    """The refused transaction's deliveries say only "purged": it used to retry for ever."""
    broker = secure_kafka_broker
    populate(school, 2, 1)
    topic = topics(broker)
    user = broker.add_user()
    grant_relay(broker, user, topic)
    broker.allow(user, "topic", topic, "DESCRIBE")  # it still sees the topic
    log = tmp_path / "relay.log"
    with log.open("wb") as out:
        relay = subprocess.Popen(
            relay_command(topic),
            env=command_env(postgres_db, broker, user),
            cwd=ROOT,
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 60
        while "started at notification" not in log.read_text():
            assert relay.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        broker.revoke(user, "topic", topic, "WRITE")
        populate(school, 2, 1, seed=2)
        started = time.monotonic()
        code = relay.wait(FAIL_FAST)
        assert time.monotonic() - started < FAIL_FAST
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait(10)
    text = log.read_text()
    assert code == 2, text[-3000:]
    assert f"Kafka refused {user.principal} WRITE on topic {topic!r}" in text, text[-3000:]
    assert "reconnecting" not in text


def test_a_relay_without_describe_on_the_position_groups_stops_at_restart(
    secure_kafka_broker: SecureKafkaBroker, postgres_db: Any, school: Any
) -> None:
    """Its position reader's group is never joined, but librdkafka looks its coordinator up.

    With an empty position topic (a first start) the reader polls nothing and
    the relay works; once a position is stored, reading it is refused.
    """
    broker = secure_kafka_broker
    populate(school, 2, 1)
    topic = topics(broker)
    user = broker.add_user()
    grant_relay(broker, user, topic, skip="group")
    env = command_env(postgres_db, broker, user)
    publish_once(broker, topic, env)
    stderr = refused(relay_command(topic), env)
    expected = (
        f"Kafka refused {user.principal} DESCRIBE on groups starting with 'esbridge-position-'"
    )
    assert expected in stderr, stderr[-3000:]
    assert "--resource-pattern-type prefixed" in stderr


def publish_once(broker: SecureKafkaBroker, topic: str, env: dict[str, str]) -> None:
    """Run the relay until its position is stored, then stop it."""
    position = TopicPartition(default_position_topic(topic), 0)
    probe = Consumer(broker.config(**{"group.id": unique_name("probe")}))
    relay = subprocess.Popen(relay_command(topic), env=env, cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while probe.get_watermark_offsets(position, timeout=10, cached=False)[1] == 0:
            assert relay.poll() is None
            assert time.monotonic() < deadline, "no position stored"
            time.sleep(0.2)
    finally:
        probe.close()
        relay.send_signal(signal.SIGTERM)
        _, stderr = relay.communicate(timeout=60)
    assert relay.returncode == 0, stderr.decode()[-3000:]


def test_a_relay_that_may_not_describe_its_topic_stops_naming_it(
    secure_kafka_broker: SecureKafkaBroker, postgres_db: Any, school: Any
) -> None:
    broker = secure_kafka_broker
    populate(school, 2, 1)
    topic = topics(broker)
    user = broker.add_user()
    grant_relay(broker, user, topic, skip="topic")  # no ACL at all on the topic
    stderr = refused(relay_command(topic), command_env(postgres_db, broker, user))
    assert f"Kafka refused {user.principal} DESCRIBE on topic {topic!r}" in stderr, stderr[-3000:]
    assert "does not exist" not in stderr


@pytest.mark.parametrize(
    ("skip", "describe", "resource", "operation"),
    [
        ("group", False, "group {group!r}", "READ"),
        ("topic", True, "topic {topic!r}", "READ"),
        ("topic", False, "topic {topic!r}", "DESCRIBE"),
    ],
    ids=["no-group-read", "no-topic-read", "no-topic-describe"],
)
def test_a_consumer_without_an_acl_stops_naming_it(
    secure_kafka_broker: SecureKafkaBroker,
    postgres_db: Any,
    skip: str,
    describe: bool,
    resource: str,
    operation: str,
) -> None:
    broker = secure_kafka_broker
    topic = topics(broker)
    group = unique_name("g")
    user = broker.add_user()
    grant_consumer(broker, user, topic, group, skip=skip)
    if describe:
        broker.allow(user, "topic", topic, "DESCRIBE")
    stderr = refused(consume_command(topic, group), command_env(postgres_db, broker, user))
    named = resource.format(topic=topic, group=group)
    assert f"Kafka refused {user.principal} {operation} on {named}" in stderr, stderr[-3000:]
    assert "does not exist" not in stderr


def test_a_wrong_password_is_reported_as_such(
    secure_kafka_broker: SecureKafkaBroker, postgres_db: Any, school: Any
) -> None:
    broker = secure_kafka_broker
    topic = topics(broker)
    user = broker.add_user()
    wrong = KafkaUser(user.name, "not-the-password-4711")
    env = command_env(postgres_db, broker, wrong)
    for command in (relay_command(topic), consume_command(topic, unique_name("g")), STATUS):
        stderr = refused(command, env)
        assert "KafkaAuthenticationError" in stderr, stderr[-3000:]
        assert f"refused the SASL login of user {user.name!r} (SCRAM-SHA-512)" in stderr
        assert "KAFKA_SASL_PASSWORD" in stderr
        assert wrong.password not in stderr  # never echoed


def test_an_untrusted_broker_certificate_is_reported_as_such(
    secure_kafka_broker: SecureKafkaBroker, postgres_db: Any, school: Any, tmp_path: Path
) -> None:
    broker = secure_kafka_broker
    topic = topics(broker)
    user = broker.add_user()
    other_ca = make_ca(tmp_path, "other-ca")
    env = command_env(postgres_db, broker, user, **{"ssl.ca.location": str(other_ca)})
    for command in (relay_command(topic), consume_command(topic, unique_name("g")), STATUS):
        stderr = refused(command, env)
        assert "KafkaTLSError" in stderr, stderr[-3000:]
        assert "certificate verify failed" in stderr
        assert "ssl.ca.location (KAFKA_SSL_CA_LOCATION)" in stderr
