"""Configuration errors of the commands: exit 2 at once, a message that names the
variable, topic or offset at fault, never a secret, never a traceback (real Kafka,
real Postgres, the ``esbridge`` console script)."""

from __future__ import annotations

import subprocess
from typing import Any

from confluent_kafka import Producer

from esbridge.names import default_position_topic
from esbridge.relay.position import RelayPosition
from tests.support.relay_support import ESBRIDGE, ROOT, ledger, subprocess_env, write_events

SECRET = "S3cr3t-value"


def esbridge(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ESBRIDGE, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def assert_refused(done: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit status 2, ``message`` on stderr, no traceback and no secret anywhere."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert message in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert SECRET not in done.stderr + done.stdout


def test_a_stray_kafka_variable_is_named_by_every_command(
    postgres_db: Any, kafka_broker: Any, create_topic: Any
) -> None:
    ledger(postgres_db.env).close()
    topic = create_topic(partitions=1)
    commands = [
        ["relay", "tests.support.relay_support:Ledger", "--topic", topic],
        ["consume", "tests.support.consumer_apps:Mirror", "--upstream", "DogSchool",
         "--topic", topic],
        ["run", "tests.integration.runtime.test_postgres_privileges:SYSTEM"],
    ]  # fmt: skip
    for variable, message in [
        ("KAFKA_SASL_PASSWROD", "KAFKA_SASL_PASSWROD (sasl.passwrod) (did you mean "
         "KAFKA_SASL_PASSWORD, for sasl.password?)"),
        ("KAFKA_ADVERTISED_LISTENERS", "KAFKA_ADVERTISED_LISTENERS (advertised.listeners). "
         "esbridge passes every KAFKA_* variable to librdkafka"),
    ]:  # fmt: skip
        env = {**subprocess_env(postgres_db, kafka_broker), variable: SECRET}
        for command in commands:
            assert_refused(esbridge(env, *command), f"esbridge: error: not a Kafka client "
                           f"setting: {message}")  # fmt: skip


def test_a_malformed_kafka_config_line_is_shown_without_its_secret(
    postgres_db: Any, kafka_broker: Any, create_topic: Any, tmp_path: Any
) -> None:
    ledger(postgres_db.env).close()
    topic = create_topic(partitions=1)
    config = tmp_path / "client.properties"
    config.write_text(
        f"bootstrap.servers={kafka_broker.bootstrap_servers}\n"
        f"security.protocol=PLAINTEXT\nsasl.password {SECRET}\n"
    )
    env = subprocess_env(postgres_db, kafka_broker)
    done = esbridge(
        env, "relay", "tests.support.relay_support:Ledger", "--topic", topic,
        "--kafka-config", str(config),
    )  # fmt: skip
    assert_refused(done, f"{config}:3: expected 'name=value', got 'sasl.password ***'")


def test_garbage_in_the_position_topic_is_named_with_its_offset(
    postgres_db: Any, kafka_broker: Any, create_topic: Any
) -> None:
    """Something else wrote the relay's key in its position topic: the relay cannot know
    where it stopped, so it refuses to start, naming where the garbage is."""
    write_events(ledger(postgres_db.env), 10)
    topic = create_topic(partitions=1)
    position_topic = create_topic(partitions=1, name=default_position_topic(topic))
    relay_id = f"relay-{topic}"
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers})
    valid = RelayPosition(3, [3]).encode(relay_id, "Ledger", topic)
    for key, value in [(relay_id, valid), ("another-relay", b"{}"), (relay_id, b"\x00garbage")]:
        producer.produce(position_topic, key=key.encode(), value=value)
    assert producer.flush(30) == 0
    env = subprocess_env(postgres_db, kafka_broker)
    done = esbridge(
        env, "relay", "tests.support.relay_support:Ledger", "--topic", topic,
        "--relay-id", relay_id,
    )  # fmt: skip
    assert_refused(
        done,
        f"the last message of relay {relay_id!r} in its position topic {position_topic!r} "
        "(partition 0, offset 2) is not a relay position: not JSON (",
    )
    assert "Only esbridge relays may write to a position topic" in done.stderr
