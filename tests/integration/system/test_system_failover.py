"""The orders system, one ``esbridge run`` process per application, through a 3-broker cluster
while brokers and workers are killed -9.

Orders, Reservations and Payments each run in their own worker process (the
command lines ``esbridge run --app NAME --worker-index 0`` that ``esbridge run
--supervise`` gives its workers, restarted by its supervisor when they die),
3 partitions per topic, replicated 3 ways (``min.insync.replicas=2``). This
process creates orders at a steady rate while it:

* kills -9 the broker leading a partition of the orders topic, and starts it again;
* kills -9 the Orders relay's transaction coordinator and, while that broker
  is down, the Orders worker (its relay and its consumers) at a random point;
* kills -9 each application's worker once, in a random order, at random points.

Afterwards every order must have been reserved once and paid once, and
nothing else must have happened: each log holds exactly the events the orders
explain (3 per order in Orders, 1 in Reservations and in Payments), each
order's events are Created, Reserved, Paid in versions 1, 2, 3 in log order,
pointing at the one reservation and the one payment made for it, every
follower's tracking position on every partition equals the last notification
id of that partition of its leader's log, nothing was parked as a dead
letter, and no worker exited but by this test's kills (or with status 1, to
be restarted, when Kafka fenced its static membership) and by SIGTERM at the
end, cleanly.

``ESBRIDGE_FAILOVER_SEED`` replays the random choices of a run (the seed is
printed). It prints (``-s``) the random seed and how long processing stopped after each
fault: from the kill until an event written after it had its effect
downstream (see :class:`Positions`).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from eventsourcing.utils import get_topic

from esbridge.deadletters.store import DeadLetterStore
from esbridge.names import SystemTopics, tracking_names
from esbridge.testing.kafka_cluster import LocalKafkaCluster
from examples.orders.application import Orders, Payments, Reservations
from examples.orders.demo import SystemProcesses, count_effects, paid_counter, wait_for_count
from examples.orders.domainmodel import Order, Payment, Reservation
from tests.support.consumer_apps import count_notifications, partition_targets
from tests.support.failover import Fault, Progress, crash_and_restart, roles
from tests.support.relay_support import wait_for

PARTITIONS = 3
RATE = 60  # orders created a second while the faults happen
BATCH = 3  # orders a save()
#: (follower, leader) of every edge of the orders system, in the order of :class:`Positions`.
EDGES = [
    ("Reservations", "Orders"),
    ("Payments", "Orders"),
    ("Orders", "Reservations"),
    ("Orders", "Payments"),
]
APPS = ("Orders", "Reservations", "Payments")
APP_CLASSES: dict[str, Any] = {"Orders": Orders, "Reservations": Reservations, "Payments": Payments}
TRACKED = len(EDGES) * PARTITIONS  # the tracking positions, edge by edge, partition by partition


def edge_index(follower: str, leader: str, partition: int) -> int:
    return EDGES.index((follower, leader)) * PARTITIONS + partition


def edge_max(follower: str, leader: str) -> int:
    """Where :class:`Positions` puts the furthest of an edge's positions."""
    return TRACKED + EDGES.index((follower, leader))


def head(app: str) -> int:
    """Where :class:`Positions` puts ``app``'s last notification id."""
    return TRACKED + len(EDGES) + APPS.index(app)


class Positions:
    """Every tracking position of the system, the furthest of each edge, and each log's last
    notification id: one query (sampled every 20 ms).

    A fault's recovery is the time until a position passes the head of its leader's log as
    it stood at the fault: an event written after the fault has had its effect downstream.
    Events in flight at the fault (a commit sent by a worker just before its kill, messages
    already fetched) do not count.
    """

    def __init__(self, dsn: str) -> None:
        self.connection = psycopg.connect(dsn, autocommit=True)
        self.query = " UNION ALL ".join(
            [
                f"SELECT '{app}', application_name, max(notification_id) "
                f"FROM {app.lower()}_tracking GROUP BY application_name"
                for app in APPS
            ]
            + [
                f"SELECT '{app}', '', max(notification_id) FROM {app.lower()}_events"
                for app in APPS
            ]
        )
        self.index = {
            (follower, name): edge_index(follower, leader, p)
            for follower, leader in EDGES
            for p, name in enumerate(tracking_names(leader, PARTITIONS))
        }
        self.index.update({(app, ""): head(app) for app in APPS})

    def __call__(self) -> list[int]:
        values = [0] * (TRACKED + len(EDGES) + len(APPS))
        for app, name, position in self.connection.execute(self.query).fetchall():
            index = self.index.get((app, name))
            if index is not None:
                values[index] = position or 0
        for follower, leader in EDGES:
            first = edge_index(follower, leader, 0)
            values[edge_max(follower, leader)] = max(values[first : first + PARTITIONS])
        return values

    def close(self) -> None:
        self.connection.close()


class Writer(threading.Thread):
    """Creates ``BATCH`` orders a save, ``RATE`` a second, until stopped."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(daemon=True, name="orders writer")
        self.orders = Orders(env=env)
        self.ids: list[uuid.UUID] = []
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        try:
            while not self.stopping.is_set():
                self.ids += self.orders.create_new_orders(BATCH)
                self.stopping.wait(max(0.0, started + len(self.ids) / RATE - time.monotonic()))
        except BaseException as e:  # reported by the test
            self.error = e

    def stop(self) -> list[uuid.UUID]:
        self.stopping.set()
        self.join(30)
        self.orders.close()
        if self.error is not None:
            raise self.error
        return self.ids


class Supervising(threading.Thread):
    """Calls the supervisor's ``poll()`` every 50 ms: dead workers are started again at once,
    whatever the test is waiting for (a broker's restart, say)."""

    def __init__(self, processes: SystemProcesses) -> None:
        super().__init__(daemon=True, name="supervisor poll")
        self.processes = processes
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            try:
                self.processes.poll()
            except BaseException as e:  # a worker stopped on a configuration error
                self.error = e
                return

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        if self.error is not None:
            raise self.error


@dataclass
class WorkerKill:
    worker: str
    pid: int
    recovery: float = 0.0

    def line(self) -> str:
        return (
            f"kill -9    worker {self.worker} (pid {self.pid}; restarted by the supervisor): "
            f"progress resumed after {self.recovery:5.2f} s"
        )


#: What a worker's kill stops, for each application: the follower's furthest position on
#: an edge it consumes, and the head of that edge's leader's log (see :class:`Positions`).
WORKER_WATCH = {
    "Orders": (edge_max("Orders", "Reservations"), head("Reservations")),
    "Reservations": (edge_max("Reservations", "Orders"), head("Orders")),
    "Payments": (edge_max("Payments", "Orders"), head("Orders")),
}


def kill_worker(processes: SystemProcesses, progress: Progress, app: str) -> WorkerKill:
    """SIGKILL ``app``'s worker (its supervisor starts it again); time until the worker's
    position passes the head of its leader's log at the kill."""
    progress.watch, since = WORKER_WATCH[app]
    before = progress.positions()[since]
    t0 = time.monotonic()
    kill = WorkerKill(f"{app}[0]", processes.kill(f"{app}[0]"))
    kill.recovery = progress.wait_past(before, 60, kill.line()) - t0
    return kill


def check_orders_log(orders: Orders, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[Any, Any]]:
    """Each order's events: Created, Reserved, Paid, versions 1, 2, 3, in log order, and no
    other event in the log; each order's (reservation id, payment id)."""
    names = {get_topic(c): c.__name__ for c in (Order.Created, Order.Reserved, Order.Paid)}
    streams: dict[uuid.UUID, list[tuple[int, str]]] = defaultdict(list)
    refs: dict[uuid.UUID, tuple[Any, Any]] = {}
    reservation: dict[uuid.UUID, Any] = {}
    start = 1
    while page := orders.recorder.select_notifications(start=start, limit=5000):
        for n in page:
            streams[n.originator_id].append((n.originator_version, names[n.topic]))
            event = orders.mapper.to_domain_event(n)
            if isinstance(event, Order.Reserved):
                reservation[n.originator_id] = event.reservation_id
            elif isinstance(event, Order.Paid):
                refs[n.originator_id] = (reservation.get(n.originator_id), event.payment_id)
        start = page[-1].id + 1
    assert set(streams) == set(ids), "orders missing from, or unknown orders in, the log"
    wrong = {
        i: s for i, s in streams.items() if s != [(1, "Created"), (2, "Reserved"), (3, "Paid")]
    }
    assert not wrong, f"{len(wrong)} orders with other events or another order: {wrong}"
    return refs


def check_references(env: dict[str, str], refs: dict[uuid.UUID, tuple[Any, Any]]) -> None:
    """Each order's reservation and payment are the one Reservation and the one Payment made
    for it: the follower's aggregates are exactly those the orders point at."""
    for name, created, slot in (
        ("Reservations", Reservation.Created, 0),
        ("Payments", Payment.Created, 1),
    ):
        app = APP_CLASSES[name](env=env)
        try:
            made = {}
            start = 1
            while page := app.recorder.select_notifications(start=start, limit=5000):
                for n in page:
                    assert n.topic == get_topic(created), n.topic
                    made[n.originator_id] = app.mapper.to_domain_event(n).order_id
                start = page[-1].id + 1
            pointed = {ref[slot]: order_id for order_id, ref in refs.items()}
            assert made == pointed, f"{name}: aggregates differ from the orders' refs"
        finally:
            app.close()


def last_ids(env: dict[str, str], leader: str) -> list[int]:
    """The last notification id of each partition of ``leader``'s log."""
    app = APP_CLASSES[leader](env=env)
    try:
        return partition_targets(app, PARTITIONS)
    finally:
        app.close()


@pytest.mark.slow
def test_orders_system_exactly_once_while_brokers_and_workers_are_killed(
    postgres_db: Any, kafka_cluster: LocalKafkaCluster, capsys: Any
) -> None:
    cluster = kafka_cluster
    seed = int(os.environ.get("ESBRIDGE_FAILOVER_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    print(f"ESBRIDGE_FAILOVER_SEED={seed}")  # shown with a failure
    faults: list[Fault | WorkerKill] = []
    t0 = time.monotonic()
    with SystemProcesses(postgres_db.env, cluster.config(), partitions=PARTITIONS) as processes:
        names = SystemTopics(processes.prefix)
        orders_topic = names.topic("Orders")
        relay_id = names.relay_id("Orders")
        positions = Positions(postgres_db.dsn)
        progress = Progress(positions)
        supervising = Supervising(processes)
        writer = Writer(processes.env)
        try:
            supervising.start()
            writer.start()
            progress.start()
            progress.watch = edge_max("Orders", "Payments")
            progress.wait_past(0, 90, "the first order paid (every worker running)")

            def orders_head() -> int:
                return positions()[head("Orders")]

            def broker_fault(kind: str, node_id: int, watch: int, **kwargs: Any) -> None:
                led = roles(cluster, node_id, orders_topic, PARTITIONS, transactional_id=relay_id)
                fault = Fault(kind, node_id, "kill -9", watch=watch, roles=led)
                faults.append(
                    crash_and_restart(cluster, fault, progress, since=orders_head, **kwargs)
                )

            def worker_fault(app: str) -> None:
                time.sleep(rng.uniform(0.2, 1.5))  # a random point of the stream
                faults.append(kill_worker(processes, progress, app))

            # 1. The leader of a partition of the orders topic.
            partition = rng.randrange(PARTITIONS)
            broker_fault(
                f"leader of orders partition {partition}",
                cluster.leader(orders_topic, partition),
                edge_index("Reservations", "Orders", partition),
            )
            # 2. Each application's worker, in a random order.
            for app in rng.sample(APPS, len(APPS)):
                worker_fault(app)
            # 3. The Orders relay's transaction coordinator, and, while it is down, the
            #    Orders worker: its successor's relay meets a coordinator that moves.
            orders_kill: list[WorkerKill] = []

            def kill_orders_worker() -> None:
                time.sleep(rng.uniform(0.1, 1.0))
                orders_kill.append(WorkerKill("Orders[0]", processes.kill("Orders[0]")))

            broker_fault(
                "transaction coordinator of the Orders relay, + worker Orders[0] killed",
                cluster.coordinator(relay_id),
                edge_max("Reservations", "Orders"),
                while_down=kill_orders_worker,
            )
            ids = writer.stop()
            # Once every order is paid, no log grows: each partition's last id is final.
            paid = paid_counter(processes.env)
            try:
                wait_for_count(paid, len(ids), 90)
            finally:
                paid.close()
            expected = [t for _, leader in EDGES for t in last_ids(processes.env, leader)]
            wait_for(lambda: positions()[:TRACKED] == expected, 60, "caught up")
        finally:
            if writer.is_alive():
                writer.stopping.set()
            progress.stop()
            positions.close()
            supervising.stopping.set()  # before the supervisor stops its workers
            supervising.join(10)
        supervising.stop()  # raises what a poll() raised
        # Each exit so far was one of this test's kills, or a worker that stopped on a
        # runtime failure (exit 1) for its supervisor to restart it: a consumer fenced
        # when its rejoin raced the group coordinator's failover. None stopped on a
        # configuration error (2), none was left dead.
        kills = [k.worker for k in [*faults, *orders_kill] if isinstance(k, WorkerKill)]
        exits = {w.name: list(w.exit_codes) for w in processes.supervisor.workers}
        killed = sorted(name for name, codes in exits.items() for code in codes if code == -9)
        assert killed == sorted(kills), exits
        failed = [name for name, codes in exits.items() for code in codes if code == 1]
        assert all(code in (-9, 1) for codes in exits.values() for code in codes), exits
        assert set(processes.pids()) == {f"{app}[0]" for app in APPS}
    # Leaving sent SIGTERM: every worker stopped by itself, none hung.
    assert processes.last_exit_codes() == {f"{app}[0]": 0 for app in APPS}
    seconds = time.monotonic() - t0
    # Exactly once, counted from the three logs.
    effects = count_effects(processes.env, ids)
    assert effects.problems() == []
    assert len(effects.reserved) == len(effects.paid) == len(ids)
    for name, per_order in (("Orders", 3), ("Reservations", 1), ("Payments", 1)):
        app = APP_CLASSES[name](env=processes.env)
        try:
            assert count_notifications(app) == per_order * len(ids), name
            parked = DeadLetterStore(app.recorder.datastore)
            assert not parked.exists() or parked.count(name) == 0, f"{name} parked messages"
        finally:
            app.close()
    orders = Orders(env=processes.env)
    try:
        refs = check_orders_log(orders, ids)
    finally:
        orders.close()
    check_references(processes.env, refs)
    assert len(ids) > RATE * 10  # orders were written all through the faults
    with capsys.disabled():
        print(
            f"\nsystem failover (seed {seed}): {len(ids)} orders, each reserved and paid once, "
            f"through {len(faults)} faults in {seconds:.0f} s"
        )
        for fault in faults:
            print("  " + fault.line())
        if failed:
            print(f"  restarted after exiting on a runtime failure: {', '.join(failed)}")
