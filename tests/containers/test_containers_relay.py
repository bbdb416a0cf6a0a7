"""End to end through the testcontainers backend: DogSchool -> relay -> Kafka -> consumer ->
Counters, resumed after a PostgreSQL crash without losing or repeating an event."""

from __future__ import annotations

from typing import Any

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.relay.relay import Relay
from examples.dogschool.application import Counters, DogSchool

TRICKS = ["roll", "sit", "fetch", "play dead"]


def relay_and_consume(
    db: Any, config: dict[str, Any], topic: str
) -> tuple[int, int, dict[str, int]]:
    """One relay pass and one consumer pass (fresh instances: they resume where they were)."""
    relay = Relay("DogSchool", kafka_config=config, topic=topic, env=db.env)
    try:
        published = relay.publish_available()
    finally:
        relay.close()
    counters = Counters(env=db.env)
    consumer = ConsumerAdapter(
        counters,
        upstream="DogSchool",
        topic=topic,
        kafka_config=config | {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
        group_id=f"{topic}.counters",
        upstream_env=db.env,
    )
    try:
        processed = consumer.process_available(timeout=60)
    finally:
        consumer.close()
        counts = {t: counters.get_count(t) for t in TRICKS}
        counters.close()
    return published, processed, counts


def test_relay_to_consumer_survives_postgres_crash(
    postgres_server: Any, postgres_db: Any, kafka_config: dict[str, Any], create_topic: Any
) -> None:
    topic = create_topic(partitions=3)
    school = DogSchool(env=postgres_db.env)
    dogs = [school.register_dog(f"dog{i}") for i in range(6)]
    for n, dog in enumerate(dogs):
        for trick in TRICKS[: 1 + n % 4]:
            school.add_trick(dog, trick)
    school.close()
    # 6 registrations + 1+2+3+4+1+2 tricks = 19 events
    assert relay_and_consume(postgres_db, kafka_config, topic) == (
        19,
        19,
        {"roll": 6, "sit": 4, "fetch": 2, "play dead": 1},
    )

    postgres_server.restart(kill=True)

    school = DogSchool(env=postgres_db.env)
    for dog in dogs[:3]:
        school.add_trick(dog, "play dead")
    school.close()
    assert relay_and_consume(postgres_db, kafka_config, topic) == (
        3,
        3,
        {"roll": 6, "sit": 4, "fetch": 2, "play dead": 4},
    )
