"""Harness tests through the testcontainers backend (``make test`` runs them with
``ESBRIDGE_TEST_BACKEND=containers``; under another backend they test that one)."""

from __future__ import annotations

from typing import Any

import pytest

from esbridge.testing.containers import require_container_engine
from esbridge.testing.engine import TIMINGS
from tests.support.dev_servers import start_dev_servers, tmpdir_for_servers

__all__ = ["start_dev_servers", "tmpdir_for_servers"]  # fixtures of test_dev_servers_containers


@pytest.fixture(scope="session", autouse=True)
def _container_engine() -> None:
    """These tests are about containers: they need an engine whatever the backend.

    Without one they fail in CI and are skipped with the reason on a laptop
    (see ``require_container_engine``).
    """
    require_container_engine()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for what, seconds in TIMINGS.items():
        shown = ", ".join(f"{s:.1f}" for s in seconds)
        terminalreporter.write_line(f"esbridge containers: {what}: {shown} s")
