"""A dead-letter table written by the previous release gets this release's columns, rows kept.

The previous DDL (esbridge/deadletters/store.py up to the dead-letter
policies) and a row as its ``insert`` wrote it are created verbatim; then the
current code opens the table: the columns are added once, the row reads,
and the new operations (discard, the traceback) work on it. The projection
side (SQLAlchemy, any dialect) is migrated the same way.
"""

from __future__ import annotations

from typing import Any

import pytest
from eventsourcing.postgres import PostgresDatastore
from sqlalchemy import Column, MetaData, Table, create_engine, inspect, text
from sqlalchemy.engine import Engine

from esbridge.deadletters.store import ADDED_COLUMNS, DeadLetterStore
from esbridge.names import DEAD_LETTER_TABLE
from esbridge_connectors import sql_tracking

PREVIOUS_DDL = """
CREATE TABLE IF NOT EXISTS public.esbridge_dead_letters (
    id bigserial PRIMARY KEY,
    follower text NOT NULL,
    upstream text NOT NULL,
    tracking_name text,
    nid bigint,
    key text NOT NULL,
    value bytea,
    headers jsonb NOT NULL DEFAULT '[]',
    kafka_topic text,
    kafka_partition integer,
    kafka_offset bigint,
    event_topic text,
    originator_version bigint,
    reason text NOT NULL,
    error text NOT NULL,
    attempts integer NOT NULL DEFAULT 1,
    status text NOT NULL DEFAULT 'parked',
    parked_at timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS esbridge_dead_letters_nid_uniq
    ON public.esbridge_dead_letters (follower, upstream, nid) WHERE nid IS NOT NULL;
CREATE INDEX IF NOT EXISTS esbridge_dead_letters_parked_key
    ON public.esbridge_dead_letters (follower, upstream, key) WHERE status = 'parked';
"""
PREVIOUS_INSERT = (
    "INSERT INTO public.esbridge_dead_letters (follower, upstream, tracking_name, nid, key, "
    "value, headers, kafka_topic, kafka_partition, kafka_offset, event_topic, "
    "originator_version, reason, error, attempts) VALUES ('Mirror', 'DogSchool', 'DogSchool', "
    "3, 'k1', '\\x7b7d', '[[\"esb_nid\", \"Mw==\"]]', 'dogs', 0, 2, 'm:Dog.TrickAdded', 2, "
    "'policy_error', 'ValueError: no', 4) ON CONFLICT DO NOTHING"
)


@pytest.fixture
def datastore(postgres_db: Any) -> Any:
    env = postgres_db.env
    store = PostgresDatastore(
        dbname=env["POSTGRES_DBNAME"],
        host=env["POSTGRES_HOST"],
        port=env["POSTGRES_PORT"],
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"],
    )
    yield store
    store.close()


def test_the_store_adds_its_columns_to_a_previous_table_and_reads_its_rows(datastore: Any) -> None:
    with datastore.transaction(commit=True) as curs:
        curs.execute(PREVIOUS_DDL)
        curs.execute(PREVIOUS_INSERT)
    store = DeadLetterStore(datastore)
    assert not store.exists()  # the table is there, this release's columns are not
    store.create_table()
    assert store.exists()
    store.create_table()  # a second process: nothing to do
    [letter] = store.list("Mirror")
    assert (letter.nid, letter.key, letter.attempts, letter.status) == (3, "k1", 4, "parked")
    assert letter.headers == [("esb_nid", b"3")] and letter.value == b"{}"
    assert letter.traceback is None and letter.discarded_at is None
    [gone] = store.discard("Mirror", [letter.id], by="ann", reason="obsolete")
    assert (gone.status, gone.discarded_by, gone.discard_reason) == ("discarded", "ann", "obsolete")
    assert store.count("Mirror") == 0


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_a_projection_s_previous_table_gets_the_columns_too(
    dialect: str, postgres_server: Any, tmp_path: Any
) -> None:
    engine: Engine = (
        create_engine(f"sqlite:///{tmp_path / 'p.db'}")
        if dialect == "sqlite"
        else create_engine(postgres_server.create_database().url)
    )
    added = {name for name, _kind in ADDED_COLUMNS}
    previous = Table(
        DEAD_LETTER_TABLE,
        MetaData(),
        *[
            Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
            for c in sql_tracking.dead_letter_table.columns
            if c.name not in added
        ],
    )
    try:
        previous.create(engine)
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {DEAD_LETTER_TABLE} (follower, upstream, key, reason, error, "
                    "attempts, status, headers, parked_at, nid) VALUES ('proj', 'DogSchool', "
                    "'k', 'policy_error', 'boom', 3, 'parked', '[]', CURRENT_TIMESTAMP, 5)"
                )
            )
        sql_tracking.create_tracking_tables(engine)
        columns = {c["name"] for c in inspect(engine).get_columns(DEAD_LETTER_TABLE)}
        assert added <= columns
        sql_tracking.create_tracking_tables(engine)  # again: nothing to add
        with engine.begin() as conn:
            [letter] = sql_tracking.dead_letters(conn, "proj")
        assert (letter.nid, letter.attempts, letter.error) == (5, 3, "boom")
    finally:
        engine.dispose()
