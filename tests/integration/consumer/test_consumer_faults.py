"""Consumer processes killed with SIGKILL at random moments while 100,000 events stream in.

``esbridge consume`` subprocesses (a consumer group on a 3-partition topic)
are killed -9, frozen (SIGSTOP for longer than their session timeout: the
group hands their partitions to the others, and they wake up as zombies in
the middle of whatever they were doing), and members join and leave
(rebalances), at random moments spread over the whole run, while a writer
adds dog-school events and a relay (running concurrently, as in production)
publishes them; the broker is restarted once and Postgres once. The moments
are random points of the *downstream* progress, so the faults fall while the
consumers are working, from the first events to the last. Afterwards:

* every partition's tracking position is the last notification id of that
  partition (nothing lost, nothing left behind);
* every mirror equals its dog: each upstream ``TrickAdded`` (each with a
  unique trick) was applied exactly once, in the dog's order;
* the follower's log holds exactly one event per upstream event.

``ESBRIDGE_FAULT_EVENTS`` sets the number of upstream events (default 100,000).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from resource import RUSAGE_CHILDREN, RUSAGE_SELF, getrusage
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.application import AggregateNotFoundError

from esbridge.names import tracking_names
from esbridge.relay.relay import Relay
from examples.dogschool.application import DogSchool
from examples.dogschool.domainmodel import Dog
from tests.support.consumer_apps import (
    Mirror,
    count_notifications,
    partition_targets,
    verify_logs,
    verify_mirror,
)

ROOT = Path(__file__).resolve().parents[3]
EVENTS = int(os.environ.get("ESBRIDGE_FAULT_EVENTS", "100000"))
PARTITIONS = 3
KILLS = 22  # at least 20 are required; a couple more in case the last ones fall late
JOINS = LEAVES = 4
FREEZES = 4  # SIGSTOP for FREEZE_SECONDS, then SIGCONT
FREEZE_SECONDS = (4.0, 7.0)  # longer than the session timeout (3 s)
DOGS = max(20, EVENTS // 50)  # about 50 events per aggregate
CHUNK = 500  # aggregates per save(): one transaction each, ~10k events/s
TIME_LIMIT = 300.0  # seconds for the whole stream, faults included


class Members:
    """The ``esbridge consume`` subprocesses of one consumer group."""

    def __init__(self, env: dict[str, str], topic: str, logdir: Path) -> None:
        self.env = env
        self.topic = topic
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}
        self.started = 0

    def start(self) -> None:
        self.started += 1
        log = open(self.logdir / f"consumer-{self.started}.log", "wb")  # noqa: SIM115
        command = [
            sys.executable,
            "-c",
            "import sys; from esbridge.cli import main; sys.exit(main())",
            "consume",
            "tests.support.consumer_apps:Mirror",
            "--app-dir",
            str(ROOT),
            "--upstream",
            "DogSchool",
            "--topic",
            self.topic,
            "--group",
            f"{self.topic}.mirror",
            "--upstream-log",
            "--partitions",
            str(PARTITIONS),
        ]
        proc = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log, stderr=log)
        log.close()
        self.procs.append(proc)
        self.logs[proc.pid] = self.logdir / f"consumer-{self.started}.log"

    def kill_one(self, rng: random.Random) -> None:
        proc = rng.choice(self.procs)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.procs.remove(proc)

    def freeze_one(self, rng: random.Random) -> None:
        """Stop a member (SIGSTOP) until its partitions went to others, then let it go on."""
        proc = rng.choice(self.procs)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            time.sleep(rng.uniform(*FREEZE_SECONDS))
        finally:
            os.kill(proc.pid, signal.SIGCONT)

    def stop_one(self, rng: random.Random) -> None:
        proc = rng.choice(self.procs)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def check_alive(self) -> None:
        for proc in self.procs:
            code = proc.poll()
            if code is not None:
                tail = self.logs[proc.pid].read_text(errors="replace")[-6000:]
                raise AssertionError(
                    f"consumer {proc.pid} exited by itself with {code}; its log ends:\n{tail}"
                )


class Worker(threading.Thread):
    """A daemon thread whose failure the test reports."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.work()
        except BaseException as e:  # reported by the test
            self.error = e

    def work(self) -> None:
        raise NotImplementedError

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"{type(self).__name__} failed: {self.error!r}") from self.error


class Writer(Worker):
    """Writes ``EVENTS`` dog-school events, ``CHUNK`` aggregates per ``save()``.

    The dogs stay in memory (the writer is the only one changing them), so a
    step costs one transaction and no reads. Every trick is unique
    (``t<sequence>``): a lost, repeated or reordered event shows in the mirror.
    A failed save (Postgres restarting) may or may not have committed, so the
    dogs of that save are reloaded from the database before going on.
    """

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__()
        self.env = env
        self.written = 0
        self.done = threading.Event()
        self.dogs: dict[UUID, Dog] = {}

    def work(self) -> None:
        rng = random.Random(7)
        school = DogSchool(env=self.env)
        ids: list[UUID] = []
        sequence = 0
        while self.written < EVENTS:
            if len(ids) < DOGS and (len(ids) < CHUNK or rng.random() < 0.3):
                batch = [Dog(f"dog-{len(ids) + i}") for i in range(CHUNK)]
            else:
                batch = [self.dogs[i] for i in rng.sample(ids, min(CHUNK, len(ids)))]
                for dog in batch:
                    sequence += 1
                    dog.add_trick(trick=f"t{sequence}")
            try:
                school.save(*batch)
            except Exception:
                batch = self._reload(school, batch)
            else:
                self.written += len(batch)
            for dog in batch:
                if dog.id not in self.dogs:
                    ids.append(dog.id)
                self.dogs[dog.id] = dog
        school.close()
        self.done.set()

    def _reload(self, school: DogSchool, batch: list[Dog]) -> list[Dog]:
        """After an ambiguous failure: the dogs of ``batch`` as the database holds them."""
        for _ in range(600):
            try:
                stored: list[Dog] = []
                for dog in batch:
                    # A new dog whose save rolled back is not found.
                    with contextlib.suppress(AggregateNotFoundError):
                        stored.append(school.repository.get(dog.id))
                self.written = school.recorder.max_notification_id() or 0
                return stored
            except Exception:
                time.sleep(0.2)
        raise AssertionError("Postgres did not come back within 2 minutes")


class RelayThread(Worker):
    """``Relay.run()`` for the dog school: publishes as the writer writes, retrying faults."""

    def __init__(self, env: dict[str, str], topic: str, kafka: dict[str, Any]) -> None:
        super().__init__()
        self.relay = Relay(
            "DogSchool", kafka_config=kafka, topic=topic, env=env, partitions=PARTITIONS,
            max_retry_delay=1.0,
        )  # fmt: skip

    def work(self) -> None:
        self.relay.run()

    def position(self) -> int:
        return self.relay.status().position


def fault_plan(rng: random.Random) -> list[tuple[float, str]]:
    """The faults, each at a random point of the downstream progress (0..1), in order.

    Each kind of fault is spread evenly (one random point per equal slice of
    the run), so kills fall from the first events to the last.
    """

    def spread(count: int, action: str, low: float = 0.02, high: float = 0.95) -> list:
        width = (high - low) / count
        return [(low + (i + rng.random()) * width, action) for i in range(count)]

    plan = spread(KILLS, "kill") + spread(JOINS, "join") + spread(LEAVES, "leave")
    plan += spread(FREEZES, "freeze")
    plan += [(rng.uniform(0.25, 0.4), "broker"), (rng.uniform(0.55, 0.7), "postgres")]
    return sorted(plan)


@pytest.mark.slow
def test_kill_consumers_restart_broker_and_postgres(
    postgres_server: Any,
    postgres_db: Any,
    kafka_broker: Any,
    create_topic: Any,
    kafka_config: dict[str, Any],
    tmp_path: Path,
) -> None:
    topic = create_topic(partitions=PARTITIONS)
    env = dict(os.environ)
    env.update(postgres_db.env)
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
            # A killed member holds its partitions until its session times out.
            "KAFKA_SESSION_TIMEOUT_MS": "3000",
            "KAFKA_HEARTBEAT_INTERVAL_MS": "300",
            # Small prefetch: with librdkafka's default (64 MB) a member owning two
            # partitions drains one's whole backlog before the other's (its queue is
            # FIFO), so one partition lags and finishes alone at the end.
            "KAFKA_QUEUED_MAX_MESSAGES_KBYTES": "1024",
            "KAFKA_MAX_PARTITION_FETCH_BYTES": "131072",
            "MIRROR_AGGREGATE_CACHE_MAXSIZE": str(2 * DOGS),
            "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        }
    )
    DogSchool(env=postgres_db.env).close()  # creates the tables before the relay reads them
    mirror = Mirror(env=postgres_db.env)  # creates the follower's tables once
    writer = Writer(postgres_db.env)
    relay = RelayThread(postgres_db.env, topic, {**kafka_config, "log_level": 2})
    members = Members(env, topic, tmp_path)
    rng = random.Random(42)
    plan = fault_plan(rng)
    done: dict[str, int] = dict.fromkeys(
        ["kill", "freeze", "join", "leave", "broker", "postgres"], 0
    )
    downstream = 0
    started = time.monotonic()

    def progress() -> int:
        """Downstream events recorded: one per upstream event processed."""
        nonlocal downstream
        with contextlib.suppress(Exception):  # Postgres restarting: keep the last figure
            downstream = mirror.recorder.max_notification_id() or 0
        return downstream

    def kill() -> None:
        members.kill_one(rng)
        members.start()  # the replacement joins

    actions: dict[str, Callable[[], None]] = {
        "kill": kill,
        "join": members.start,
        "leave": lambda: members.stop_one(rng),
        "freeze": lambda: members.freeze_one(rng),
        "broker": lambda: kafka_broker.restart(),
        "postgres": lambda: postgres_server.restart(),
    }

    def report() -> None:
        """A line of progress (shown with -s, or when the test fails)."""
        positions = "?"
        with contextlib.suppress(Exception):
            positions = str([mirror.recorder.max_tracking_id(n) or 0 for n in names])
        print(
            f"{time.monotonic() - started:5.0f} s: written {writer.written}, published "
            f"{relay.position()}, processed {downstream}, positions {positions}, "
            f"{len(members.procs)} members, faults {done}",
            flush=True,
        )

    names = tracking_names("DogSchool", PARTITIONS)
    next_report = started + 10
    members.start()
    members.start()
    writer.start()
    relay.start()
    try:
        while plan:
            writer.check()
            relay.check()
            members.check_alive()
            elapsed = time.monotonic() - started
            assert elapsed < TIME_LIMIT, (
                f"stream too slow: {writer.written} events written, {relay.position()} "
                f"published, {downstream} processed, faults done {done} after {elapsed:.0f} s"
            )
            time.sleep(rng.uniform(0.2, 0.8))
            if time.monotonic() >= next_report:
                next_report += 10
                report()
            if progress() < plan[0][0] * EVENTS:
                continue
            _, action = plan.pop(0)
            if action == "join" and len(members.procs) >= 4:
                continue
            if action == "leave" and len(members.procs) <= 2:
                continue
            actions[action]()
            done[action] += 1
        assert done["kill"] >= 20 and done["freeze"] == FREEZES, done
        assert done["broker"] == done["postgres"] == 1, done
        assert writer.done.wait(TIME_LIMIT - (time.monotonic() - started)), "writer too slow"
        writer.check()
        school = DogSchool(env=postgres_db.env)
        total = school.recorder.max_notification_id() or 0
        assert total >= EVENTS
        while relay.position() < total:
            relay.check()
            assert time.monotonic() - started < TIME_LIMIT, "relay too slow"
            time.sleep(0.2)
        relay.relay.stop()
        relay.join(60)
        relay.check()
        targets = partition_targets(school, PARTITIONS)
        while True:
            members.check_alive()
            positions = [mirror.recorder.max_tracking_id(n) or 0 for n in names]
            if positions == targets:
                break
            elapsed = time.monotonic() - started
            assert elapsed < TIME_LIMIT, f"consumers too slow: at {positions} of {targets}"
            if time.monotonic() >= next_report:
                next_report += 10
                progress()
                report()
            time.sleep(0.3)
    finally:
        members.stop_all()
        relay.relay.stop()
    streamed = time.monotonic() - started
    assert verify_logs(school, mirror) == len(writer.dogs)
    verify_mirror(school, mirror, random.Random(1).sample(sorted(writer.dogs), 100))
    # Exactly one downstream event per upstream event, none more (counted, not taken
    # from the highest id: rolled-back batches leave gaps in the follower's ids).
    assert count_notifications(mirror) == count_notifications(school)
    own, children = (getrusage(who) for who in (RUSAGE_SELF, RUSAGE_CHILDREN))
    print(
        f"\n{total} events, {done['kill']} kill -9, {done['freeze']} freezes, "
        f"{done['join']} joins and {done['leave']} "
        f"leaves, broker and Postgres restarted once, {members.started} consumer processes, "
        f"streamed in {streamed:.0f} s, verified in {time.monotonic() - started - streamed:.0f} s"
        f"; CPU: this process {own.ru_utime + own.ru_stime:.0f} s, its finished children "
        f"(consumers, stopped servers) {children.ru_utime + children.ru_stime:.0f} s"
    )
    school.close()
    mirror.close()
