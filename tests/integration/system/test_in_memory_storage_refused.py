"""No Postgres settings: every entry point refuses at start instead of running on memory.

Without ``PERSISTENCE_MODULE`` the eventsourcing library stores applications in
memory. These runs used to look healthy: a runner's ``wait_idle()`` returned at
once, ``esbridge relay`` and ``esbridge run`` logged "started at notification 0"
and published nothing for ever, ``esbridge status`` printed lag 0 and exit 0.
The servers are real and running: only the Postgres settings are missing.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from eventsourcing.system import System

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.errors import ConfigurationError
from esbridge.relay.relay import Relay
from esbridge.system.runner import KafkaRunner
from examples.dogschool.system import system as dogschool_system
from tests.support.consumer_apps import Mirror
from tests.support.relay_support import ESBRIDGE, ROOT

#: What every refusal names: the settings to give instead.
REMEDY = [
    "PERSISTENCE_MODULE=eventsourcing.postgres",
    "POSTGRES_DBNAME, POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, POSTGRES_PASSWORD",
]
IN_MEMORY = "application 'DogSchool' would be stored in memory, not in PostgreSQL"


def without_postgres_settings(env: dict[str, str]) -> dict[str, str]:
    """``env`` without any persistence or Postgres setting (prefixed ones too)."""
    return {
        key: value
        for key, value in env.items()
        if "POSTGRES_" not in key and "PERSISTENCE_MODULE" not in key
    }


@pytest.fixture
def no_postgres_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in set(os.environ) - set(without_postgres_settings(dict(os.environ))):
        monkeypatch.delenv(key)
    yield


def assert_refused(message: str, app: str = IN_MEMORY) -> None:
    assert app in message, message
    for fragment in REMEDY:
        assert fragment in message, message


def test_runner_without_env_refuses_to_start(
    no_postgres_settings: None, kafka_config: dict[str, Any]
) -> None:
    # Refused when the runner is constructed (it constructs its applications then, as the
    # library's runners do), before any application is built.
    with pytest.raises(ConfigurationError) as refused:
        KafkaRunner(
            dogschool_system, kafka_config=kafka_config, topic_prefix=f"t.{uuid.uuid4().hex[:8]}."
        )
    assert_refused(str(refused.value))
    assert "KafkaRunner's env= argument" in str(refused.value)
    assert "env=postgres_db.env" in str(refused.value)


class MemoryMirror(Mirror):
    """A follower whose class keeps it in memory, whatever the runner's settings."""

    env = {**Mirror.env, "MEMORYMIRROR_PERSISTENCE_MODULE": "eventsourcing.popo"}


def test_runner_refuses_an_application_whose_class_keeps_it_in_memory(
    postgres_db: Any, kafka_config: dict[str, Any]
) -> None:
    system = System(pipes=[[dogschool_system.get_app_cls("DogSchool"), MemoryMirror]])
    before = connections(postgres_db.dsn)
    with pytest.raises(ConfigurationError) as refused:  # when constructed, as it constructs
        KafkaRunner(
            system,
            env=postgres_db.env,
            kafka_config=kafka_config,
            topic_prefix=f"t.{uuid.uuid4().hex[:8]}.",
        )
    assert_refused(
        str(refused.value),
        "application 'MemoryMirror' is not stored in PostgreSQL "
        "(PERSISTENCE_MODULE=eventsourcing.popo)",
    )
    # DogSchool, constructed before MemoryMirror was refused, was closed: no pool left open.
    deadline = time.monotonic() + 10  # a closed connection's backend ends soon after
    while connections(postgres_db.dsn) > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert connections(postgres_db.dsn) <= before


def connections(dsn: str) -> int:
    """Connections to the database of ``dsn``, not counting the one asking."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_relay_and_consumer_refuse_in_memory_storage(
    no_postgres_settings: None, postgres_db: Any, kafka_config: dict[str, Any]
) -> None:
    """Library users get the refusal when they make a relay or a consumer adapter."""
    with pytest.raises(ConfigurationError) as refused:
        Relay("DogSchool", kafka_config=kafka_config, topic="t")
    assert_refused(str(refused.value))

    in_memory = Mirror(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    with pytest.raises(ConfigurationError) as refused:
        ConsumerAdapter(
            in_memory, upstream="DogSchool", topic="t", kafka_config=kafka_config, group_id="g"
        )
    assert_refused(
        str(refused.value),
        "application 'Mirror' is not stored in PostgreSQL (PERSISTENCE_MODULE=eventsourcing.popo)",
    )

    mirror = Mirror(env=postgres_db.env)
    try:
        with pytest.raises(ConfigurationError) as refused:
            ConsumerAdapter(
                mirror,
                upstream="DogSchool",
                topic="t",
                kafka_config=kafka_config,
                group_id="g",
                upstream_env={},  # the upstream log would be read from memory: empty
            )
        assert_refused(str(refused.value))
    finally:
        mirror.close()


def test_commands_without_postgres_settings_exit_2(kafka_broker: Any, create_topic: Any) -> None:
    topic = create_topic(partitions=1)
    env = without_postgres_settings(dict(os.environ))
    env.update(KAFKA_BOOTSTRAP_SERVERS=kafka_broker.bootstrap_servers, PYTHONPATH=str(ROOT))
    system = "examples.dogschool.system:system"
    prefix = f"t.{uuid.uuid4().hex[:8]}."
    commands = [
        ["relay", "examples.dogschool.application:DogSchool", "--topic", topic],
        ["relay", "DogSchool", "--topic", topic],
        ["consume", "tests.support.consumer_apps:Mirror", "--upstream", "DogSchool",
         "--topic", topic],
        ["run", system, "--app", "DogSchool", "--topic-prefix", prefix],
        ["run", system, "--app", "Counters", "--topic-prefix", prefix],
        ["run", system, "--setup", "--topic-prefix", prefix],
        ["status", system],
        ["status", system, "--fail-on-lag"],
    ]  # fmt: skip
    for command in commands:
        # Each used to run for ever (relay, run) or exit 0 (status): the timeout fails the test.
        done = subprocess.run(
            [ESBRIDGE, *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (command, done.stderr[-3000:])
        # The first application refused (the follower, for consume) is named.
        assert_refused(done.stderr, "would be stored in memory, not in PostgreSQL")
        assert "started at notification" not in done.stderr
