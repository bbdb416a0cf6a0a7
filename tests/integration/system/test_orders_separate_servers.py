"""The orders system with every application in its own PostgreSQL server, across OS processes.

Three Postgres servers (the session's for Orders, one started here for each of
Reservations and Payments), real Kafka, one ``esbridge run --app NAME``
process per application and one real ``esbridge serve-log`` process per
application on 127.0.0.1. Each worker's environment holds its own server's
settings only, so a follower *cannot* open its leader's database: in prompt
mode every event it processes was pulled over HTTP, with its own token, from
the leader's log service. Verified from the three databases: every order
reserved once and paid once, and every follower's tracking position equal to
its leader's max notification id.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from esbridge.cli.run import ESBRIDGE_COMMAND
from esbridge.errors import ConfigurationError
from esbridge.system.runner import KafkaRunner
from esbridge.testing.backends import make_postgres
from examples.orders.application import Orders
from examples.orders.demo import (
    APPS,
    SOURCE_ROOT,
    SYSTEM_PATH,
    SystemProcesses,
    count_effects,
    drive_orders,
    kafka_env,
    paid_counter,
    without_databases,
)
from examples.orders.system import system

ORDERS = 60


@pytest.fixture(scope="module")
def own_servers() -> Iterator[dict[str, Any]]:
    """A Postgres server of its own for Reservations and for Payments."""
    servers = {app: make_postgres() for app in ("Reservations", "Payments")}
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture
def databases(postgres_db: Any, own_servers: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Each application's own database, each in another server."""
    found = {"Orders": dict(postgres_db.env)}
    for app, server in own_servers.items():
        found[app] = dict(server.create_database().env)
    assert len({env["POSTGRES_PORT"] for env in found.values()}) == 3
    return found


def wait_caught_up(processes: SystemProcesses, timeout: float = 30.0) -> list[Any]:
    """The edges' statuses once every follower tracks its leader's max notification id."""
    deadline = time.monotonic() + timeout
    while True:
        edges = processes.edge_statuses()
        if all(e.position == e.upstream_max_nid for e in edges) or time.monotonic() > deadline:
            return edges
        processes.poll()
        time.sleep(0.2)


@pytest.mark.parametrize("mode", ["prompts", "payloads"])
def test_orders_with_a_postgres_server_per_application(
    mode: str, databases: dict[str, dict[str, str]], kafka_broker: Any
) -> None:
    with SystemProcesses({}, kafka_broker.config(), mode=mode, databases=databases) as processes:
        workers = {w.name: w for w in processes.supervisor.workers}
        assert set(processes.pids()) == {f"{a}[0]" for a in APPS} | {
            f"serve-log[{a}]" for a in APPS
        }
        for app in APPS:  # a worker is given its own server and no other
            command = workers[f"{app}[0]"].command
            assert command.count("--upstream-url") == 3, command
            worker_env = workers[f"{app}[0]"].env or {}
            assert worker_env["POSTGRES_PORT"] == databases[app]["POSTGRES_PORT"]
            assert not any(key.endswith("_POSTGRES_PORT") for key in worker_env)
            assert sorted(k for k in worker_env if k.endswith("_LOG_TOKEN")) == [
                f"{leader.upper()}_UPSTREAM_LOG_TOKEN" for leader in sorted(system.follows[app])
            ]
        orders = Orders(env=processes.env)
        paid = paid_counter(processes.env)
        try:
            ids = drive_orders(orders, paid, ORDERS, batch=5, timeout=90, on_tick=processes.poll)
        finally:
            paid.close()
            orders.close()
        effects = count_effects(processes.env, ids)
        edges = wait_caught_up(processes)
    assert effects.problems() == []
    assert len(effects.reserved) == len(effects.paid) == ORDERS
    assert sum(effects.reserved.values()) == sum(effects.paid.values()) == ORDERS
    assert sum(effects.reservations.values()) == sum(effects.payments.values()) == ORDERS
    by_edge = {(e.leader, e.follower): e for e in edges}
    assert set(by_edge) == set(system.edges)
    # Orders logs Created, Reserved and Paid for each order; the others one event each.
    maxima = {"Orders": 3 * ORDERS, "Reservations": ORDERS, "Payments": ORDERS}
    for (leader, _follower), edge in by_edge.items():
        assert edge.upstream_max_nid == maxima[leader], edge
        assert edge.position == edge.upstream_max_nid, edge
    # Leaving sent SIGTERM: every process stopped by itself, none had to be killed (-9).
    # uvicorn ends a graceful shutdown by re-raising the signal it caught: -15.
    codes = processes.last_exit_codes()
    assert {name: codes[name] for name in codes if "[0]" in name} == {f"{a}[0]": 0 for a in APPS}
    assert {codes[f"serve-log[{a}]"] for a in APPS} <= {0, -15}, codes


def test_a_follower_that_cannot_read_its_leader_is_refused(
    databases: dict[str, dict[str, str]], kafka_config: dict[str, Any]
) -> None:
    """Reservations in its own server, with no URL for Orders' log: refused, both remedies
    named, before anything runs. With the URL, it is built without opening Orders' database."""
    runner = KafkaRunner(
        system, databases["Reservations"], kafka_config=kafka_config, apps=["Reservations"]
    )
    with pytest.raises(ConfigurationError) as refused:
        runner.start()
    assert runner.components == [] and runner.is_stopped
    message = str(refused.value)
    assert "cannot read the notification log of its upstream 'Orders'" in message
    assert "--upstream-url Orders=URL" in message and "ORDERS_UPSTREAM_LOG_TOKEN" in message
    runner = KafkaRunner(
        system,
        {**databases["Reservations"], "ORDERS_UPSTREAM_LOG_URL": "http://127.0.0.1:9"},
        kafka_config=kafka_config,
        apps=["Reservations"],
    )
    try:
        assert runner.settings.log_services["Orders"].url == "http://127.0.0.1:9"
    finally:
        runner.stop()


def test_setup_of_one_application_makes_its_tables_only(
    databases: dict[str, dict[str, str]], kafka_broker: Any
) -> None:
    """``esbridge run --setup --app Reservations`` in the Reservations service: its own
    tables in its own server, none of Orders' (another team's, in another server)."""
    env = {**without_databases(dict(os.environ), APPS), **databases["Reservations"]}
    env.update(kafka_env(kafka_broker.config()), PYTHONPATH=str(SOURCE_ROOT))
    prefix = f"t.{uuid.uuid4().hex[:8]}."
    done = subprocess.run(
        [*ESBRIDGE_COMMAND, "run", SYSTEM_PATH, "--setup", "--app", "Reservations",
         "--topic-prefix", prefix],
        env=env, cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"tables and topics of Reservations of {SYSTEM_PATH} are ready" in done.stderr
    db = databases["Reservations"]
    with psycopg.connect(
        host=db["POSTGRES_HOST"], port=db["POSTGRES_PORT"], dbname=db["POSTGRES_DBNAME"],
        user=db["POSTGRES_USER"], password=db["POSTGRES_PASSWORD"],
    ) as connection:  # fmt: skip
        tables = {
            row[0]
            for row in connection.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
    assert {"reservations_events", "reservations_tracking"} <= tables
    assert not any(t.startswith(("orders_", "payments_")) for t in tables), tables
