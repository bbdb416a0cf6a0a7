"""One relay id per topic: ``esbridge relay`` and ``esbridge run`` agree, and a relay id new to
a topic that another relay id published to refuses to publish the log a second time.

The mistake: ``esbridge relay App`` after ``esbridge run`` used another default
relay id (version 1 names), started from notification 0 and doubled the topic.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from esbridge.errors import ConfigurationError, RelayIdConflictError
from esbridge.names import SystemTopics
from esbridge.relay.relay import Relay
from esbridge.system.runner import KafkaRunner
from esbridge.testing.servers import unique_name
from examples.dogschool.application import DogSchool
from tests.integration.runtime.test_postgres_privileges import SYSTEM
from tests.support.consumer_apps import populate
from tests.support.relay_support import ESBRIDGE, ROOT, read_all, subprocess_env

DOGS, TRICKS = 5, 2
EVENTS = DOGS * (1 + TRICKS)


def published_by_the_system(postgres_db: Any, kafka_broker: Any) -> tuple[str, str]:
    """Run the system until its relay published the log: its topic and relay id."""
    prefix = unique_name("ids") + "."
    with KafkaRunner(
        SYSTEM, env=postgres_db.env, kafka_config=kafka_broker.config(), topic_prefix=prefix
    ) as runner:
        populate(runner.get(DogSchool), DOGS, TRICKS)
        runner.wait_idle(timeout=60)
    names = SystemTopics(prefix)
    topic = names.topic("DogSchool")
    assert len(read_all(kafka_broker.config(), topic, EVENTS)) == EVENTS
    return topic, names.relay_id("DogSchool")


def test_the_stand_alone_relay_continues_the_systems_relay(
    postgres_db: Any, kafka_broker: Any
) -> None:
    topic, system_relay_id = published_by_the_system(postgres_db, kafka_broker)
    relay = Relay("DogSchool", kafka_config=kafka_broker.config(), topic=topic, env=postgres_db.env)
    assert relay.relay_id == system_relay_id
    try:
        assert relay.publish_available() == 0  # it continues where the system's relay was
    finally:
        relay.close()
    assert len(read_all(kafka_broker.config(), topic, EVENTS)) == EVENTS


def test_a_relay_under_another_id_refuses_and_the_topic_is_unchanged(
    postgres_db: Any, kafka_broker: Any
) -> None:
    topic, system_relay_id = published_by_the_system(postgres_db, kafka_broker)
    old_default = f"esbridge-relay.dogschool.{topic}"  # names version 1
    done = subprocess.run(
        [ESBRIDGE, "relay", "examples.dogschool.application:DogSchool", "--topic", topic,
         "--relay-id", old_default],
        env=subprocess_env(postgres_db, kafka_broker),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "RelayIdConflictError" in done.stderr
    assert (
        f"relay {old_default!r} has never published to topic {topic!r}, but relay id(s) "
        f"[{system_relay_id!r}] did"
    ) in done.stderr
    assert f"pass its id: --relay-id {system_relay_id} " in done.stderr
    assert "--allow-other-relays" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(read_all(kafka_broker.config(), topic, EVENTS)) == EVENTS
    # The same refusal through the API, with the ids as attributes.
    relay = Relay(
        "DogSchool",
        kafka_config=kafka_broker.config(),
        topic=topic,
        env=postgres_db.env,
        relay_id="another",
    )
    with pytest.raises(RelayIdConflictError) as raised:
        relay.publish_available()
    relay.close()
    assert isinstance(raised.value, ConfigurationError)
    assert (raised.value.relay_id, raised.value.topic) == ("another", topic)
    assert raised.value.other_relay_ids == [system_relay_id]
    assert len(read_all(kafka_broker.config(), topic, EVENTS)) == EVENTS


def test_a_second_relay_on_purpose_publishes_again(postgres_db: Any, kafka_broker: Any) -> None:
    topic, _ = published_by_the_system(postgres_db, kafka_broker)
    relay = Relay(
        "DogSchool",
        kafka_config=kafka_broker.config(),
        topic=topic,
        env=postgres_db.env,
        relay_id="second",
        allow_other_relays=True,
    )
    try:
        assert relay.publish_available() == EVENTS
    finally:
        relay.close()
    assert len(read_all(kafka_broker.config(), topic, 2 * EVENTS)) == 2 * EVENTS
