"""The examples under the library's own ``SingleThreadedRunner``: POPO and real Postgres.

This is the baseline the esbridge runner must match (``test_examples_kafka.py``
runs the very same checks and application classes under ``KafkaRunner``).
"""

from __future__ import annotations

from typing import Any

import pytest
from eventsourcing.system import SingleThreadedRunner

from examples.dogschool.checks import check_dogschool
from examples.dogschool.system import system as dogschool_system
from examples.email_index.checks import check_email_index
from examples.email_index.system import system as email_index_system
from examples.orders.checks import check_orders
from examples.orders.system import system as orders_system
from examples.replication.application import Original
from examples.replication.checks import check_replication, check_resumed, created_before_start
from examples.replication.system import system as replication_system


@pytest.fixture(params=["popo", "postgres"])
def env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "popo":
        return {}
    db: Any = request.getfixturevalue("postgres_db")
    return dict(db.env)


def test_dogschool(env: dict[str, str]) -> None:
    with SingleThreadedRunner(dogschool_system, env=env) as runner:
        check_dogschool(runner)


def test_orders(env: dict[str, str]) -> None:
    with SingleThreadedRunner(orders_system, env=env) as runner:
        check_orders(runner, num_orders=5)


def test_email_index(env: dict[str, str]) -> None:
    with SingleThreadedRunner(email_index_system, env=env) as runner:
        check_email_index(runner)


def test_replication_popo() -> None:
    with SingleThreadedRunner(replication_system) as runner:
        # POPO storage lives in the runner's applications: create "before"
        # through the runner's original, then replicate on the next save.
        before = created_before_start(runner.get(Original), ["one", "two", "three"])
        check_replication(runner, before)


def test_replication_postgres_resumes(postgres_db: Any) -> None:
    env = dict(postgres_db.env)
    original = Original(env=env)
    before = created_before_start(original, ["one", "two", "three"])
    with SingleThreadedRunner(replication_system, env=env) as runner:
        # The single-threaded runner pulls only when prompted by a new event.
        runner.get(Original).create_thing("prompt")
        all_ids = check_replication(runner, before)
    # The replicator is down: the original goes on.
    all_ids.append(original.create_thing("five"))
    original.close()
    with SingleThreadedRunner(replication_system, env=env) as runner:
        all_ids.append(runner.get(Original).create_thing("six"))
        check_resumed(runner, all_ids, settle=lambda: None)
