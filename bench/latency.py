"""Latency from a commit in Postgres to its effect, against a bare producer/consumer pair.

    python bench/latency.py [--rates 100,500,1000] [--seconds 10] [--runs 1]
                            [--relay-set NAME=VALUE ...] [--consumer-set NAME=VALUE ...]

Starts its own PostgreSQL and Kafka (esbridge.testing; or external servers named
by ESBRIDGE_POSTGRES_DSN / ESBRIDGE_KAFKA_BOOTSTRAP). For each offered rate
(events/s, 10 events per Postgres transaction), in the same run:

* **esbridge**: an application commits events at that rate; a relay (payload mode,
  exactly once, 1 partition) publishes them; a ``read_committed`` consumer in this
  process notes when each becomes visible (commit -> visible), and a
  :class:`~esbridge.consumer.ConsumerAdapter` in another process feeds a follower
  that saves one aggregate per event and notes when each batch committed in its
  own Postgres (commit -> downstream commit). The relay's steps are timed too,
  which gives the breakdown: wake-up (commit -> the relay's step starts), read +
  produce (-> its transaction commit starts), Kafka commit (-> commit returns),
  fetch (-> visible), consume + downstream commit (-> committed downstream);
* **floor**: a bare, non-transactional confluent-kafka producer sending the same
  number of messages at the same rate (default settings, ``linger.ms=0``), a
  ``read_uncommitted`` consumer in this process, and one in another process that
  commits a Postgres transaction (an INSERT of the batch's keys) per batch it gets.

Prints p50/p99/p999 (ms) of each, the ratio esbridge/floor, and the breakdown's
medians. Each rate runs ``--seconds`` (short: the numbers are for comparison
within one run, on a shared machine they are noisy); ``--runs`` repeats and
reports the median of each percentile.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate
from eventsourcing.system import ProcessApplication

from esbridge import wire
from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.processing.application_sink import ProcessApplicationSink
from esbridge.relay.payloads import PayloadPublishing
from esbridge.relay.publisher import KafkaPublisher
from esbridge.relay.relay import Relay

APP = "LatencyLog"
PER_TRANSACTION = 10


class Account(Aggregate):
    """An upstream aggregate: one ``Created`` event per account."""


class Seen(Aggregate):
    """The follower's effect: one aggregate per upstream event."""

    def __init__(self, upstream_id: str) -> None:
        self.upstream_id = upstream_id


class LatencyLog(Application):
    name = APP


class Mirror(ProcessApplication):
    """A follower that saves one aggregate per upstream event (a realistic policy)."""

    name = "Mirror"

    def policy(self, domain_event: Any, processing_event: Any) -> None:
        processing_event.collect_events(Seen(str(domain_event.originator_id)))


# -- the relay's steps, timed ---------------------------------------------------------

#: (step started, commit started, commit returned, last notification id), wall clock.
STEPS: list[tuple[float, float, float, int]] = []
_step_started = threading.local()


def time_relay_steps() -> None:
    """Wrap the relay's step and commit to note when each transaction started and ended."""
    step, commit = PayloadPublishing.step, KafkaPublisher.commit

    def timed_step(self: PayloadPublishing) -> int:
        _step_started.t = time.time()
        return step(self)

    def timed_commit(self: KafkaPublisher) -> int:
        started = time.time()
        count = commit(self)
        if count:
            step_started = getattr(_step_started, "t", started)
            STEPS.append((step_started, started, time.time(), self.committed.nid))
        return count

    PayloadPublishing.step = timed_step  # type: ignore[method-assign]
    KafkaPublisher.commit = timed_commit  # type: ignore[method-assign]


# -- the downstream process -----------------------------------------------------------


class NotingSink:
    """The consumer's default sink, noting when each upstream key's batch committed."""

    def __init__(self, follower: Any) -> None:
        self.inner = ProcessApplicationSink(follower)
        self.committed: dict[str, float] = {}

    def position(self, tracking_name: str) -> int:
        return self.inner.position(tracking_name)

    def apply(self, steps: Any, expected: Any) -> None:
        self.inner.apply(steps, expected)
        now = time.time()
        for step in steps:
            self.committed[step.key] = now

    def __getattr__(self, name: str) -> Any:  # dead_letters, ...
        return getattr(self.inner, name)


def downstream(kind: str, args: dict[str, Any], q: Any, stop: Any) -> None:
    """Another process: consume the topic and commit in Postgres; report commit times."""
    kafka = {"bootstrap.servers": args["bootstrap"]}
    if kind == "esbridge":
        follower = Mirror(env=args["env"])
        sink = NotingSink(follower)
        adapter = ConsumerAdapter(
            follower,
            upstream=APP,
            topic=args["topic"],
            kafka_config={**kafka, **args["consumer_set"]},
            group_id=f"lat-{uuid.uuid4().hex}",
            sink=sink,
        )
        thread = threading.Thread(target=adapter.run)
        thread.start()
        q.put("ready")
        stop.wait()
        adapter.stop()
        thread.join(30)
        follower.close()
        q.put(json.dumps(sink.committed))
        return
    consumer = Consumer(
        {**kafka, "group.id": f"floor-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(args["topic"], 0, 0)])
    committed: dict[str, float] = {}
    with psycopg.connect(args["dsn"]) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS floor_seen (key text)")
        conn.commit()
        q.put("ready")
        while not stop.is_set():
            first = consumer.poll(0.2)
            if first is None:
                continue
            messages = [first, *consumer.consume(999, 0)]
            keys = [m.key().decode() for m in messages if m.error() is None and m.key()]
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO floor_seen VALUES (%s)", [(k,) for k in keys])
            conn.commit()
            now = time.time()
            committed.update((k, now) for k in keys)
    consumer.close()
    q.put(json.dumps(committed))


# -- one rate ---------------------------------------------------------------------------


class Visibility:
    """A consumer thread in this process noting when each key became visible."""

    def __init__(self, kafka: dict[str, Any], topic: str, isolation: str) -> None:
        self.consumer = Consumer(
            {
                **kafka,
                "group.id": f"vis-{uuid.uuid4().hex}",
                "isolation.level": isolation,
                "fetch.wait.max.ms": 5,
                "enable.auto.commit": False,
            }
        )
        self.consumer.assign([TopicPartition(topic, 0, 0)])
        self.seen: dict[str, tuple[float, int]] = {}  # key -> (time, notification id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        # poll() returns at the first message; consume(n, timeout) would wait the whole
        # timeout unless n messages came, adding up to it to every measurement.
        while not self._stop.is_set():
            first = self.consumer.poll(0.05)
            if first is None:
                continue
            for m in (first, *self.consumer.consume(999, 0)):
                if m.error() is None and m.key():
                    nid = wire.headers_dict(m.headers()).get(wire.H_NID) or "0"  # type: ignore[arg-type]
                    self.seen[m.key().decode()] = (time.time(), int(nid))  # type: ignore[union-attr]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


def offer(rate: int, seconds: float, write: Callable[[], list[str]]) -> dict[str, float]:
    """Call ``write`` (``PER_TRANSACTION`` events) at ``rate`` events/s; key -> commit time."""
    committed: dict[str, float] = {}
    start, sent = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        keys = write()
        now = time.time()
        committed.update((k, now) for k in keys)
        sent += len(keys)
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    return committed


def wait_for(seen: Callable[[], int], count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while seen() < count and time.monotonic() < deadline:
        time.sleep(0.05)


def start_downstream(kind: str, args: dict[str, Any]) -> tuple[Any, Any, Any]:
    ctx = multiprocessing.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=downstream, args=(kind, args, q, stop))
    proc.start()
    if q.get(timeout=120) != "ready":
        raise RuntimeError("downstream process did not start")
    time.sleep(3 if kind == "esbridge" else 0.5)  # joined its group, first fetch made
    return proc, q, stop


def stop_downstream(proc: Any, q: Any, stop: Any, expected: int) -> dict[str, float]:
    stop.set()
    result: dict[str, float] = json.loads(q.get(timeout=60))
    proc.join(30)
    return result


def esbridge_run(
    postgres: Any, broker: Any, rate: int, seconds: float, relay_set: dict[str, Any],
    consumer_set: dict[str, Any], producer_set: dict[str, Any],
) -> dict[str, list[float]]:  # fmt: skip
    db, follower_db = postgres.create_database(), postgres.create_database()
    env = dict(db.env)
    follower_env = {
        **follower_db.env,
        **{f"{APP.upper()}_{k}": v for k, v in env.items() if k.startswith("POSTGRES_")},
    }
    kafka = broker.config()
    topic = str(broker.create_topic(partitions=1))
    app = LatencyLog(env=env)
    producer = {**kafka, **producer_set}
    relay = Relay(APP, kafka_config=producer, topic=topic, env=env, partitions=1, **relay_set)
    relay.prepare()
    down = start_downstream(
        "esbridge",
        {"bootstrap": broker.bootstrap_servers, "env": follower_env, "topic": topic,
         "consumer_set": consumer_set},
    )  # fmt: skip
    visible = Visibility(kafka, topic, "read_committed")
    relay_thread = threading.Thread(target=relay.run)
    relay_thread.start()
    STEPS.clear()

    def write() -> list[str]:
        accounts = [Account() for _ in range(PER_TRANSACTION)]
        app.save(*accounts)
        return [str(a.id) for a in accounts]

    try:
        committed = offer(rate, seconds, write)
        wait_for(lambda: len(visible.seen), len(committed))
    finally:
        relay.stop()
        relay_thread.join(10)
        visible.close()
        app.close()
    time.sleep(1.0)  # the downstream consumer's last batch
    done = stop_downstream(*down, expected=len(committed))
    return breakdown(committed, visible.seen, done)


def breakdown(
    committed: dict[str, float], visible: dict[str, tuple[float, int]], done: dict[str, float]
) -> dict[str, list[float]]:
    """Per-event durations (s): end to end, and each part along the path."""
    steps = sorted(STEPS, key=lambda s: s[3])
    ends = [s[3] for s in steps]
    parts: dict[str, list[float]] = {
        k: [] for k in ("visible", "downstream", "wake", "produce", "commit", "fetch", "consume")
    }
    import bisect

    for key, t0 in committed.items():
        if key in visible:
            t_vis, nid = visible[key]
            parts["visible"].append(t_vis - t0)
            i = bisect.bisect_left(ends, nid)
            if i < len(steps):
                started, commit_started, commit_ended, _ = steps[i]
                parts["wake"].append(max(0.0, started - t0))
                parts["produce"].append(commit_started - max(started, t0))
                parts["commit"].append(commit_ended - commit_started)
                parts["fetch"].append(t_vis - commit_ended)
            if key in done:
                parts["consume"].append(done[key] - t_vis)
        if key in done:
            parts["downstream"].append(done[key] - t0)
    return parts


def floor_run(postgres: Any, broker: Any, rate: int, seconds: float) -> dict[str, list[float]]:
    db = postgres.create_database()
    kafka = broker.config()
    topic = str(broker.create_topic(partitions=1))
    down = start_downstream(
        "bare", {"bootstrap": broker.bootstrap_servers, "dsn": db.dsn, "topic": topic}
    )
    visible = Visibility(kafka, topic, "read_uncommitted")
    producer = Producer({**kafka, "linger.ms": 0})
    value = b"x" * 200

    def write() -> list[str]:
        keys = [str(uuid.uuid4()) for _ in range(PER_TRANSACTION)]
        for k in keys:
            producer.produce(topic, value, k.encode(), 0)
        producer.poll(0)
        return keys

    try:
        committed = offer(rate, seconds, write)
        producer.flush(10)
        wait_for(lambda: len(visible.seen), len(committed))
    finally:
        visible.close()
    time.sleep(0.5)
    done = stop_downstream(*down, expected=len(committed))
    return {
        "visible": [visible.seen[k][0] - t for k, t in committed.items() if k in visible.seen],
        "downstream": [done[k] - t for k, t in committed.items() if k in done],
    }


# -- report ---------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    """p50, p99, p999 in ms."""
    if not values:
        return (float("nan"),) * 3
    ordered = sorted(values)
    n = len(ordered)
    return tuple(ordered[min(n - 1, int(n * q))] * 1000 for q in (0.5, 0.99, 0.999))  # type: ignore[return-value]


def median_of(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return tuple(statistics.median(r[i] for r in runs) for i in range(3))  # type: ignore[return-value]


def settings(pairs: Sequence[str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            result[name] = json.loads(value)
        except json.JSONDecodeError:
            result[name] = value
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100,500,1000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--relay-set", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--compare",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="also run the relay with these settings, in the same run (e.g. linger_rate=0)",
    )
    parser.add_argument("--producer-set", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--consumer-set", nargs="*", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    relay_set, consumer_set = settings(args.relay_set), settings(args.consumer_set)
    producer_set = settings(args.producer_set)
    variants = [("esbridge", relay_set)]
    if args.compare:
        variants.append((" ".join(args.compare), {**relay_set, **settings(args.compare)}))
    time_relay_steps()

    from esbridge.testing import make_kafka, make_postgres

    postgres, broker = make_postgres(), make_kafka()
    try:
        # Warm the broker and the processes' imports up: a fresh JVM is slower at first.
        floor_run(postgres, broker, 1000, 2.0)
        esbridge_run(postgres, broker, 1000, 2.0, relay_set, consumer_set, producer_set)
        print(
            f"{'rate':>5}  {'path':<28} {'p50/p99/p999 ms':>24}  "
            f"{'floor p50/p99/p999 ms':>23}  ratio p50/p99"
        )
        for rate in (int(r) for r in args.rates.split(",")):
            ours: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
            transactions: dict[str, list[float]] = {}
            floor: dict[str, list[tuple[float, float, float]]] = {}
            for _ in range(args.runs):
                for label, tuning in variants:
                    parts = esbridge_run(
                        postgres, broker, rate, args.seconds, tuning, consumer_set, producer_set
                    )
                    transactions.setdefault(label, []).append(len(STEPS) / args.seconds)
                    for name, values in parts.items():
                        ours.setdefault(label, {}).setdefault(name, []).append(percentiles(values))
                for name, values in floor_run(postgres, broker, rate, args.seconds).items():
                    floor.setdefault(name, []).append(percentiles(values))
            for label, _ in variants:
                for name, path in (("visible", "visible"), ("downstream", "downstream commit")):
                    o, f = median_of(ours[label][name]), median_of(floor[name])
                    print(
                        f"{rate:>5}  {'commit -> ' + path:<28} {o[0]:>7.1f} {o[1]:>7.1f} "
                        f"{o[2]:>7.1f}  {f[0]:>7.1f} {f[1]:>7.1f} {f[2]:>7.1f}  "
                        f"{o[0] / f[0]:5.1f} {o[1] / f[1]:5.1f}   {label}"
                    )
                print(
                    f"{rate:>5}  breakdown p50 (p99) ms: "
                    + ", ".join(
                        f"{name} {median_of(ours[label][name])[0]:.1f} "
                        f"({median_of(ours[label][name])[1]:.1f})"
                        for name in ("wake", "produce", "commit", "fetch", "consume")
                    )
                    + f"; {statistics.median(transactions[label]):.0f} transactions/s   {label}"
                )
            sys.stdout.flush()
    finally:
        broker.close()
        postgres.close()


if __name__ == "__main__":
    main()
