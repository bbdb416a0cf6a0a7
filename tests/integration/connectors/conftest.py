"""Fixtures of the SQL projection tests (the dog school of tests.support.sql_projection_domain)."""

from __future__ import annotations

import pytest

from tests.support.sql_projection_domain import DogSchool, FailureSwitch


@pytest.fixture(autouse=True)
def _reset_failures():
    """Handlers fail only where a test says so."""
    FailureSwitch.failing.clear()
    FailureSwitch.calls.clear()
    yield
    FailureSwitch.failing.clear()


@pytest.fixture
def school(postgres_db) -> DogSchool:
    return DogSchool(env=postgres_db.env)
