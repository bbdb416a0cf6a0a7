"""The consumer adapter against a real Kafka broker and a real PostgreSQL server.

Each test builds an upstream log with the dog school, publishes it (with the
relay, or with a ManualPublisher that injects duplicates, gaps or reordering),
consumes it into ``Mirror`` and compares every mirror with its dog: equal
lists prove exactly one effect per upstream event, in per-aggregate order.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from eventsourcing.utils import get_topic

from esbridge import wire
from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.deadletters.retry import retry_dead_letters
from esbridge.deadletters.store import DeadLetterStore
from esbridge.errors import GapNotReconciledError
from esbridge.names import tracking_names
from esbridge.processing.application_sink import ProcessApplicationSink
from esbridge.relay.relay import Relay
from examples.dogschool.application import DogSchool
from examples.dogschool.domainmodel import Dog
from tests.support.consumer_apps import (
    Fragile,
    ManualPublisher,
    Mirror,
    count_notifications,
    notifications,
    populate,
    verify_mirror,
)
from tests.support.relay_support import publish_and_close

FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


class RegistrationsOnly(Mirror):
    """A mirror that follows only registrations (``topics``): dogs without their tricks."""

    topics = (get_topic(Dog.Registered),)


def adapter(
    follower: Any, topic: str, kafka_config: dict[str, Any], group: str = "g", **kw: Any
) -> ConsumerAdapter:
    return ConsumerAdapter(
        follower,
        upstream="DogSchool",
        topic=topic,
        kafka_config={**kafka_config, **FAST_GROUP},
        group_id=f"{topic}.{group}",
        **kw,
    )


def relay_all(school: DogSchool, topic: str, kafka_config: dict[str, Any], **kw: Any) -> int:
    relay = Relay("DogSchool", kafka_config=kafka_config, topic=topic, env=school.env, **kw)
    return publish_and_close(relay)


def published(
    school: DogSchool, topic: str, kafka_config: dict[str, Any], dogs: int, tricks: int
) -> tuple[list[Any], int]:
    """``dogs`` dogs with ``tricks`` tricks each, published to ``topic``: (dog ids, events)."""
    dog_ids = populate(school, dogs, tricks)
    total = school.recorder.max_notification_id() or 0
    assert relay_all(school, topic, kafka_config) == total
    return dog_ids, total


def consume_all(consumer: ConsumerAdapter, timeout: float = 30) -> tuple[int, Any]:
    """Process what the topic holds, then close: (messages processed, final status)."""
    try:
        return consumer.process_available(timeout=timeout), consumer.status()
    finally:
        consumer.close()


def teach(school: DogSchool, dog_id: Any, *tricks: str) -> None:
    """Add ``tricks`` to one dog in one transaction."""
    dog = school.repository.get(dog_id)
    for trick in tricks:
        dog.add_trick(trick=trick)
    school.save(dog)


def fragile_follower(postgres_db: Any) -> Fragile:
    """A follower whose policy fails on "poison" until ``Fragile.healed`` is set."""
    Fragile.healed = False
    return Fragile(env=postgres_db.env)


def test_tracking_names() -> None:
    assert tracking_names("DogSchool", 1) == ["DogSchool"]
    assert tracking_names("DogSchool", 3) == ["DogSchool#0/3", "DogSchool#1/3", "DogSchool#2/3"]


def test_exactly_once_single_partition(
    school: DogSchool, mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    topic = create_topic(partitions=1)
    dogs = populate(school, 40, 5)
    total = school.recorder.max_notification_id()
    assert relay_all(school, topic, kafka_config, partitions=1) == total == 240
    consumer = adapter(mirror, topic, kafka_config)
    processed, status = consume_all(consumer)
    assert processed == total
    verify_mirror(school, mirror, dogs)
    # The library's own tracking name: the runners can take over without reprocessing.
    assert mirror.recorder.max_tracking_id("DogSchool") == total
    assert status.positions == {"DogSchool": total}
    assert status.processed == total and status.duplicates == 0
    # A new group reads the whole topic again: everything is a duplicate, no effect.
    again = adapter(mirror, topic, kafka_config, group="other")
    try:
        assert again.process_available(timeout=30) == 0
        assert again.status().duplicates == total
    finally:
        again.close()
    verify_mirror(school, mirror, dogs)
    assert mirror.recorder.max_notification_id() == 40 + 200  # 40 created + 200 copied


def test_process_available_returns_once_read_to_the_end_with_an_empty_partition(
    school: DogSchool, mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    """A partition that never got a message is read to its end from the start: it used to
    keep ``process_available`` waiting out its whole timeout (its start is a logical
    offset, "the beginning", which compared below the partition's high mark of 0)."""
    topic = create_topic(partitions=2)
    dogs = populate(school, 1, 3)  # one aggregate: one of the two partitions stays empty
    assert relay_all(school, topic, kafka_config, partitions=2) == 4
    consumer = adapter(mirror, topic, kafka_config)
    try:
        started = time.monotonic()
        assert consumer.process_available(timeout=30) == 4
        took = time.monotonic() - started
    finally:
        consumer.close()
    assert took < 15, f"process_available took {took:.1f} s of its 30 s timeout"
    verify_mirror(school, mirror, dogs)


def test_a_follower_s_topics_skip_other_events_without_decoding_them(
    school: DogSchool, postgres_db: Any, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    """``topics`` (the library's ``ProcessApplication.topics``): events of other types are
    not decoded and their policy is not called, but the tracking position passes them."""
    topic = create_topic(partitions=1)
    dogs = populate(school, 10, 3)
    total = school.recorder.max_notification_id()
    relay_all(school, topic, kafka_config, partitions=1)
    registrations = RegistrationsOnly(env=postgres_db.env)
    consumer = adapter(registrations, topic, kafka_config)
    decoded: list[str] = []
    decode = consumer.steps.decoder.decode

    def counting_decode(stored: Any) -> Any:
        decoded.append(stored.topic)
        return decode(stored)

    consumer.steps.decoder.decode = counting_decode  # type: ignore[method-assign]
    try:
        processed, status = consume_all(consumer)
        assert processed == total == 40 and status.processed == 40
        assert decoded == [get_topic(Dog.Registered)] * 10
        assert registrations.recorder.max_tracking_id("DogSchool") == total
        assert registrations.recorder.max_notification_id() == 10  # one mirror a dog, no tricks
        assert all(registrations.tricks(dog) == [] for dog in dogs)
    finally:
        registrations.close()


def test_exactly_once_three_partitions_two_members(
    school: DogSchool, mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    topic = create_topic(partitions=3)
    dogs, total = published(school, topic, kafka_config, 60, 4)
    # Two members of one group share the partitions, each with its own follower object.
    other = Mirror(env=mirror.env)
    consumers = [adapter(mirror, topic, kafka_config), adapter(other, topic, kafka_config)]
    errors: list[BaseException] = []

    def run(c: ConsumerAdapter) -> None:
        try:
            c.run()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in consumers]
    for t in threads:
        t.start()
    names = tracking_names("DogSchool", 3)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not errors:
            done = sum((mirror.recorder.max_tracking_id(n) or 0) > 0 for n in names)
            processed = sum(c.status().processed for c in consumers)
            if processed >= total and done == 3:
                break
            time.sleep(0.2)
    finally:
        for c in consumers:
            c.stop()
        for t in threads:
            t.join(30)
    assert not errors, errors
    verify_mirror(school, mirror, dogs)
    assert sum(c.status().processed for c in consumers) == total
    assert not mirror.recorder.max_tracking_id("DogSchool")
    assert mirror.recorder.max_notification_id() == 60 + 240
    other.close()


def test_duplicates_have_no_effect(
    school: DogSchool, mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    topic = create_topic(partitions=1)
    dogs = populate(school, 10, 3)
    notes = notifications(school)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", 1)
    messages = publisher.messages(notes)
    duplicated = []
    for i, m in enumerate(messages):
        duplicated.append(m)
        if i % 3 == 0:
            duplicated.append(m)  # the same message produced twice in a row
    publisher.send(duplicated)
    publisher.send(messages[:10])  # and a replay of the start, later
    consumer = adapter(mirror, topic, kafka_config)
    processed, status = consume_all(consumer)
    assert processed == len(notes)
    verify_mirror(school, mirror, dogs)
    assert status.duplicates == len(duplicated) - len(messages) + 10
    assert mirror.recorder.max_notification_id() == 10 + 30


def test_reordered_and_missing_are_reconciled_from_the_log(
    school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
    postgres_db: Any,
) -> None:
    topic = create_topic(partitions=3)
    dogs = populate(school, 30, 4)
    notes = notifications(school)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", 3)
    messages = publisher.messages(notes)
    sent = list(messages)
    del sent[20:25]  # lost
    sent[40], sent[41], sent[42] = sent[42], sent[40], sent[41]  # reordered
    del sent[-1]  # the very last one never arrives: only a later message could reveal it
    publisher.send(sent)
    consumer = adapter(mirror, topic, kafka_config, upstream_env=postgres_db.env)
    _, status = consume_all(consumer)
    missing_last = notes[-1]
    # Each partition that lost messages shows a gap (one, when all five fell in one partition).
    lost_in = {partition for *_, partition in messages[20:25]}
    assert status.gaps_reconciled >= len(lost_in) and status.reconciled_events >= 5
    assert status.held_partitions == []
    assert status.processed == len(notes) - 1
    # Everything but the never-announced last notification is applied, in order.
    for dog_id in dogs:
        expected = list(school.get_dog(dog_id)["tricks"])
        if dog_id == missing_last.originator_id:
            expected = expected[:-1]
        assert mirror.tricks(dog_id) == expected


def test_missing_without_log_access_is_held_then_fails_clearly(
    school: DogSchool, mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    topic = create_topic(partitions=1)
    populate(school, 5, 2)
    notes = notifications(school)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", 1)
    messages = publisher.messages(notes)
    publisher.send(messages[:6] + messages[7:])  # notification 7 is lost
    consumer = adapter(mirror, topic, kafka_config, hold_timeout=3.0)
    consumer.process_available(timeout=2)
    status = consumer.status()
    assert status.processed == 6
    assert mirror.recorder.max_tracking_id("DogSchool") == 6
    [held] = status.held_partitions
    assert held.partition == 0 and held.position == 6 and held.missing == "notification id 7"
    assert held.held_messages == len(notes) - 7
    with pytest.raises(GapNotReconciledError, match=r"notification id 7 never arrived") as e:
        consumer.run()  # fails once the gap is older than hold_timeout
    assert (e.value.topic, e.value.partition) == (topic, 0)
    assert (e.value.position, e.value.held_nid) == (6, 8)  # 7 is missing
    assert mirror.recorder.max_tracking_id("DogSchool") == 6  # nothing after the gap


def test_prompt_mode_pulls_from_the_log(
    school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
    postgres_db: Any,
) -> None:
    topic = create_topic(partitions=1)
    dogs = populate(school, 50, 3)
    relay_all(school, topic, kafka_config, mode="prompts")
    consumer = adapter(
        mirror, topic, kafka_config, mode="prompts", upstream_env=postgres_db.env, page_size=70
    )
    try:
        assert consumer.process_available(timeout=30) == 200
        populate(school, 5, 1, seed=2)  # more events, then a prompt
        relay_all(school, topic, kafka_config, mode="prompts")
        assert consumer.process_available(timeout=30) == 10
        upstream_log: Any = consumer._upstream_log.recorder
    finally:
        consumer.close()
    verify_mirror(school, mirror, dogs)
    assert mirror.recorder.max_tracking_id("DogSchool") == 210
    # close() closed the upstream log's pool: left to the garbage collector, it can be
    # closed at interpreter exit only, which hangs a stopping process for many seconds.
    assert upstream_log.datastore.pool.closed


def test_poison_messages_are_parked_then_replayed(
    school: DogSchool, create_topic: Any, kafka_config: dict[str, Any], postgres_db: Any
) -> None:
    fragile = fragile_follower(postgres_db)
    topic = create_topic(partitions=1)
    dogs = populate(school, 6, 2)
    teach(school, dogs[2], "poison", "after-1")
    teach(school, dogs[3], "unaffected")
    teach(school, dogs[2], "after-2")
    relay_all(school, topic, kafka_config)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", 1)
    publisher.send_raw(b"not-esbridge", b"{}", [("x", b"y")])
    total = school.recorder.max_notification_id()
    consumer = adapter(fragile, topic, kafka_config, retries=2, retry_backoff=0.01)
    processed, status = consume_all(consumer)
    assert processed == total
    assert fragile.recorder.max_tracking_id("DogSchool") == total
    assert status.parked == 4
    # The victim's later tricks wait behind the poison; other dogs are unaffected.
    assert fragile.tricks(dogs[2]) == list(school.get_dog(dogs[2])["tricks"][:2])
    verify_mirror(school, fragile, [d for d in dogs if d != dogs[2]])
    store = DeadLetterStore(fragile.recorder.datastore)  # type: ignore[attr-defined]
    rows = store.list("Fragile")
    assert [(r.reason, r.key) for r in rows] == [
        ("policy_error", str(dogs[2])),
        ("held_behind", str(dogs[2])),
        ("held_behind", str(dogs[2])),
        ("malformed_message", "not-esbridge"),
    ]
    assert "cannot learn poison" in rows[0].error and rows[0].attempts == 3
    assert wire.H_NID in dict(rows[0].headers)
    # Still failing: nothing replayed, the rest of the key stays parked.
    result = retry_dead_letters(fragile)
    assert result.retried == [] and rows[0].id in result.failed
    # After the fix, the key's messages replay in order.
    Fragile.healed = True
    result = retry_dead_letters(fragile)
    assert result.retried == [rows[0].id, rows[1].id, rows[2].id]
    assert list(result.failed) == [rows[3].id]  # not an esbridge message: inspect only
    verify_mirror(school, fragile, dogs)
    assert [r.reason for r in store.list("Fragile")] == ["malformed_message"]
    fragile.close()


def test_dlq_command_lists_and_replays(
    school: DogSchool,
    create_topic: Any,
    kafka_config: dict[str, Any],
    postgres_db: Any,
    monkeypatch: Any,
    capsys: Any,
) -> None:
    from esbridge.cli import main

    fragile = fragile_follower(postgres_db)
    topic = create_topic(partitions=1)
    dogs = populate(school, 3, 1)
    teach(school, dogs[0], "poison", "later")
    relay_all(school, topic, kafka_config)
    consumer = adapter(fragile, topic, kafka_config, retries=1, retry_backoff=0.01)
    consume_all(consumer)
    for key, value in postgres_db.env.items():
        monkeypatch.setenv(key, value)
    follower = "tests.support.consumer_apps:Fragile"
    capsys.readouterr()
    assert main(["dlq", "list", follower]) == 0
    listed = capsys.readouterr().out
    assert "policy_error" in listed and "held_behind" in listed and "2 row(s)" in listed
    assert main(["dlq", "replay", follower]) == 1  # still failing: stays parked
    Fragile.healed = True
    assert main(["dlq", "replay", follower]) == 0
    assert "replayed 2 row(s)" in capsys.readouterr().out
    verify_mirror(school, fragile, dogs)
    fragile.close()


def test_dlq_retry_is_the_command_and_replay_its_deprecated_name(
    postgres_db: Any, monkeypatch: Any, capsys: Any
) -> None:
    """``esbridge replay`` backfills a topic; the dead-letter command is ``dlq retry``."""
    from esbridge.cli import main

    fragile = fragile_follower(postgres_db)
    for key, value in postgres_db.env.items():
        monkeypatch.setenv(key, value)
    follower = "tests.support.consumer_apps:Fragile"
    capsys.readouterr()
    assert main(["dlq", "retry", follower]) == 0
    out, err = capsys.readouterr()
    assert "retried 0 row(s)" in out and "deprecated" not in err
    assert main(["dlq", "replay", follower]) == 0  # the former name still works, and says so
    out, err = capsys.readouterr()
    assert "replayed 0 row(s)" in out
    assert "esbridge dlq replay is deprecated: use 'esbridge dlq retry'" in err
    fragile.close()


@pytest.mark.parametrize("hint", ["exact", "partial", "raising"])
def test_prefetch_hint_never_changes_the_result(
    hint: str,
    school: DogSchool,
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
) -> None:
    """A prefetch hint only saves reads: a right, a half-right or a broken hint, same effect."""
    from examples.dogschool.domainmodel import Dog
    from tests.support.consumer_apps import DogMirror

    def prefetch(event: Any) -> list[Any]:
        if hint == "raising":
            raise RuntimeError("a broken hint")
        if not isinstance(event, Dog.TrickAdded):
            return []
        if hint == "partial" and event.originator_version % 2:
            return []
        return [DogMirror.create_id(event.originator_id)]

    topic = create_topic(partitions=2)
    dogs = populate(school, 30, 6)
    total = school.recorder.max_notification_id()
    assert relay_all(school, topic, kafka_config, partitions=2) == total
    # Mirrors changed earlier in a batch must be seen by later events of the batch,
    # prefetched or not: big batches put many tricks of one dog in the same batch.
    mirror = Mirror(env={**postgres_db.env, "MIRROR_AGGREGATE_CACHE_MAXSIZE": "1000"})
    try:
        consumer = adapter(mirror, topic, kafka_config, prefetch=prefetch, batch_size=500)
        processed, status = consume_all(consumer)
        assert processed == total and status.duplicates == 0
        verify_mirror(school, mirror, dogs)
        assert mirror.recorder.max_notification_id() == 30 + 180
    finally:
        mirror.close()


class StallingSink(ProcessApplicationSink):
    """The default sink, whose first batch waits for ``release`` before it is applied.

    A member that stalls in the middle of a batch (a long GC pause, a frozen VM)
    for longer than its ``max.poll.interval.ms``: the group hands its partition
    to another member meanwhile, and it wakes up as a zombie with a batch to
    record.
    """

    def __init__(self, follower: Any) -> None:
        super().__init__(follower)
        self.stalled = threading.Event()
        self.release = threading.Event()

    def apply(self, steps: Any, expected: Any) -> None:
        if not self.stalled.is_set():
            self.stalled.set()
            assert self.release.wait(120)
        super().apply(steps, expected)


def test_a_zombie_member_that_wakes_mid_batch_records_nothing(
    school: DogSchool, mirror: Mirror, create_topic: Any, kafka_config: dict[str, Any]
) -> None:
    topic = create_topic(partitions=1)
    dogs, total = published(school, topic, kafka_config, 40, 5)
    zombie_app = Mirror(env=mirror.env)  # another process's follower object
    sink = StallingSink(zombie_app)
    zombie = adapter(zombie_app, topic, {**kafka_config, "max.poll.interval.ms": 7000}, sink=sink)
    zombie_result: list[Any] = []
    thread = threading.Thread(
        target=lambda: zombie_result.append(zombie.process_available(timeout=30))
    )
    thread.start()
    healthy = adapter(mirror, topic, kafka_config)
    try:
        assert sink.stalled.wait(60), "the first member never got its batch"
        # The stalled member leaves the group after its poll interval; this one gets
        # the partition and records everything.
        deadline = time.monotonic() + 90
        while healthy.status().processed < total and time.monotonic() < deadline:
            healthy.process_available(timeout=5)
        assert healthy.status().processed == total
        verify_mirror(school, mirror, dogs)
        sink.release.set()  # the zombie wakes up and records its batch
        thread.join(90)
        assert not thread.is_alive()
        healthy.process_available(timeout=5)
    finally:
        sink.release.set()
        thread.join(30)
        zombie.close()
        healthy.close()
    assert zombie_result and zombie.status().processed == 0  # its batch was refused whole
    verify_mirror(school, mirror, dogs)
    assert mirror.recorder.max_tracking_id("DogSchool") == total
    assert count_notifications(mirror) == 40 + 200  # one follower event per upstream event
    zombie_app.close()
