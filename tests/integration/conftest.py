"""Fixtures shared by the consumer's integration tests: the dog school and its mirror.

Each opens its application on the test's fresh database and closes it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import Mirror


@pytest.fixture
def school(postgres_db: Any) -> Iterator[DogSchool]:
    app = DogSchool(env=postgres_db.env)
    yield app
    app.close()


@pytest.fixture
def mirror(postgres_db: Any) -> Iterator[Mirror]:
    app = Mirror(env=postgres_db.env)
    yield app
    app.close()


@pytest.fixture(params=[False, True], ids=["no-log", "upstream-log"])
def upstream_env(request: Any, postgres_db: Any) -> dict[str, str] | None:
    """The consumer's upstream log settings: none (the chain alone), then the log's."""
    return postgres_db.env if request.param else None
