"""``esbridge status`` reads partition counts from the topics, says what it cannot read, and
shows parked messages by upstream and reason.

The mistakes: ``--partitions 3`` on a 1-partition topic printed positions of
partitions that do not exist, exit 0; a Kafka it could not read, or a dead-letter
table full of another upstream name's messages, went unsaid.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from esbridge.cli import main
from esbridge.deadletters.store import DeadLetter, DeadLetterStore
from esbridge.system.runner import KafkaRunner
from esbridge.system.setup import setup_system
from esbridge.testing.servers import free_port, unique_name
from examples.dogschool.application import DogSchool
from tests.integration.runtime.test_postgres_privileges import SYSTEM, SYSTEM_PATH
from tests.support.consumer_apps import Mirror, populate

DOGS, TRICKS = 6, 1
EVENTS = DOGS * (1 + TRICKS)


@pytest.fixture
def environment(postgres_db: Any, kafka_broker: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test's servers in the environment, as a user's shell has them; a topic prefix."""
    for key, value in postgres_db.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_broker.bootstrap_servers)
    setup_system(SYSTEM, postgres_db.env)
    return unique_name("st") + "."


def run_system(postgres_db: Any, kafka_broker: Any, prefix: str, partitions: int) -> None:
    """Process the dog school's events into the mirror over ``partitions`` partitions."""
    runner = KafkaRunner(
        SYSTEM,
        env=postgres_db.env,
        kafka_config=kafka_broker.config(),
        topic_prefix=prefix,
        partitions=partitions,
    )
    with runner:
        populate(runner.get(DogSchool), DOGS, TRICKS)
        runner.wait_idle(timeout=60)


def status(capsys: Any, prefix: str, *options: str) -> tuple[int, str, str]:
    # Only what the command prints: an earlier CLI call in the session may have left a
    # log handler on stderr that the runner's log lines reached.
    # Nor librdkafka's lines about brokers that earlier tests of the session stopped:
    # clients of those tests that Python has not collected yet still report them.
    capsys.readouterr()
    code = main(["status", SYSTEM_PATH, "--topic-prefix", prefix, *options])
    out, err = capsys.readouterr()
    broker = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    lines = err.splitlines(keepends=True)
    err = "".join(x for x in lines if "esbridge.librdkafka" not in x or broker in x)
    return code, out, err


def row(out: str) -> list[str]:
    return out.splitlines()[2].split()


def test_partitions_come_from_the_topic_and_a_disagreeing_flag_exits_2(
    environment: str, postgres_db: Any, kafka_broker: Any, capsys: Any
) -> None:
    prefix = environment
    run_system(postgres_db, kafka_broker, prefix, partitions=3)
    code, out, err = status(capsys, prefix, "--fail-on-lag")
    assert (code, err) == (0, "")
    positions = row(out)[4:7]
    assert [p.split("=")[0] for p in positions] == ["p0", "p1", "p2"]
    assert sum(int(p.split("=")[1]) > 0 for p in positions) >= 2
    # Given and wrong: said, exit 2 (before, positions of partitions that do not exist).
    code, out, err = status(capsys, prefix, "--partitions", "1")
    assert code == 2 and out == ""
    assert (
        f"esbridge: error: --partitions 1 disagrees with Kafka's metadata: topic "
        f"'{prefix}dogschool' has 3 partitions. esbridge status reads the count itself: "
        "leave out --partitions, or give --partitions 3"
    ) in err
    assert status(capsys, prefix, "--partitions", "3")[0] == 0


def test_a_one_partition_topic_with_partitions_3_is_refused(
    environment: str, postgres_db: Any, kafka_broker: Any, capsys: Any
) -> None:
    prefix = environment
    run_system(postgres_db, kafka_broker, prefix, partitions=1)
    code, out, err = status(capsys, prefix, "--partitions", "3", "--fail-on-lag")
    assert code == 2 and out == ""
    assert f"topic '{prefix}dogschool' has 1 partition. " in err
    code, out, _ = status(capsys, prefix, "--fail-on-lag")
    assert code == 0 and row(out)[3:5] == [str(EVENTS), str(EVENTS)]


def test_kafka_unreachable_counts_from_tracking_records_and_fails_the_health_check(
    environment: str,
    postgres_db: Any,
    kafka_broker: Any,
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = environment
    run_system(postgres_db, kafka_broker, prefix, partitions=2)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    code, out, err = status(capsys, prefix, "--fail-on-lag")
    assert code == 1
    assert "esbridge status: cannot read Kafka (no Kafka broker answered at" in err
    assert "partition counts taken from the followers' tracking records" in err
    # The tracking records say 2 partitions, and every event is processed.
    cells = row(out)
    assert [c.split("=")[0] for c in cells[4:6]] == ["p0", "p1"]
    assert cells[6] == "0"  # lag (events)
    # A flag that disagrees with the tracking records is refused too.
    code, _, err = status(capsys, prefix, "--partitions", "3")
    assert code == 2 and "--partitions 3 disagrees with Mirror's tracking records" in err


def test_parked_counts_by_reason_and_messages_of_a_wrong_upstream_name(
    environment: str, postgres_db: Any, kafka_broker: Any, capsys: Any
) -> None:
    prefix = environment
    run_system(postgres_db, kafka_broker, prefix, partitions=1)
    mirror = Mirror(env=postgres_db.env)
    try:
        store = DeadLetterStore(mirror.recorder.datastore)  # type: ignore[attr-defined]
        store.create_table()
        letters = [
            DeadLetter("Mirror", "DogSchool", f"k{i}", reason, "boom", nid=100 + i)
            for i, reason in enumerate(["policy_error", "policy_error", "foreign_message"])
        ]
        letters += [
            DeadLetter("Mirror", "DogSchol", f"t{i}", "foreign_message", "x", nid=200 + i)
            for i in range(4)
        ]
        with mirror.recorder.datastore.transaction(commit=True) as curs:  # type: ignore[attr-defined]
            store.insert(curs, letters)
    finally:
        mirror.close()
    code, out, _ = status(capsys, prefix, "--fail-on-lag")
    assert code == 0
    lines = out.splitlines()
    assert "3 (foreign_message 1, policy_error 2)" in lines[2]
    assert lines[-1] == (
        "Mirror: 4 messages parked from 'DogSchol', which Mirror does not follow in this "
        "system (foreign_message 4)"
    )


def test_postgres_unreachable_fails_the_health_check(
    environment: str, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTGRES_PORT", str(free_port()))
    monkeypatch.setenv("POSTGRES_CONNECT_TIMEOUT", "2")
    code, out, err = status(capsys, environment, "--fail-on-lag")
    assert code == 1 and out == ""
    assert "esbridge: error: Postgres unreachable" in err


def test_a_system_never_set_up_in_the_database_is_named_not_a_raw_sql_error(
    postgres_db: Any, kafka_broker: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Before: ``relation "public.dogschool_events" does not exist`` and a traceback."""
    for key, value in postgres_db.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_broker.bootstrap_servers)
    prefix = unique_name("st") + "."
    code, out, err = status(capsys, prefix, "--fail-on-lag")
    assert code == 2 and out == ""
    assert (
        "DogSchool's table(s) public.dogschool_events do not exist in database "
        f"{postgres_db.dbname!r}: DogSchool was never set up there. Create its tables with "
        "`esbridge run <system> --setup`"
    ) in err
    assert "Traceback" not in err
    # The leader set up, the follower not: the follower is named.
    DogSchool(env=postgres_db.env).close()
    code, out, err = status(capsys, prefix)
    assert code == 2 and "Mirror's table(s) public.mirror_events" in err
