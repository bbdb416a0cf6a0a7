"""Data written by the previous layout of projection tracking keeps being read.

Issue #22 moved projection dead letters from ``esbridge_projection_dead_letters``
into esbridge's one dead-letter table (``esbridge_dead_letters``). A projection
database written by the previous layout must keep its place and its parked
notifications, moved once, readable by esbridge's own dead-letter store.

This test creates the previous tables with their exact DDL
(as SQLAlchemy emitted it for ``connectors/sql_tracking.py`` up to then) and
rows exactly as ``advance()`` and ``park()`` wrote them, then runs the
current code on that database.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from eventsourcing.postgres import PostgresDatastore
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine

from esbridge.deadletters.store import REASON_POLICY, DeadLetterStore
from esbridge_connectors.sql_projection import ProjectionRunner
from esbridge_connectors.upstream import application_mapper
from tests.support.sql_projection_domain import DogNameProjection, DogSchool, table_contents

# The previous layout's DDL, per dialect, verbatim.
PREVIOUS_DDL = {
    "postgresql": [
        """CREATE TABLE esbridge_projection_tracking (
            projection VARCHAR(200) NOT NULL,
            upstream VARCHAR(200) NOT NULL,
            notification_id BIGINT NOT NULL,
            version INTEGER NOT NULL,
            updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
            PRIMARY KEY (projection, upstream)
        )""",
        """CREATE TABLE esbridge_projection_dead_letters (
            projection VARCHAR(200) NOT NULL,
            upstream VARCHAR(200) NOT NULL,
            notification_id BIGINT NOT NULL,
            topic VARCHAR(500) NOT NULL,
            originator_id VARCHAR(200) NOT NULL,
            originator_version BIGINT NOT NULL,
            attempts INTEGER NOT NULL,
            error TEXT NOT NULL,
            traceback TEXT NOT NULL,
            parked_at TIMESTAMP WITH TIME ZONE NOT NULL,
            PRIMARY KEY (projection, upstream, notification_id)
        )""",
    ],
    "sqlite": [
        """CREATE TABLE esbridge_projection_tracking (
            projection VARCHAR(200) NOT NULL,
            upstream VARCHAR(200) NOT NULL,
            notification_id BIGINT NOT NULL,
            version INTEGER NOT NULL,
            updated_at DATETIME NOT NULL,
            PRIMARY KEY (projection, upstream)
        )""",
        """CREATE TABLE esbridge_projection_dead_letters (
            projection VARCHAR(200) NOT NULL,
            upstream VARCHAR(200) NOT NULL,
            notification_id BIGINT NOT NULL,
            topic VARCHAR(500) NOT NULL,
            originator_id VARCHAR(200) NOT NULL,
            originator_version BIGINT NOT NULL,
            attempts INTEGER NOT NULL,
            error TEXT NOT NULL,
            traceback TEXT NOT NULL,
            parked_at DATETIME NOT NULL,
            PRIMARY KEY (projection, upstream, notification_id)
        )""",
    ],
}

# The rows as advance() and park() inserted them.
PREVIOUS_TRACKING_INSERT = (
    "INSERT INTO esbridge_projection_tracking "
    "(projection, upstream, notification_id, version, updated_at) "
    "VALUES (:projection, :upstream, :notification_id, :version, :updated_at)"
)
PREVIOUS_DEAD_LETTER_INSERT = (
    "INSERT INTO esbridge_projection_dead_letters "
    "(projection, upstream, notification_id, topic, originator_id, originator_version, "
    "attempts, error, traceback, parked_at) "
    "VALUES (:projection, :upstream, :notification_id, :topic, :originator_id, "
    ":originator_version, :attempts, :error, :traceback, :parked_at)"
)


@pytest.fixture(params=["postgresql", "sqlite"])
def target(request, postgres_server, tmp_path) -> Engine:
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'projection.db'}")
    else:
        engine = create_engine(postgres_server.create_database().url)
    yield engine
    engine.dispose()


def test_previous_tracking_and_dead_letter_rows_are_read(postgres_db, target):
    school = DogSchool(env=postgres_db.env)
    dogs = [school.register(name) for name in ("rex", "bad", "fido", "rex")]
    notifications = school.recorder.select_notifications(start=1, limit=10)
    assert [n.id for n in notifications] == [1, 2, 3, 4]
    bad = notifications[1]
    projection = DogNameProjection()
    parked_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    # The previous layout, at position 2: "rex" applied, "bad" parked.
    with target.begin() as conn:
        for ddl in PREVIOUS_DDL[target.dialect.name]:
            conn.execute(text(ddl))
        projection.create_tables(conn)
        conn.execute(text("INSERT INTO proj_dog_names (name, dogs) VALUES ('rex', 1)"))
        conn.execute(
            text(PREVIOUS_TRACKING_INSERT),
            {
                "projection": projection.name,
                "upstream": "DogSchool",
                "notification_id": 2,
                "version": projection.version,
                "updated_at": parked_at,
            },
        )
        conn.execute(
            text(PREVIOUS_DEAD_LETTER_INSERT),
            {
                "projection": projection.name,
                "upstream": "DogSchool",
                "notification_id": bad.id,
                "topic": bad.topic,
                "originator_id": str(bad.originator_id),
                "originator_version": bad.originator_version,
                "attempts": 3,
                "error": "RuntimeError: cannot project 'bad'",
                "traceback": "Traceback (most recent call last): ...",
                "parked_at": parked_at,
            },
        )

    runner = ProjectionRunner(
        projection,
        target,
        upstream="DogSchool",
        mapper=application_mapper(DogSchool, postgres_db.env),
        env=postgres_db.env,
    )
    try:
        runner.setup()
        assert runner.position() == 2
        [letter] = runner.dead_letters()
        assert (letter.follower, letter.upstream, letter.nid) == ("dog_names", "DogSchool", 2)
        assert letter.key == str(dogs[1].id)
        assert letter.originator_version == bad.originator_version
        assert letter.event_topic == bad.topic
        assert letter.attempts == 3
        assert letter.reason == REASON_POLICY
        assert letter.error == (
            "RuntimeError: cannot project 'bad'\nTraceback (most recent call last): ..."
        )
        assert letter.parked_at == parked_at or letter.parked_at.replace(tzinfo=UTC) == parked_at

        # Moved in one go: the old table is kept under another name, and a second
        # setup (another runner, a restart) moves nothing twice.
        tables = set(inspect(target).get_table_names())
        assert "esbridge_projection_dead_letters" not in tables
        assert "esbridge_projection_dead_letters_migrated" in tables
        runner.setup()
        assert len(runner.dead_letters()) == 1
        if target.dialect.name == "postgresql":
            # esbridge's own dead-letter store (what 'esbridge dlq' reads) sees it too.
            datastore = PostgresDatastore(
                dbname=target.url.database,
                host=target.url.host,
                port=str(target.url.port),
                user=target.url.username,
                password=target.url.password or "",
            )
            try:
                store = DeadLetterStore(datastore)
                assert store.exists()
                [seen] = store.list("dog_names")
                assert (seen.nid, seen.key, seen.event_topic) == (2, letter.key, bad.topic)
                assert store.count("dog_names") == 1
            finally:
                datastore.close()

        # It carries on from its place: 3 and 4 applied once, 1 and 2 not again.
        stats = runner.run_once()
        assert (stats.applied, stats.parked) == (2, 0)
        assert runner.position() == 4
        assert table_contents(target, ("proj_dog_names",)) == {
            "proj_dog_names": [("fido", 1), ("rex", 2)]
        }
        assert len(runner.dead_letters()) == 1
    finally:
        runner.close()
        school.close()
