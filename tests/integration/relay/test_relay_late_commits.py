"""Late commits: writers without the library's table lock commit an id after higher ids.

With ``POSTGRES_ENABLE_DB_FUNCTIONS=y`` (or any insert into the events table
that skips ``LOCK TABLE``), a transaction can allocate a notification id, stay
open while others commit higher ids, and commit last. The relay must publish
that id anyway, once and in order, and must not stall on one that rolls back.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from esbridge.relay import gaps as relay_gaps
from esbridge.relay.relay import Relay
from tests.integration.relay.test_relay import check_exactly_once_in_order
from tests.support.relay_support import (
    APP_NAME,
    db_ids,
    ledger,
    ledger_relay,
    read_all,
    rolled_back_insert,
    write_events,
)

PARTITIONS = 3


@contextmanager
def held_insert(dsn: str) -> Iterator[tuple[psycopg.Connection[Any], int]]:
    """An event inserted without the table lock, in a transaction left open: (conn, its id).

    The caller commits or rolls back; leaving the block rolls back whatever is still open.
    """
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "INSERT INTO ledger_events (originator_id, originator_version, topic, state) "
            "VALUES (%s, 1, 'tests:Held', %s) RETURNING notification_id",
            (uuid.uuid4(), b"{}"),
        ).fetchone()
        assert row is not None
        try:
            yield conn, int(row[0])
        finally:
            conn.rollback()


def lockless_writer(env: dict[str, str]) -> Any:
    """The ledger application writing with the library's database functions (no table lock)."""
    return ledger({**env, "POSTGRES_ENABLE_DB_FUNCTIONS": "y"})


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@contextmanager
def running(relay: Relay) -> Iterator[Relay]:
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        yield relay
    finally:
        relay.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert relay.status().error is None


def counter(registry: CollectorRegistry, name: str, topic: str) -> float | None:
    return registry.get_sample_value(
        f"esbridge_relay_{name}_total", {"app": APP_NAME, "topic": topic}
    )


def hold_while_others_commit(
    postgres_db: Any, relay: Relay, writer: Any, finish: str, held_pid: list[int] | None = None
) -> tuple[int, int, float]:
    """The issue's sequence: an id allocated and held open while other writers commit
    higher ids and the relay runs; then ``finish`` ("commit" or "rollback") the held one.

    Returns (the held id, the highest id, seconds from finishing it to the relay at that id);
    appends the holding session's Postgres pid to ``held_pid``.
    """
    with held_insert(postgres_db.dsn) as (conn, held):
        if held_pid is not None:
            held_pid.append(conn.info.backend_pid)
        write_events(writer, 60, per_save=6)
        top = db_ids(postgres_db.dsn)[-1][0]
        assert top > held + 50
        # The relay publishes up to the held id and stops there while it may commit.
        wait_for(lambda: relay.status().position == held - 1, "relay never reached the gap")
        time.sleep(1.5)
        assert relay.status().position == held - 1
        assert relay.status().upstream_max == top  # it saw the ids above the gap
        getattr(conn, finish)()
        started = time.monotonic()
        wait_for(lambda: relay.status().position == top, f"relay stalled after {finish}")
    return held, top, time.monotonic() - started


@pytest.mark.parametrize("hook", [False, True], ids=["fast-path", "encoder-hook"])
def test_a_late_commit_is_published_once_in_order(
    postgres_db, kafka_config, create_topic, caplog, hook
):
    writer = lockless_writer(postgres_db.env)
    write_events(writer, 20, accounts=10)
    topic = create_topic(partitions=PARTITIONS)
    registry = CollectorRegistry()
    options: dict[str, Any] = {"registry": registry, "poll_interval": 0.2}
    if hook:
        options["encoder"] = lambda n: (n.state, [])
    relay = ledger_relay(postgres_db, kafka_config, topic, **options)
    caplog.set_level(logging.INFO, logger="esbridge.relay_gaps")
    with running(relay):
        wait_for(lambda: relay.status().position == 20, "relay never published the first 20")
        held, _top, _ = hold_while_others_commit(postgres_db, relay, writer, "commit")
    expected = db_ids(postgres_db.dsn)
    assert len(expected) == 81 and held in {e[0] for e in expected}
    records = read_all(kafka_config, topic, 81)
    check_exactly_once_in_order(records, expected, PARTITIONS)  # the held id before higher ones
    assert counter(registry, "late_commits", topic) == 1.0
    assert counter(registry, "gap_waits", topic) == 1.0
    warnings = [  # the relay's own (librdkafka may warn of a coordinator still loading)
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "esbridge.relay_gaps"
    ]
    assert warnings == [
        f"relay {APP_NAME}: notification ids {held} committed after higher ids (late commits: "
        "writers without the library's table lock, e.g. POSTGRES_ENABLE_DB_FUNCTIONS=y); "
        "published now, in order, since the relay had waited at the gap"
    ]
    waits = [r.getMessage() for r in caplog.records if "are missing while" in r.getMessage()]
    assert len(waits) == 1 and waits[0].startswith(
        f"relay {APP_NAME}: notification ids {held} are missing while "
    )


@contextmanager
def select_only_role(postgres_db: Any) -> Iterator[dict[str, str]]:
    """A login role that may only SELECT the ledger's events table: its POSTGRES_* settings."""
    role = f"esb_reader_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'reader'")
        conn.execute(f"GRANT SELECT ON ledger_events TO {role}")
    try:
        yield {**postgres_db.env, "POSTGRES_USER": role, "POSTGRES_PASSWORD": "reader"}
    finally:
        with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_a_held_insert_that_rolls_back_leaves_a_gap_that_does_not_stall(
    postgres_db, kafka_config, create_topic, caplog, monkeypatch
):
    """Also: a relay whose role may only SELECT the events table does all this, and a
    long wait names the session that holds it up."""
    monkeypatch.setattr(relay_gaps, "STILL_WAITING_WARNING", 0.5)
    caplog.set_level(logging.WARNING, logger="esbridge.relay_gaps")
    held_pid: list[int] = []
    writer = lockless_writer(postgres_db.env)
    write_events(writer, 20, accounts=10)
    topic = create_topic(partitions=PARTITIONS)
    registry = CollectorRegistry()
    with select_only_role(postgres_db) as reader_env:
        relay = Relay(
            APP_NAME,
            kafka_config=kafka_config,
            topic=topic,
            env=reader_env,
            registry=registry,
            poll_interval=5.0,  # the gap's wait polls faster: a rollback sends no NOTIFY
        )
        with running(relay):
            wait_for(lambda: relay.status().position == 20, "relay never published the first 20")
            held, _top, after = hold_while_others_commit(
                postgres_db, relay, writer, "rollback", held_pid
            )
            assert after < 1.0, f"{after:.2f} s to move past a rolled-back gap"
    expected = db_ids(postgres_db.dsn)
    assert len(expected) == 80 and held not in {e[0] for e in expected}
    check_exactly_once_in_order(read_all(kafka_config, topic, 80), expected, PARTITIONS)
    assert counter(registry, "late_commits", topic) == 0.0
    assert counter(registry, "gap_waits", topic) == 1.0
    still = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert still, "no warning about the transaction holding the relay at the gap"
    assert all(
        re.fullmatch(
            rf"relay {APP_NAME}: still waiting, after \d+ s, for transactions writing to "
            rf"public\.ledger_events \(Postgres pids {held_pid[0]}\), which may commit "
            rf"notification ids {held}; the relay publishes nothing past them until those "
            "transactions commit or roll back",
            message,
        )
        for message in still
    ), still


def test_a_gap_without_writers_in_progress_costs_no_wait(postgres_db, kafka_config, create_topic):
    app = ledger(postgres_db.env)
    write_events(app, 30)
    rolled_back_insert(postgres_db.dsn, rows=4)
    write_events(app, 30)
    topic = create_topic(partitions=1)
    registry = CollectorRegistry()
    relay = ledger_relay(postgres_db, kafka_config, topic, registry=registry, page_size=25)
    try:
        assert relay.publish_available() == 60
    finally:
        relay.close()
    expected = db_ids(postgres_db.dsn)
    check_exactly_once_in_order(read_all(kafka_config, topic, 60), expected, 1)
    assert counter(registry, "gap_waits", topic) == 0.0
    assert counter(registry, "late_commits", topic) == 0.0


def test_lock_free_writers_and_held_inserts_each_published_once(
    postgres_db, kafka_config, create_topic
):
    """Three lock-free writers at once, and inserts held open for 0.1-0.5 s that commit
    (or, one in three, roll back) while the others write: every committed id once, in order."""
    writer = lockless_writer(postgres_db.env)
    write_events(writer, 1, accounts=1)  # creates the tables and the insert function
    topic = create_topic(partitions=PARTITIONS)
    registry = CollectorRegistry()
    relay = ledger_relay(postgres_db, kafka_config, topic, registry=registry, linger=0)
    rng = random.Random(30)
    held_outcomes: list[str] = []

    def holder() -> None:
        for i in range(12):
            with held_insert(postgres_db.dsn) as (conn, _nid):
                time.sleep(rng.uniform(0.1, 0.5))
                outcome = "rollback" if i % 3 == 2 else "commit"
                getattr(conn, outcome)()
                held_outcomes.append(outcome)

    writers = [lockless_writer(postgres_db.env) for _ in range(3)]  # one at a time: DDL
    threads = [
        threading.Thread(target=write_events, args=(w, 300), kwargs={"per_save": 3, "rate": 100})
        for w in writers
    ]
    threads.append(threading.Thread(target=holder))
    with running(relay):
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        top = db_ids(postgres_db.dsn)[-1][0]
        wait_for(lambda: relay.status().position == top, "relay never caught up")
    assert held_outcomes.count("commit") == 8
    expected = db_ids(postgres_db.dsn)
    assert len(expected) == 1 + 900 + 8
    check_exactly_once_in_order(read_all(kafka_config, topic, len(expected)), expected, PARTITIONS)
    late = counter(registry, "late_commits", topic)
    assert late is not None and late >= 1  # held ids committed after higher ones


def test_publish_available_stops_at_a_held_gap_and_a_later_call_publishes_the_rest(
    postgres_db, kafka_config, create_topic
):
    writer = lockless_writer(postgres_db.env)
    write_events(writer, 10, accounts=5)
    topic = create_topic(partitions=1)
    relay = ledger_relay(postgres_db, kafka_config, topic)
    try:
        with held_insert(postgres_db.dsn) as (conn, held):
            write_events(writer, 15, per_save=5)
            assert relay.publish_available() == 10  # up to the held id (11), not past it
            assert relay.status().position == held - 1 == 10
            conn.commit()
        assert relay.publish_available() == 16  # the held id, then the 15 above it
    finally:
        relay.close()
    expected = db_ids(postgres_db.dsn)
    records = read_all(kafka_config, topic, 26)
    assert [int(r.headers["esb_nid"]) for r in records] == [e[0] for e in expected]
    check_exactly_once_in_order(records, expected, 1)
