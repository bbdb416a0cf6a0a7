"""Data written by the previous layout of projection tracking keeps being read.

Issue #22 moves projection dead letters into esbridge's one dead-letter table
(and may change the tracking table). Whatever the new layout, a projection
database written by the previous one must keep its place and its parked
notifications. This test creates the previous tables with their exact DDL
(as SQLAlchemy emitted it for ``connectors/sql_tracking.py`` up to then) and
rows exactly as ``advance()`` and ``park()`` wrote them, then runs the
current code on that database.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from esbridge_connectors.sql_projection import ProjectionRunner
from esbridge_connectors.upstream import application_mapper
from sql_projection_domain import DogNameProjection, DogSchool, table_contents
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

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
        assert letter.originator_id == str(dogs[1].id)
        assert letter.originator_version == bad.originator_version
        assert letter.topic == bad.topic
        assert letter.attempts == 3
        assert letter.error == "RuntimeError: cannot project 'bad'"

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
