"""Replays and SQL projections that read the upstream log over HTTP only.

The upstream DogSchool lives in a PostgreSQL server of its own, its log served
on 127.0.0.1; the replay and the projection get no database settings for it.
A replayed range is message for message what the relay published (keys,
partitions, headers, bodies: the ``esb_prev_nid`` chain rebuilt over HTTP),
a projection rebuilt from the remote log equals one fed from the database, and
one fed from Kafka fills the topic's gaps from it.
Refusals and a service that does not answer end each with what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from esbridge.cli import main
from esbridge.errors import (
    ConfigurationError,
    RemoteLogRefusedError,
    RemoteLogUnreachableError,
)
from esbridge.testing.servers import free_port
from esbridge_connectors.sql_projection import ProjectionRunner, is_transient
from esbridge_connectors.sql_projection_kafka import KafkaProjectionFeed
from esbridge_connectors.upstream import application_mapper
from tests.integration.connectors.test_replay import (
    PARTITIONS,
    nid_of,
    read_all,
    relay_publish,
)
from tests.support.consumer_apps import ManualPublisher
from tests.support.remote_log import (
    OTHER_TOKEN,
    SCHOOL_TOKEN,
    own_postgres_server,
    remote,
    serving,
)
from tests.support.sql_projection_domain import DogProjection, DogSchool, table_contents

DOGS = 40
EVENTS = DOGS + sum(i % 4 for i in range(DOGS))  # 100


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[Any]:
    with own_postgres_server() as server:
        yield server


@pytest.fixture
def school(upstream_server: Any) -> Iterator[DogSchool]:
    db = upstream_server.create_database()
    app = DogSchool(env=db.env)
    for i in range(DOGS):
        app.register(f"dog-{i}", tricks=i % 4)
    assert app.recorder.max_notification_id() == EVENTS
    yield app
    app.close()
    upstream_server.drop_database(db.dbname)


@pytest.fixture
def no_upstream_database(monkeypatch: pytest.MonkeyPatch, kafka_config: dict[str, Any]) -> None:
    """The follower's side: Kafka and a token, no database settings of the upstream."""
    for name in ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DBNAME", "POSTGRES_USER",
                 "POSTGRES_PASSWORD", "PERSISTENCE_MODULE", "UPSTREAM_LOG_URL"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_config["bootstrap.servers"])
    monkeypatch.setenv("UPSTREAM_LOG_TOKEN", SCHOOL_TOKEN)


def replay(capsys: Any, topic: str, *options: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["replay", "DogSchool", "--topic", topic, *options])
    out, err = capsys.readouterr()
    return code, out, err


def test_replay_reads_the_range_from_the_log_service(
    school: DogSchool,
    kafka_config: dict[str, Any],
    create_topic: Any,
    no_upstream_database: None,
    capsys: Any,
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    assert relay_publish(school, kafka_config, topic) == EVENTS  # the upstream's own relay
    with serving(school.recorder, max_limit=9) as server:  # small pages: many requests
        code, out, err = replay(capsys, topic, "--from", "17", "--to", "61",
                                "--upstream-url", server.url)  # fmt: skip
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["count"], summary["first"], summary["last"]) == (45, 17, 61)

    messages = read_all(kafka_config, topic, EVENTS + 45)
    assert len(messages) == EVENTS + 45
    originals: dict[int, Any] = {}
    replayed = []
    for m in messages:
        if nid_of(m) in originals:
            replayed.append(m)
        else:
            originals[nid_of(m)] = m
    assert sorted(originals) == list(range(1, EVENTS + 1))
    assert sorted(nid_of(m) for m in replayed) == list(range(17, 62))
    for copy in replayed:  # a duplicate of the relay's message to every consumer
        original = originals[nid_of(copy)]
        assert (copy.key(), copy.partition(), copy.value()) == (
            original.key(),
            original.partition(),
            original.value(),
        )
        assert copy.headers() == original.headers()  # esb_prev_nid included


def test_replay_says_what_to_do_when_the_service_refuses_or_is_down(
    school: DogSchool,
    kafka_config: dict[str, Any],
    create_topic: Any,
    no_upstream_database: None,
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    with serving(school.recorder) as server:
        monkeypatch.setenv("UPSTREAM_LOG_URL", server.url)  # the variable, as consume reads it
        monkeypatch.setenv("UPSTREAM_LOG_TOKEN", OTHER_TOKEN)
        code, out, err = replay(capsys, topic)
        assert (code, out) == (2, "")
        assert "HTTP 403 forbidden" in err and "ask the log's owners" in err
        monkeypatch.delenv("UPSTREAM_LOG_TOKEN")
        code, out, err = replay(capsys, topic)
        assert (code, out) == (2, "")
        assert "HTTP 401 missing_token" in err and "set UPSTREAM_LOG_TOKEN" in err
    monkeypatch.setenv("UPSTREAM_LOG_TOKEN", SCHOOL_TOKEN)
    code, out, err = replay(capsys, topic, "--upstream-url", f"http://127.0.0.1:{free_port()}")
    assert (code, out) == (1, "")
    assert "did not answer" in err and "check that esbridge serve-log runs" in err
    assert read_all(kafka_config, topic, 0) == []  # nothing published by any of them


@pytest.fixture
def target(postgres_server: Any) -> Iterator[Engine]:
    """The projection's database, in the follower's server."""
    engine = create_engine(postgres_server.create_database().url)
    yield engine
    engine.dispose()


def remote_runner(engine: Engine, url: str, **options: Any) -> ProjectionRunner:
    options.setdefault("upstream_token", SCHOOL_TOKEN)
    return ProjectionRunner(
        DogProjection(),
        engine,
        upstream="DogSchool",
        mapper=application_mapper(DogSchool, {}),
        upstream_url=url,
        page_size=7,
        **options,
    )


def test_a_projection_is_rebuilt_from_the_log_service(
    school: DogSchool, target: Engine, tmp_path: Any
) -> None:
    direct = create_engine(f"sqlite:///{tmp_path / 'direct.db'}")
    from_database = ProjectionRunner(
        DogProjection(), direct, upstream="DogSchool", mapper=application_mapper(DogSchool, {}),
        recorder=school.recorder,
    )  # fmt: skip
    assert from_database.run_once().applied == EVENTS
    expected = table_contents(direct)
    assert len(expected["proj_dogs"]) == DOGS and len(expected["proj_tricks"]) == EVENTS - DOGS

    with serving(school.recorder) as server:
        runner = remote_runner(target, server.url)
        try:
            first = runner.run_once()
            assert (first.applied, first.position) == (EVENTS, EVENTS)
            with target.begin() as conn:  # a bug, a manual edit: rebuild it
                conn.execute(text("UPDATE proj_dogs SET trick_count = 99"))
            for i in range(3):
                school.register(f"late-{i}", tricks=1)
            stats = runner.rebuild()
            assert stats is not None
            assert (stats.applied, stats.parked, stats.position) == (EVENTS + 6, 0, EVENTS + 6)
            assert stats.transactions == -(-(EVENTS + 6) // 7)  # pages of 7: one commit each
        finally:
            runner.close()
    from_database.run_once()
    assert table_contents(target) == table_contents(direct)
    assert len(table_contents(target)["proj_tricks"]) == EVENTS - DOGS + 3


def test_a_projection_names_a_refused_token_and_waits_out_a_service_that_is_down(
    school: DogSchool, target: Engine
) -> None:
    with serving(school.recorder) as server:
        runner = remote_runner(target, server.url, upstream_token=OTHER_TOKEN)
        with pytest.raises(RemoteLogRefusedError, match=r"HTTP 403 forbidden.*ask the log's"):
            runner.run_once()
        assert not is_transient(RemoteLogRefusedError("x"))  # run_forever raises it
        runner.close()
    nobody = remote(f"http://127.0.0.1:{free_port()}", retries=1)  # quick
    runner = ProjectionRunner(
        DogProjection(), target, upstream="DogSchool", mapper=application_mapper(DogSchool, {}),
        recorder=nobody,
    )  # fmt: skip
    with pytest.raises(RemoteLogUnreachableError, match="did not answer") as raised:
        runner.run_once()
    assert is_transient(raised.value)  # run_forever retries it, as a database that is down
    assert runner.position() == 0
    with pytest.raises(ConfigurationError, match="one way only"):
        remote_runner(target, "http://127.0.0.1:1", recorder=school.recorder)


def test_a_kafka_fed_projection_fills_gaps_from_the_log_service(
    school: DogSchool,
    target: Engine,
    kafka_config: dict[str, Any],
    create_topic: Any,
    tmp_path: Any,
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    notes = list(school.recorder.select_notifications(start=1, limit=EVENTS))
    publisher = ManualPublisher(kafka_config, topic, "DogSchool", PARTITIONS)
    sent = list(publisher.messages(notes))
    last = {partition: n.id for n, (_, _, _, partition) in zip(notes, sent, strict=True)}
    del sent[70:75]  # only the log service has these
    del sent[30:50]
    publisher.send(sent)
    direct = create_engine(f"sqlite:///{tmp_path / 'direct.db'}")
    ProjectionRunner(
        DogProjection(), direct, upstream="DogSchool", mapper=application_mapper(DogSchool, {}),
        recorder=school.recorder,
    ).run_once()  # fmt: skip
    with serving(school.recorder, max_limit=6) as server:
        log = remote(server.url)
        feed = KafkaProjectionFeed(
            DogProjection(), target, upstream="DogSchool", topic=topic,
            kafka_config=kafka_config, mapper=application_mapper(DogSchool, {}), recorder=log,
        )  # fmt: skip
        try:
            assert feed.process_available(timeout=10) == EVENTS
            assert feed.positions() == [last[p] for p in range(PARTITIONS)]
            assert feed.adapter.status().reconciled_events == 25
        finally:
            feed.close()
            log.close()
    assert table_contents(target) == table_contents(direct)  # each event once, in order
