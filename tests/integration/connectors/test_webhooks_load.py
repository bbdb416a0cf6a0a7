"""Load on the webhook intake, served by uvicorn in a subprocess, against a real Postgres.

50 concurrent senders push 10,000 deliveries: 8,000 distinct delivery ids and
2,000 duplicates (shuffled, so many arrive while their original is still in
flight); senders retry on connection errors and 5xx until they get a 2xx.
Exactly 8,000 payments and 8,000 receipts must be recorded, once each, although
the intake is killed with SIGKILL in the middle of the load and restarted: the
senders' retries (same delivery ids) must still leave exactly 8,000.
Throughput and latency figures: ``bench/webhooks.py`` (same sender, with a
bare uvicorn endpoint as the baseline in the same run).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from esbridge_connectors.sender import Delivery, SendStats, send_all
from tests.integration.connectors.test_webhooks import SIGNATURE, Payments, recorded

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
DISTINCT = 8_000
DUPLICATES = 2_000
SENDERS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class IntakeProcess:
    """``python -m esbridge_connectors.webhooks test_webhooks:make_intake`` on fixed ports."""

    def __init__(
        self, env: dict[str, str], port: int, log: Path, ops_port: int = 0, workers: int = 1
    ) -> None:
        inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env = (
            os.environ
            | env
            | {
                # the child imports the test module by the name pytest gave it (event topics).
                "PYTHONPATH": os.pathsep.join([str(ROOT), *inherited]),
                "POSTGRES_POOL_SIZE": "16",
                "INTAKE_CONCURRENCY": "16",
            }
        )
        self.port = port
        self.ops_port = ops_port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.ops_url = f"http://127.0.0.1:{self.ops_port}"
        self.workers = workers
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "esbridge_connectors.webhooks",
            "tests.integration.connectors.test_webhooks:make_intake",
            "--port", str(self.port), "--ops-port", str(self.ops_port),
            "--workers", str(self.workers), "--log-level", "warning",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.ops_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            finally:
                self.kill()


def make_deliveries(seed: int = 7) -> tuple[list[Delivery], list[Delivery]]:
    """(distinct deliveries, all 10,000 sends in sending order)."""
    rng = random.Random(seed)
    distinct = [
        Delivery(
            f"d-{i}",
            json.dumps({"type": "payment.received", "ref": f"r-{i}", "amount": i}).encode(),
        )
        for i in range(DISTINCT)
    ]
    sends = distinct + [rng.choice(distinct) for _ in range(DUPLICATES)]
    rng.shuffle(sends)
    return distinct, sends


def check_exact(env: dict[str, str], distinct: list[Delivery]) -> None:
    app = Payments(env=env)
    try:
        events = recorded(app)
    finally:
        app.close()
    refs = Counter(e.ref for e in events["Payment.Received"])
    receipts = Counter(e.delivery_id for e in events["WebhookReceipt.Received"])
    assert len(events["Payment.Received"]) == DISTINCT
    assert set(refs) == {f"r-{i}" for i in range(DISTINCT)} and set(refs.values()) == {1}
    assert set(receipts) == {d.delivery_id for d in distinct} and set(receipts.values()) == {1}


def report(name: str, stats: SendStats) -> None:
    print(
        f"\n{name}: {stats.requests} requests in {stats.elapsed:.1f} s = "
        f"{stats.requests_per_second:.0f} req/s, p50 {stats.percentile(0.5) * 1000:.1f} ms, "
        f"p99 {stats.percentile(0.99) * 1000:.1f} ms, retries {stats.retries}, "
        f"outcomes {dict(sorted(stats.statuses.items()))}"
    )


@pytest.mark.slow
def test_10000_deliveries_kill_9_mid_load_then_restart_still_exactly_8000(postgres_db, tmp_path):
    distinct, sends = make_deliveries(seed=11)
    Payments(env=postgres_db.env).close()
    intake = IntakeProcess(postgres_db.env, free_port(), tmp_path / "intake.log")
    intake.start()
    result: dict[str, Any] = {}

    def load() -> None:
        result["stats"] = asyncio.run(
            send_all(f"{intake.url}/webhooks", sends, signature=SIGNATURE, concurrency=SENDERS)
        )

    sender = threading.Thread(target=load)
    sender.start()
    try:
        probe = Payments(env=postgres_db.env)
        deadline = time.monotonic() + 120
        while (probe.recorder.max_notification_id() or 0) < 2 * 3_000:  # ~3,000 recorded
            assert time.monotonic() < deadline and sender.is_alive(), intake.log.read_text()
            time.sleep(0.01)
        probe.close()
        intake.kill()
        killed_at = time.monotonic()
        time.sleep(1.0)  # senders meet refused connections and retry
        intake.start()
        print(f"\nintake back after {time.monotonic() - killed_at:.1f} s")
        sender.join(300)
        assert not sender.is_alive()
    finally:
        intake.stop()
        sender.join(5)
    stats: SendStats = result["stats"]
    report("load with kill -9", stats)
    assert stats.statuses.get("transport_error", 0) > 0  # the kill did cut requests off
    assert stats.statuses.get("recorded", 0) <= DISTINCT  # a lost 2xx comes back "duplicate"
    assert stats.statuses.get("recorded", 0) + stats.statuses.get("duplicate", 0) == len(sends)
    check_exact(postgres_db.env, distinct)
