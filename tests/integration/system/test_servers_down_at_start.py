"""Relays, consumers and runners started while Postgres (or the broker) is down wait, then work.

Postgres restarts are routine; a process (re)started by its supervisor in the
middle of one must not exit with a traceback. Both commands are started with
the server stopped, must stay up, logging why they wait, and after the server
is back must deliver every event exactly once.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.errors import ConfigurationError
from esbridge.names import tracking_names
from esbridge.relay.relay import Relay
from esbridge.runtime.postgres_retry import connection_diagnosis
from esbridge.system.runner import KafkaRunner
from esbridge.testing.servers import free_port
from examples.dogschool.application import Counters, DogSchool
from examples.dogschool.system import system
from tests.support.consumer_apps import Mirror, count_notifications, verify_mirror
from tests.support.relay_support import ESBRIDGE, ROOT, subprocess_env

DOGS = 30
TRICKS = 4


class Background(threading.Thread):
    """Runs ``target`` and keeps what it raised, for the test to report."""

    def __init__(self, target: Any) -> None:
        super().__init__(daemon=True)
        self.work = target
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            self.work()
        except BaseException as e:  # reported by the test
            self.errors.append(e)


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=out)


def test_relay_and_consumer_wait_for_postgres_at_start(
    postgres_server: Any, postgres_db: Any, kafka_broker: Any, create_topic: Any, tmp_path: Path
) -> None:
    school = DogSchool(env=postgres_db.env)
    dog_ids = []
    for i in range(DOGS):
        dog_ids.append(school.register_dog(f"dog {i}"))
    for trick in range(TRICKS):
        for dog_id in dog_ids:
            school.add_trick(dog_id, f"trick {trick}")
    school.close()
    Mirror(env=postgres_db.env).close()  # the follower's tables
    topic = create_topic(partitions=2)
    env = subprocess_env(postgres_db, kafka_broker)

    postgres_server.stop()
    relay_log, consumer_log = tmp_path / "relay.log", tmp_path / "consumer.log"
    relay = start(
        [ESBRIDGE, "relay", "examples.dogschool.application:DogSchool", "--topic", topic],
        env,
        relay_log,
    )
    mirror_cls = "tests.support.consumer_apps:Mirror"
    consume = ["consume", mirror_cls, "--upstream", "DogSchool", "--topic", topic]
    consumer = start([ESBRIDGE, *consume, "--upstream-log"], env, consumer_log)
    try:
        deadline = time.monotonic() + 60
        while "Postgres unreachable" not in consumer_log.read_text() or (
            "cannot open the notification log yet" not in relay_log.read_text()
        ):
            assert relay.poll() is None, relay_log.read_text()[-3000:]
            assert consumer.poll() is None, consumer_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "neither said why it waits"
            time.sleep(0.2)
        time.sleep(2)  # a few retries, with backoff
        assert relay.poll() is None, relay_log.read_text()[-3000:]
        assert consumer.poll() is None, consumer_log.read_text()[-3000:]

        postgres_server.start()
        mirror = Mirror(env=postgres_db.env)
        expected = DOGS * (1 + TRICKS)  # one mirror event per upstream event
        deadline = time.monotonic() + 120
        while (count := count_notifications(mirror)) < expected:
            assert relay.poll() is None, relay_log.read_text()[-3000:]
            assert consumer.poll() is None, consumer_log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{count} of {expected} events processed"
            time.sleep(0.3)
        positions = [mirror.recorder.max_tracking_id(n) for n in tracking_names("DogSchool", 2)]
        assert sum(1 for p in positions if p) == 2, positions  # both partitions were consumed
        school = DogSchool(env=postgres_db.env)
        verify_mirror(school, mirror, dog_ids)
        time.sleep(1)
        assert count_notifications(mirror) == expected  # nothing applied twice
        school.close()
        mirror.close()
    finally:
        postgres_server.start()
        for proc in (relay, consumer):
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in (relay, consumer)]
    assert codes == [0, 0], (relay_log.read_text()[-3000:], consumer_log.read_text()[-3000:])


def test_runner_waits_for_postgres_while_constructing_its_applications(
    postgres_server: Any, postgres_db: Any, kafka_broker: Any, caplog: Any
) -> None:
    made: list[KafkaRunner] = []

    def construct_and_start() -> None:
        # The runner constructs its applications when it is constructed (as the
        # library's runners do): that is where it waits.
        made.append(
            KafkaRunner(
                system,
                # The library's pool waits this long for a connection (30 s by default):
                # shorter, so the runner's own waiting is what bridges the outage.
                env={**postgres_db.env, "POSTGRES_CONNECT_TIMEOUT": "1"},
                kafka_config={"bootstrap.servers": kafka_broker.bootstrap_servers},
            )
        )
        made[0].start()

    postgres_server.stop()
    # Postgres is started again from this thread: the harness ties the server's
    # life to the thread that starts it (a parent-death signal).
    starting = Background(construct_and_start)
    errors = starting.errors
    try:
        with caplog.at_level(logging.WARNING, logger="esbridge.postgres"):
            starting.start()
            time.sleep(3)
            assert starting.is_alive(), errors
            postgres_server.start()
            starting.join(120)
        assert not starting.is_alive() and not errors, errors
        assert "Postgres unreachable (constructing application" in caplog.text
        (runner,) = made
        school = runner.get(DogSchool)
        dog_id = school.register_dog("Fido")
        school.add_trick(dog_id, "roll over")
        counters = runner.get(Counters)
        deadline = time.monotonic() + 60
        while counters.get_count("roll over") != 1:
            assert time.monotonic() < deadline, "the trick was not counted"
            time.sleep(0.2)
    finally:
        postgres_server.start()
        starting.join(120)
        for made_runner in made:
            made_runner.stop()


def test_diagnosis_tells_refused_settings_from_a_server_that_is_down(postgres_db: Any) -> None:
    env = dict(postgres_db.env)
    assert connection_diagnosis("DogSchool", env)() is None
    for wrong, message in [
        ({"POSTGRES_DBNAME": "no_such_db"}, 'database "no_such_db" does not exist'),
        ({"DOGSCHOOL_POSTGRES_PASSWORD": "wrong"}, "password authentication failed"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            connection_diagnosis("DogSchool", {**env, **wrong})()
    down = connection_diagnosis("DogSchool", {**env, "POSTGRES_PORT": str(free_port())})()
    assert down is not None and "refused" in down
    sqlite = {**env, "PERSISTENCE_MODULE": "eventsourcing.sqlite", "POSTGRES_PORT": "1"}
    assert connection_diagnosis("DogSchool", sqlite)() is None  # not a Postgres application


def test_commands_exit_2_at_once_when_postgres_refuses_the_settings(
    postgres_db: Any, kafka_broker: Any, create_topic: Any
) -> None:
    """Not after the pool's 30 s connect timeout, and not waiting for ever."""
    DogSchool(env=postgres_db.env).close()
    topic = create_topic(partitions=1)
    env = {**subprocess_env(postgres_db, kafka_broker), "POSTGRES_PASSWORD": "wrong"}
    mirror_cls = "tests.support.consumer_apps:Mirror"
    commands = [
        ["relay", "examples.dogschool.application:DogSchool", "--topic", topic],
        ["consume", mirror_cls, "--upstream", "DogSchool", "--topic", topic, "--upstream-log"],
        ["status", "tests.integration.runtime.test_postgres_privileges:SYSTEM"],
    ]
    for command in commands:
        started = time.monotonic()
        done = subprocess.run(
            [ESBRIDGE, *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done.stderr[-3000:]
        assert "password authentication failed" in done.stderr, done.stderr[-3000:]
        assert f"Postgres rejected the password of user {postgres_db.user!r}" in done.stderr
        assert "Check POSTGRES_PASSWORD" in done.stderr
        assert time.monotonic() - started < 20


def test_a_consumer_stopped_while_postgres_is_down_ends_quietly(
    postgres_server: Any, postgres_db: Any, kafka_broker: Any, create_topic: Any, caplog: Any
) -> None:
    school = DogSchool(env=postgres_db.env)
    for i in range(DOGS):
        school.register_dog(f"dog {i}")
    school.close()
    topic = create_topic(partitions=1)
    kafka = {"bootstrap.servers": kafka_broker.bootstrap_servers}
    relay = Relay("DogSchool", kafka_config=kafka, topic=topic, env=postgres_db.env)
    try:
        assert relay.publish_available() == DOGS
    finally:
        relay.close()
    Mirror(env=postgres_db.env).close()  # its tables

    def adapter(mirror: Mirror) -> ConsumerAdapter:
        return ConsumerAdapter(
            mirror, upstream="DogSchool", topic=topic, kafka_config=kafka, group_id=topic
        )

    mirror = Mirror(env={**postgres_db.env, "POSTGRES_CONNECT_TIMEOUT": "1"})
    consumer = adapter(mirror)
    postgres_server.stop()
    thread = Background(consumer.run)
    try:
        with caplog.at_level(logging.WARNING, logger="esbridge.postgres"):
            thread.start()
            deadline = time.monotonic() + 60
            while "Postgres unreachable (creating the dead-letter table" not in caplog.text:
                assert thread.is_alive() and time.monotonic() < deadline, described(thread.errors)
                time.sleep(0.1)
        consumer.stop()
        thread.join(30)
        assert not thread.is_alive() and thread.errors == [], described(thread.errors)
        assert consumer.status().error is None
    finally:
        postgres_server.start()
        mirror.close()
    mirror = Mirror(env=postgres_db.env)
    try:  # nothing of the abandoned batch was recorded: a new consumer processes all of it
        assert adapter(mirror).process_available(timeout=60) == DOGS
        assert count_notifications(mirror) == DOGS
    finally:
        mirror.close()


def described(errors: list[BaseException]) -> str:
    import traceback

    return "\n".join("".join(traceback.format_exception(e)) for e in errors)


def test_a_consumer_started_while_the_broker_is_down_waits_for_it(
    postgres_db: Any, kafka_broker: Any, create_topic: Any, tmp_path: Path
) -> None:
    school = DogSchool(env=postgres_db.env)
    dog_ids = [school.register_dog(f"dog {i}") for i in range(DOGS)]
    for dog_id in dog_ids:
        school.add_trick(dog_id, "sit")
    school.close()
    topic = create_topic(partitions=2)
    kafka = {"bootstrap.servers": kafka_broker.bootstrap_servers}
    relay = Relay("DogSchool", kafka_config=kafka, topic=topic, env=postgres_db.env)
    try:
        assert relay.publish_available() == 2 * DOGS
    finally:
        relay.close()
    Mirror(env=postgres_db.env).close()  # its tables
    env = subprocess_env(postgres_db, kafka_broker)
    log = tmp_path / "consumer.log"
    kafka_broker.stop()
    mirror_cls = "tests.support.consumer_apps:Mirror"
    consumer = start(
        [ESBRIDGE, "consume", mirror_cls, "--upstream", "DogSchool", "--topic", topic], env, log
    )
    try:
        deadline = time.monotonic() + 60
        while "Kafka broker at" not in log.read_text() or "unreachable" not in log.read_text():
            assert consumer.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(40)  # longer than the topic_timeout (30 s) that applies once it answers
        assert consumer.poll() is None, log.read_text()[-3000:]
        kafka_broker.start()
        mirror = Mirror(env=postgres_db.env)
        deadline = time.monotonic() + 120
        while (count := count_notifications(mirror)) < 2 * DOGS:
            assert consumer.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{count} processed"
            time.sleep(0.3)
        verify_mirror(DogSchool(env=postgres_db.env), mirror, dog_ids)
        mirror.close()
    finally:
        kafka_broker.start()
        consumer.send_signal(signal.SIGTERM)
        code = consumer.wait(60)
    assert code == 0, log.read_text()[-3000:]
    assert f"stopped: {2 * DOGS} events processed, 0 duplicates skipped" in log.read_text()
