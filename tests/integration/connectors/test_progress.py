"""A replay and a projection rebuild say how far they are (count, rate, ETA).

Not on a terminal (here: stderr captured, or the logs), a line when the work
starts, at most one every few seconds, and a summary when it is done; on a
terminal the same numbers redraw one line (see tests/unit/runtime/test_catch_up.py).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from esbridge_connectors.sql_projection import ProjectionRunner
from esbridge_connectors.upstream import application_mapper
from tests.support.sql_projection_domain import Dog, DogProjection, DogSchool

ROOT = Path(__file__).resolve().parents[3]
ESBRIDGE = str(Path(sys.executable).with_name("esbridge"))
EVENTS = 3000


def register_dogs(school: DogSchool, count: int) -> None:
    for start in range(0, count, 1000):
        school.save(*(Dog(f"dog {i}") for i in range(start, min(count, start + 1000))))


def test_a_replay_logs_its_progress_and_a_summary(
    school: DogSchool, postgres_db: Any, kafka_config: dict[str, Any], create_topic: Any
) -> None:
    register_dogs(school, EVENTS)
    topic = create_topic(partitions=3)
    env = {**os.environ, **postgres_db.env, "PYTHONPATH": str(ROOT)}
    env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_config["bootstrap.servers"]
    done = subprocess.run(
        [ESBRIDGE, "replay", "DogSchool", "--topic", topic],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    subject = f"replay DogSchool -> {topic}"
    lines = re.findall(
        rf"{re.escape(subject)} publishing: (\d+) / (\d+) notifications \((\d+)/s, ETA (\d+) s\)",
        done.stderr,
    )
    assert lines, done.stderr
    assert all(int(n) < int(total) == EVENTS for n, total, _, _ in lines)
    assert re.search(
        rf"{re.escape(subject)} published: {EVENTS} notifications in [0-9.]+ s \(\d+/s\)",
        done.stderr,
    ), done.stderr
    assert "\r" not in done.stderr  # no terminal: log lines, never a redrawn line


def test_a_projection_rebuild_logs_its_progress_and_a_summary(
    school: DogSchool, postgres_db: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    register_dogs(school, EVENTS)
    engine = create_engine(f"sqlite:///{tmp_path / 'projection.db'}")
    runner = ProjectionRunner(
        DogProjection(),
        engine,
        upstream="DogSchool",
        mapper=application_mapper(DogSchool, postgres_db.env),
        env=postgres_db.env,
        progress=sys.stderr,  # captured by pytest: no terminal
    )
    try:
        caplog.set_level(logging.INFO, logger="esbridge.connectors.projection")
        stats = runner.rebuild()
    finally:
        runner.close()
        engine.dispose()
    assert stats is not None and stats.applied == EVENTS
    messages = [r.getMessage() for r in caplog.records]
    subject = f"projection {DogProjection.name} <- DogSchool"
    assert f"{subject} catching up: 0 / {EVENTS} notifications" in messages, messages
    assert any(
        re.fullmatch(
            rf"{re.escape(subject)} caught up: {EVENTS} notifications in [0-9.]+ s \(\d+/s\)", m
        )
        for m in messages
    ), messages
