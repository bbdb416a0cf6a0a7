"""The relay through a 3-broker cluster whose brokers are killed -9 while it publishes.

A relay publishes a backlog, and then the events a writer keeps adding, to a
3-partition topic replicated 3 ways (``min.insync.replicas=2``) in small
transactions, so that a transaction is open at any instant. Meanwhile the
broker leading each partition, and the broker that is the relay's
transaction coordinator, are crashed (SIGKILL) and started again, one after
the other; then a leader is stopped cleanly (as in a rolling restart).
Each transaction holds messages for every partition, so publishing stops
whichever of them lost its leader. Afterwards
a ``read_committed`` consumer must see every notification id of the log
exactly once, on its key's partition, in id order, with an unbroken
``esb_prev_nid`` chain: a transaction cut by a crash was either committed
whole or aborted whole and published again.

The test prints, for each fault, how long publishing stopped (from the crash
until the relay's committed position moved again).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest

from esbridge.testing.kafka_cluster import LocalKafkaCluster
from tests.support.failover import Fault, Progress, crash_and_restart, roles
from tests.support.relay_support import (
    ROOT,
    check_exactly_once_in_order,
    db_ids,
    ledger,
    ledger_relay,
    read_all,
    subprocess_env,
    write_events,
)

PARTITIONS = 3
BACKLOG = 20_000
RATE = 500  # events/s the writer adds while the brokers are crashed


@pytest.mark.slow
def test_relay_exactly_once_while_leaders_and_coordinator_are_killed(
    postgres_db: Any, kafka_cluster: LocalKafkaCluster, capsys: Any
) -> None:
    cluster = kafka_cluster
    write_events(ledger(postgres_db.env), BACKLOG, accounts=300, per_save=500)
    topic = cluster.create_topic(partitions=PARTITIONS)
    relay = ledger_relay(
        postgres_db,
        cluster.config(),
        topic,
        partitions=PARTITIONS,
        batch_size=500,  # many transactions: a crash always cuts one
        max_retry_delay=1.0,
    )
    thread = threading.Thread(target=relay.run, daemon=True)
    progress = Progress(lambda: [relay.status().position])
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.support.relay_support", "write", "10000000", "50", str(RATE)],
        env=subprocess_env(postgres_db, cluster),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    faults: list[Fault] = []
    try:
        thread.start()
        progress.start()
        progress.wait_past(0, 60, "the relay's first transaction")
        coordinator = "transaction coordinator"
        plan = [
            ("leader of partition 0", "kill -9"),
            (coordinator, "kill -9"),
            ("leader of partition 1", "clean stop"),
        ]
        for kind, how in plan:
            if kind == coordinator:
                node_id = cluster.coordinator(relay.relay_id)
            else:
                node_id = cluster.leader(topic, int(kind.rsplit(" ", 1)[1]))
            led = roles(cluster, node_id, topic, PARTITIONS, transactional_id=relay.relay_id)
            fault = crash_and_restart(cluster, Fault(kind, node_id, how, roles=led), progress)
            faults.append(fault)
            assert thread.is_alive(), relay.status().error
        writer.send_signal(signal.SIGTERM)
        writer.wait(30)
        expected = db_ids(postgres_db.dsn)
        progress.wait_past(expected[-1][0] - 1, 60, "the relay catching up")
    finally:
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait()
        relay.stop()
        thread.join(30)
        progress.stop()
    assert not thread.is_alive()
    assert relay.status().error is None
    assert relay.status().position == expected[-1][0]
    assert len(expected) > BACKLOG + RATE * 5  # the writer went on during the faults

    records = read_all(cluster.config(), topic, len(expected), quiet=1.0)
    check_exactly_once_in_order(records, expected, PARTITIONS)
    assert len(records) == len(expected)
    aborted = len(
        read_all(cluster.config(), topic, len(expected), isolation="read_uncommitted", quiet=2.0)
    )
    with capsys.disabled():
        print(
            f"\nrelay failover: {len(expected)} notifications, {len(records)} read committed "
            f"(exactly once, in order), {aborted - len(records)} more in aborted transactions"
        )
        for fault in faults:
            print("  " + fault.line())
