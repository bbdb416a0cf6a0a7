"""A consumer whose only access to the upstream log is its HTTP service (``esbridge serve-log``).

The upstream DogSchool lives in a PostgreSQL server of its own (a second
server started here), the follower in the session's server, and the consumer
is given no upstream database settings: the missing notifications of a gap and
the events of prompt mode can only come over HTTP. Comparing every mirror
with its dog proves each event had its effect exactly once and in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.errors import ConfigurationError, RemoteLogRefusedError
from esbridge.relay.relay import Relay
from esbridge.testing.backends import make_postgres
from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import (
    ManualPublisher,
    Mirror,
    count_notifications,
    notifications,
    populate,
    verify_mirror,
)
from tests.support.relay_support import publish_and_close
from tests.support.remote_log import OTHER_TOKEN, SCHOOL_TOKEN, serving

FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[Any]:
    """The upstream's own PostgreSQL server: the follower has no settings for it."""
    server = make_postgres()
    yield server
    server.close()


@pytest.fixture
def remote_school(upstream_server: Any) -> Iterator[DogSchool]:
    db = upstream_server.create_database()
    app = DogSchool(env=db.env)
    yield app
    app.close()
    upstream_server.drop_database(db.dbname)


def remote_consumer(
    mirror: Mirror, topic: str, kafka_config: dict[str, Any], url: str, **kw: Any
) -> ConsumerAdapter:
    kw.setdefault("upstream_token", SCHOOL_TOKEN)
    return ConsumerAdapter(
        mirror,
        upstream="DogSchool",
        topic=topic,
        kafka_config={**kafka_config, **FAST_GROUP},
        group_id=f"{topic}.g",
        upstream_url=url,
        **kw,
    )


def test_gaps_are_filled_over_http_exactly_once_and_in_order(
    remote_school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
) -> None:
    assert remote_school.env["POSTGRES_PORT"] != mirror.env["POSTGRES_PORT"]  # two servers
    topic = create_topic(partitions=3)
    dogs = populate(remote_school, 30, 4)
    notes = notifications(remote_school)
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", 3)
    messages = publisher.messages(notes)
    sent = list(messages)
    del sent[100:130]  # lost: only the log service has them
    del sent[20:25]
    sent[40], sent[41], sent[42] = sent[42], sent[40], sent[41]  # reordered
    publisher.send(sent)
    with serving(remote_school.recorder, max_limit=7) as server:  # small pages: many requests
        consumer = remote_consumer(mirror, topic, kafka_config, server.url)
        try:
            consumer.process_available(timeout=30)
            status = consumer.status()
        finally:
            consumer.close()
    assert status.reconciled_events >= 35 and status.gaps_reconciled >= 2
    assert status.held_partitions == []
    verify_mirror(remote_school, mirror, dogs)  # every trick once, in order
    assert count_notifications(mirror) == len(notes)  # one mirror event per upstream event
    assert mirror.recorder.max_tracking_id("DogSchool#0/3") is not None


def test_prompt_mode_pulls_over_http(
    remote_school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
) -> None:
    topic = create_topic(partitions=1)
    dogs = populate(remote_school, 50, 3)

    def relay() -> None:  # on the upstream's side: it reads its own database
        publish_and_close(
            Relay(
                "DogSchool",
                kafka_config=kafka_config,
                topic=topic,
                env=remote_school.env,
                mode="prompts",
            )
        )

    relay()
    with serving(remote_school.recorder) as server:
        consumer = remote_consumer(
            mirror, topic, kafka_config, server.url, mode="prompts", page_size=70
        )
        try:
            assert consumer.process_available(timeout=30) == 200
            populate(remote_school, 5, 1, seed=2)
            relay()
            assert consumer.process_available(timeout=30) == 10
        finally:
            consumer.close()
    verify_mirror(remote_school, mirror, dogs)
    assert mirror.recorder.max_tracking_id("DogSchool") == 210


def test_a_refused_token_stops_the_consumer_with_the_server_s_reason(
    remote_school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
) -> None:
    topic = create_topic(partitions=1)
    populate(remote_school, 5, 1)
    with serving(remote_school.recorder) as server:
        consumer = remote_consumer(
            mirror, topic, kafka_config, server.url, mode="prompts", upstream_token=OTHER_TOKEN
        )
        try:
            with pytest.raises(RemoteLogRefusedError, match=r"HTTP 403 forbidden"):
                consumer.process_available(timeout=10)
        finally:
            consumer.close()
    assert mirror.recorder.max_tracking_id("DogSchool") is None  # nothing processed


def test_the_upstream_log_is_given_one_way_only(
    mirror: Mirror, kafka_config: dict[str, Any], postgres_db: Any
) -> None:
    with pytest.raises(ConfigurationError, match="one way only"):
        ConsumerAdapter(
            mirror,
            upstream="DogSchool",
            topic="t",
            kafka_config=kafka_config,
            group_id="g",
            upstream_env=postgres_db.env,
            upstream_url="http://127.0.0.1:1",
        )
