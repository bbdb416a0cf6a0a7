"""``esbridge serve-log`` as a process: it serves the log to a token of its token file.

Its output (uvicorn's access log included) never shows a token, and a bad
``--bind`` or token file stops it at once with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from esbridge.eventlog.remote import RemoteNotificationLog
from esbridge.testing.servers import free_port
from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import populate

TOKEN = "cli-reader-0123456789abcdef"
ESBRIDGE = [str(Path(sys.executable).with_name("esbridge"))]  # the console script


def serve_log(postgres_db: Any, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*ESBRIDGE, "serve-log", "examples.dogschool.application:DogSchool", *args],
        env={**os.environ, **postgres_db.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_serve_log_serves_and_never_logs_tokens(postgres_db: Any, tmp_path: Path) -> None:
    school = DogSchool(env=postgres_db.env)
    populate(school, 4, 2)
    school.close()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# readers\n{TOKEN} DogSchool\n")
    port = free_port()
    process = serve_log(postgres_db, tmp_path, "--bind", f"127.0.0.1:{port}", "--token-file",
                        str(tokens))  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz").json() == {"status": "ok"}:
                    break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        log = RemoteNotificationLog(url, "DogSchool", TOKEN)
        assert log.max_notification_id() == 12
        assert [n.id for n in log.select_notifications(start=5, limit=3)] == [5, 6, 7]
        log.close()
        refused = httpx.get(f"{url}/v1/DogSchool/max-id", headers={"Authorization": "Bearer x"})
        assert refused.status_code == 401
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "GET /v1/DogSchool/notifications?start=5&limit=3" in output  # the access log
    assert TOKEN not in output


def test_serve_log_refuses_a_bad_token_file(postgres_db: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("short DogSchool\n")
    process = serve_log(postgres_db, tmp_path, "--token-file", str(tokens))
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "tokens.txt:1 is shorter than 16 characters" in output
    assert "short DogSchool" not in output


def test_serve_log_refuses_a_bad_bind(postgres_db: Any, tmp_path: Path) -> None:
    process = serve_log(postgres_db, tmp_path, "--bind", "8470", "--token-file", "x")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2 and "--bind '8470': give HOST:PORT" in output
