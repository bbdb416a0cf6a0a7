"""Clear errors at start, before anything is consumed: bad system paths, missing tables,
a leader without a relay, applications that are not in the system."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Any

import pytest

from esbridge.cli.run import ESBRIDGE_COMMAND
from esbridge.errors import ApplicationNotFoundError, ConfigurationError
from esbridge.system.applications import construct_or_close
from esbridge.system.runner import KafkaRunner, load_system
from esbridge.system.setup import new_app
from examples.orders.application import Payments
from examples.orders.system import system as orders_system
from tests.support.causal_shop import Fulfilment, Shop

KAFKA = {"bootstrap.servers": "127.0.0.1:1"}  # never contacted: these errors come first


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("examples.orders.system", "is not of the form 'package.module:attribute'"),
        ("examples.no_such_module:system", "cannot import module 'examples.no_such_module'"),
        ("examples.orders.system:no_such_system", "has no attribute 'no_such_system'"),
        ("examples.orders.domainmodel:Order", "not an eventsourcing.system.System"),
    ],
)
def test_bad_system_paths(path: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_system(path)


def test_unimportable_application_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(orders_system.nodes, "Payments", "examples.orders.gone:Payments")
    with pytest.raises(ConfigurationError, match=r"application .Payments. .* cannot be imported"):
        load_system("examples.orders.system:system")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["examples.nope:system", "--app", "Orders"], "cannot import module 'examples.nope'"),
        (
            ["examples.orders.system:system", "--relay-set", "lingr=1"],
            "--relay-set 'lingr=1': expected NAME=VALUE with NAME one of",
        ),
    ],
)
def test_cli_reports_a_configuration_error_and_exits_2(args: list[str], message: str) -> None:
    result = subprocess.run(
        [*ESBRIDGE_COMMAND, "run", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_relay_settings_reach_every_worker_and_its_relays(postgres_db: Any) -> None:
    """``esbridge run --relay-set`` is passed to each supervised worker, whose runner
    gives it to the relays it makes."""
    from esbridge.cli import build_parser
    from esbridge.cli.relay import parse_tuning
    from esbridge.cli.run import worker_command
    from esbridge.system.parts import make_relay

    args = build_parser().parse_args(
        ["run", "examples.orders.system:system", "--workers", "2",
         "--relay-set", "linger=0.2", "--relay-set", "batch_size=500"]
    )  # fmt: skip
    command = worker_command(args, "Orders", 1)
    assert command[-4:] == ["--relay-set", "linger=0.2", "--relay-set", "batch_size=500"]
    runner = KafkaRunner(
        orders_system,
        env=postgres_db.env,  # the runner constructs its applications, as the library's do
        kafka_config=KAFKA,
        relay_options=parse_tuning(args.relay_set),
    )
    try:
        relay = make_relay(runner.settings, "Orders")
        assert (relay.tuning.linger, relay.tuning.batch_size) == (0.2, 500)
    finally:
        runner.stop()


class CausalShop(Shop):
    publish_causal_dependencies = True


class IndependentFulfilment(Fulfilment):
    wait_for_causal_dependencies = False


def test_causal_dependencies_are_chosen_per_application(postgres_db: Any) -> None:
    """The leader's class opts in (its relay), a follower's class opts out (its consumer);
    runner-wide options win over both."""
    from eventsourcing.system import System

    from esbridge.system.parts import make_consumer, make_relay

    def runner(**options: Any) -> KafkaRunner:
        system = System(pipes=[[CausalShop, IndependentFulfilment], [CausalShop, Fulfilment]])
        return KafkaRunner(system, env=postgres_db.env, kafka_config=KAFKA, **options)

    plain = runner()
    try:
        assert make_relay(plain.settings, "CausalShop").tuning.causal_dependencies is True
        waits = {
            name: make_consumer(
                plain.settings, plain.apps[name], "CausalShop", name
            ).tuning.causal_dependencies
            for name in ("IndependentFulfilment", "Fulfilment")
        }
        assert waits == {"IndependentFulfilment": False, "Fulfilment": True}
    finally:
        plain.stop()
    forced = runner(
        relay_options={"causal_dependencies": False},
        consumer_options={"causal_dependencies": True},
    )
    try:
        assert make_relay(forced.settings, "CausalShop").tuning.causal_dependencies is False
        consumer = make_consumer(
            forced.settings, forced.apps["IndependentFulfilment"], "CausalShop", "x"
        )
        assert consumer.tuning.causal_dependencies is True
    finally:
        forced.stop()


def test_missing_tables_with_table_creation_disabled(postgres_db: Any) -> None:
    env = {**postgres_db.env, "CREATE_TABLE": "n"}
    with pytest.raises(ConfigurationError, match="reservations_events"):
        # The applications are constructed with the runner, as the library's runners do.
        KafkaRunner(orders_system, env=env, kafka_config=KAFKA, apps=["Reservations"])


def test_leader_without_relay() -> None:
    with pytest.raises(ConfigurationError, match="leader 'Orders' has no relay"):
        KafkaRunner(orders_system, kafka_config=KAFKA, relay_modes={"Orders": "none"})


def test_every_application_without_relays() -> None:
    with pytest.raises(ConfigurationError, match=r"leaders \['Orders', .*\] would have no relay"):
        KafkaRunner(orders_system, kafka_config=KAFKA, run_relays=False)


def test_bad_partition_counts() -> None:
    with pytest.raises(ConfigurationError, match="positive integers"):
        KafkaRunner(orders_system, kafka_config=KAFKA, partitions=0)
    with pytest.raises(ConfigurationError, match="not leaders of the system"):
        KafkaRunner(orders_system, kafka_config=KAFKA, partitions={"Shipping": 2})


def test_unknown_names() -> None:
    with pytest.raises(ConfigurationError, match="not in the system"):
        KafkaRunner(orders_system, kafka_config=KAFKA, relay_modes={"Shipping": "payloads"})
    with pytest.raises(ConfigurationError, match="'Shipping' is not in the system"):
        KafkaRunner(orders_system, kafka_config=KAFKA, apps=["Shipping"])


def test_no_broker_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    with pytest.raises(ConfigurationError, match="KAFKA_BOOTSTRAP_SERVERS"):
        KafkaRunner(orders_system)


def test_get_of_an_application_run_elsewhere(postgres_db: Any) -> None:
    runner = KafkaRunner(orders_system, env=postgres_db.env, kafka_config=KAFKA, apps=["Orders"])
    try:
        with pytest.raises(ApplicationNotFoundError) as raised:
            runner.get(Payments)
        assert str(raised.value) == (
            "application 'Payments' is not run by this runner (apps=['Orders'] excludes it): "
            "it runs in another process, or add it to apps=[...]"
        )
        assert raised.value.application == "Payments"
        assert isinstance(raised.value, ConfigurationError | KeyError)  # KeyError: the library's
        with pytest.raises(ConfigurationError, match=r"'Shipping' is not in the system \(it has"):
            runner.get(type("Shipping", (), {"name": "Shipping"}))
    finally:
        runner.stop()


def test_get_before_start_returns_the_application_without_contacting_kafka(
    postgres_db: Any,
) -> None:
    """As the library's runners: the applications exist from construction (this used to
    raise "not started yet"); the broker (none listens at KAFKA's address) is not contacted."""
    runner = KafkaRunner(orders_system, env=postgres_db.env, kafka_config=KAFKA)
    try:
        assert isinstance(runner.get(Payments), Payments)
        assert runner.components == [] and not runner.is_started
    finally:
        runner.stop()


def test_supervised_workers_stop_on_a_configuration_error(
    postgres_db: Any, kafka_broker: Any
) -> None:
    """``--supervise`` restarts crashed workers, but not one that cannot start (exit 2)."""
    env = {
        **os.environ,
        **postgres_db.env,
        "CREATE_TABLE": "n",  # the tables are missing and may not be created
        "KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
    }
    command = [*ESBRIDGE_COMMAND, "run", "examples.orders.system:system", "--supervise"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "stopped on a configuration error" in result.stderr
    assert "cannot read the notification log of application" in result.stderr


def test_processes_constructing_one_application_at_the_same_moment_all_succeed(
    postgres_server: Any,
) -> None:
    """Several workers (or ``esbridge consume`` processes) start together on a fresh database.

    Constructed directly, most collide in Postgres's catalog or on the library's migration
    record; :func:`new_app` retries those collisions.
    """
    from tests.support.consumer_apps import Mirror

    def construct_together(make: Any, count: int = 8) -> list[BaseException]:
        env = postgres_server.create_database().env
        barrier = threading.Barrier(count)
        errors: list[BaseException] = []

        def construct() -> None:
            barrier.wait()
            try:
                make(env).close()
            except Exception as e:  # reported by the test
                errors.append(e)

        threads = [threading.Thread(target=construct) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return errors

    # The collisions are real: plain construction fails in most rounds. (Each failed
    # construction closes what it opened, else its pool's connections stay open.)
    plain = [construct_together(lambda env: construct_or_close(Mirror, env)) for _ in range(3)]
    assert any(plain)
    for _ in range(5):
        assert construct_together(lambda env: new_app(Mirror, "Mirror", env)) == []


def test_a_construction_that_fails_leaves_no_connection_open(postgres_server: Any) -> None:
    """Retried constructions must not pile up connections until Postgres refuses more.

    A collision makes the application's ``__init__`` raise after its pool opened
    connections; nobody holds the half-built application to close it. CI once
    failed with "couldn't get a connection after 30.00 sec" after such leaks.
    """
    from tests.support.consumer_apps import Mirror

    class FailsHalfWay(Mirror):
        def construct_event_store(self) -> Any:
            raise RuntimeError("constructed half-way")  # after the pool opened and tables exist

    env = postgres_server.create_database().env

    def connections() -> int:
        app = new_app(Mirror, "Mirror", env)
        try:
            with app.recorder.datastore.transaction(commit=False) as curs:  # type: ignore[attr-defined]
                curs.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                )
                return int(curs.fetchone()["count"])
        finally:
            app.close()

    before = connections()
    kept = []  # as a caller that logs or chains the errors: they hold the half-built apps
    for _ in range(10):
        with pytest.raises(RuntimeError, match="half-way") as failed:
            construct_or_close(FailsHalfWay, env)
        kept.append(failed.value)
    deadline = time.monotonic() + 10  # a closed connection's backend ends soon after
    while connections() > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert connections() <= before  # each leaked construction kept 6 open
