"""SQL projections fed from Kafka by esbridge's consumer loop (``KafkaProjectionFeed``).

The feed is a :class:`~esbridge.consumer.adapter.ConsumerAdapter` driving a
projection sink, so a Kafka-fed projection gets the consumer's guarantees;
these tests prove the ones a projection adds, against a real broker and real
databases:

* a handler that raises is retried, then parked in the projection database's
  dead-letter table (with its Kafka coordinates) in the transaction that moves
  the partition's position past it; later events carry on;
* a feed process killed with kill -9 while a relay publishes, restarted, ends
  with tables equal to the events' own state and each partition's position at
  its last notification id: nothing applied twice, nothing skipped;
* two feeds of one projection at once (a zombie): the compare-and-set on the
  tracking rows keeps every event applied once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from esbridge.kafka.partitioning import key_partitioner
from esbridge.names import tracking_names
from esbridge.relay.relay import Relay
from esbridge_connectors import sql_tracking
from esbridge_connectors.replay import Replay
from esbridge_connectors.sql_projection_kafka import KafkaProjectionFeed
from esbridge_connectors.upstream import application_mapper
from tests.integration.connectors.test_sql_projection import (
    expected_contents,
    start_projection_process,
    wait_for,
)
from tests.support.sql_projection_domain import (
    DogProjection,
    DogSchool,
    FailureSwitch,
    dog_feed,
    table_contents,
)

ROOT = Path(__file__).resolve().parents[3]
PARTITIONS = 3


def last_ids(school: DogSchool, partitions: int) -> list[int]:
    """Each partition's last notification id: where its position must end."""
    partition_of = key_partitioner(partitions)
    last = [0] * partitions
    for n in school.recorder.select_notifications(start=1, limit=1_000_000):
        p = partition_of(str(n.originator_id).encode())
        last[p] = max(last[p], n.id)
    return last


def stored_positions(engine: Engine, partitions: int) -> list[int]:
    names = tracking_names("DogSchool", partitions)
    with engine.connect() as conn:
        try:
            found = [sql_tracking.read_position(conn, "dogs", name) for name in names]
        except Exception:
            return [0] * partitions  # tables not created yet
    return [0 if p is None else p.notification_id for p in found]


def test_failing_handler_is_retried_then_parked_with_its_kafka_coordinates(
    school, postgres_db, postgres_server, kafka_config, create_topic
):
    FailureSwitch.failing.update({"trick-3": -1})  # always fails
    dogs = [school.register(f"dog-{i}", tricks=2 + (i == 4) * 2) for i in range(6)]
    topic = create_topic(partitions=PARTITIONS)
    Replay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env).run()
    engine = create_engine(postgres_server.create_database().url)
    feed = dog_feed(engine, topic, kafka_config, postgres_db.env)
    feed.adapter.tuning.retry_backoff = 0.01
    try:
        total = school.recorder.max_notification_id()
        assert feed.process_available(timeout=5) == total
        assert FailureSwitch.calls == {"trick-3": 3}  # once in its batch, then twice alone
        assert feed.positions() == last_ids(school, PARTITIONS)
        with engine.connect() as conn:
            [letter] = sql_tracking.dead_letters(conn, "dogs")
        bad = dogs[4]
        partition = key_partitioner(PARTITIONS)(str(bad.id).encode())
        assert letter.key == str(bad.id) and letter.upstream == "DogSchool"
        assert letter.originator_version == 5 and letter.event_topic.endswith("TrickAdded")
        assert letter.tracking_name == tracking_names("DogSchool", PARTITIONS)[partition]
        assert (letter.kafka_topic, letter.kafka_partition) == (topic, partition)
        assert letter.kafka_offset is not None and letter.attempts == 3
        assert "RuntimeError: cannot project trick 'trick-3'" in letter.error
        contents = table_contents(engine)
        expected = expected_contents(school)
        assert contents["proj_tricks"] == [t for t in expected["proj_tricks"] if t[2] != "trick-3"]
        assert feed.skipped == 0

        # Later events, of the parked aggregate too, are applied (as by a log-fed runner).
        FailureSwitch.failing.clear()
        school.register("after", tricks=1)
        Replay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env).run(
            total + 1
        )
        assert feed.process_available(timeout=5) == 2
        with engine.connect() as conn:
            assert len(sql_tracking.dead_letters(conn, "dogs")) == 1
    finally:
        feed.close()
        engine.dispose()


def _start_feed(url: str, env: dict[str, str], topic: str, kafka: dict) -> subprocess.Popen[str]:
    return start_projection_process("main_kafka", url, json.dumps(env), topic, json.dumps(kafka))


def test_kafka_fed_projection_killed_mid_stream_loses_and_repeats_nothing(
    school, postgres_db, postgres_server, kafka_config, create_topic
):
    topic = create_topic(partitions=PARTITIONS)
    url = postgres_server.create_database().url
    engine = create_engine(url)
    # A short session: the group gives a killed member's partitions to its successor soon.
    kafka = {**kafka_config, "session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
    relay = Relay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env)
    relaying = threading.Thread(target=relay.run, daemon=True)
    relaying.start()
    writing_done = threading.Event()

    def write() -> None:
        for i in range(300):
            school.register(f"dog-{i}", tricks=i % 7)
        writing_done.set()

    def applied() -> int:
        try:
            return sum(len(rows) for rows in table_contents(engine).values())
        except Exception:
            return 0  # tables not created yet

    writer = threading.Thread(target=write)
    killed_at: list[int] = []
    process = None
    try:
        process = _start_feed(url, postgres_db.env, topic, kafka)
        writer.start()
        for threshold in (100, 500):
            wait_for(lambda t=threshold: applied() > t, 120, f"more than {threshold} rows")
            process.send_signal(signal.SIGKILL)  # kill -9: no cleanup, mid-transaction likely
            process.wait(10)
            killed_at.append(applied())
            process = _start_feed(url, postgres_db.env, topic, kafka)
        writer.join(120)
        assert writing_done.is_set()
        expected = last_ids(school, PARTITIONS)
        wait_for(lambda: stored_positions(engine, PARTITIONS) == expected, 120, "caught up")
    finally:
        if process is not None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        relay.stop()
        relaying.join(30)
        relay.close()
    contents = table_contents(engine)
    total_rows = sum(len(rows) for rows in contents.values())
    assert len(killed_at) == 2 and killed_at[-1] < total_rows  # killed with work still to do
    assert contents == expected_contents(school)
    with engine.connect() as conn:
        assert sql_tracking.dead_letters(conn, "dogs") == []
    engine.dispose()


def test_two_feeds_of_one_projection_apply_each_event_once(
    school, postgres_db, postgres_server, kafka_config, create_topic
):
    """A zombie: two feeds in different consumer groups read the same partitions. Whichever
    commits second finds the tracking rows moved, re-reads them and skips what is there."""
    for i in range(40):
        school.register(f"dog-{i}", tricks=3)
    topic = create_topic(partitions=PARTITIONS)
    Replay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env).run()
    engine = create_engine(postgres_server.create_database().url)
    first = dog_feed(engine, topic, kafka_config, postgres_db.env)
    second = KafkaProjectionFeed(
        DogProjection(),
        engine,
        upstream="DogSchool",
        topic=topic,
        kafka_config=kafka_config,
        mapper=application_mapper(DogSchool, postgres_db.env),
        env=postgres_db.env,
        group_id=f"{first.group_id}.zombie",
    )
    results: dict[str, int] = {}

    def feed(name: str, f) -> None:
        results[name] = f.process_available(timeout=5)

    try:
        first.setup()  # the tables once: creating them is not what this test races
        threads = [
            threading.Thread(target=feed, args=("a", first)),
            threading.Thread(target=feed, args=("b", second)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        total = school.recorder.max_notification_id()
        assert results["a"] + results["b"] == total  # each event applied by exactly one
        assert first.positions() == last_ids(school, PARTITIONS)
        assert table_contents(engine) == expected_contents(school)
    finally:
        first.close()
        second.close()
        engine.dispose()


def test_rows_and_positions_land_in_sqlite_too(
    school, postgres_db, kafka_config, create_topic, tmp_path
):
    for i in range(12):
        school.register(f"dog-{i}", tricks=i % 3)
    topic = create_topic(partitions=PARTITIONS)
    Replay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env).run()
    engine = create_engine(f"sqlite:///{tmp_path / 'dogs.db'}")
    feed = dog_feed(engine, topic, kafka_config, postgres_db.env, log=False)
    try:
        assert feed.process_available(timeout=5) == school.recorder.max_notification_id()
        assert feed.positions() == last_ids(school, PARTITIONS)
        assert table_contents(engine) == expected_contents(school)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*) FROM esbridge_projection_tracking"))
            assert rows.scalar() == PARTITIONS
    finally:
        feed.close()
        engine.dispose()
