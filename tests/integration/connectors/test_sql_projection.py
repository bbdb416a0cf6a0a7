"""SQL projections against a real PostgreSQL (upstream log and target) and SQLite (target).

* rows and the tracking row commit in one transaction (a runner whose commit
  loses the compare-and-set leaves no row behind);
* a handler that raises is retried, then parked with its reason, and the
  projection keeps its place and carries on;
* a projection process killed with kill -9 mid-stream and restarted ends with
  tables equal to a from-scratch rebuild;
* a rebuild (from the log, or from a Kafka topic) runs while another
  projection of the same log keeps running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from esbridge.kafka.partitioning import key_partitioner
from esbridge.names import tracking_names
from esbridge_connectors.replay import Replay
from esbridge_connectors.sql_projection import ProjectionRunner
from esbridge_connectors.sql_tracking import ProjectionConflictError
from esbridge_connectors.upstream import application_mapper
from tests.support.sql_projection_domain import (
    DogNameProjection,
    DogProjection,
    DogSchool,
    FailureSwitch,
    dog_feed,
    table_contents,
)

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(params=["postgresql", "sqlite"])
def target(request, postgres_server, tmp_path) -> Engine:
    """The projection's database: another PostgreSQL database, or a SQLite file."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'projection.db'}")
    else:
        db = postgres_server.create_database()
        engine = create_engine(db.url)
    yield engine
    engine.dispose()


def runner_for(projection, engine, postgres_db, **options) -> ProjectionRunner:
    return ProjectionRunner(
        projection,
        engine,
        upstream="DogSchool",
        mapper=application_mapper(DogSchool, postgres_db.env),
        env=postgres_db.env,
        **options,
    )


def expected_contents(school: DogSchool) -> dict[str, list[tuple]]:
    """What the projection must hold, computed from the aggregates themselves."""
    dogs, tricks = [], []
    for n in school.recorder.select_notifications(start=1, limit=1_000_000):
        if n.topic.endswith("Dog.Registered"):
            dog = school.repository.get(n.originator_id)
            dogs.append((str(dog.id), dog.name, len(dog.tricks)))
            tricks.extend((str(dog.id), i + 2, t) for i, t in enumerate(dog.tricks))
    return {"proj_dogs": sorted(dogs), "proj_tricks": sorted(tricks)}


def test_rows_and_tracking_commit_in_one_transaction(school, target, postgres_db):
    for i in range(20):
        school.register(f"dog-{i}", tricks=3)
    runner = runner_for(DogProjection(), target, postgres_db, page_size=25)
    stats = runner.run_once()
    assert (stats.applied, stats.parked) == (80, 0)
    assert stats.transactions == 4  # 25 events per transaction, not one commit each
    assert runner.position() == 80
    assert table_contents(target) == expected_contents(school)

    # Two runners of one projection from the same position: the second one's commit finds
    # the tracking row moved and rolls back its rows with it, so nothing is applied twice.
    for i in range(5):
        school.register(f"late-{i}", tricks=1)
    other = runner_for(DogProjection(), target, postgres_db)
    other.setup()
    runner.run_once()
    with pytest.raises(ProjectionConflictError):
        other.run_once()
    assert runner.position() == 90
    assert table_contents(target) == expected_contents(school)
    log = runner.recorder  # opened by the runner (from env): close() closes it
    runner.close()
    other.close()
    assert log.datastore.pool.closed  # type: ignore[attr-defined]


def test_handler_that_raises_is_retried_then_parked_and_position_kept(school, target, postgres_db):
    FailureSwitch.failing.update({"trick-1": 2, "trick-3": -1})  # flaky twice; always
    dogs = [school.register(f"dog-{i}", tricks=2 + (i == 4) * 2) for i in range(6)]
    runner = runner_for(DogProjection(), target, postgres_db, max_attempts=3, retry_delay=0.01)
    stats = runner.run_once()
    total = school.recorder.max_notification_id()
    assert total == 6 * 3 + 2
    # trick-1 of dog 0 failed twice, then applied on the third attempt; trick-3 always fails.
    assert FailureSwitch.calls == {"trick-1": 2, "trick-3": 3}
    assert (stats.applied, stats.parked) == (total - 1, 1)
    assert runner.position() == total
    [letter] = runner.dead_letters()
    bad = school.repository.get(dogs[4].id)
    assert letter.key == str(bad.id)
    assert letter.originator_version == 5  # Registered, trick-0..trick-3: trick-3 is v5
    assert letter.event_topic.endswith("Dog.TrickAdded")
    assert letter.attempts == 3
    assert "RuntimeError: cannot project trick 'trick-3'" in letter.error
    contents = table_contents(target)
    expected = expected_contents(school)
    assert contents["proj_tricks"] == [t for t in expected["proj_tricks"] if t[2] != "trick-3"]
    assert (str(bad.id), "dog-4", 3) in contents["proj_dogs"]  # 3 of 4 tricks projected

    # New events after the parked one are applied; the parked one is not retried by itself.
    school.register("after", tricks=1)
    stats = runner.run_once()
    assert (stats.applied, stats.parked) == (2, 0)
    assert len(runner.dead_letters()) == 1


def start_projection_process(entry: str, *args: str) -> subprocess.Popen[str]:
    """``tests.support.sql_projection_domain.<entry>()`` in a subprocess, once it has started."""
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    code = f"import tests.support.sql_projection_domain as m; m.{entry}()"
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:  # librdkafka may warn about settings first
        if line.strip() == "started":
            return process
    raise AssertionError(f"the projection process exited with {process.wait()}")


def _start_projection(url: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return start_projection_process("main", url, json.dumps(env))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def test_projection_killed_mid_stream_equals_a_rebuild(
    school, postgres_db, postgres_server, tmp_path
):
    db = postgres_server.create_database()
    engine = create_engine(db.url)
    watcher = runner_for(DogProjection(), engine, postgres_db)  # reads the position only
    writing_done = threading.Event()

    def write() -> None:
        for i in range(150):
            school.register(f"dog-{i}", tricks=i % 7)
        writing_done.set()

    process = _start_projection(db.url, postgres_db.env)
    writer = threading.Thread(target=write)
    writer.start()
    killed_at: list[int] = []
    try:
        for threshold in (60, 250):
            wait_for(lambda t=threshold: _position(engine) > t, 60, f"position > {threshold}")
            process.send_signal(signal.SIGKILL)  # kill -9: no cleanup, mid-transaction likely
            process.wait(10)
            killed_at.append(_position(engine))
            process = _start_projection(db.url, postgres_db.env)
            assert _position(engine) >= killed_at[-1]
        writer.join(120)
        assert writing_done.is_set()
        total = school.recorder.max_notification_id()
        wait_for(lambda: _position(engine) == total, 60, f"position == {total}")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    assert len(killed_at) == 2 and killed_at[-1] < total  # killed with work still to do
    assert watcher.position() == total
    after_restarts = table_contents(engine)

    # From scratch, in another database, in one go.
    fresh = create_engine(f"sqlite:///{tmp_path / 'rebuild.db'}")
    runner_for(DogProjection(), fresh, postgres_db, page_size=1000).run_once()
    assert after_restarts == table_contents(fresh) == expected_contents(school)
    # And rebuilt in place.
    watcher.rebuild()
    assert table_contents(engine) == after_restarts
    engine.dispose()


def _position(engine: Engine) -> int:
    with engine.connect() as conn:
        try:
            value = conn.execute(
                text(
                    "SELECT notification_id FROM esbridge_projection_tracking "
                    "WHERE projection = 'dogs'"
                )
            ).scalar()
        except Exception:
            return 0  # tables not created yet
    return int(value or 0)


def test_rebuild_from_the_log_while_another_projection_keeps_running(school, target, postgres_db):
    for i in range(30):
        school.register(f"name-{i % 10}", tricks=2)
    dogs = runner_for(DogProjection(), target, postgres_db, poll_interval=0.02)
    names = runner_for(DogNameProjection(), target, postgres_db, poll_interval=0.02)
    dogs.run_once()
    names_thread = threading.Thread(target=names.run_forever)
    names_thread.start()
    try:
        wait_for(lambda: names.position() == 90, 30, "dog_names caught up")
        # Corrupt the dogs projection (a bug, a manual edit), then rebuild it from scratch
        # while dog_names keeps following new events.
        with target.begin() as conn:
            conn.execute(text("UPDATE proj_dogs SET trick_count = 99"))
        stop = threading.Event()

        def write() -> None:
            i = 0
            while not stop.is_set():
                school.register(f"name-{i % 10}", tricks=1)
                i += 1
                time.sleep(0.01)

        writer = threading.Thread(target=write)
        writer.start()
        stats = dogs.rebuild()
        stop.set()
        writer.join()
        assert stats is not None and stats.applied >= 90
        total = school.recorder.max_notification_id()
        dogs.run_once()
        wait_for(lambda: names.position() == total, 30, "dog_names caught up again")
    finally:
        names.stop()
        names_thread.join(10)
    assert dogs.position() == total
    assert table_contents(target) == expected_contents(school)
    with target.connect() as conn:
        counts = dict(conn.execute(text("SELECT name, dogs FROM proj_dog_names")).all())
    registered = [row[1] for row in expected_contents(school)["proj_dogs"]]
    assert counts == {n: registered.count(n) for n in set(registered)}


def test_rebuild_from_kafka_equals_the_log_fed_projection(
    school, postgres_db, postgres_server, kafka_config, create_topic, tmp_path
):
    for i in range(40):
        school.register(f"dog-{i}", tricks=i % 5)
    total = school.recorder.max_notification_id()
    topic = create_topic(partitions=3)
    Replay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env).run()

    log_fed = create_engine(f"sqlite:///{tmp_path / 'log.db'}")
    runner_for(DogProjection(), log_fed, postgres_db).run_once()

    db = postgres_server.create_database()
    engine = create_engine(db.url)
    names = runner_for(DogNameProjection(), engine, postgres_db)
    names.run_once()
    feed = dog_feed(engine, topic, kafka_config, postgres_db.env)
    try:
        assert feed.process_available(timeout=3) == total
        assert sum(feed.positions()) > 0 and max(feed.positions()) == total
        assert table_contents(engine) == table_contents(log_fed) == expected_contents(school)
        with engine.connect() as conn:  # the consumer adapter's tracking names
            rows = conn.execute(
                text("SELECT upstream FROM esbridge_projection_tracking WHERE projection = :p"),
                {"p": DogProjection().name},
            ).scalars()
            assert sorted(rows) == tracking_names("DogSchool", 3)

        # Redelivered and replayed messages are skipped (positions per partition).
        Replay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env).run(5, 60)
        assert feed.process_available(timeout=3) == 0
        assert feed.duplicates == 56

        # Rebuild from the beginning of the topic; the other projection is untouched.
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM proj_tricks"))
        feed.rebuild()
        assert feed.process_available(timeout=3) == total
        assert table_contents(engine) == expected_contents(school)
        assert names.position() == total
    finally:
        feed.close()
        engine.dispose()


def test_kafka_feed_fills_a_gap_from_the_log(
    school, postgres_db, postgres_server, kafka_config, create_topic
):
    """Messages missing from the topic (here: never published) are read from the log."""
    for i in range(10):
        school.register(f"dog-{i}", tricks=2)
    topic = create_topic(partitions=2)
    Replay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env).run(11)
    db = postgres_server.create_database()
    engine = create_engine(db.url)
    feed = dog_feed(engine, topic, kafka_config, postgres_db.env)
    try:
        assert feed.process_available(timeout=3) == 30
        partition_of = key_partitioner(2)
        before = school.recorder.select_notifications(start=1, limit=10)
        assert feed.gaps_filled == len(
            {partition_of(str(n.originator_id).encode()) for n in before}
        )
        assert table_contents(engine) == expected_contents(school)
        log = feed.recorder  # opened by the feed to fill the gap: close() closes it
    finally:
        feed.close()
        engine.dispose()
    assert log.datastore.pool.closed  # type: ignore[union-attr]


def test_a_rebuild_that_fails_part_way_changes_nothing(school, target, postgres_db):
    """Reset of tables, position and dead letters is one transaction (also on SQLite)."""
    for i in range(5):
        school.register(f"dog-{i}", tricks=2)
    runner = runner_for(DogProjection(), target, postgres_db)
    runner.run_once()
    before = table_contents(target)

    class Broken(DogProjection):
        def create_tables(self, conn) -> None:
            raise RuntimeError("disk full")

    broken = runner_for(Broken(), target, postgres_db)
    with pytest.raises(RuntimeError, match="disk full"):
        broken.rebuild()
    assert table_contents(target) == before
    assert runner.position() == 15


def test_kafka_feed_skips_messages_that_carry_no_notification_and_loses_none(
    school, postgres_db, postgres_server, kafka_config, create_topic
):
    """A foreign message and a relay message with a broken header land between the relay's
    messages: both are skipped and counted; every notification is applied (no upstream log
    given: a notification missing from the topic would be a ProjectionGapError)."""
    from confluent_kafka import Producer

    from esbridge_connectors.sql_projection_kafka import ProjectionGapError

    for i in range(10):
        school.register(f"dog-{i}", tricks=2)
    topic = create_topic(partitions=2)
    replay = Replay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env)
    replay.run(1, 15)
    producer = Producer(kafka_config)
    producer.produce(topic, b"{}", key=b"k", partition=0)  # no headers at all
    broken = [("esb_format", b"1"), ("esb_kind", b"payload"), ("esb_nid", b"seven")]
    producer.produce(topic, b"{}", key=b"k", headers=broken, partition=1)
    assert producer.flush(10) == 0
    replay.run(16)
    db = postgres_server.create_database()
    engine = create_engine(db.url)
    feed = dog_feed(engine, topic, kafka_config, postgres_db.env, log=False)
    try:
        assert feed.process_available(timeout=3) == 30
        assert feed.skipped == 2 and feed.gaps_filled == 0
        assert table_contents(engine) == expected_contents(school)
        assert feed.process_available(timeout=1) == 0  # their offsets were committed too
    finally:
        feed.close()
        engine.dispose()

    # A skipped message that carried a notification is a gap: never a silent loss.
    topic = create_topic(partitions=1)
    replay = Replay("DogSchool", kafka_config=kafka_config, topic=topic, env=postgres_db.env)
    replay.run(1, 5)
    producer.produce(topic, b"{}", key=b"k", headers=broken)  # in place of notification 6
    assert producer.flush(10) == 0
    replay.run(7, 10)
    engine = create_engine(postgres_server.create_database().url)
    feed = dog_feed(engine, topic, kafka_config, postgres_db.env, log=False)
    try:
        with pytest.raises(ProjectionGapError, match="missing from partition 0"):
            feed.process_available(timeout=3)
        assert feed.skipped == 1 and feed.positions()[0] <= 5  # nothing applied past the gap
    finally:
        feed.close()
        engine.dispose()
