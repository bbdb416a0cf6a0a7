"""Running an ``esbridge`` command as a subprocess and signalling it once it says something."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from esbridge.testing.servers import free_port
from tests.support.relay_support import ESBRIDGE, ROOT


def no_broker_env(postgres_db: Any) -> dict[str, str]:
    """The test database's settings, and a broker address where nothing listens."""
    env = {**os.environ, **postgres_db.env, "PYTHONPATH": str(ROOT)}
    env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"
    return env


def signal_after(
    command: list[str],
    env: dict[str, str],
    log: Path,
    sig: signal.Signals,
    marker: str,
    after: float = 1.0,
) -> tuple[int, float, str]:
    """Run ``esbridge command``; ``after`` s after ``marker`` is in its output, send ``sig``.

    Returns its exit status, the seconds from the signal to its end, and its output.
    """
    with log.open("wb") as out:
        process = subprocess.Popen([ESBRIDGE, *command], env=env, cwd=ROOT, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while marker not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"never said {marker!r}: {log.read_text()}"
            time.sleep(0.1)
        time.sleep(after)
        process.send_signal(sig)
        sent = time.monotonic()
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 30 s after {sig.name}: {log.read_text()[-3000:]}")
        return code, time.monotonic() - sent, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
