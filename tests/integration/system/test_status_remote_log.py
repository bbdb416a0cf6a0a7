"""``esbridge status --upstream-url``: the lag read through the leader's log service.

The leader DogSchool lives in a PostgreSQL server of its own, its log served
over HTTP on 127.0.0.1; the status command is given the follower's database
settings only. Without ``--upstream-url`` it cannot read the leader at all
(the control), with it the row is exact. A service that does not answer,
a wrong token and a token for another application each end the command with
what to do (exit 1: try again; exit 2: fix the settings), as Postgres errors do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from esbridge.cli import main
from esbridge.system.runner import KafkaRunner
from esbridge.testing.servers import free_port, unique_name
from examples.dogschool.application import DogSchool
from tests.integration.runtime.test_postgres_privileges import SYSTEM, SYSTEM_PATH
from tests.support.consumer_apps import Mirror, populate
from tests.support.remote_log import OTHER_TOKEN, SCHOOL_TOKEN, own_postgres_server, serving

DOGS, TRICKS, PROCESSED = 6, 1, 5  # 12 events, the follower processed the first 5


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[Any]:
    with own_postgres_server() as server:
        yield server


@pytest.fixture
def school(upstream_server: Any) -> Iterator[DogSchool]:
    db = upstream_server.create_database()
    app = DogSchool(env=db.env)
    populate(app, DOGS, TRICKS)
    yield app
    app.close()
    upstream_server.drop_database(db.dbname)


@pytest.fixture
def follower_env(
    school: DogSchool, postgres_db: Any, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The follower's database only in the environment; it processed PROCESSED events."""
    assert school.env["POSTGRES_PORT"] != postgres_db.env["POSTGRES_PORT"]  # two servers
    for key, value in postgres_db.env.items():
        monkeypatch.setenv(key, value)
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "UPSTREAM_LOG_URL", "UPSTREAM_LOG_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    mirror = Mirror(env=postgres_db.env)  # its tables; the leader's are not in this database
    try:
        mirror.follow("DogSchool", school.notification_log)
        mirror.pull_and_process("DogSchool", start=1, stop=PROCESSED)
        assert mirror.recorder.max_tracking_id("DogSchool") == PROCESSED
    finally:
        mirror.close()
    return dict(postgres_db.env)


def status(capsys: Any, *options: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["status", SYSTEM_PATH, *options])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_reads_the_leader_s_log_through_its_service(
    school: DogSchool, follower_env: dict[str, str], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = status(capsys, "--json")  # the control: the leader's database is not here
    assert code == 2 and "DogSchool's table(s)" in err
    monkeypatch.setenv("UPSTREAM_LOG_TOKEN", SCHOOL_TOKEN)
    with serving(school.recorder, max_limit=4) as server:  # small pages: the backlog in 2
        code, out, err = status(capsys, "--json", "--upstream-url", server.url)
        assert code == 0, err
        monkeypatch.setenv("UPSTREAM_LOG_URL", server.url)  # the variable, as consume reads it
        code, out_from_env, err = status(capsys, "--json", "--fail-on-lag")
        assert code == 1, err  # behind: 7 events
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["leader"], row["follower"]) == ("DogSchool", "Mirror")
    assert row["upstream_max_nid"] == DOGS * (1 + TRICKS) == 12
    assert row["positions"] == {"DogSchool": PROCESSED}
    assert row["lag_events"] == 12 - PROCESSED
    assert 0 < row["lag_seconds"] < 600  # the oldest unprocessed event, decoded
    assert row["relay"] is None  # its lease is in the leader's database: not asked
    assert [json.loads(line) for line in out_from_env.splitlines()] == [
        {**row, "lag_seconds": json.loads(out_from_env)["lag_seconds"]}
    ]


def test_each_leader_s_own_variables_win_over_the_plain_ones(
    school: DogSchool, follower_env: dict[str, str], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DOGSCHOOL_UPSTREAM_LOG_*`` (as ``esbridge run --upstream-url DogSchool=URL`` sets
    them) name that leader's service; the plain ones, here wrong, are for the others."""
    monkeypatch.setenv("UPSTREAM_LOG_URL", f"http://127.0.0.1:{free_port()}")  # nobody
    monkeypatch.setenv("UPSTREAM_LOG_TOKEN", OTHER_TOKEN)
    with serving(school.recorder) as server:
        monkeypatch.setenv("DOGSCHOOL_UPSTREAM_LOG_URL", server.url)
        monkeypatch.setenv("DOGSCHOOL_UPSTREAM_LOG_TOKEN", SCHOOL_TOKEN)
        code, out, err = status(capsys, "--json")
    assert code == 0, err
    row = json.loads(out)
    assert (row["upstream_max_nid"], row["lag_events"]) == (12, 12 - PROCESSED)


def test_a_runner_of_the_follower_alone_waits_and_reports_through_the_service(
    school: DogSchool, follower_env: dict[str, str], kafka_broker: Any
) -> None:
    """``KafkaRunner.wait_idle()`` and ``statuses()`` in a process that runs the follower
    only, with no settings for the leader's database: its log is read from the service."""
    prefix = unique_name("rl") + "."
    kafka = {"kafka_config": kafka_broker.config(), "topic_prefix": prefix}
    env = {
        **follower_env,
        "DOGSCHOOL_UPSTREAM_LOG_URL": "",  # set below, once served
        "DOGSCHOOL_UPSTREAM_LOG_TOKEN": SCHOOL_TOKEN,
    }
    with serving(school.recorder) as server:
        env["DOGSCHOOL_UPSTREAM_LOG_URL"] = server.url
        with (
            KafkaRunner(SYSTEM, env=dict(school.env), apps=["DogSchool"], **kafka),
            KafkaRunner(SYSTEM, env=env, apps=["Mirror"], **kafka) as runner,
        ):
            runner.wait_idle(timeout=90)
            [edge] = runner.statuses()
            mirror = runner.get(Mirror)
            assert mirror.recorder.max_tracking_id("DogSchool") == DOGS * (1 + TRICKS)
    assert (edge.upstream_max_nid, edge.lag_events, edge.relay) == (12, 0, None)


def test_status_says_what_to_do_when_the_service_refuses_or_is_down(
    school: DogSchool, follower_env: dict[str, str], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving(school.recorder) as server:
        monkeypatch.setenv("UPSTREAM_LOG_TOKEN", "a-token-nobody-listed-0123456789")
        code, out, err = status(capsys, "--upstream-url", server.url)
        assert (code, out) == (2, "")
        assert "HTTP 401 invalid_token" in err and "set UPSTREAM_LOG_TOKEN" in err
        assert "a-token-nobody-listed" not in err  # never shown

        monkeypatch.setenv("UPSTREAM_LOG_TOKEN", OTHER_TOKEN)  # allowed another app only
        code, out, err = status(capsys, "--upstream-url", server.url)
        assert (code, out) == (2, "")
        assert "HTTP 403 forbidden" in err and "ask the log's owners" in err

    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("UPSTREAM_LOG_TOKEN", SCHOOL_TOKEN)
    code, out, err = status(capsys, "--upstream-url", nobody)
    assert (code, out) == (1, "")
    assert f"{nobody}/v1/DogSchool/" in err and "did not answer" in err
    assert "check that esbridge serve-log runs at that address" in err
