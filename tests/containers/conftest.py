"""Harness tests through the testcontainers backend (``make test`` runs them with
``ESBRIDGE_TEST_BACKEND=containers``; under another backend they test that one)."""

from __future__ import annotations

from typing import Any

import pytest

from esbridge.testing.backends import chosen_backend
from esbridge.testing.containers import require_container_engine
from esbridge.testing.engine import TIMINGS


@pytest.fixture(scope="session", autouse=True)
def _container_engine() -> None:
    """Skip on a laptop with no engine; fail in CI (see ``require_container_engine``)."""
    if "containers" in (chosen_backend("postgres"), chosen_backend("kafka")):
        require_container_engine()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for what, seconds in TIMINGS.items():
        shown = ", ".join(f"{s:.1f}" for s in seconds)
        terminalreporter.write_line(f"esbridge containers: {what}: {shown} s")
