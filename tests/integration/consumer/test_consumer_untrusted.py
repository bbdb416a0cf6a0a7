"""A message's own ``esb_nid`` never moves a partition past events it did not see.

Each test sends the relay's genuine messages with one foreign message among
them (another producer with write access to the topic, a buggy or mis-pointed
relay): a bogus high id, a forged id with a valid event, another
application's message, a forged held message after a gap. Every test ends
with every genuine event applied exactly once (the mirrors equal the dogs),
the tracking positions at the genuine ends, and the foreign message parked as
``foreign_message`` without a position, so that nothing is held behind it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from esbridge import wire
from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.deadletters.retry import retry_dead_letters
from esbridge.deadletters.store import REASON_FOREIGN, DeadLetterStore
from esbridge.errors import ConfigurationError, GapNotReconciledError
from esbridge.names import tracking_names
from esbridge.processing.application_sink import ProcessApplicationSink
from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import (
    ManualPublisher,
    Mirror,
    notifications,
    populate,
    verify_mirror,
)

PARTITIONS = 3
Message = tuple[bytes, bytes, list[tuple[str, bytes]], int]


def forged(message: Message, **headers: str) -> Message:
    """``message`` with some header values replaced (``esb_nid=...``, ``esb_app=...``)."""
    key, value, old, partition = message
    new = [(k, headers[k].encode() if k in headers else v) for k, v in old]
    return key, value, new, partition


def nid_of(message: Message) -> int:
    return int(dict(message[2])[wire.H_NID])


def last_nids(messages: list[Message]) -> list[int]:
    """The last genuine notification id of each partition (its final tracking position)."""
    last = [0] * PARTITIONS
    for m in messages:
        last[m[3]] = max(last[m[3]], nid_of(m))
    return last


def consume(mirror: Mirror, topic: str, kafka_config: dict[str, Any], env: Any, **kw: Any) -> Any:
    consumer = ConsumerAdapter(
        mirror,
        upstream="DogSchool",
        topic=topic,
        kafka_config={**kafka_config, "session.timeout.ms": 6000},
        group_id=f"{topic}.g",
        upstream_env=env,
        **kw,
    )
    try:
        consumer.process_available(timeout=15)
        return consumer.status()
    finally:
        consumer.close()


def positions(mirror: Mirror) -> list[int]:
    return [
        mirror.recorder.max_tracking_id(name) or 0
        for name in tracking_names("DogSchool", PARTITIONS)
    ]


def parked(mirror: Mirror) -> list[Any]:
    store: DeadLetterStore = ProcessApplicationSink(mirror).dead_letters
    return store.list("Mirror")


def setup(school: DogSchool, kafka_config: dict[str, Any], topic: str) -> Any:
    dogs = populate(school, 12, 3)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", PARTITIONS)
    return dogs, publisher, publisher.messages(notifications(school))


def assert_exact(school: DogSchool, mirror: Mirror, dogs: Any, genuine: list[Message]) -> None:
    verify_mirror(school, mirror, dogs)
    assert positions(mirror) == last_nids(genuine)
    assert mirror.recorder.max_notification_id() == 12 + 12 * 3  # one event an upstream event


def test_an_undecodable_message_with_a_bogus_high_id_moves_no_position(
    school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
    upstream_env: Any,
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    dogs, publisher, messages = setup(school, kafka_config, topic)
    victim = messages[20]  # a real aggregate's key, on its own partition
    bogus = forged(victim, esb_nid="1000", esb_prev_nid="0")
    bogus = (bogus[0], b"\xff\x00 not an event", bogus[2], bogus[3])
    publisher.send([*messages[:15], bogus, *messages[15:]])
    status = consume(mirror, topic, kafka_config, upstream_env)
    assert_exact(school, mirror, dogs, messages)
    [letter] = parked(mirror)
    assert (letter.reason, letter.nid, letter.tracking_name) == (REASON_FOREIGN, 1000, None)
    assert status.processed == len(messages) and status.held_partitions == []


def test_a_forged_decodable_message_is_not_applied(
    school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
    upstream_env: Any,
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    dogs, publisher, messages = setup(school, kafka_config, topic)
    # A valid trick event of a real dog, claiming to be notification 48 (the last id of the
    # log, another dog's event, on another partition) and to follow notification 0.
    last = messages[-1]
    copy = next(m for m in messages[30:] if m[3] != last[3])
    fake = forged(copy, esb_nid="48", esb_prev_nid="0")
    publisher.send([*messages[:28], fake, *messages[28:]])
    consume(mirror, topic, kafka_config, upstream_env)
    assert_exact(school, mirror, dogs, messages)
    [letter] = parked(mirror)
    assert (letter.reason, letter.nid, letter.tracking_name) == (REASON_FOREIGN, 48, None)
    # A foreign message is never replayed: it can only be inspected.
    result = retry_dead_letters(mirror)
    assert result.retried == [] and "foreign message" in result.failed[letter.id]
    verify_mirror(school, mirror, dogs)


def test_another_application_s_message_is_foreign_and_holds_nothing_back(
    school: DogSchool, mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    dogs, publisher, messages = setup(school, kafka_config, topic)
    other = forged(messages[14], esb_app="Kennels", esb_nid="15", esb_prev_nid="0")
    publisher.send([*messages[:14], other, *messages[14:]])
    consume(mirror, topic, kafka_config, None)
    assert_exact(school, mirror, dogs, messages)
    [letter] = parked(mirror)
    assert letter.reason == REASON_FOREIGN and "'Kennels'" in letter.error
    # The dog whose key it carried is not parked behind it.
    assert [r.reason for r in parked(mirror)] == [REASON_FOREIGN]


def test_a_forged_id_beyond_the_log_on_the_exact_chain_is_caught_by_the_log(
    school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
    postgres_db: Any,
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    dogs, publisher, messages = setup(school, kafka_config, topic)
    # Continues its partition's chain exactly (a forger who read the topic), id 5000.
    p = messages[10][3]
    before = [m for m in messages[:10] if m[3] == p]
    prev = nid_of(before[-1]) if before else 0
    fake = forged(messages[30], esb_nid="5000", esb_prev_nid=str(prev))
    fake = (fake[0], fake[1], fake[2], p)
    publisher.send([*messages[:10], fake, *messages[10:]])
    consume(mirror, topic, kafka_config, postgres_db.env)
    assert_exact(school, mirror, dogs, messages)
    [letter] = parked(mirror)
    assert letter.reason == REASON_FOREIGN and "beyond the upstream log" in letter.error


def test_a_forged_high_id_behind_a_gap_cannot_stretch_the_log_read(
    school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
    postgres_db: Any,
) -> None:
    """A held message with id 1000 once made the consumer read the log up to 999 and set its
    position there: events committed later with ids below 1000 were skipped as duplicates."""
    topic = create_topic(partitions=PARTITIONS)
    dogs, publisher, messages = setup(school, kafka_config, topic)
    fake = forged(messages[5], esb_nid="1000", esb_prev_nid="999")
    publisher.send([*messages[:6], fake])  # and the rest never arrives (a trailing gap)
    consumer = ConsumerAdapter(
        mirror,
        upstream="DogSchool",
        topic=topic,
        kafka_config=kafka_config,
        group_id=f"{topic}.g",
        upstream_env=postgres_db.env,
        trailing_gap_after=1.0,
    )
    runs = threading.Thread(target=consumer.run)
    runs.start()
    try:
        wait_for(lambda: positions(mirror) == last_nids(messages))
        assert_exact(school, mirror, dogs, messages)  # 42 of them from the log
        # Events committed afterwards, below 1000, arrive and are applied.
        more = populate(school, 4, 2, seed=9)
        publisher.send(publisher.messages(notifications(school)[48:]))
        wait_for(lambda: mirror.recorder.max_notification_id() == 48 + 12)
    finally:
        consumer.stop()
        runs.join(30)
    verify_mirror(school, mirror, [*dogs, *more])
    [letter] = parked(mirror)
    assert letter.reason == REASON_FOREIGN and "beyond the upstream log" in letter.error
    status = consumer.status()
    assert status.reconciled_events == 42 and status.processed == 48 + 12


def wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_without_the_log_a_forged_held_message_is_held_loudly_not_applied(
    school: DogSchool, mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    topic = create_topic(partitions=1)
    populate(school, 3, 1)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", 1)
    messages = publisher.messages(notifications(school))
    publisher.send([*messages[:3], forged(messages[3], esb_nid="1000", esb_prev_nid="999")])
    consumer = ConsumerAdapter(
        mirror,
        upstream="DogSchool",
        topic=topic,
        kafka_config=kafka_config,
        group_id=f"{topic}.g",
        hold_timeout=3.0,
    )
    try:
        consumer.process_available(timeout=1)
        with pytest.raises(GapNotReconciledError) as caught:
            consumer.run()
    finally:
        consumer.close()
    assert "notification ids 4..999 never arrived" in str(caught.value)
    assert mirror.recorder.max_tracking_id("DogSchool") == 3
    # The group's offset stays at the held message: a restart reads it again.
    probe = Consumer({**kafka_config, "group.id": f"{topic}.g"})
    try:
        [tp] = probe.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        probe.close()
    assert tp.offset == 3


def test_verify_messages_catches_a_forgery_on_the_exact_chain(
    school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
    postgres_db: Any,
) -> None:
    """The chain cannot tell a copy of a genuine message with another aggregate's key, sent
    first: every message checked against the log can."""
    topic = create_topic(partitions=PARTITIONS)
    dogs, publisher, messages = setup(school, kafka_config, topic)
    genuine = messages[30]
    other_key = next(m[0] for m in messages if m[0] != genuine[0] and m[3] == genuine[3])
    copy = (other_key, genuine[1], genuine[2], genuine[3])  # same headers, wrong aggregate
    publisher.send([*messages[:30], copy, *messages[30:]])
    status = consume(mirror, topic, kafka_config, postgres_db.env, verify_messages=True)
    assert_exact(school, mirror, dogs, messages)
    [letter] = parked(mirror)
    assert letter.reason == REASON_FOREIGN and letter.key == other_key.decode()
    assert status.processed == 48


def test_verify_messages_needs_the_upstream_log(mirror: Mirror) -> None:
    with pytest.raises(ConfigurationError, match="verify_messages checks every message"):
        ConsumerAdapter(
            mirror,
            upstream="DogSchool",
            topic="t",
            kafka_config={},
            group_id="g",
            verify_messages=True,
        )
