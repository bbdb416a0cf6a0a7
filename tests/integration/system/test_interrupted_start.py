"""Ctrl-C (SIGINT) and SIGTERM end a command that waits at start-up, at once, saying for what.

Each command is started against a loopback port where nothing listens (a
broker or a Postgres that is not there), signalled once it has said that it
waits, and must be gone within :data:`BOUND` seconds with ``interrupted while
waiting for ...`` and 128 + the signal number (before: ``esbridge run`` took
27 s to stop after SIGINT, waiting out its 30 s broker timeout).
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from esbridge.testing.servers import free_port
from examples.dogschool.application import DogSchool
from tests.support.cli_processes import no_broker_env, signal_after

#: Seconds from the signal to the end of the process (the grace is 1 s).
BOUND = 3.0

COMMANDS = {
    "relay": ["relay", "examples.dogschool.application:DogSchool", "--partitions", "1"],
    "consume": [
        "consume",
        "examples.dogschool.application:Counters",
        "--upstream",
        "DogSchool",
        "--topic",
        "esbridge.dogschool",
    ],
    "run": ["run", "examples.dogschool.system:system"],
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_command_waiting_for_the_broker_stops_at_once(
    name: str, sig: signal.Signals, postgres_db: Any, tmp_path: Path
) -> None:
    DogSchool(env=postgres_db.env).close()  # its tables: the wait is for the broker
    env = no_broker_env(postgres_db)
    code, seconds, output = signal_after(
        COMMANDS[name], env, tmp_path / "out.log", sig, "cannot reach the Kafka broker"
    )
    assert code == 128 + sig, output[-3000:]
    assert seconds < BOUND, output[-3000:]
    servers = env["KAFKA_BOOTSTRAP_SERVERS"]
    assert re.search(f"interrupted while waiting for .*the Kafka broker at {servers}", output)
    assert "Traceback" not in output, output[-3000:]


def test_a_command_waiting_for_postgres_stops_at_once(postgres_db: Any, tmp_path: Path) -> None:
    env = {**no_broker_env(postgres_db), "POSTGRES_PORT": str(free_port())}
    code, seconds, output = signal_after(
        COMMANDS["consume"], env, tmp_path / "out.log", signal.SIGINT, "Postgres unreachable"
    )
    assert code == 130, output[-3000:]
    assert seconds < BOUND, output[-3000:]
    assert "interrupted while waiting for Postgres (constructing" in output, output[-3000:]


def test_run_with_workers_takes_its_workers_along(postgres_db: Any, tmp_path: Path) -> None:
    """The supervisor's workers wait for the broker too: none is left behind."""
    DogSchool(env=postgres_db.env).close()
    log = tmp_path / "out.log"
    command = [*COMMANDS["run"], "--workers", "2"]
    code, seconds, output = signal_after(
        command, no_broker_env(postgres_db), log, signal.SIGINT, "cannot reach the Kafka broker"
    )
    workers = [int(pid) for pid in re.findall(r"started \S+ \(pid (\d+)\)", output)]
    assert len(workers) == 4, output[-3000:]  # DogSchool[0], [1], Counters[0], [1]
    assert code == 130, output[-3000:]
    assert seconds < BOUND, output[-3000:]
    assert output.count("interrupted while waiting for") == 4, output[-3000:]
    assert "interrupted while starting" in output, output[-3000:]
    for pid in workers:  # gone, and reaped by the supervisor (no zombie either)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
