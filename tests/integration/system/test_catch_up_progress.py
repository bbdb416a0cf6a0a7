"""A relay and a consumer working off a backlog say how far they are (n / N, rate, ETA), and a
relay inside ``esbridge run`` logs the stop summary a stand-alone relay logs.

Before, both were silent from their start line to their stop line, and a
runner's relay had no stop line at all.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

from esbridge.testing.servers import unique_name
from examples.dogschool.application import DogSchool
from examples.dogschool.domainmodel import Dog
from tests.support.cli_processes import signal_after
from tests.support.relay_support import subprocess_env

BACKLOG = 5000


def test_run_reports_its_catch_up_and_its_relays_stop(
    postgres_db: Any, kafka_broker: Any, tmp_path: Path
) -> None:
    school = DogSchool(env=postgres_db.env)
    for start in range(0, BACKLOG, 1000):
        school.save(*(Dog(f"dog {i}") for i in range(start, start + 1000)))
    school.close()
    prefix = unique_name("progress") + "."
    code, _, output = signal_after(
        ["run", "examples.dogschool.system:system", "--topic-prefix", prefix],
        subprocess_env(postgres_db, kafka_broker),
        tmp_path / "out.log",
        signal.SIGTERM,
        "consumer Counters <- DogSchool caught up",
        after=0.5,
    )
    assert code == 0, output[-3000:]
    relay = f"relay DogSchool -> {prefix}dogschool"
    assert f"{relay} catching up: 0 / {BACKLOG} notifications" in output, output[-3000:]
    assert re.search(f"{relay} caught up: {BACKLOG} notifications in [0-9.]+ s", output)
    consumer = re.findall(
        r"consumer Counters <- DogSchool catching up: (\d+) / (\d+) messages", output
    )
    # Kafka offsets: the transactions' commit markers count too.
    assert consumer and all(int(n) < int(total) <= BACKLOG + 5 for n, total in consumer), output
    assert f"relay DogSchool stopped at notification {BACKLOG} ({BACKLOG} published" in output
