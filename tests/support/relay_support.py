"""Helpers of the relay tests: a small application, a writer, a plain Kafka reader.

Runnable as a writer subprocess::

    python -m tests.support.relay_support write COUNT [PER_SAVE] [RATE]

(the ``POSTGRES_*`` settings come from the environment).
"""

from __future__ import annotations

import os
import random
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from confluent_kafka import Consumer, KafkaError, TopicPartition
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from esbridge.kafka.partitioning import partition_for_key

if TYPE_CHECKING:
    from esbridge.relay.relay import Relay

APP_NAME = "Ledger"
ROOT = Path(__file__).resolve().parents[2]
ESBRIDGE = str(Path(sys.executable).parent / "esbridge")


class Account(Aggregate):
    """An account that is credited: its events are ~200 bytes as JSON."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0

    @event("Credited")
    def credit(self, amount: int, note: str) -> None:
        self.balance += amount


class Ledger(Application):
    name = APP_NAME


def ledger(env: Mapping[str, str]) -> Ledger:
    return Ledger(env=dict(env))


def ledger_relay(
    postgres_db: Any, kafka_config: dict[str, Any], topic: str, **options: Any
) -> Relay:
    """A relay of the ledger's log in ``postgres_db`` to ``topic`` (``options`` as Relay takes)."""
    from esbridge.relay.relay import Relay  # not at the top: the writer subprocess does not need it

    return Relay(APP_NAME, kafka_config=kafka_config, topic=topic, env=postgres_db.env, **options)


def publish_and_close(relay: Relay) -> int:
    """Publish what the log holds now, then close the relay (also when publishing fails)."""
    try:
        return relay.publish_available()
    finally:
        relay.close()


def subprocess_env(postgres_db: Any, kafka_broker: Any) -> dict[str, str]:
    """The environment of an ``esbridge`` command run against the test servers."""
    env = dict(os.environ)
    env.update(postgres_db.env)
    env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_broker.bootstrap_servers
    env["PYTHONPATH"] = str(ROOT)
    return env


def write_events(
    app: Ledger,
    count: int,
    *,
    accounts: int = 50,
    per_save: int = 100,
    rate: float | None = None,
    note_size: int = 40,
) -> int:
    """Append ``count`` events (account creations, then credits), ``per_save`` per transaction."""
    note = "x" * note_size
    pool: list[Account] = []
    written = 0
    started = time.monotonic()
    while written < count:
        n = min(per_save, count - written)
        batch: list[Account] = []
        in_batch: set[int] = set()
        for _ in range(n):
            if len(pool) < accounts:
                account = Account(owner=f"owner-{len(pool)}")
                pool.append(account)
            else:
                account = random.choice(pool)
                if id(account) in in_batch:
                    account = Account(owner="extra")
                else:
                    account.credit(amount=1, note=note)
            in_batch.add(id(account))
            batch.append(account)
        app.save(*batch)
        written += n
        if rate:
            ahead = written / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    return written


def rolled_back_insert(dsn: str, table: str = "ledger_events", rows: int = 1) -> None:
    """Insert events and roll back: leaves a permanent gap in the notification ids."""
    with psycopg.connect(dsn) as conn:
        with conn.cursor() as cur:
            for _ in range(rows):
                cur.execute(
                    f"INSERT INTO {table} (originator_id, originator_version, topic, state) "
                    "VALUES (%s, 1, 'x:Y', %s)",
                    (uuid.uuid4(), b"{}"),
                )
        conn.rollback()


def db_ids(dsn: str, table: str = "ledger_events") -> list[tuple[int, str, int]]:
    """(notification id, originator id, version) of every stored event, in id order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"SELECT notification_id, originator_id::text, originator_version FROM {table} "
            "ORDER BY notification_id"
        ).fetchall()
    return [(int(a), str(b), int(c)) for a, b, c in rows]


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]


def read_all(
    config: Mapping[str, Any],
    topic: str,
    expected: int | None = None,
    *,
    timeout: float = 60.0,
    quiet: float = 2.0,
    isolation: str = "read_committed",
) -> list[Record]:
    """Every message of ``topic`` (all partitions, from the start) with a plain consumer.

    Stops at ``expected`` messages (then waits ``quiet`` seconds more for
    extras), or when ``timeout`` passes.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": config["bootstrap.servers"],
            "group.id": f"relay-test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": isolation,
            "auto.offset.reset": "earliest",
        }
    )
    records: list[Record] = []
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        deadline = time.monotonic() + timeout
        reached: float | None = None
        while time.monotonic() < deadline:
            if reached is not None and time.monotonic() - reached > quiet:
                break
            for msg in consumer.consume(10000, 0.2):
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(error)
                headers = {k: (v or b"").decode() for k, v in msg.headers() or ()}
                records.append(
                    Record(msg.partition(), msg.offset(), msg.key(), msg.value(), headers)
                )
            if expected is not None and reached is None and len(records) >= expected:
                reached = time.monotonic()
    finally:
        consumer.close()
    return records


def check_exactly_once_in_order(
    records: list[Record], expected: list[tuple[int, str, int]], partitions: int
) -> None:
    """Each stored event once, on its key's partition, in id order, with an unbroken chain."""
    nids = [int(r.headers["esb_nid"]) for r in records]
    assert len(nids) == len(set(nids)), "duplicates"
    assert sorted(nids) == [e[0] for e in expected], "missing or extra notifications"
    by_nid = {e[0]: e for e in expected}
    per_partition: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        per_partition[r.partition].append(r)
    for partition, recs in per_partition.items():
        recs.sort(key=lambda r: r.offset)
        prev = 0
        for r in recs:
            nid = int(r.headers["esb_nid"])
            assert nid > prev, f"partition {partition}: {nid} after {prev}"
            assert int(r.headers["esb_prev_nid"]) == prev, "broken esb_prev_nid chain"
            _, originator, version = by_nid[nid]
            assert r.key == originator.encode()
            assert partition_for_key(r.key, partitions) == partition
            assert int(r.headers["esb_version"]) == version
            prev = nid


def lease_holder(dsn: str, relay_id: str) -> str | None:
    """Who holds ``relay_id``'s lease (:func:`esbridge.relay.lease.lease_holder`), if any."""
    from esbridge.relay.lease import lease_holder as holder

    with psycopg.connect(dsn, autocommit=True) as conn:
        return holder(conn, relay_id)


def lease_holder_pid(dsn: str, relay_id: str) -> int | None:
    """The PID of the ``esbridge relay`` process holding ``relay_id``'s lease, if any."""
    name = lease_holder(dsn, relay_id) or ""
    return int(name.split()[3]) if name.startswith("esbridge relay pid ") else None


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout} s")


def main(argv: list[str]) -> int:
    if argv[:1] != ["write"]:
        print(__doc__, file=sys.stderr)
        return 2
    count = int(argv[1])
    per_save = int(argv[2]) if len(argv) > 2 else 100
    rate = float(argv[3]) if len(argv) > 3 else None
    app = ledger(os.environ)
    written = 0
    while written < count:
        try:
            written += write_events(app, min(1000, count - written), per_save=per_save, rate=rate)
        except Exception as e:  # Postgres restarted: reconnect (a save may or may not commit)
            print(f"writer: {type(e).__name__}: {e}; retrying", file=sys.stderr, flush=True)
            time.sleep(0.5)
            app = ledger(os.environ)
    print(f"wrote {written}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
