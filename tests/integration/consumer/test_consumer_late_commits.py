"""A consumer that reads the upstream log never reads past an id that may still commit.

Writers that skip the library's table lock (``POSTGRES_ENABLE_DB_FUNCTIONS=y``)
can commit an id after higher ids. The relay waits at such a gap
(:mod:`esbridge.relay.gaps`), so its partitions fall idle; a consumer that then
filled their "trailing gap" from the log up to its highest id would process
the ids above the held one, and the held one, published later, would look like
a duplicate: lost. The trailing fill is bounded by what the relay published.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.relay.relay import Relay
from examples.dogschool.application import DogSchool
from examples.dogschool.domainmodel import Dog
from tests.support.consumer_apps import Mirror, populate, verify_mirror


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_held_lock_free_insert_is_not_passed_by_a_trailing_fill(
    school: DogSchool,
    mirror: Mirror,
    postgres_db: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
) -> None:
    topic = create_topic(partitions=1)
    dogs = populate(school, 5, 1)
    relay = Relay("DogSchool", kafka_config=kafka_config, topic=topic, env=school.env)
    consumer = ConsumerAdapter(
        mirror,
        upstream="DogSchool",
        topic=topic,
        kafka_config=kafka_config,
        group_id=f"{topic}.g",
        upstream_env=postgres_db.env,
        trailing_gap_after=1.0,
    )
    threads = [threading.Thread(target=relay.run), threading.Thread(target=consumer.run)]
    for thread in threads:
        thread.start()
    lock_free = DogSchool(env={**postgres_db.env, "POSTGRES_ENABLE_DB_FUNCTIONS": "y"})
    try:
        wait_for(lambda: mirror.recorder.max_tracking_id("DogSchool") == 10, "caught up")
        held_dog = Dog("held")
        [event] = held_dog.collect_events()
        stored = school.mapper.to_stored_event(event)
        with psycopg.connect(postgres_db.dsn) as conn:
            row = conn.execute(
                "INSERT INTO dogschool_events (originator_id, originator_version, topic, state) "
                "VALUES (%s, %s, %s, %s) RETURNING notification_id",
                (stored.originator_id, stored.originator_version, stored.topic, stored.state),
            ).fetchone()
            assert row is not None
            held = int(row[0])
            more = populate(lock_free, 4, 1, seed=3)  # ids above the held one, committed
            assert (school.recorder.max_notification_id() or 0) > held + 5
            time.sleep(4)  # the relay waits at the held id; the consumer's partition is idle
            assert (mirror.recorder.max_tracking_id("DogSchool") or 0) < held
            conn.commit()
        top = school.recorder.max_notification_id()
        wait_for(lambda: mirror.recorder.max_tracking_id("DogSchool") == top, "all of it")
    finally:
        consumer.stop()
        relay.stop()
        for thread in threads:
            thread.join(30)
        lock_free.close()
    verify_mirror(school, mirror, [*dogs, *more, held_dog.id])
    assert consumer.status().processed == top
