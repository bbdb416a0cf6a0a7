"""Benchmark: how long a partition waits behind the others while a backlog drains.

    python bench/fairness.py [--messages 100000] [--events 150000] [--runs 3]

Starts its own PostgreSQL and Kafka (esbridge.testing; or external servers named
by ESBRIDGE_POSTGRES_DSN / ESBRIDGE_KAFKA_BOOTSTRAP). A *wait* is the time a
partition goes without progress (its consumed position not moving) while it
still has a backlog; the figure is each run's worst wait over all partitions,
counted from the first message consumed. Measured in the same run:

1. **baseline**: a plain confluent-kafka consumer, default settings, draining
   3 partitions x ``--messages`` small messages (written by a plain producer
   with the relay's batching and compression settings),
   spending ``--work-us`` per message (a stand-in for a transaction's work, so
   that it drains about as fast as the consumer adapter);
2. **esbridge**: one :class:`~esbridge.consumer.ConsumerAdapter` draining a
   relay-published 3-partition topic of ``--events`` dog-school events into
   ``Counters`` (as bench/consume.py), with partition flow control off
   (``fair_partitions=False``: the behaviour before it existed) and on (the
   default). Each adapter run is checked exactly (every trick counted once).

Prints, per run, each partition's worst wait and its lag curve (the share of
its backlog left at each tenth of the run); then the medians and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Consumer, Producer

from bench.consume import check_counts, drain, fresh_env, partition_ends, populate
from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.consumer.partition_flow import Sample, longest_stalls
from esbridge.relay.publisher import PRODUCER_DEFAULTS
from esbridge.relay.relay import Relay
from esbridge.testing import make_kafka, make_postgres
from examples.dogschool.application import Counters

PARTITIONS = 3


def lag_curves(samples: list[Sample], ends: list[int], starts: list[int]) -> list[str]:
    """Per partition, the percentage of its backlog left at each tenth of the run."""
    total = samples[-1][0]
    curves = []
    for p, end in enumerate(ends):
        points = []
        for tenth in range(11):
            at = total * tenth / 10
            position = max((pos[p] for t, pos in samples if t <= at), default=starts[p])
            left = max(0, end - max(position, starts[p])) / max(1, end - starts[p])
            points.append(f"{100 * left:3.0f}")
        curves.append(" ".join(points))
    return curves


def drain_seconds(samples: list[Sample], ends: list[int]) -> float:
    """From the first progress to the sample in which every partition was at its end."""
    started = next(t for t, pos in samples if any(pos))
    return (
        next(t for t, pos in samples if all(p >= e for p, e in zip(pos, ends, strict=True)))
        - started
    )


def report(label: str, samples: list[Sample], ends: list[int], starts: list[int]) -> float:
    waits = longest_stalls(samples, ends)
    print(f"  {label}: {samples[-1][0]:.1f} s ({drain_seconds(samples, ends):.1f} s from the "
          "first progress to the end), worst wait per partition: "
          + ", ".join(f"p{p} {w:.1f} s" for p, w in enumerate(waits)))  # fmt: skip
    for p, curve in enumerate(lag_curves(samples, ends, starts)):
        print(f"    p{p} backlog left (%), each tenth of the run: {curve}")
    return max(waits)


# -- baseline: a plain consumer ---------------------------------------------------------------


def produce_backlog(kafka: dict[str, Any], topic: str, messages: int) -> None:
    """``messages`` per partition, batched and compressed as the relay's producer does."""
    producer = Producer({**kafka, **PRODUCER_DEFAULTS})
    value = os.urandom(60).hex().encode()  # 120 bytes, about as compressible as an event
    for i in range(messages):
        for p in range(PARTITIONS):
            while True:
                try:
                    producer.produce(topic, key=str(i).encode(), value=value, partition=p)
                    break
                except BufferError:  # the relay's small queue: wait for deliveries
                    producer.poll(0.05)
    assert producer.flush(60) == 0


def plain_run(
    kafka: dict[str, Any], topic: str, group: str, messages: int, work_us: float
) -> float:
    """A default-settings consumer draining the topic; its worst per-partition wait."""
    consumer = Consumer({**kafka, "group.id": group, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    positions = [0] * PARTITIONS
    samples: list[Sample] = []
    started = time.perf_counter()
    count = 0
    try:
        while count < messages * PARTITIONS and time.perf_counter() - started < 600:
            batch = consumer.consume(1000, 1.0)
            for message in batch:
                if message.error() is None:
                    positions[message.partition() or 0] = (message.offset() or 0) + 1
                    count += 1
            if batch:
                deadline = time.perf_counter() + work_us * len(batch) / 1e6
                while time.perf_counter() < deadline:
                    pass
            samples.append((time.perf_counter() - started, list(positions)))
    finally:
        consumer.close()
    assert count == messages * PARTITIONS, (count, messages * PARTITIONS)
    return report("plain consumer", samples, [messages] * PARTITIONS, [0] * PARTITIONS)


# -- esbridge: the consumer adapter -----------------------------------------------------------


def adapter_run(
    env: dict[str, str],
    topic: str,
    kafka: dict[str, Any],
    group: str,
    ends: dict[str, int],
    expected: int,
    fair: bool,
) -> tuple[float, float, float]:
    """(worst wait, whole-call events/s, draining events/s) of one adapter; positions sampled
    every 20 ms. Draining: from the first progress until every partition is at its end."""
    counters = Counters(env=env)
    adapter = ConsumerAdapter(
        counters, upstream="DogSchool", topic=topic, kafka_config=kafka, group_id=group,
        batch_size=2000, fair_partitions=fair,
    )  # fmt: skip
    names = list(ends)
    samples: list[Sample] = []
    done = threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not done.wait(0.02):
            positions = adapter.status().positions
            samples.append((time.perf_counter() - started, [positions.get(n, 0) for n in names]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        processed = drain(adapter, expected, timeout=300)
        seconds = time.perf_counter() - started
    finally:
        done.set()
        sampler.join()
        adapter.close()
        counters.close()
    assert processed == expected, (processed, expected)
    label = "esbridge, flow control " + ("on" if fair else "off")
    last = list(ends.values())
    wait = report(label, samples, last, [0] * PARTITIONS)
    return wait, processed / seconds, processed / drain_seconds(samples, last)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000, help="plain, per partition")
    parser.add_argument("--work-us", type=float, default=50.0, help="plain, per message")
    parser.add_argument("--events", type=int, default=150_000, help="esbridge, all partitions")
    parser.add_argument("--tricks", type=int, default=5000, help="distinct counters")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip", choices=["plain", "esbridge"], help="leave one side out")
    args = parser.parse_args()

    postgres = make_postgres(fsync=True)
    kafka_broker = make_kafka()
    waits: dict[str, list[float]] = {"plain": [], "off": [], "on": []}
    rates: dict[str, list[float]] = {"off": [], "on": []}
    drains: dict[str, list[float]] = {"off": [], "on": []}
    try:
        kafka = kafka_broker.config()
        if args.skip != "plain":
            topic = kafka_broker.create_topic(partitions=PARTITIONS)
            produce_backlog(kafka, topic, args.messages)
        if args.skip != "esbridge":
            upstream = dict(postgres.create_database().env)
            total = populate(upstream, args.events, args.tricks)
            events_topic = kafka_broker.create_topic(partitions=PARTITIONS)
            relay = Relay(
                "DogSchool", kafka_config=kafka, topic=events_topic, env=upstream,
                partitions=PARTITIONS,
            )  # fmt: skip
            relay.publish_available()
            relay.close()
            ends = partition_ends(upstream, PARTITIONS)
            print(f"upstream log: {total} events on {PARTITIONS} partitions")
        for run in range(1, args.runs + 1):
            print(f"run {run}:")
            if args.skip != "plain":
                waits["plain"].append(
                    plain_run(kafka, topic, f"plain-{run}", args.messages, args.work_us)
                )
            if args.skip == "esbridge":
                continue
            sides = [(False, "off"), (True, "on")]
            for fair, key in sides if run % 2 else sides[::-1]:  # each side first in turn
                env = fresh_env(postgres, upstream)
                wait, rate, draining = adapter_run(
                    env, events_topic, kafka, f"bench-{key}-{run}", ends, total, fair
                )
                check_counts(env, upstream)
                waits[key].append(wait)
                rates[key].append(rate)
                drains[key].append(draining)
        print("MEDIAN worst per-partition wait:")
        median = {k: statistics.median(v) for k, v in waits.items() if v}
        labels = {
            "plain": "plain confluent-kafka consumer (baseline)",
            "off": "esbridge consumer, flow control off (before)",
            "on": "esbridge consumer, flow control on (after)",
        }
        for key, value in median.items():
            print(f"  {labels[key]}: {value:.1f} s")
        if "on" in median:
            on, off = median["on"], median["off"]
            for name, figures in (("whole call", rates), ("draining", drains)):
                print(f"  rate ({name}): off {statistics.median(figures['off']):,.0f} events/s, "
                      f"on {statistics.median(figures['on']):,.0f} events/s")  # fmt: skip
            print(f"RATIO worst wait, before / after: {off / max(on, 1e-3):.1f}x")
            if "plain" in median:
                print(f"RATIO worst wait, plain consumer / after: "
                      f"{median['plain'] / max(on, 1e-3):.1f}x")  # fmt: skip
    finally:
        kafka_broker.close()
        postgres.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
