"""Standby relays: one relay per relay id publishes, the others wait and take over.

Real Postgres and Kafka. What could fail: a standby that publishes while the
active relay lives (it would fence it: the active one would log ``fenced`` and
exit), a takeover that never comes or loses or repeats a notification, a relay
that keeps publishing after losing its lease to a Postgres restart.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from esbridge.errors import ConfigurationError, RelayFencedError, RelayStandbyError
from esbridge.names import default_relay_id
from esbridge.relay.relay import Relay
from tests.integration.relay.test_relay import check_exactly_once_in_order
from tests.integration.relay.test_relay_kill import PARTITIONS, _kill, _start_relay
from tests.support.relay_support import (
    ROOT,
    db_ids,
    lease_holder_pid,
    ledger,
    ledger_relay,
    read_all,
    subprocess_env,
    wait_for,
    write_events,
)


def run_in_thread(relay: Relay) -> threading.Thread:
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    return thread


def stop_relays(relays: Any, threads: list[threading.Thread]) -> None:
    for relay in relays:
        relay.stop()
    for thread in threads:
        thread.join(30)


def start_pair(
    app: Any, first: Relay, second: Relay, events: int, threads: list[threading.Thread]
) -> None:
    """Run ``first`` until it published ``events`` new events, then ``second`` (standing by)."""
    threads.append(run_in_thread(first))
    write_events(app, events)
    wait_for(lambda: first.status().published == events, 30, "first relay publishes")
    threads.append(run_in_thread(second))
    wait_for(lambda: second.status().standby, 30, "second relay stands by")


def settle(relays: list[Relay], published: int, timeout: float) -> None:
    """Wait until ``relays`` published ``published`` events in all, one active, one standing by."""
    wait_for(lambda: sum(r.status().published for r in relays) >= published, timeout, "published")
    wait_for(
        lambda: sorted(r.status().standby for r in relays) == [False, True],
        30,
        "one relay active, one standing by",
    )


def test_a_second_relay_stands_by_and_takes_over_when_the_first_stops(
    postgres_db, kafka_config, create_topic
):
    topic = create_topic(partitions=3)
    app = ledger(postgres_db.env)
    registries = [CollectorRegistry(), CollectorRegistry()]  # as if in two processes
    first, second = (
        ledger_relay(
            postgres_db, kafka_config, topic, poll_interval=0.2, linger=0, registry=registry
        )
        for registry in registries
    )

    def active(registry: CollectorRegistry) -> float | None:
        return registry.get_sample_value("esbridge_relay_active", {"app": "Ledger", "topic": topic})

    threads: list[threading.Thread] = []
    try:
        start_pair(app, first, second, 100, threads)
        write_events(app, 100)
        wait_for(lambda: first.status().published == 200, 30, "first relay goes on")
        time.sleep(1.0)  # the standby had time to do harm, if it could
        assert second.status().published == 0 and second.status().standby
        assert [active(registry) for registry in registries] == [1, 0]

        first.stop()
        threads[0].join(30)
        assert not threads[0].is_alive() and first.status().error is None
        write_events(app, 100)
        wait_for(lambda: second.status().published == 100, 30, "second relay takes over")
        assert not second.status().standby and second.status().position == 300
        assert [active(registry) for registry in registries] == [0, 1]
    finally:
        stop_relays((first, second), threads)
        app.close()
    assert first.status().error is None and second.status().error is None
    check_exactly_once_in_order(read_all(kafka_config, topic, 300), db_ids(postgres_db.dsn), 3)


def test_a_relay_that_takes_no_lease_reports_itself_active(postgres_db, kafka_config, create_topic):
    topic = create_topic(partitions=1)
    app = ledger(postgres_db.env)
    registry = CollectorRegistry()
    relay = ledger_relay(postgres_db, kafka_config, topic, standby=False, registry=registry)

    def active() -> float | None:
        return registry.get_sample_value("esbridge_relay_active", {"app": "Ledger", "topic": topic})

    try:
        write_events(app, 5)
        assert relay.publish_available() == 5
        assert active() == 1 and not relay.status().standby
    finally:
        relay.close()
        app.close()
    assert active() == 0


def test_a_standby_relay_stops_when_asked(postgres_db, kafka_config, create_topic):
    topic = create_topic(partitions=1)
    ledger(postgres_db.env).close()
    first = ledger_relay(postgres_db, kafka_config, topic)
    second = ledger_relay(postgres_db, kafka_config, topic)
    try:
        first.publish_available()  # holds the lease until closed
        thread = run_in_thread(second)
        wait_for(lambda: second.status().standby, 30, "second relay stands by")
        second.stop()
        thread.join(5)
        assert not thread.is_alive(), "a standby relay did not stop within 5 s"
        assert second.status().error is None and second.status().published == 0
    finally:
        first.close()
        second.close()


def test_publish_available_refuses_to_wait_past_its_timeout_for_the_lease(
    postgres_db, kafka_config, create_topic
):
    topic = create_topic(partitions=1)
    app = ledger(postgres_db.env)
    write_events(app, 10)
    first = ledger_relay(postgres_db, kafka_config, topic)
    second = ledger_relay(postgres_db, kafka_config, topic, connect_timeout=1.5)
    try:
        assert first.publish_available() == 10
        with pytest.raises(RelayStandbyError, match=r"esbridge relay pid \d+ .*publishes"):
            second.publish_available()
        first.close()
        write_events(app, 5)
        assert second.publish_available() == 5  # the lease is free now
    finally:
        first.close()
        second.close()
        app.close()
    check_exactly_once_in_order(read_all(kafka_config, topic, 15), db_ids(postgres_db.dsn), 1)


def test_after_a_postgres_restart_one_relay_publishes_each_event_once(
    postgres_server, postgres_db, kafka_config, create_topic
):
    topic = create_topic(partitions=3)
    app = ledger(postgres_db.env)
    options: dict[str, Any] = {"poll_interval": 0.2, "linger": 0, "lease_check": 0.2}
    relays = [ledger_relay(postgres_db, kafka_config, topic, **options) for _ in range(2)]
    threads = [run_in_thread(relay) for relay in relays]
    try:
        write_events(app, 100)
        wait_for(lambda: sum(r.status().published for r in relays) == 100, 30, "published")
        postgres_server.restart()
        app.close()
        app = ledger(postgres_db.env)
        write_events(app, 100)
        settle(relays, 200, 60)
    finally:
        stop_relays(relays, threads)
        app.close()
    assert [r.status().error for r in relays] == [None, None]
    check_exactly_once_in_order(read_all(kafka_config, topic, 200), db_ids(postgres_db.dsn), 3)


class RelayPair:
    """Two ``esbridge relay`` processes of one relay id while a writer appends events.

    ``writer``: the arguments of ``relay_support write`` (events, per save,
    rate); ``settings``: relay tunings (``NAME=VALUE``) of both relays.
    """

    def __init__(
        self, postgres_db, kafka_broker, topic, tmp_path, writer: list[str], *settings: str
    ) -> None:
        self.dsn = postgres_db.dsn
        self.kafka_broker = kafka_broker
        self.topic = topic
        self.tmp_path = tmp_path
        self.settings = settings
        self.relay_id = default_relay_id("Ledger", topic)
        self.env = subprocess_env(postgres_db, kafka_broker)
        self.logs: dict[int, Path] = {}
        self._writer_log = open(tmp_path / "writer.log", "wb")  # noqa: SIM115
        self.writer = subprocess.Popen(
            [sys.executable, "-m", "tests.support.relay_support", "write", *writer],
            cwd=ROOT,
            env=self.env,
            stdout=self._writer_log,
            stderr=self._writer_log,
        )
        self.relays = [self.start(), self.start()]

    def start(self) -> subprocess.Popen[bytes]:
        path = self.tmp_path / f"relay-{len(self.logs)}.log"
        with open(path, "wb") as log_file:
            process = _start_relay(self.env, self.topic, log_file, *self.settings)
        self.logs[process.pid] = path
        return process

    def holder_pid(self) -> int | None:
        return lease_holder_pid(self.dsn, self.relay_id)

    def roles(self) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
        """(the relay holding the lease, the other one), once one holds it."""
        pid = wait_for(self.holder_pid, 60, "a relay holds the lease")
        active = next(p for p in self.relays if p.pid == pid)
        return active, next(p for p in self.relays if p is not active)

    def check_running(self) -> None:
        for p in self.relays:
            if p.poll() is not None:
                tail = self.logs[p.pid].read_text(errors="replace")[-3000:]
                raise AssertionError(f"a relay exited ({p.returncode}); its log ends:\n{tail}")

    def finish(self) -> tuple[list[Any], list[Any]]:
        """Wait for the writer, read the topic, stop both relays: (records, log rows)."""
        assert self.writer.wait(180) == 0
        expected = db_ids(self.dsn)
        records = read_all(
            self.kafka_broker.config(), self.topic, len(expected), timeout=90, quiet=3
        )
        for p in self.relays:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(30) for p in self.relays] == [0, 0]
        return records, expected

    def close(self) -> None:
        """End what still runs (frozen processes too) and check that no relay was fenced."""
        for p in [*self.relays, self.writer]:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                _kill(p)
        self._writer_log.close()

    def fenced(self) -> list[str]:
        return [path.name for path in self.logs.values() if b"fenced" in path.read_bytes()]


KILLS = 6


@pytest.mark.slow
def test_kill_9_of_the_active_relay_hands_over_to_the_standby(
    postgres_db, kafka_broker, create_topic, tmp_path
):
    """Two ``esbridge relay`` processes; the active one is killed again and again while a
    writer appends events; each time the other takes over and the killed one is started
    again (as the standby). No relay is ever fenced; each notification arrives once."""
    ledger(postgres_db.env).close()  # the tables
    topic = create_topic(partitions=PARTITIONS)
    rng = random.Random(20261201)
    pair = RelayPair(postgres_db, kafka_broker, topic, tmp_path, ["20000", "50", "800"])
    takeovers: list[float] = []
    try:
        for _ in range(KILLS):
            active, other = pair.roles()
            time.sleep(rng.uniform(0.2, 1.5))  # publishing (or starting to)
            killed = time.monotonic()
            _kill(active)
            wait_for(lambda o=other: pair.holder_pid() == o.pid, 30, "the standby takes over")
            takeovers.append(time.monotonic() - killed)
            pair.relays = [other]
            pair.check_running()
            pair.relays.append(pair.start())
        records, expected = pair.finish()
    finally:
        pair.close()
    assert not pair.fenced(), f"relays were fenced (a standby published): {pair.fenced()}"
    print(f"takeover after kill -9 (s): {', '.join(f'{t:.2f}' for t in takeovers)}")
    assert max(takeovers) < 10
    check_exactly_once_in_order(records, expected, PARTITIONS)


def test_an_idle_relay_keeps_its_lease_past_its_expiry(postgres_db, kafka_config, create_topic):
    """The lease expires when the holder stops renewing it; a relay with nothing to
    publish waits between polls (here 30 s) and must renew it meanwhile."""
    topic = create_topic(partitions=1)
    app = ledger(postgres_db.env)
    options: dict[str, Any] = {"poll_interval": 30, "lease_check": 0.5, "lease_expiry": 2}
    first, second = (ledger_relay(postgres_db, kafka_config, topic, **options) for _ in range(2))
    threads: list[threading.Thread] = []
    try:
        start_pair(app, first, second, 10, threads)
        time.sleep(6)  # three expiries of an idle first relay
        assert second.status().standby and not first.status().standby
        write_events(app, 10)  # NOTIFY wakes the first relay before its next poll
        wait_for(lambda: first.status().published == 20, 30, "first relay goes on")
        assert second.status().published == 0
    finally:
        stop_relays((first, second), threads)
        app.close()
    assert first.status().error is None and second.status().error is None
    check_exactly_once_in_order(read_all(kafka_config, topic, 20), db_ids(postgres_db.dsn), 1)


def test_a_relay_refuses_a_lease_expiry_it_could_miss(postgres_db, kafka_config):
    with pytest.raises(ConfigurationError, match=r"lease_expiry \(1 s\) must be more than twice"):
        ledger_relay(postgres_db, kafka_config, "t", lease_check=2, lease_expiry=1)
    ledger_relay(postgres_db, kafka_config, "t", lease_check=2, lease_expiry=None).close()


FREEZES = 3
EXPIRY = 4.0


@pytest.mark.slow
def test_a_frozen_relay_loses_its_lease_to_the_standby_and_stands_by_when_it_wakes(
    postgres_db, kafka_broker, create_topic, tmp_path
):
    """Two ``esbridge relay`` processes; the active one is frozen (SIGSTOP: its process and
    its connections live on, it just stops) while a writer appends events. Its lease
    expires, the standby takes over; when the frozen one is woken (SIGCONT) it finds its
    lease gone and stands by, whatever it was doing when frozen. Both keep running;
    each notification arrives once, in order."""
    ledger(postgres_db.env).close()  # the tables
    topic = create_topic(partitions=PARTITIONS)
    rng = random.Random(20261202)
    settings = ("lease_check=0.5", f"lease_expiry={EXPIRY}")
    pair = RelayPair(postgres_db, kafka_broker, topic, tmp_path, ["8000", "20", "400"], *settings)
    takeovers: list[float] = []
    try:
        for _ in range(FREEZES):
            active, other = pair.roles()
            time.sleep(rng.uniform(0.5, 2.0))  # publishing
            frozen = time.monotonic()
            os.kill(active.pid, signal.SIGSTOP)
            try:
                wait_for(lambda o=other: pair.holder_pid() == o.pid, EXPIRY + 30, "takeover")
                takeovers.append(time.monotonic() - frozen)
                time.sleep(rng.uniform(0.0, 2.0))  # the new holder publishes
            finally:
                os.kill(active.pid, signal.SIGCONT)
            log_path = pair.logs[active.pid]
            wait_for(lambda p=log_path: b"lost its lease" in p.read_bytes(), 30, "woken relay")
            time.sleep(1.0)  # what a woken relay might do wrong, it has done by now
            assert pair.holder_pid() == other.pid, "the woken relay took the lease back"
            pair.check_running()
        records, expected = pair.finish()
    finally:
        pair.close()
    print(f"takeover after SIGSTOP (s): {', '.join(f'{t:.2f}' for t in takeovers)}")
    assert min(takeovers) > EXPIRY - 1 and max(takeovers) < EXPIRY + 10
    check_exactly_once_in_order(records, expected, PARTITIONS)


def test_a_relay_that_cannot_reach_kafka_never_takes_the_lease(
    postgres_db, kafka_config, create_topic
):
    """A relay with a wrong ``bootstrap.servers`` (started first) must not keep a correct
    one standing by: it waits for its broker before it takes the lease."""
    topic = create_topic(partitions=1)
    app = ledger(postgres_db.env)
    cut_off = {**kafka_config, "bootstrap.servers": "127.0.0.1:9"}  # nothing listens there
    wrong = ledger_relay(postgres_db, cut_off, topic, poll_interval=0.2)
    right = ledger_relay(postgres_db, kafka_config, topic, poll_interval=0.2, linger=0)
    threads = [run_in_thread(wrong)]
    try:
        time.sleep(2)  # it tries its broker
        threads.append(run_in_thread(right))
        write_events(app, 20)
        wait_for(lambda: right.status().published == 20, 30, "the relay that reaches Kafka")
        assert wrong.status().published == 0
    finally:
        stop_relays((wrong, right), threads)
        app.close()
    assert right.status().error is None
    assert wrong.status().error is None  # stopped while waiting for its broker: no error
    check_exactly_once_in_order(read_all(kafka_config, topic, 20), db_ids(postgres_db.dsn), 1)


def test_a_holder_that_cannot_reach_kafka_gives_its_lease_to_the_standby(
    postgres_db, kafka_broker, create_topic
):
    """While Kafka is down the holder retries; after ``lease_yield`` seconds it gives its
    lease up and stands by, and the standby takes it (here it cannot reach Kafka either,
    so they take turns). When Kafka is back one relay publishes; each event once."""
    kafka_config = kafka_broker.config()
    topic = create_topic(partitions=2)
    app = ledger(postgres_db.env)
    options: dict[str, Any] = {
        "poll_interval": 0.2,
        "linger": 0,
        "lease_check": 0.5,
        "lease_yield": 3,
        "commit_timeout": 3,
        "init_timeout": 3,
        "max_retry_delay": 1,
    }
    relays = [ledger_relay(postgres_db, kafka_config, topic, **options) for _ in range(2)]
    threads: list[threading.Thread] = []
    holders: set[int] = set()
    try:
        start_pair(app, relays[0], relays[1], 50, threads)
        kafka_broker.stop()
        try:
            write_events(app, 50)  # the holder fails to publish these
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(holders) < 2:
                holders.update(i for i, r in enumerate(relays) if not r.status().standby)
                time.sleep(0.05)
        finally:
            kafka_broker.start()
        assert holders == {0, 1}, "the lease never passed to the standby"
        settle(relays, 100, 90)
    finally:
        stop_relays(relays, threads)
        app.close()
    assert [r.status().error for r in relays] == [None, None]
    check_exactly_once_in_order(read_all(kafka_config, topic, 100), db_ids(postgres_db.dsn), 2)


def test_a_holder_fenced_once_goes_on_and_fenced_twice_in_a_minute_stops(
    postgres_db, kafka_config, create_topic
):
    """Fenced while it holds its lease: once (a woken relay that lost its lease does that)
    the holder restarts its producer; twice within a minute, another relay publishes with
    its id without a lease, and the holder stops saying so instead of fencing for ever."""
    topic = create_topic(partitions=1)
    app = ledger(postgres_db.env)
    holder = ledger_relay(postgres_db, kafka_config, topic, poll_interval=0.2, linger=0)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            holder.run()
        except RelayFencedError as e:
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def intrude() -> None:
        intruder = ledger_relay(postgres_db, kafka_config, topic, standby=False)
        intruder.prepare()  # init_transactions with the holder's transactional.id
        intruder.close()

    try:
        write_events(app, 10)
        wait_for(lambda: holder.status().published == 10, 30, "holder publishes")
        intrude()
        write_events(app, 10)  # the holder's next transaction finds itself fenced
        wait_for(lambda: holder.status().published == 20, 30, "holder goes on")
        intrude()
        write_events(app, 10)
        thread.join(30)
        assert not thread.is_alive()
        assert raised and "fenced twice within a minute" in str(raised[0])
    finally:
        stop_relays([holder], [thread])
        app.close()
    records = read_all(kafka_config, topic, 20)
    check_exactly_once_in_order(records, db_ids(postgres_db.dsn)[:20], 1)
