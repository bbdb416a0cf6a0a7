"""The orders system with each application in its own OS process (``esbridge run --app``).

Real Postgres, real Kafka, real processes: the test starts one ``esbridge run``
process per application (through the demo's supervisor), submits orders from
this process, kills workers with SIGKILL mid-run (the supervisor starts them
again) and checks that every order was reserved and paid exactly once, by
counting every effect in the three applications' logs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

from esbridge.cli.run import ESBRIDGE_COMMAND
from examples.orders.application import Orders
from examples.orders.demo import SystemProcesses, count_effects, drive_orders, paid_counter


def exactly_once(env: dict[str, str], ids: list[Any]) -> None:
    effects = count_effects(env, ids)
    assert effects.problems() == []
    assert len(effects.paid) == len(effects.reserved) == len(ids)
    assert sum(effects.payments.values()) == sum(effects.reservations.values()) == len(ids)


def status_table(processes: SystemProcesses) -> str:
    """``esbridge status`` run as a user would, with the same options as the workers."""
    result = subprocess.run(
        [
            *ESBRIDGE_COMMAND,
            "status",
            "examples.orders.system:system",
            "--app-dir",
            os.getcwd(),
            "--topic-prefix",
            processes.prefix,
            "--partitions",
            str(processes.partitions),
            "--mode",
            processes.mode,
            "--fail-on-lag",
        ],
        env=processes.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_three_processes_prompts_and_status(postgres_db: Any, kafka_broker: Any) -> None:
    with SystemProcesses(postgres_db.env, kafka_broker.config(), mode="prompts") as processes:
        assert len(processes.pids()) == 3
        orders = Orders(env=processes.env)
        paid = paid_counter(processes.env)
        try:
            ids = drive_orders(orders, paid, 100, batch=5, timeout=90, on_tick=processes.poll)
        finally:
            paid.close()
            orders.close()
        exactly_once(processes.env, ids)
        table = status_table(processes)
    # Leaving sent SIGTERM: every worker stopped by itself (0), none had to be killed (-9).
    assert processes.last_exit_codes() == {"Orders[0]": 0, "Reservations[0]": 0, "Payments[0]": 0}
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["edge", "upstream"]
    edges = {line.split("  ")[0].strip(): line.split() for line in lines[2:]}
    assert set(edges) == {
        "Orders -> Reservations",
        "Reservations -> Orders",
        "Orders -> Payments",
        "Payments -> Orders",
    }
    for row in edges.values():
        # edge (3 words), upstream max nid, position, lag events, lag s, held gaps, DLQ, relay
        assert row[3] == row[4], row  # position == upstream max nid
        assert row[5] == "0", row
        # Who published the leader's log: a worker's relay, still holding its lease.
        assert " ".join(row[9:]).startswith("esbridge relay pid "), row


@pytest.mark.slow
def test_1000_orders_two_partitions_kill_9_and_restart(postgres_db: Any, kafka_broker: Any) -> None:
    """3 applications in 3 OS processes, 2 partitions; two workers SIGKILLed mid-run."""
    kills: list[tuple[str, int]] = []
    with SystemProcesses(postgres_db.env, kafka_broker.config(), partitions=2) as processes:
        orders = Orders(env=processes.env)
        paid = paid_counter(processes.env)
        started = time.monotonic()

        def chaos() -> None:
            # Called about every 0.1 s while orders flow (submitted for ~6.7 s at 150/s):
            # SIGKILL a worker mid-stream, let the supervisor start it again.
            plan = [(1.5, "Orders[0]"), (3.5, "Payments[0]")]
            for after, worker in plan[len(kills) :]:
                if time.monotonic() - started >= after:
                    kills.append((worker, processes.kill(worker)))
            processes.poll()

        try:
            ids = drive_orders(orders, paid, 1000, rate=150, batch=5, timeout=240, on_tick=chaos)
        finally:
            paid.close()
            orders.close()
        restarted = processes.pids()
        assert len(kills) == 2, f"the orders finished before both kills: {kills}"
        assert processes.restarts() >= 2, (kills, restarted)
        exactly_once(processes.env, ids)
        for worker, pid in kills:
            assert restarted[worker] != pid
        table = status_table(processes)
    print(table, file=sys.stderr)


@pytest.mark.slow
def test_two_workers_the_relay_moves_when_its_worker_is_killed(
    postgres_db: Any, kafka_broker: Any
) -> None:
    """Both workers of each application run its relay; one publishes, one stands by. The
    worker whose Orders relay publishes is SIGKILLed and NOT restarted: the other worker's
    relay takes over at once, and orders keep being reserved and paid exactly once."""
    from esbridge.names import SystemTopics
    from tests.support.relay_support import lease_holder_pid, wait_for

    with SystemProcesses(postgres_db.env, kafka_broker.config(), partitions=2, workers=2) as p:
        relay_id = SystemTopics(p.prefix).relay_id("Orders")
        orders = Orders(env=p.env)
        paid = paid_counter(p.env)
        try:
            ids = drive_orders(orders, paid, 50, batch=5, timeout=120, on_tick=p.poll)
            pids = p.pids()
            holder = wait_for(lambda: lease_holder_pid(postgres_db.dsn, relay_id), 30, "holder")
            active = next(name for name, pid in pids.items() if pid == holder)
            other = "Orders[1]" if active == "Orders[0]" else "Orders[0]"
            assert active.startswith("Orders["), (active, pids)
            p.kill(active)  # and no p.poll() from here on: it stays dead
            killed = time.monotonic()
            wait_for(
                lambda: lease_holder_pid(postgres_db.dsn, relay_id) == pids[other],
                15,
                "the other worker's relay takes over",
            )
            takeover = time.monotonic() - killed
            ids += drive_orders(orders, paid, 100, batch=5, timeout=120)
            assert active not in p.pids(), "the killed worker was restarted"
        finally:
            paid.close()
            orders.close()
        exactly_once(p.env, ids)
    print(f"relay takeover by the other worker: {takeover:.2f} s", file=sys.stderr)
