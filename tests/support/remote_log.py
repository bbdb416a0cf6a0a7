"""A notification log service on 127.0.0.1 for tests: tokens, a served DogSchool, TLS files,
the upstream's own PostgreSQL server and ``esbridge serve-log`` as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from esbridge.eventlog.remote import RemoteNotificationLog
from esbridge.testing.backends import make_postgres
from esbridge_connectors.log_service import AccessToken, NotificationLogService, TokenTable
from esbridge_connectors.serving import BackgroundServer

#: Allowed to read DogSchool only.
SCHOOL_TOKEN = "school-reader-0123456789abcdef"
#: Allowed to read another application only.
OTHER_TOKEN = "other-reader-0123456789abcdef"
#: Allowed to read every application.
ADMIN_TOKEN = "admin-reader-0123456789abcdef"
TOKENS = TokenTable(
    [
        AccessToken(SCHOOL_TOKEN, frozenset({"DogSchool"}), "test:1"),
        AccessToken(OTHER_TOKEN, frozenset({"Payments"}), "test:2"),
        AccessToken(ADMIN_TOKEN, None, "test:3"),
    ]
)
#: The ``esbridge`` console script of this environment.
ESBRIDGE = [str(Path(sys.executable).with_name("esbridge"))]
#: The repository's root: on ``PYTHONPATH`` (and ``--app-dir``) of the processes started.
ROOT = Path(__file__).resolve().parents[2]


def log_service(recorder: Any, max_limit: int = 1000) -> NotificationLogService:
    """A service of the DogSchool log held by ``recorder``, for :data:`TOKENS`."""
    return NotificationLogService({"DogSchool": recorder}, TOKENS, max_limit=max_limit)


@contextmanager
def serving(recorder: Any, *, max_limit: int = 1000, **config: Any) -> Iterator[BackgroundServer]:
    """The DogSchool log held by ``recorder``, served on a free port of 127.0.0.1."""
    with BackgroundServer(log_service(recorder, max_limit), **config) as server:
        yield server


def remote(url: str, token: str | None = SCHOOL_TOKEN, **options: Any) -> RemoteNotificationLog:
    options.setdefault("backoff", 0.05)
    return RemoteNotificationLog(url, "DogSchool", token, **options)


def self_signed_certificate(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (its own CA) and its key: (certfile, keyfile)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


@contextmanager
def own_postgres_server() -> Iterator[Any]:
    """A PostgreSQL server of the upstream's own: the follower has no settings for it."""
    server = make_postgres()
    try:
        yield server
    finally:
        server.close()


def serve_log_process(
    env: Mapping[str, str],
    port: int,
    tokens: Path,
    app: str = "examples.dogschool.application:DogSchool",
) -> subprocess.Popen[bytes]:
    """A real ``esbridge serve-log`` of ``app`` (its database: ``env``) on 127.0.0.1:``port``,
    returned once its ``/healthz`` answers."""
    process = subprocess.Popen(
        [*ESBRIDGE, "serve-log", app, "--bind", f"127.0.0.1:{port}",
         "--token-file", str(tokens), "--app-dir", str(ROOT)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("esbridge serve-log did not start")
        time.sleep(0.2)
