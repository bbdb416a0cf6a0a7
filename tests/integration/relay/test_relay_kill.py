"""kill -9 of ``esbridge relay`` at random moments, plus a broker and a Postgres restart.

A writer subprocess appends events the whole time. At the end a plain
``read_committed`` consumer must see every stored notification exactly once,
in notification-id order within each partition, with an unbroken
``esb_prev_nid`` chain.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.relay.test_relay import check_exactly_once_in_order
from tests.support.relay_support import (
    ESBRIDGE,
    ROOT,
    db_ids,
    ledger,
    read_all,
    subprocess_env,
    write_events,
)

EVENTS = 100_000
KILLS = 22
PARTITIONS = 3
BROKER_RESTART_AT = 5  # iterations where the relay has started publishing (i % 4 != 3)
POSTGRES_RESTART_AT = 13
WRITE_RATE = "1500"  # events/s: the writer runs during most of the kill loop


def _start_relay(
    env: dict[str, str], topic: str, log_file, *settings: str
) -> subprocess.Popen[bytes]:
    """``esbridge relay`` for the ledger; ``settings``: more ``NAME=VALUE`` relay tunings."""
    return subprocess.Popen(
        [
            ESBRIDGE,
            "--log-level",
            "DEBUG",  # "committed" lines show progress
            "relay",
            "tests.support.relay_support:Ledger",
            "--topic",
            topic,
            "--partitions",
            str(PARTITIONS),
            "--set",
            "poll_interval=0.5",
            "--set",
            "batch_seconds=0.5",
            *(arg for setting in settings for arg in ("--set", setting)),
        ],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=log_file,
    )


def _wait_started(log_path: Path, process: subprocess.Popen[bytes], timeout: float = 30) -> bool:
    """Wait until the relay logged that it started publishing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if b"started at notification" in log_path.read_bytes():
            return True
        time.sleep(0.02)
    return False


def _wait_committed(
    log_path: Path, offset: int, process: subprocess.Popen[bytes], timeout: float = 60
) -> bool:
    """Wait until the relay logged a committed batch after byte ``offset`` of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if b"relay Ledger: committed" in log_path.read_bytes()[offset:]:
            return True
        time.sleep(0.05)
    return False


def _kill(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)


@pytest.mark.slow
def test_kill_9_relay_while_writing_and_restarting_servers(
    postgres_server, postgres_db, kafka_broker, create_topic, tmp_path
):
    ledger(postgres_db.env)  # create the tables
    topic = create_topic(partitions=PARTITIONS)
    env = subprocess_env(postgres_db, kafka_broker)
    rng = random.Random(20261123)
    writer_log = open(tmp_path / "writer.log", "wb")  # noqa: SIM115
    relay_log = open(tmp_path / "relay.log", "wb")  # noqa: SIM115
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.relay_support",
            "write",
            str(EVENTS),
            "100",
            "2000",
        ],
        cwd=ROOT,
        env=env,
        stdout=writer_log,
        stderr=writer_log,
    )
    relay = None
    try:
        killed_running = 0
        for i in range(KILLS):
            log_path = tmp_path / f"relay-{i}.log"
            with open(log_path, "wb") as log_file:
                relay = _start_relay(env, topic, log_file)
            # Most kills hit a publishing relay (after start-up), some hit start-up.
            if i % 4 != 3 and _wait_started(log_path, relay):
                killed_running += 1
            if i in (BROKER_RESTART_AT, POSTGRES_RESTART_AT):
                # The relay is publishing: it must recover by itself and go on publishing.
                if i == BROKER_RESTART_AT:
                    kafka_broker.restart()
                else:
                    postgres_server.restart()  # relay and writer both reconnect
                restarted_at = len(log_path.read_bytes())
                # Something to publish after the restart, even if the writer has
                # finished (a fast relay may have caught up with it by now).
                extra = ledger(postgres_db.env)
                try:
                    write_events(extra, 50, per_save=10)
                finally:
                    extra.close()
                assert _wait_committed(log_path, restarted_at, relay), "no progress after restart"
            time.sleep(rng.uniform(0.05, 2.0))
            assert relay.poll() is None, f"relay exited by itself ({relay.returncode})"
            _kill(relay)
        assert killed_running >= KILLS // 2
        relay = _start_relay(env, topic, relay_log)
        assert writer.wait(180) == 0
        expected = db_ids(postgres_db.dsn)
        assert len(expected) >= EVENTS
        records = read_all(kafka_broker.config(), topic, len(expected), timeout=90, quiet=3)
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0, "SIGTERM should stop the relay gracefully"
    finally:
        for p in (relay, writer):
            if p is not None and p.poll() is None:
                _kill(p)
        writer_log.close()
        relay_log.close()
    check_exactly_once_in_order(records, expected, PARTITIONS)
