"""A wrong ``--upstream`` stops the consumer before it parks anything; parking is loud.

The mistake: a topic of ``DogSchool`` consumed as upstream ``DogSchol``. Every
message then came from another application than the configured one, and the
consumer parked the whole topic as foreign messages, logging nothing above
INFO. Now it stops with :class:`UpstreamMismatchError` naming the fix, with
nothing in the dead-letter table and no offset committed; a foreign message
among the upstream's own (or after a position was recorded) is still parked,
with a rate-limited warning.
"""

from __future__ import annotations

import logging
import re
import subprocess
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.deadletters.store import REASON_FOREIGN, DeadLetterStore
from esbridge.errors import ConfigurationError, UpstreamMismatchError
from esbridge.processing.application_sink import ProcessApplicationSink
from examples.dogschool.application import DogSchool
from tests.integration.consumer.test_consumer_untrusted import forged
from tests.support.consumer_apps import (
    ManualPublisher,
    Mirror,
    count_notifications,
    notifications,
    populate,
    verify_mirror,
)
from tests.support.relay_support import ESBRIDGE, ROOT, subprocess_env

PARTITIONS = 2
DOGS, TRICKS = 10, 2
EVENTS = DOGS * (1 + TRICKS)


def adapter(mirror: Mirror, topic: str, kafka_config: dict[str, Any], upstream: str) -> Any:
    return ConsumerAdapter(
        mirror,
        upstream=upstream,
        topic=topic,
        kafka_config={**kafka_config, "session.timeout.ms": 6000},
        group_id=f"{topic}.g",  # the same group whatever the upstream: offsets are shared
    )


def parked(mirror: Mirror) -> list[Any]:
    store: DeadLetterStore = ProcessApplicationSink(mirror).dead_letters
    return store.list("Mirror")


def committed_offsets(kafka_config: dict[str, Any], topic: str) -> list[int]:
    consumer = Consumer({**kafka_config, "group.id": f"{topic}.g"})
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return [tp.offset for tp in consumer.committed(tps, timeout=10)]
    finally:
        consumer.close()


def published(school: DogSchool, kafka_config: dict[str, Any], topic: str) -> Any:
    dogs = populate(school, DOGS, TRICKS)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", PARTITIONS)
    messages = publisher.messages(notifications(school))
    return dogs, publisher, messages


def test_a_wrong_upstream_stops_before_parking_anything(
    school: DogSchool, mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    dogs, publisher, messages = published(school, kafka_config, topic)
    publisher.send(messages)
    wrong = adapter(mirror, topic, kafka_config, "DogSchol")
    try:
        with pytest.raises(UpstreamMismatchError) as raised:
            wrong.process_available(timeout=30)
    finally:
        wrong.close()
    error = raised.value
    assert isinstance(error, ConfigurationError)
    assert (error.upstream, error.topic, error.applications) == ("DogSchol", topic, ["DogSchool"])
    text = str(error)
    assert f"the messages on topic {topic!r} come from application(s) ['DogSchool']" in text
    assert "configured for upstream 'DogSchol'" in text
    assert "pass --upstream DogSchool" in text
    assert "nothing was parked or committed" in text
    # Nothing parked, nothing processed, no offset committed past the messages.
    assert parked(mirror) == []
    assert count_notifications(mirror) == 0
    assert all(offset < 0 for offset in committed_offsets(kafka_config, topic))
    # Fixed, the same consumer group processes every event (none was skipped).
    right = adapter(mirror, topic, kafka_config, "DogSchool")
    try:
        right.process_available(timeout=30)
    finally:
        right.close()
    verify_mirror(school, mirror, dogs)
    assert count_notifications(mirror) == EVENTS
    assert parked(mirror) == []


def test_esbridge_consume_with_a_typo_in_upstream_exits_2_naming_the_fix(
    school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
    postgres_db: Any,
    kafka_broker: Any,
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    _dogs, publisher, messages = published(school, kafka_config, topic)
    publisher.send(messages)
    command = [
        ESBRIDGE, "consume", "tests.support.consumer_apps:Mirror",
        "--upstream", "DogSchol", "--topic", topic,
    ]  # fmt: skip
    done = subprocess.run(
        command,
        env=subprocess_env(postgres_db, kafka_broker),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "UpstreamMismatchError" in done.stderr
    assert "pass --upstream DogSchool" in done.stderr
    assert "Traceback" not in done.stderr
    assert parked(mirror) == []
    assert count_notifications(mirror) == 0


def test_foreign_messages_among_the_upstreams_are_parked_with_one_warning_not_one_each(
    school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
    caplog: Any,
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    dogs, publisher, messages = published(school, kafka_config, topic)
    strays = [
        forged(messages[i % len(messages)], esb_app="Kennels", esb_nid=str(1000 + i))
        for i in range(40)
    ]
    publisher.send([*messages[:5], *strays, *messages[5:]])
    consumer = adapter(mirror, topic, kafka_config, "DogSchool")
    with caplog.at_level(logging.INFO, logger="esbridge.consumer"):
        try:
            consumer.process_available(timeout=30)
        finally:
            consumer.close()
    verify_mirror(school, mirror, dogs)
    letters = parked(mirror)
    assert len(letters) == 40 and {letter.reason for letter in letters} == {REASON_FOREIGN}
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "dead-letter table" in r.getMessage()
    ]
    # The first one at once, the rest counted (here: said when the consumer closed).
    assert 1 <= len(warnings) <= 2, warnings
    counts = [int(re.search(r"parked (\d+) messages?", w).group(1)) for w in warnings]  # type: ignore[union-attr]
    assert sum(counts) == 40, warnings
    assert (
        warnings[0].startswith(f"consumer Mirror <- DogSchool parked {counts[0]} message")
        and f"({REASON_FOREIGN} {counts[0]};" in warnings[0]
    )
    assert "message from application 'Kennels'" in warnings[0]
    assert "esbridge dlq list <module>:Mirror" in warnings[0]


def test_once_a_position_is_recorded_a_round_of_foreign_messages_is_parked(
    school: DogSchool, mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    """A restarted consumer whose first round holds only another application's message: the
    recorded position proves the upstream right, so the message is parked, not refused."""
    topic = create_topic(partitions=PARTITIONS)
    dogs, publisher, messages = published(school, kafka_config, topic)
    publisher.send(messages)
    first = adapter(mirror, topic, kafka_config, "DogSchool")
    try:
        first.process_available(timeout=30)
    finally:
        first.close()
    publisher.send([forged(messages[0], esb_app="Kennels", esb_nid="5000")])
    second = adapter(mirror, topic, kafka_config, "DogSchool")
    try:
        second.process_available(timeout=30)
        assert second.status().error is None
    finally:
        second.close()
    verify_mirror(school, mirror, dogs)
    [letter] = parked(mirror)
    assert letter.reason == REASON_FOREIGN and "'Kennels'" in letter.error


def test_a_topic_of_another_producer_stops_before_parking_anything(
    mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    """A wrong ``--topic`` (messages without esbridge headers) is refused, not parked as
    malformed; a couple of stray such messages are still parked."""
    topic = create_topic(partitions=PARTITIONS)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", PARTITIONS)
    for i in range(20):
        publisher.send_raw(f"order-{i}".encode(), b'{"total": 1}', [("source", b"shop")])
    consumer = adapter(mirror, topic, kafka_config, "DogSchool")
    try:
        with pytest.raises(UpstreamMismatchError) as raised:
            consumer.process_available(timeout=30)
    finally:
        consumer.close()
    text = str(raised.value)
    assert f"messages read from topic {topic!r} is an esbridge message" in text
    assert "not published by a relay of 'DogSchool'" in text and "--topic" in text
    assert (raised.value.upstream, raised.value.topic) == ("DogSchool", topic)
    assert parked(mirror) == []
    assert all(offset < 0 for offset in committed_offsets(kafka_config, topic))

    few = create_topic(partitions=PARTITIONS)
    strays = ManualPublisher(kafka_config, few, "DogSchool", PARTITIONS)
    strays.send_raw(b"a", b"{}", [("source", b"shop")])
    strays.send_raw(b"b", b"{}", [("source", b"shop")])
    consumer = adapter(mirror, few, kafka_config, "DogSchool")
    try:
        consumer.process_available(timeout=30)
    finally:
        consumer.close()
    assert sorted(letter.reason for letter in parked(mirror)) == ["malformed_message"] * 2
