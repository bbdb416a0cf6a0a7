"""A wrong ``KAFKA_BOOTSTRAP_SERVERS`` is said once, first, with what to check; a fresh
start says nothing alarming.

Before: 503 log lines in 33 s, about a hundred identical librdkafka
``Connect ... failed: Connection refused`` lines per retry before the line that
said what was wrong, and a WARNING about the transaction coordinator loading
at every fresh start (see :mod:`esbridge.kafka.client_log`).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from esbridge.testing.servers import unique_name
from examples.dogschool.application import DogSchool
from tests.support.cli_processes import no_broker_env, signal_after
from tests.support.relay_support import subprocess_env

RELAY = ["relay", "examples.dogschool.application:DogSchool", "--partitions", "1"]


def test_a_broker_that_refuses_connections_is_said_once_and_first(
    postgres_db: Any, tmp_path: Path
) -> None:
    DogSchool(env=postgres_db.env).close()
    env = no_broker_env(postgres_db)
    servers = env["KAFKA_BOOTSTRAP_SERVERS"]
    # Several of the relay's retries (each a few seconds of librdkafka reconnecting).
    code, _, output = signal_after(
        RELAY, env, tmp_path / "out.log", signal.SIGTERM, "cannot reach", after=8
    )
    assert code == 143, output[-3000:]
    lines = output.splitlines()
    assert len(lines) < 20, output
    librdkafka = [line for line in lines if " esbridge.librdkafka " in line]
    assert librdkafka[0].endswith(
        f"cannot reach the Kafka broker at {servers} (Connection refused): check "
        "KAFKA_BOOTSTRAP_SERVERS (bootstrap.servers) and that the broker runs"
    ), output
    assert sum("Connection refused" in line for line in lines) <= 3, output


def test_a_fresh_relay_logs_no_warning_about_the_transaction_coordinator(
    postgres_db: Any, kafka_broker: Any, tmp_path: Path
) -> None:
    app = DogSchool(env=postgres_db.env)
    app.register_dog("Fido")
    app.close()
    topic = unique_name("fresh")  # and so a relay id no transaction used before
    code, _, output = signal_after(
        [*RELAY, "--topic", topic],
        subprocess_env(postgres_db, kafka_broker),
        tmp_path / "out.log",
        signal.SIGTERM,
        "started at notification",
    )
    assert code == 0, output[-3000:]
    warnings = [line for line in output.splitlines() if " WARNING " in line or " ERROR " in line]
    assert not warnings, output
