"""``ESBRIDGE_PROFILE_DIR``: every relay and consumer thread of a runner writes cProfile stats."""

from __future__ import annotations

import pstats
from pathlib import Path
from typing import Any

import pytest

from esbridge.system.runner import PROFILE_DIR_ENV, RunningComponent


class _Busy:
    """A component whose run() does a little work and returns."""

    def run(self) -> None:
        sum(i * i for i in range(10_000))

    def stop(self) -> None:
        pass

    def status(self) -> Any:
        return None


def test_profile_dir_gets_one_stats_file_per_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path / "prof"))
    running = RunningComponent("consumer", "Orders", "Payments", _Busy())
    running.start()
    running.thread.join(10)
    assert running.error is None
    (written,) = (tmp_path / "prof").iterdir()
    assert written.name.endswith("-consumer-Orders-Payments.prof")
    stats = pstats.Stats(str(written))
    assert any(name == "run" for _file, _line, name in stats.stats)  # type: ignore[attr-defined]


def test_without_the_variable_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PROFILE_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    running = RunningComponent("relay", "Orders", None, _Busy())
    running.start()
    running.thread.join(10)
    assert running.error is None
    assert list(tmp_path.iterdir()) == []
