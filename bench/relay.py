"""Relay throughput, memory and latency, against a bare confluent-kafka producer.

    python bench/relay.py [--events 200000] [--runs 3] [--rss-events 1000000] [--partitions 3]
    python bench/relay.py --tracing [--events 200000] [--runs 5] [--events-per-trace 1]

Starts its own PostgreSQL and Kafka (esbridge.testing; or external servers named
by ESBRIDGE_POSTGRES_DSN / ESBRIDGE_KAFKA_BOOTSTRAP), stores a backlog of
200-byte events, warms the broker up (one untimed bare-producer pass over the
same messages: a fresh JVM runs the first ~200,000 messages slower, which
otherwise fell on the relay's first run only), then, in the same run:

1. relay events/s (payload mode, exactly once) publishing the backlog, and a bare
   confluent-kafka producer sending the same messages (same keys, values,
   headers, partitions) with the same settings (the relay's producer defaults,
   idempotence, one transaction per 50,000 messages); the ratio; median of runs;
2. the relay's peak RSS (a subprocess) publishing a backlog of ``--rss-events``;
3. latency from commit in Postgres to visibility in a read_committed consumer
   at 1,000 events/s offered load (p50, p99).

With ``--tracing``, instead: relay events/s over two equal backlogs in the
same run, one of an application that does not record trace context (tracing
off: no side table) and one where every event has a stored W3C trace context
(tracing on: the relay reads the side table per page and adds a
``traceparent`` header to every message); runs alternate; medians and the
ratio on/off (docs/tracing.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from esbridge.relay import publisher as relay_publisher
from esbridge.relay.publisher import PRODUCER_DEFAULTS
from esbridge.relay.relay import Relay
from esbridge.runtime.logs import kafka_client_config
from esbridge.wire.encoding import PayloadEncoder

APP = "BenchLog"
EVENT_BYTES = 200
TRANSACTION = 50_000
#: CPU seconds per message of this process (all its threads, librdkafka's too), per run.
CPU: dict[str, list[float]] = {"relay": [], "bare": []}


class Account(Aggregate):
    def __init__(self) -> None:
        self.notes: list[str] = []

    @event("Noted")
    def note(self, text: str) -> None:
        self.notes.append(text)


class BenchLog(Application):
    name = APP


def store_backlog(env: dict[str, str], dsn: str, events: int) -> None:
    """``events`` stored events of ~200 bytes each (SQL copies of one real event)."""
    app = BenchLog(env=env)
    account = Account()
    account.note(text="")
    app.save(account)
    last = "SELECT topic, state FROM benchlog_events ORDER BY notification_id DESC LIMIT 1"
    with psycopg.connect(dsn) as conn:
        _, state = conn.execute(last).fetchone() or ("", b"")
        account.note(text="x" * max(EVENT_BYTES - len(bytes(state)), 0))
        app.save(account)
        topic, state = conn.execute(last).fetchone() or ("", b"")
        conn.execute("DELETE FROM benchlog_events")
        conn.commit()
        done = 0
        while done < events:  # chunks: one transaction each
            n = min(200_000, events - done)
            conn.execute(
                "INSERT INTO benchlog_events (originator_id, originator_version, topic, state) "
                "SELECT gen_random_uuid(), 1, %s, %s FROM generate_series(1, %s)",
                (topic, state, n),
            )
            conn.commit()
            done += n
    app.close()


def trace_every_event(env: dict[str, str], dsn: str, per_trace: int = 1) -> None:
    """Give every stored event a trace context, as if saved in a span, ``per_trace`` a span.

    1 (the default, the worst case): every event its own random context, which
    also makes the messages compress worse than the backlog's copies of one event.
    """
    from esbridge import record_trace_context

    app = BenchLog(env=env)
    record_trace_context(app)  # creates benchlog_events_trace
    app.close()
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO benchlog_events_trace (notification_id, traceparent) "
            "SELECT e.notification_id, s.traceparent FROM benchlog_events e JOIN ("
            "  SELECT n, '00-' || md5(random()::text) || '-' "
            "  || substr(md5(random()::text), 1, 16) || '-01' AS traceparent "
            "  FROM generate_series(0, (SELECT max(notification_id) FROM benchlog_events) / %s) n"
            ") s ON s.n = e.notification_id / %s",
            (per_trace, per_trace),
        )
        conn.commit()


def tracing_runs(postgres: Any, broker: Any, args: argparse.Namespace) -> None:
    """Relay throughput, tracing off against tracing on, alternating runs (see module doc)."""
    kafka = broker.config()
    envs = {}
    for label in ("off", "on"):
        db = postgres.create_database()
        store_backlog(db.env, db.dsn, args.events)
        if label == "on":
            trace_every_event(db.env, db.dsn, args.events_per_trace)
        envs[label] = db.env
    print(
        f"backlogs: 2 x {args.events} events of {EVENT_BYTES} B (on: every event traced, "
        f"{args.events_per_trace} event(s) a trace context)"
    )
    relay_run(envs["off"], kafka, create_topic(broker, args.partitions), args.partitions)
    print("warm-up run (untimed) done")
    rates: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}  # this process's CPU us an event
    for run in range(args.runs):
        for label in ("off", "on") if run % 2 == 0 else ("on", "off"):
            topic = create_topic(broker, args.partitions)
            rates[label].append(relay_run(envs[label], kafka, topic, args.partitions, args.events))
            cpu[label].append(CPU["relay"][-1] * 1e6)
        print(
            f"run {run + 1}: tracing off {rates['off'][-1]:,.0f} events/s "
            f"({cpu['off'][-1]:.1f} us CPU/event), on {rates['on'][-1]:,.0f} events/s "
            f"({cpu['on'][-1]:.1f} us CPU/event)"
        )
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(
        f"relay, tracing off: {off:,.0f} events/s, "
        f"{statistics.median(cpu['off']):.1f} us CPU/event (median of {args.runs})"
    )
    print(
        f"relay, tracing on (traceparent on every message): {on:,.0f} events/s, "
        f"{statistics.median(cpu['on']):.1f} us CPU/event"
    )
    print(f"ratio on/off: {on / off:.2f}")


def relay_run(
    env: dict[str, str], kafka: dict[str, Any], topic: str, partitions: int, expected: int = 1
) -> float:
    relay = Relay(APP, kafka_config=kafka, topic=topic, env=env, partitions=partitions)
    try:
        relay.prepare()
        start, cpu = time.perf_counter(), time.process_time()
        count = relay.publish_available()
        while count < expected:  # it returned at a gap it saw a writer for: go on (timed)
            time.sleep(0.05)
            count += relay.publish_available()
        CPU["relay"].append((time.process_time() - cpu) / count)
        return count / (time.perf_counter() - start)
    finally:
        relay.close()


def bare_run(
    kafka: dict[str, Any], topic: str, messages: list[tuple[bytes, bytes, Any, int]], total: int
) -> float:
    """The same messages, same settings (log lines too), from a plain transactional producer."""
    conf = kafka_client_config(PRODUCER_DEFAULTS)
    conf.update(kafka)
    conf.update({"enable.idempotence": True, "transactional.id": f"bare-{uuid.uuid4().hex}"})
    producer = Producer(conf)
    producer.init_transactions(60)
    start, cpu = time.perf_counter(), time.process_time()
    sent = 0
    while sent < total:
        producer.begin_transaction()
        in_tx = 0
        while in_tx < TRANSACTION and sent < total:
            key, value, headers, partition = messages[sent % len(messages)]
            while True:
                try:
                    producer.produce(topic, value, key, partition, headers=headers)
                    break
                except BufferError:
                    producer.poll(relay_publisher.BACKPRESSURE_POLL)  # as the relay does
            sent += 1
            in_tx += 1
        producer.commit_transaction(60)
    CPU["bare"].append((time.process_time() - cpu) / total)
    return total / (time.perf_counter() - start)


def prebuilt_messages(env: dict[str, str], partitions: int, limit: int) -> list[Any]:
    from esbridge.eventlog.notification_log import open_recorder

    recorder = open_recorder(APP, env)
    encoder = PayloadEncoder(APP, partitions)
    last = [0] * partitions
    notifications = recorder.select_notifications(start=1, limit=limit)
    # Headers as a dict, as the relay hands them to confluent-kafka: the same
    # headers in the same order on the wire, and the cheaper form to convert,
    # so the baseline is the fastest honest producer of these messages.
    return [
        (key, value, dict(headers), partition)
        for key, value, headers, partition in (encoder.message(n, last) for n in notifications)
    ]


def create_topic(kafka_broker: Any, partitions: int) -> str:
    return str(kafka_broker.create_topic(partitions=partitions))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def rss_child(args: argparse.Namespace) -> None:
    """Publish the backlog in this process; print the rate, peak RSS and RSS over time (MB)."""
    env = json.loads(os.environ["BENCH_ENV"])
    kafka = {"bootstrap.servers": os.environ["BENCH_BOOTSTRAP"]}
    relay = Relay(
        APP,
        kafka_config=kafka,
        topic=os.environ["BENCH_TOPIC"],
        env=env,
        partitions=args.partitions,
    )
    relay.prepare()
    samples: list[tuple[int, float]] = [(0, _rss_mb())]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append((relay.status().position, _rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    count = relay.publish_available()
    rate = count / (time.perf_counter() - start)
    done.set()
    relay.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rate": rate, "peak_rss_mb": peak_mb, "samples": samples}))


def latency(
    env: dict[str, str], kafka: dict[str, Any], topic: str, seconds: float = 10.0, **tuning: Any
) -> tuple[float, float, int]:
    """p50, p99 (ms) from commit in Postgres to visibility at 1,000 events/s offered."""
    relay = Relay(APP, kafka_config=kafka, topic=topic, env=env, partitions=1, **tuning)
    relay.prepare()
    consumer = Consumer(
        {
            **kafka,
            "group.id": f"lat-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 5,
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    # Skip what the relay published of the backlog before (position starts there).
    committed: dict[bytes, float] = {}
    received: list[tuple[bytes | None, float]] = []
    stop = threading.Event()

    def consume() -> None:
        # poll() returns at the first message; consume(1000, 0.05) alone waited up to
        # 50 ms unless 1,000 messages came, which this bench once counted as latency.
        while not stop.is_set():
            first = consumer.poll(0.05)
            if first is None:
                continue
            for m in (first, *consumer.consume(999, 0)):
                if m.error() is None:
                    received.append((m.key(), time.time()))

    app = BenchLog(env=env)
    relay_thread = threading.Thread(target=relay.run)
    consumer_thread = threading.Thread(target=consume)
    relay_thread.start()
    consumer_thread.start()
    try:
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < seconds:
            accounts = [Account() for _ in range(10)]
            app.save(*accounts)
            now = time.time()
            for a in accounts:
                committed[str(a.id).encode()] = now
            sent += 10
            ahead = sent / 1000 - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        deadline = time.monotonic() + 10
        while len(received) < sent and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        relay.stop()
        relay_thread.join(10)
        consumer_thread.join(10)
        consumer.close()
        app.close()
    seen = [t - committed[key] for key, t in received if key in committed]
    ordered = sorted(seen)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[int(len(ordered) * 0.99)] * 1000
    return p50, p99, len(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rss-events", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument(
        "--tracing", action="store_true", help="relay throughput with tracing on vs off"
    )
    parser.add_argument(
        "--events-per-trace",
        type=int,
        default=1,
        help="with --tracing: events saved in one span (1: each its own context)",
    )
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args)
        return

    from esbridge.testing import make_kafka, make_postgres

    postgres, broker = make_postgres(), make_kafka()
    try:
        if args.tracing:
            tracing_runs(postgres, broker, args)
            return
        db = postgres.create_database()
        env = db.env
        kafka = broker.config()
        t = time.perf_counter()
        store_backlog(env, db.dsn, args.events)
        print(f"backlog: {args.events} events of {EVENT_BYTES} B ({time.perf_counter() - t:.1f} s)")
        messages = prebuilt_messages(env, args.partitions, 25_000)
        warm_up = bare_run(kafka, create_topic(broker, args.partitions), messages, args.events)
        CPU["bare"].clear()
        print(f"broker warm-up (bare producer, untimed): {warm_up:,.0f} msg/s")
        relay_rates, bare_rates = [], []
        for run in range(args.runs):
            relay_rates.append(
                relay_run(env, kafka, create_topic(broker, args.partitions), args.partitions)
            )
            bare_rates.append(
                bare_run(kafka, create_topic(broker, args.partitions), messages, args.events)
            )
            print(
                f"run {run + 1}: relay {relay_rates[-1]:,.0f} events/s "
                f"({CPU['relay'][-1] * 1e6:.1f} us CPU/event), "
                f"bare producer {bare_rates[-1]:,.0f} msg/s "
                f"({CPU['bare'][-1] * 1e6:.1f} us CPU/msg)"
            )
        relay_median, bare_median = statistics.median(relay_rates), statistics.median(bare_rates)
        print(
            f"relay (payloads, exactly once, {args.partitions} partitions): "
            f"{relay_median:,.0f} events/s (median of {args.runs})"
        )
        print(
            f"bare confluent-kafka producer, same messages and settings: {bare_median:,.0f} msg/s"
        )
        print(f"ratio relay/bare: {relay_median / bare_median:.2f}")

        if args.rss_events:
            db2 = postgres.create_database()
            t = time.perf_counter()
            store_backlog(db2.env, db2.dsn, args.rss_events)
            print(f"backlog for RSS: {args.rss_events} events ({time.perf_counter() - t:.1f} s)")
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", "--partitions", str(args.partitions)],
                env={
                    **os.environ,
                    "BENCH_ENV": json.dumps(db2.env),
                    "BENCH_BOOTSTRAP": broker.bootstrap_servers,
                    "BENCH_TOPIC": create_topic(broker, args.partitions),
                },
                capture_output=True,
                check=True,
                text=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"relay peak RSS publishing {args.rss_events} events: "
                f"{result['peak_rss_mb']:.0f} MB ({result['rate']:,.0f} events/s)"
            )
            samples = result["samples"]
            step = max(1, len(samples) // 8)
            print(
                "RSS (MB) by position: "
                + ", ".join(f"{pos:,}: {mb:.0f}" for pos, mb in samples[::step] + samples[-1:])
            )

        # The default linger (RelayTuning.linger, adaptive) trades a little latency for
        # fewer transactions under load; linger=0 shows the latency without it.
        for label, tuning in (("default linger", {}), ("linger=0", {"linger": 0.0})):
            db3 = postgres.create_database()
            BenchLog(env=db3.env).close()
            p50, p99, n = latency(db3.env, kafka, create_topic(broker, 1), **tuning)
            print(
                f"commit -> read_committed visibility at 1,000 events/s ({label}): "
                f"p50 {p50:.0f} ms, p99 {p99:.0f} ms ({n} events)"
            )
    finally:
        broker.close()
        postgres.close()


if __name__ == "__main__":
    main()
