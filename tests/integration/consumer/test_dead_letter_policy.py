"""Dead-letter policies against a real Kafka and a real Postgres: park, skip, stop.

The upstream log: three dogs with a trick each (6 events), then dog 0 learns
"poison" and "later" (7, 8) and dog 1 "fine" (9). ``Fragile`` fails on
"poison". Each test counts the follower's effects (its notification log) and
the dead-letter rows, in order.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from esbridge import DeadLetterPolicy, PoisonMessageError
from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.deadletters.store import DeadLetterStore
from examples.dogschool.application import DogSchool
from tests.integration.consumer.test_consumer import (
    adapter,
    consume_all,
    fragile_follower,
    relay_all,
    teach,
)
from tests.support.consumer_apps import Fragile, count_notifications, populate, verify_mirror

POISON_NID = 7  # dog 0's "poison"; 8 is its "later", 9 dog 1's "fine"


def poisoned(school: DogSchool, topic: str, kafka_config: dict[str, Any]) -> list[Any]:
    dogs = populate(school, 3, 1)
    teach(school, dogs[0], "poison", "later")
    teach(school, dogs[1], "fine")
    assert relay_all(school, topic, kafka_config) == 9
    return dogs


def policy_adapter(
    fragile: Fragile, topic: str, kafka_config: dict[str, Any], policy: DeadLetterPolicy, **kw: Any
) -> ConsumerAdapter:
    return adapter(fragile, topic, kafka_config, dead_letter_policy=policy, dlq_refresh=0.0, **kw)


def sample(registry: CollectorRegistry, name: str, topic: str) -> float | None:
    labels = {"follower": "Fragile", "upstream": "DogSchool", "topic": topic}
    return registry.get_sample_value(name, labels)


def test_park_retries_with_backoff_then_holds_the_key(
    school: DogSchool, create_topic: Any, kafka_config: dict[str, Any], postgres_db: Any
) -> None:
    fragile = fragile_follower(postgres_db)
    Fragile.poison_attempts.clear()
    topic = create_topic(partitions=1)
    dogs = poisoned(school, topic, kafka_config)
    policy = DeadLetterPolicy(max_attempts=4, backoff=0.2, backoff_cap=0.3, jitter=0.5)
    registry = CollectorRegistry()
    consumer = policy_adapter(fragile, topic, kafka_config, policy, registry=registry)
    processed, status = consume_all(consumer)
    assert processed == 9 and fragile.recorder.max_tracking_id("DogSchool") == 9
    assert (status.parked, status.skipped, status.dead_letters) == (2, 0, 2)
    # 4 tries of "poison", waiting 0.2, 0.3, 0.3 s less up to half of each (jitter).
    attempts = Fragile.poison_attempts
    assert len(attempts) == 4
    for (before, after), nominal in zip(itertools.pairwise(attempts), [0.2, 0.3, 0.3], strict=True):
        assert 0.5 * nominal - 0.01 <= after - before <= nominal + 1.0
    # Effects: 3 dogs, 3 tricks, "fine"; dog 0's "poison" and "later" wait.
    assert count_notifications(fragile) == 7
    assert fragile.tricks(dogs[0]) == list(school.get_dog(dogs[0])["tricks"][:1])
    verify_mirror(school, fragile, dogs[1:])
    rows = DeadLetterStore(fragile.recorder.datastore).list("Fragile", status=None)  # type: ignore[attr-defined]
    assert [(r.nid, r.reason, r.status, r.attempts) for r in rows] == [
        (7, "policy_error", "parked", 4),
        (8, "held_behind", "parked", 1),
    ]
    assert rows[0].traceback is not None
    assert "Traceback (most recent call last)" in rows[0].traceback
    assert rows[0].traceback.rstrip().endswith("ValueError: cannot learn poison")
    assert (rows[0].kafka_topic, rows[0].kafka_partition, rows[0].kafka_offset) == (topic, 0, 6)
    # The gauges: 2 parked, the oldest a few seconds old at most.
    assert sample(registry, "esbridge_consumer_parked_messages", topic) == 2
    age = sample(registry, "esbridge_consumer_parked_oldest_age_seconds", topic)
    assert age is not None and 0 <= age < 30
    assert sample(registry, "esbridge_consumer_parked_total", topic) == 2
    fragile.close()


def test_skip_records_the_message_and_the_key_goes_on(
    school: DogSchool, create_topic: Any, kafka_config: dict[str, Any], postgres_db: Any
) -> None:
    fragile = fragile_follower(postgres_db)
    Fragile.poison_attempts.clear()
    topic = create_topic(partitions=1)
    dogs = poisoned(school, topic, kafka_config)
    policy = DeadLetterPolicy(max_attempts=2, backoff=0.01, on_exhausted="skip")
    registry = CollectorRegistry()
    consumer = policy_adapter(fragile, topic, kafka_config, policy, registry=registry)
    processed, status = consume_all(consumer)
    assert processed == 9 and fragile.recorder.max_tracking_id("DogSchool") == 9
    assert (status.parked, status.skipped, status.dead_letters) == (0, 1, 0)
    assert len(Fragile.poison_attempts) == 2
    # Effects: 3 dogs, 3 tricks, dog 0's "later" (without "poison") and "fine".
    assert count_notifications(fragile) == 8
    tricks = list(school.get_dog(dogs[0])["tricks"])
    assert fragile.tricks(dogs[0]) == [tricks[0], "later"]
    verify_mirror(school, fragile, dogs[1:])
    store = DeadLetterStore(fragile.recorder.datastore)  # type: ignore[attr-defined]
    rows = store.list("Fragile", status=None)
    assert [(r.nid, r.reason, r.status, r.attempts) for r in rows] == [
        (7, "policy_error", "skipped", 2)
    ]
    assert store.count("Fragile") == 0  # not parked: nothing waits, nothing to retry
    assert sample(registry, "esbridge_consumer_skipped_total", topic) == 1
    assert sample(registry, "esbridge_consumer_parked_messages", topic) == 0
    assert sample(registry, "esbridge_consumer_parked_oldest_age_seconds", topic) == 0
    # A restart processes nothing again.
    again = policy_adapter(fragile, topic, kafka_config, policy, group="again")
    assert consume_all(again)[0] == 0
    assert count_notifications(fragile) == 8
    fragile.close()


def test_stop_raises_at_the_message_and_a_restart_tries_it_again(
    school: DogSchool, create_topic: Any, kafka_config: dict[str, Any], postgres_db: Any
) -> None:
    fragile = fragile_follower(postgres_db)
    Fragile.poison_attempts.clear()
    topic = create_topic(partitions=1)
    dogs = poisoned(school, topic, kafka_config)
    policy = DeadLetterPolicy(max_attempts=3, backoff=0.01, on_exhausted="stop")
    for run in (1, 2):  # a restart meets it again, and stops again
        consumer = policy_adapter(fragile, topic, kafka_config, policy, group=f"run{run}")
        with pytest.raises(PoisonMessageError) as raised:
            consume_all(consumer)
        error = raised.value
        assert (error.key, error.nid, error.topic, error.partition, error.offset) == (
            str(dogs[0]),
            POISON_NID,
            topic,
            0,
            6,
        )
        assert (error.follower, error.upstream) == ("Fragile", "DogSchool")
        assert isinstance(error.__cause__, ValueError)
        assert "after 3 attempt(s)" in str(error) and "cannot learn poison" in str(error)
        assert re.search(r"stopped at notification 7 of key \S+ \(\S+\[0\]@6\)", str(error))
        assert len(Fragile.poison_attempts) == 3 * run
        # Everything before it, nothing after it: dog 1's "fine" (9) is not applied.
        assert fragile.recorder.max_tracking_id("DogSchool") == POISON_NID - 1
        assert count_notifications(fragile) == 6
        assert DeadLetterStore(fragile.recorder.datastore).list("Fragile", status=None) == []  # type: ignore[attr-defined]
    Fragile.healed = True
    processed, status = consume_all(policy_adapter(fragile, topic, kafka_config, policy))
    assert processed == 3 and status.parked == 0
    verify_mirror(school, fragile, dogs)
    assert count_notifications(fragile) == 9
    fragile.close()


def test_undecodable_messages_meet_the_policy_s_choice_at_once(
    school: DogSchool, create_topic: Any, kafka_config: dict[str, Any], postgres_db: Any
) -> None:
    """An event type the follower cannot import cannot get better by retrying."""
    from tests.support.consumer_apps import ManualPublisher

    fragile = fragile_follower(postgres_db)
    topic = create_topic(partitions=1)
    dogs = populate(school, 2, 0)
    notes = school.recorder.select_notifications(start=1, limit=10)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", 1)
    gone = replace(notes[0], topic="nowhere.module:Gone")
    publisher.send(publisher.messages([gone, notes[1]]))
    stop = DeadLetterPolicy(on_exhausted="stop")
    with pytest.raises(PoisonMessageError, match=r"after 1 attempt.*nowhere"):
        consume_all(policy_adapter(fragile, topic, kafka_config, stop))
    assert fragile.recorder.max_tracking_id("DogSchool") in (0, None)
    skip = DeadLetterPolicy(on_exhausted="skip")
    processed, status = consume_all(policy_adapter(fragile, topic, kafka_config, skip, group="s"))
    assert (processed, status.skipped, status.parked) == (2, 1, 0)
    rows = DeadLetterStore(fragile.recorder.datastore).list("Fragile", status=None)  # type: ignore[attr-defined]
    assert [(r.nid, r.status) for r in rows] == [(1, "skipped")]
    verify_mirror(school, fragile, dogs[1:])
    fragile.close()


def test_esbridge_consume_takes_the_policy_flags(
    school: DogSchool,
    create_topic: Any,
    kafka_config: dict[str, Any],
    postgres_db: Any,
    kafka_broker: Any,
) -> None:
    """The flags reach a real ``esbridge consume``: ``--on-poison stop`` ends the command on
    the poison message, having committed what came before; ``skip`` then records it and
    goes on, exactly once."""
    import subprocess

    from tests.support.relay_support import ESBRIDGE, ROOT, subprocess_env

    fragile = fragile_follower(postgres_db)
    topic = create_topic(partitions=1)
    dogs = poisoned(school, topic, kafka_config)

    def consume(*flags: str, timeout: float) -> subprocess.CompletedProcess[str]:
        command = [
            ESBRIDGE, "consume", "tests.support.consumer_apps:Fragile",
            "--upstream", "DogSchool", "--topic", topic, "--group", f"{topic}.g",
            "--max-attempts", "2", "--backoff", "0.01", *flags,
        ]  # fmt: skip
        try:
            return subprocess.run(
                command,
                env=subprocess_env(postgres_db, kafka_broker),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:  # runs until killed (-9): counts stay exact
            return subprocess.CompletedProcess(command, -1, "", str(e.stderr or ""))

    stopped = consume("--on-poison", "stop", timeout=90)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "PoisonMessageError" in stopped.stderr and "notification 7" in stopped.stderr
    assert fragile.recorder.max_tracking_id("DogSchool") == 6  # nothing after the poison
    store = DeadLetterStore(fragile.recorder.datastore)  # type: ignore[attr-defined]
    assert store.list("Fragile", status=None) == []

    consume("--on-poison", "skip", timeout=20)  # runs until the timeout ends it
    assert fragile.recorder.max_tracking_id("DogSchool") == 9
    rows = store.list("Fragile", status=None)
    assert [(r.nid, r.status) for r in rows] == [(7, "skipped")]
    assert count_notifications(fragile) == 8  # 3 dogs, 3 tricks, "later", "fine"
    verify_mirror(school, fragile, dogs[1:])
