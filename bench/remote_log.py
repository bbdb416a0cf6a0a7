"""Remote notification-log reads (``esbridge serve-log`` over HTTP) against direct database reads.

    python bench/remote_log.py [--events 30000] [--page 500] [--runs 3]

Starts its own PostgreSQL (esbridge.testing), records ``--events`` dog-school
events, serves the log with a real ``esbridge serve-log`` process on
127.0.0.1 (bearer token, gzip), then, in the same run, reads the whole log in
pages of ``--page``:

* through :class:`esbridge.eventlog.remote.RemoteNotificationLog` (what a
  consumer with ``--upstream-url`` does to fill gaps or in prompt mode);
* the baseline: the same pages straight from the application's Postgres
  recorder (what a consumer with the upstream's database settings does).

Prints notifications/s of each (median of ``--runs``) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esbridge.eventlog.remote import RemoteNotificationLog
from esbridge.testing import make_postgres
from esbridge.testing.servers import free_port
from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import populate

TOKEN = "bench-reader-0123456789abcdef"


def read_all(reader: Any, page: int) -> float:
    """Notifications/s reading the whole log in pages of ``page``."""
    started = time.perf_counter()
    count, start = 0, 1
    while True:
        notifications = reader.select_notifications(start=start, limit=page)
        count += len(notifications)
        if len(notifications) < page:
            break
        start = notifications[-1].id + 1
    return count / (time.perf_counter() - started)


def serve(env: dict[str, str], port: int, tokens: Path) -> subprocess.Popen[bytes]:
    esbridge = str(Path(sys.executable).with_name("esbridge"))
    process = subprocess.Popen(
        [esbridge, "serve-log", "examples.dogschool.application:DogSchool",
         "--bind", f"127.0.0.1:{port}", "--token-file", str(tokens)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return process
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("esbridge serve-log did not start") from None
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--page", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    server = make_postgres()
    process = None
    try:
        db = server.create_database()
        school = DogSchool(env=db.env)
        populate(school, args.events // 5, 4)
        print(f"upstream log: {school.recorder.max_notification_id()} events")
        with tempfile.TemporaryDirectory() as directory:
            tokens = Path(directory) / "tokens.txt"
            tokens.write_text(f"{TOKEN} DogSchool\n")
            port = free_port()
            process = serve(db.env, port, tokens)
            remote = RemoteNotificationLog(f"http://127.0.0.1:{port}", "DogSchool", TOKEN)
            read_all(remote, args.page)  # warm both paths up once
            read_all(school.recorder, args.page)
            remote_rates, direct_rates = [], []
            for run in range(args.runs):
                remote_rates.append(read_all(remote, args.page))
                direct_rates.append(read_all(school.recorder, args.page))
                print(
                    f"run {run + 1}: remote {remote_rates[-1]:,.0f}/s, "
                    f"direct {direct_rates[-1]:,.0f}/s"
                )
            remote.close()
        school.close()
        r, d = statistics.median(remote_rates), statistics.median(direct_rates)
        print(f"remote log (serve-log, HTTP, page {args.page}): {r:,.0f} notifications/s (median)")
        print(f"baseline, direct recorder reads:            {d:,.0f} notifications/s (median)")
        print(f"ratio: {r / d:.2f}x")
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
        server.close()


if __name__ == "__main__":
    main()
