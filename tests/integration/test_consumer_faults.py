"""Consumer processes killed with SIGKILL at random moments while events stream in.

``esbridge consume`` subprocesses (a consumer group on a 3-partition topic)
are killed -9, started, stopped and added (rebalances) at random moments
while a writer adds dog-school events and the relay publishes them; the
broker is restarted once and Postgres once. Afterwards every mirror must
equal its dog: each upstream event applied exactly once, in per-aggregate
order, and the follower's log holds exactly one event per upstream event.

``ESBRIDGE_FAULT_EVENTS`` sets the number of upstream events (default 10,000, so the
test stays under about 3 minutes on 2 cores; 100,000 takes longer).
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

from esbridge.consumer import tracking_names
from esbridge.partitioning import partition_for_key
from esbridge.relay import Relay
from examples.dogschool.application import DogSchool
from examples.dogschool.domainmodel import Dog
from tests.integration.consumer_apps import Mirror, verify_mirror

ROOT = Path(__file__).resolve().parents[2]
EVENTS = int(os.environ.get("ESBRIDGE_FAULT_EVENTS", "10000"))
PARTITIONS = 3
KILLS = 20


class Members:
    """The ``esbridge consume`` subprocesses of one consumer group."""

    def __init__(self, env: dict[str, str], topic: str, logdir: Path) -> None:
        self.env = env
        self.topic = topic
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def start(self) -> None:
        self.started += 1
        log = open(self.logdir / f"consumer-{self.started}.log", "wb")  # noqa: SIM115
        command = [
            sys.executable,
            "-c",
            "import sys; from esbridge.cli import main; sys.exit(main())",
            "consume",
            "consumer_apps:Mirror",
            "--app-dir",
            str(ROOT / "tests" / "integration"),
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
        self.procs.append(proc)

    def kill_one(self, rng: random.Random) -> None:
        proc = rng.choice(self.procs)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.procs.remove(proc)

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
                raise AssertionError(f"consumer {proc.pid} exited by itself with {code}")


class Writer(threading.Thread):
    """Adds dog-school events in chunks and publishes them with the relay, surviving restarts."""

    def __init__(self, env: dict[str, str], topic: str, kafka: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.env, self.topic, self.kafka = env, topic, kafka
        self.written = 0
        self.published_all = threading.Event()
        self.error: BaseException | None = None
        self.dog_ids: list[Any] = []

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the test
            self.error = e

    def _retry(self, action: Any) -> Any:
        for _ in range(120):
            try:
                return action()
            except Exception:
                time.sleep(0.5)
        return action()

    def _run(self) -> None:
        rng = random.Random(7)
        school = DogSchool(env={**self.env, "AGGREGATE_CACHE_MAXSIZE": "5000"})
        relay = Relay(
            "DogSchool", kafka_config=self.kafka, topic=self.topic, env=self.env,
            partitions=PARTITIONS,
        )  # fmt: skip
        while self.written < EVENTS:
            if len(self.dog_ids) < 2000 and rng.random() < 0.5:
                dogs = [Dog(f"dog-{len(self.dog_ids) + i}") for i in range(200)]
                self._retry(lambda dogs=dogs: school.save(*dogs))
                self.dog_ids.extend(d.id for d in dogs)
                self.written += len(dogs)
            else:
                picked = rng.sample(self.dog_ids, min(300, len(self.dog_ids)))

                def teach(picked: list[Any] = picked) -> int:
                    dogs = [school.repository.get(i) for i in picked]
                    for dog in dogs:
                        dog.add_trick(trick=f"t{rng.randrange(1000)}")
                    school.save(*dogs)
                    return len(dogs)

                self.written += self._retry(teach)
            self._retry(relay.publish_available)
        self._retry(relay.publish_available)
        relay.close()
        school.close()
        self.published_all.set()


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
            "KAFKA_SESSION_TIMEOUT_MS": "6000",
            "KAFKA_HEARTBEAT_INTERVAL_MS": "500",
            "MIRROR_AGGREGATE_CACHE_MAXSIZE": "20000",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        }
    )
    Mirror(env=postgres_db.env).close()  # create the follower's tables once
    writer = Writer(postgres_db.env, topic, kafka_config)
    members = Members(env, topic, tmp_path)
    rng = random.Random(42)
    kills = rebalances = 0
    broker_restarted = postgres_restarted = False
    started = time.monotonic()
    members.start()
    members.start()
    writer.start()
    try:
        while kills < KILLS or not writer.published_all.is_set():
            assert writer.error is None, writer.error
            elapsed = time.monotonic() - started
            assert elapsed < 150, f"stream too slow: {writer.written} events written, {kills} kills"
            time.sleep(rng.uniform(0.8, 2.5))
            members.check_alive()
            action = rng.random()
            if kills >= KILLS and writer.published_all.is_set():
                break
            if action < 0.6 and members.procs:
                members.kill_one(rng)
                kills += 1
                members.start()
            elif action < 0.8 and len(members.procs) < 4:
                members.start()  # a member joins
                rebalances += 1
            elif len(members.procs) > 1:
                members.stop_one(rng)  # a member leaves
                rebalances += 1
            if kills == 7 and not broker_restarted:
                kafka_broker.restart()
                broker_restarted = True
            if kills == 14 and not postgres_restarted:
                postgres_server.restart()
                postgres_restarted = True
        writer.join(120)
        assert writer.error is None, writer.error
        assert broker_restarted and postgres_restarted and kills >= KILLS
        while len(members.procs) < 2:
            members.start()
        school = DogSchool(env=postgres_db.env)
        mirror = Mirror(env=postgres_db.env)
        targets = partition_targets(school)
        deadline = time.monotonic() + 120
        names = tracking_names("DogSchool", PARTITIONS)
        while time.monotonic() < deadline:
            members.check_alive()
            positions = [mirror.recorder.max_tracking_id(n) or 0 for n in names]
            if positions == targets:
                break
            time.sleep(0.5)
        assert positions == targets
    finally:
        members.stop_all()
    total = school.recorder.max_notification_id()
    assert total >= EVENTS
    verify_mirror(school, mirror, writer.dog_ids)
    # Exactly one downstream event per upstream event, none more.
    assert mirror.recorder.max_notification_id() == total
    print(
        f"\n{total} events, {kills} kill -9, {rebalances} joins/leaves, broker and Postgres "
        f"restarted once, {members.started} consumer processes, "
        f"{time.monotonic() - started:.0f} s"
    )
    school.close()
    mirror.close()


def partition_targets(school: DogSchool) -> list[int]:
    """The last notification id of each partition (where each tracking position must end)."""
    last = [0] * PARTITIONS
    for n in school.recorder.select_notifications(start=1, limit=10**7):
        last[partition_for_key(str(n.originator_id).encode(), PARTITIONS)] = n.id
    return last
