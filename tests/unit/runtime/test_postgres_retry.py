"""Waiting for an unreachable Postgres: what is retried, for how long, and what is not."""

from __future__ import annotations

import pytest
from eventsourcing.persistence import InterfaceError, OperationalError, ProgrammingError

from esbridge.errors import ConfigurationError, PostgresUnavailableError
from esbridge.runtime.postgres_retry import retry_unreachable


class Flaky:
    """Fails with ``error`` ``failures`` times, then returns ``"ok"``."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def test_connection_errors_are_retried_with_doubling_backoff() -> None:
    sleeps: list[float] = []
    call = Flaky(5, OperationalError("connection refused"))
    assert retry_unreachable("reading", call, sleep=sleeps.append, max_delay=1.0) == "ok"
    assert call.calls == 6
    assert sleeps == [0.2, 0.4, 0.8, 1.0, 1.0]
    call = Flaky(1, InterfaceError("connection already closed"))
    assert retry_unreachable("reading", call, sleep=sleeps.append) == "ok"


def test_other_errors_go_up_at_once() -> None:
    call = Flaky(1, ProgrammingError('relation "dogschool_events" does not exist'))
    with pytest.raises(ProgrammingError):
        retry_unreachable("reading", call, sleep=lambda s: None)
    assert call.calls == 1


def test_a_timeout_ends_waiting_with_a_clear_error() -> None:
    call = Flaky(10**9, OperationalError("connection refused"))
    with pytest.raises(PostgresUnavailableError, match=r"stayed unreachable .*reading the log"):
        retry_unreachable("reading the log", call, timeout=0.0, sleep=lambda s: None)
    assert call.calls == 1


def test_stopping_ends_waiting() -> None:
    call = Flaky(10**9, OperationalError("connection refused"))
    with pytest.raises(PostgresUnavailableError, match="stopped while Postgres was unreachable"):
        retry_unreachable("x", call, stopped=lambda: call.calls >= 3, sleep=lambda s: None)
    assert call.calls == 3


def test_diagnosis_runs_first_and_its_reason_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    reasons: list[str] = []

    def diagnose() -> str:
        reasons.append("asked")
        return "connection refused"

    call = Flaky(1, OperationalError("couldn't get a connection after 30.00 sec"))
    with caplog.at_level("WARNING", logger="esbridge.postgres"):
        retry_unreachable("reading", call, diagnose=diagnose, sleep=lambda s: None)
    assert reasons == ["asked", "asked"]  # before the first attempt, and after the failure
    assert "couldn't get a connection after 30.00 sec (connection refused)" in caplog.text


def test_a_refusal_found_by_the_diagnosis_ends_waiting() -> None:
    def diagnose() -> None:
        raise ConfigurationError("Postgres refused the settings")

    call = Flaky(1, OperationalError("couldn't get a connection"))
    with pytest.raises(ConfigurationError):
        retry_unreachable("reading", call, diagnose=diagnose, sleep=lambda s: None)
    assert call.calls == 0


def test_a_refusal_by_a_server_that_is_up_is_never_retried() -> None:
    """Even without a diagnosis: a wrong password or a missing CONNECT is not an outage."""
    for error, message in [
        (
            'connection failed: FATAL:  password authentication failed for user "mirror"',
            "Postgres rejected the password of user 'mirror' (reading): "
            'connection failed: FATAL: password authentication failed for user "mirror". '
            "Check POSTGRES_PASSWORD",
        ),
        (
            'connection failed: FATAL:  permission denied for database "dogs"\n'
            "DETAIL:  User does not have CONNECT privilege.",
            "role <role> lacks the CONNECT privilege on database dogs: "
            "GRANT CONNECT ON DATABASE dogs TO <role>",
        ),
    ]:
        call = Flaky(1, OperationalError(error))
        with pytest.raises(ConfigurationError) as raised:
            retry_unreachable("reading", call, sleep=lambda s: None)
        assert message in str(raised.value) and call.calls == 1


def test_one_shot_commands_report_an_unreachable_postgres_in_one_line() -> None:
    import os
    import subprocess

    from esbridge.cli.run import ESBRIDGE_COMMAND
    from esbridge.testing.servers import free_port

    env = {
        **os.environ,
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(free_port()),  # nothing listens there
        "POSTGRES_USER": "esbridge",
        "POSTGRES_PASSWORD": "esbridge",
        "POSTGRES_DBNAME": "esbridge",
        "POSTGRES_CONNECT_TIMEOUT": "1",
    }
    command = [*ESBRIDGE_COMMAND, "dlq", "list", "tests.support.consumer_apps:Mirror"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "esbridge: error: Postgres unreachable" in done.stderr
    assert "Traceback" not in done.stderr
