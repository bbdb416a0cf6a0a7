"""A consumer whose static membership (``group.instance.id``) another member took stops with
an error: it never goes on silently without consuming.

The workers of ``esbridge run`` join their groups as static members. When
another member joins with the same ``group.instance.id`` (a second worker
started by mistake with the same index; or, as the whole-system failover
test met, a rejoin racing the group coordinator's failover), the broker
fences the first one and librdkafka reports a fatal error. It reaches
``poll()`` as an event of code ``_FATAL`` whose ``fatal()`` is False; logged
as a mere warning, it left the worker alive but consuming nothing, forever,
with no restart by its supervisor.
"""

from __future__ import annotations

import threading
from typing import Any

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.errors import ConsumerError
from esbridge.relay.relay import Relay
from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import Mirror, populate
from tests.support.relay_support import publish_and_close, wait_for


def test_a_fenced_static_member_raises_instead_of_going_silent(
    postgres_db: Any, kafka_broker: Any, create_topic: Any
) -> None:
    school = DogSchool(env=postgres_db.env)
    mirror = Mirror(env=postgres_db.env)
    populate(school, dogs=20, tricks_per_dog=2)
    last = school.recorder.max_notification_id()
    topic = create_topic(partitions=1)
    relay = Relay("DogSchool", kafka_config=kafka_broker.config(), topic=topic, env=school.env)
    assert publish_and_close(relay) == last
    config = {
        **kafka_broker.config(),
        "group.instance.id": f"{topic}.mirror.w0",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    }

    def adapter() -> ConsumerAdapter:
        return ConsumerAdapter(
            mirror, upstream="DogSchool", topic=topic, kafka_config=config, group_id=f"{topic}.m"
        )

    first = adapter()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            first.run()
        except BaseException as e:
            failures.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    second = adapter()
    try:
        wait_for(lambda: mirror.recorder.max_tracking_id("DogSchool") == last, 60, "consumed")
        # The same group.instance.id joins: the broker fences the first member.
        second.process_available(timeout=5)
        thread.join(30)
        assert not thread.is_alive(), "the fenced consumer goes on, consuming nothing"
    finally:
        first.stop()
        second.close()
        thread.join(10)
    assert len(failures) == 1 and isinstance(failures[0], ConsumerError), failures
    message = str(failures[0])
    assert "group.instance.id" in message and "restart this consumer" in message, message
    assert mirror.recorder.max_tracking_id("DogSchool") == last
    school.close()
    mirror.close()
