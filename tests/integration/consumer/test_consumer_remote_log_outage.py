"""kill -9 of the log service while a consumer pulls from it: the consumer holds, then resumes.

The upstream DogSchool lives in a PostgreSQL server of its own; its log is
served by a real ``esbridge serve-log`` process, the only way the prompt-mode
consumer reads its events. The service is killed (SIGKILL) while the consumer
runs and events keep arriving, left down for a few seconds, and started again
on the same port: every event has its effect exactly once, in order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.relay.relay import Relay
from esbridge.testing.backends import make_postgres
from esbridge.testing.servers import free_port
from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import Mirror, populate, verify_mirror
from tests.support.relay_support import publish_and_close
from tests.support.remote_log import serve_log_process

TOKEN = "outage-reader-0123456789abcdef"


@pytest.fixture
def remote_school() -> Iterator[DogSchool]:
    server = make_postgres()
    db = server.create_database()
    app = DogSchool(env=db.env)
    yield app
    app.close()
    server.close()


def start_service(school: DogSchool, port: int, tokens: Path) -> subprocess.Popen[bytes]:
    return serve_log_process(school.env, port, tokens)


def test_the_consumer_holds_while_the_log_service_is_killed_and_resumes(
    remote_school: DogSchool,
    mirror: Mirror,
    create_topic: Any,
    kafka_config: dict[str, Any],
    tmp_path: Path,
    caplog: Any,
) -> None:
    assert remote_school.env["POSTGRES_PORT"] != mirror.env["POSTGRES_PORT"]  # two servers
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN} DogSchool\n")
    port = free_port()
    topic = create_topic(partitions=1)

    def relay() -> None:  # the upstream's side: reads its own database
        publish_and_close(
            Relay("DogSchool", kafka_config=kafka_config, topic=topic, env=remote_school.env,
                  mode="prompts")
        )  # fmt: skip

    dogs = populate(remote_school, 20, 2)
    relay()
    service = start_service(remote_school, port, tokens)
    consumer = ConsumerAdapter(
        mirror,
        upstream="DogSchool",
        topic=topic,
        kafka_config={**kafka_config, "session.timeout.ms": 6000},
        group_id=f"{topic}.g",
        mode="prompts",
        upstream_url=f"http://127.0.0.1:{port}",
        upstream_token=TOKEN,
        page_size=10,
    )
    thread = threading.Thread(target=consumer.run, daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while (mirror.recorder.max_tracking_id("DogSchool") or 0) < 60:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.1)
        os.kill(service.pid, signal.SIGKILL)  # the service dies; events keep coming
        service.wait()
        dogs += populate(remote_school, 10, 2, seed=2)
        relay()
        time.sleep(8)  # past the client's own retries: the consumer must hold, not die
        assert thread.is_alive(), consumer.status().error
        assert mirror.recorder.max_tracking_id("DogSchool") == 60
        service = start_service(remote_school, port, tokens)
        deadline = time.monotonic() + 90
        while (mirror.recorder.max_tracking_id("DogSchool") or 0) < 90:
            assert time.monotonic() < deadline and thread.is_alive(), consumer.status().error
            time.sleep(0.2)
    finally:
        consumer.stop()
        thread.join(30)
        consumer.close()
        service.kill()
        service.wait()
    assert any("holding" in r.getMessage() for r in caplog.records)
    verify_mirror(remote_school, mirror, dogs)  # every trick once, in order
    assert mirror.recorder.max_tracking_id("DogSchool") == 90
