"""Chaos run: events through relay → 3-broker cluster → consumer → follower, under kill -9.

    python bench/chaos.py [--events 1000000] [--kills 50] [--rate 5000] [--seed 1]

Servers: a local PostgreSQL server (fsync on) and a local Kafka cluster of 3
KRaft brokers (replication factor 3, ``min.insync.replicas=2``), on 127.0.0.1.
Processes: two ``esbridge relay`` processes of the dog school (one publishes,
the other stands by on the relay id's lease) and two ``esbridge consume``
processes of the mirror in one consumer group, 3 partitions, exactly once.
This process writes the dog school's events (dogs registered, then tricks,
200 aggregates a transaction, at about ``--rate`` events a second) while it
kills, every 1 to 4 s, a random relay, consumer or broker with SIGKILL and starts
it again after a pause (one broker down at a time), and once restarts
PostgreSQL (immediate shutdown, crash recovery). A save that fails while
Postgres is down is retried on aggregates read back from the database.

At the end it waits until the follower's tracking position on each partition
is that partition's last notification id, then checks: every dog's tricks
were applied to its mirror exactly once and in order (contiguous versions on
both sides), the follower's log holds exactly one event per upstream event,
and no process stopped on its own. It prints what it did and the verdict.
Everything it started is ended by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esbridge.names import tracking_names
from esbridge.testing import make_postgres
from esbridge.testing.kafka_cluster import LocalKafkaCluster
from examples.dogschool.application import DogSchool
from examples.dogschool.domainmodel import Dog
from tests.support.consumer_apps import (
    Mirror,
    count_notifications,
    partition_targets,
    verify_logs,
)

ROOT = Path(__file__).resolve().parent.parent
ESBRIDGE = str(Path(sys.executable).parent / "esbridge")
PARTITIONS = 3
CHUNK = 200  # aggregates a transaction
TRICKS = 49  # per dog: 50 events a dog


class Worker:
    """An ``esbridge`` subprocess that this run kills and starts again."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log_path = logs / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, cwd=ROOT, stdout=log, stderr=log
            )

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def check(self) -> None:
        """Raise if the process stopped by itself (only this run may end it)."""
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"{self.name} exited ({self.process.returncode}) by itself:\n{tail}")

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            return self.process.wait()


class Writer(threading.Thread):
    """Writes ``dogs`` dogs, then ``TRICKS`` tricks each, at about ``rate`` events a second."""

    def __init__(self, env: dict[str, str], dogs: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.env, self.dogs, self.rate = env, dogs, rate
        self.written = 0
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._write()
        except BaseException as e:  # reported by the main thread
            self.error = e

    def _write(self) -> None:
        school = DogSchool(env=self.env)
        started = time.monotonic()
        dogs: dict[Any, Dog] = {}  # each dog as last saved
        for start in range(0, self.dogs, CHUNK):
            batch = [Dog(f"dog-{i}") for i in range(start, min(self.dogs, start + CHUNK))]
            school, saved = self._save(school, batch, lambda: [])
            dogs.update((d.id, d) for d in saved)
            self._pace(started, len(batch))
        ids = list(dogs)
        for round_ in range(TRICKS):
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                batch = [dogs[i] for i in chunk]
                for dog in batch:
                    dog.add_trick(trick=f"trick-{round_}")
                school, saved = self._save(school, batch, lambda c=chunk: self._reread(c))
                dogs.update((d.id, d) for d in saved)
                self._pace(started, len(chunk))
        school.close()

    def _save(self, school: DogSchool, batch: list[Dog], again: Any) -> tuple[DogSchool, list[Dog]]:
        """Save ``batch``; while Postgres is down, wait and save ``again()``'s aggregates
        (read back from the database: a failed save may have committed)."""
        for _ in range(300):
            try:
                school.save(*batch)
                return school, batch
            except Exception:  # Postgres restarting: read the truth back, then try again
                self.retries += 1
                time.sleep(1.0)
                with contextlib.suppress(Exception):
                    school.close()
                school = self._reopen()
                reread = again()
                if reread:  # the trick again, on aggregates as the database has them
                    for dog in reread:
                        dog.add_trick(trick=f"retried-{self.retries}")
                    batch = reread
                else:  # dogs registered again (a committed first try only adds dogs)
                    batch = [Dog(f"dog-retried-{self.retries}-{i}") for i in range(len(batch))]
        raise RuntimeError("a save failed for 5 minutes: Postgres did not come back")

    def _reopen(self) -> DogSchool:
        while True:
            try:
                return DogSchool(env=self.env)
            except Exception:
                time.sleep(1.0)

    def _reread(self, chunk: list[Any]) -> list[Dog]:
        while True:
            school = self._reopen()
            try:
                return [school.repository.get(i) for i in chunk]
            except Exception:
                time.sleep(1.0)
            finally:
                school.close()

    def _pace(self, started: float, count: int) -> None:
        self.written += count
        ahead = started + self.written / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--kills", type=int, default=50, help="kill -9 of relays, consumers, brokers"
    )
    parser.add_argument("--rate", type=float, default=5000.0, help="events written a second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="for the follower to catch up"
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    dogs = max(1, args.events // (1 + TRICKS))
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"esbridge-chaos-{os.getpid()}"
    logs.mkdir(parents=True)
    print(f"chaos run: {dogs * (1 + TRICKS):,} events, {args.kills} kills, logs in {logs}")
    postgres = make_postgres(fsync=True)
    cluster = LocalKafkaCluster()
    workers: list[Worker] = []
    try:
        cluster.start()
        print(f"  {postgres.describe()}\n  {cluster.describe()}", flush=True)
        db = postgres.create_database()
        DogSchool(env=db.env).close()  # the tables
        Mirror(env=db.env).close()
        topic = cluster.create_topic(partitions=PARTITIONS)
        env = {
            **os.environ,
            **db.env,
            "KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap_servers,
            "PYTHONPATH": str(ROOT),
        }
        relay = [ESBRIDGE, "--log-level", "WARNING", "relay"]
        relay += ["examples.dogschool.application:DogSchool", "--topic", topic]
        relay += ["--partitions", str(PARTITIONS), "--set", "lease_expiry=10"]
        consume = [ESBRIDGE, "--log-level", "WARNING", "consume"]
        consume += ["tests.support.consumer_apps:Mirror", "--upstream", "DogSchool"]
        consume += ["--topic", topic, "--group", f"{topic}.mirror", "--upstream-log"]
        workers = [Worker(f"relay-{i}", relay, env, logs) for i in range(2)]
        # A member killed -9 holds its partitions until its session times out: 6 s, not 45.
        consumer_env = {**env, "KAFKA_SESSION_TIMEOUT_MS": "6000"}
        workers += [Worker(f"consumer-{i}", consume, consumer_env, logs) for i in range(2)]
        for w in workers:
            w.start()
        writer = Writer(dict(db.env), dogs, args.rate)
        started = time.monotonic()
        writer.start()
        done: Counter[str] = Counter()
        postgres_at = rng.randrange(args.kills // 4, args.kills * 3 // 4)
        for n in range(args.kills):
            time.sleep(rng.uniform(1.0, 4.0))
            for w in workers:
                w.check()
            if n == postgres_at:
                postgres.restart(kill=True)
                done["postgres restart"] += 1
            kind = rng.choice(["relay", "consumer", "broker"])
            if kind == "broker":
                node = rng.choice(cluster.running())
                cluster.kill(node)
                time.sleep(rng.uniform(1.0, 5.0))
                cluster.start_broker(node)
            else:
                victim = rng.choice([w for w in workers if w.name.startswith(kind)])
                victim.kill()
                time.sleep(rng.uniform(0.2, 2.0))
                victim.start()
            done[f"kill -9 {kind}"] += 1
            print(
                f"  {time.monotonic() - started:6.1f} s  kill -9 {kind}; written {writer.written:,}"
            )
        writer.join()
        if writer.error is not None:
            raise SystemExit(f"the writer failed: {writer.error!r}")
        chaos_seconds = time.monotonic() - started
        school, mirror = DogSchool(env=db.env), Mirror(env=db.env)
        try:
            targets = partition_targets(school, PARTITIONS)
            names = tracking_names("DogSchool", PARTITIONS)
            deadline = time.monotonic() + args.timeout
            while [mirror.recorder.max_tracking_id(t) or 0 for t in names] != targets:
                for w in workers:
                    w.check()
                if time.monotonic() > deadline:
                    raise SystemExit(f"not caught up after {args.timeout} s: {targets}")
                time.sleep(1.0)
            total = time.monotonic() - started
            upstream, downstream = count_notifications(school), count_notifications(mirror)
            try:
                checked = verify_logs(school, mirror)
            except AssertionError as e:
                print(f"VERDICT: FAILED (a mirror differs from its dog: {e})")
                return 1
        finally:
            school.close()
            mirror.close()
        codes = [w.stop() for w in workers]
        print()
        print(f"what it did: {', '.join(f'{v} {k}' for k, v in sorted(done.items()))}")
        print(f"  the writer retried {writer.retries} saves while Postgres restarted")
        print(
            f"events: {upstream:,} upstream, {downstream:,} in the follower; {checked:,} dogs "
            f"mirrored exactly once, in order; tracking = last id on all {PARTITIONS} partitions"
        )
        print(
            f"time: {chaos_seconds:.0f} s of chaos, caught up after {total:.0f} s "
            f"({upstream / total:,.0f} events/s end to end); exit codes {codes}"
        )
        if downstream != upstream:
            print(f"VERDICT: FAILED ({downstream - upstream:+,} events)")
            return 1
        print("VERDICT: exactly once: 0 lost, 0 duplicated, order per aggregate kept")
        return 0
    finally:
        for w in workers:
            w.stop()
        cluster.close()
        postgres.close()


if __name__ == "__main__":
    sys.exit(main())
