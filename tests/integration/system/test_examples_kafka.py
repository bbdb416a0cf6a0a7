"""The examples under esbridge's ``KafkaRunner`` (real Kafka + Postgres, one process).

Same application classes, same checks as ``test_examples_library.py``; only
the runner differs, and ``settle`` waits until every follower has caught up
(the library's single-threaded runner processes synchronously, Kafka does not).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from eventsourcing.system import SingleThreadedRunner, System

from esbridge.system.runner import KafkaRunner
from examples.dogschool.application import Counters, DogSchool
from examples.dogschool.checks import check_dogschool
from examples.dogschool.system import system as dogschool_system
from examples.email_index.checks import check_email_index
from examples.email_index.system import system as email_index_system
from examples.orders.checks import check_orders
from examples.orders.system import system as orders_system
from examples.replication.application import Original
from examples.replication.checks import check_replication, check_resumed, created_before_start
from examples.replication.system import system as replication_system

RunnerFactory = Callable[..., KafkaRunner]


@pytest.fixture
def make_runner(postgres_db: Any, kafka_broker: Any) -> RunnerFactory:
    prefix = f"esb.{uuid.uuid4().hex[:8]}."

    def make(system: System, **kwargs: Any) -> KafkaRunner:
        return KafkaRunner(
            system,
            env=postgres_db.env,
            kafka_config=kafka_broker.config(),
            topic_prefix=prefix,
            **kwargs,
        )

    return make


def settle_for(runner: KafkaRunner) -> Callable[[], None]:
    return lambda: runner.wait_idle(timeout=30)


def test_dogschool_payloads(make_runner: RunnerFactory) -> None:
    with make_runner(dogschool_system) as runner:
        check_dogschool(runner, settle_for(runner))


def test_orders_cycle_prompts(make_runner: RunnerFactory) -> None:
    # Orders -> Reservations -> Orders -> Payments -> Orders: a cycle, in prompt mode.
    with make_runner(orders_system, relay_modes="prompts") as runner:
        check_orders(runner, settle_for(runner), num_orders=5)


def test_orders_cycle_payloads_two_partitions(make_runner: RunnerFactory) -> None:
    with make_runner(orders_system, partitions=2) as runner:
        check_orders(runner, settle_for(runner), num_orders=10)


def test_email_index_mixed_modes(make_runner: RunnerFactory) -> None:
    with make_runner(email_index_system, relay_modes={"Users": "payloads"}) as runner:
        check_email_index(runner, settle_for(runner))


def test_replication_resumes_after_restart(make_runner: RunnerFactory, postgres_db: Any) -> None:
    original = Original(env=postgres_db.env)
    before = created_before_start(original, ["one", "two", "three"])
    with make_runner(replication_system) as runner:
        all_ids = check_replication(runner, before, settle_for(runner))
    # The replicator is down; the original goes on.
    all_ids.append(original.create_thing("five"))
    original.close()
    with make_runner(replication_system) as runner:
        check_resumed(runner, all_ids, settle_for(runner))


def test_switching_runners_does_not_reprocess(make_runner: RunnerFactory, postgres_db: Any) -> None:
    """Tracking records are the library's: a system moves between runners without reprocessing."""
    env = postgres_db.env
    with SingleThreadedRunner(dogschool_system, env=env) as runner:
        school = runner.get(DogSchool)
        dog = school.register_dog("Billy")
        school.add_trick(dog, "roll over")
        assert runner.get(Counters).get_count("roll over") == 1
    with make_runner(dogschool_system) as runner:
        runner.get(DogSchool).add_trick(dog, "fetch ball")
        runner.wait_idle(timeout=30)
        counters = runner.get(Counters)
        assert counters.get_count("roll over") == 1  # not counted a second time
        assert counters.get_count("fetch ball") == 1
