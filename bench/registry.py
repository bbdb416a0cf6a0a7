"""Relay throughput in the Schema Registry formats against the default format, same run.

    python bench/registry.py [--events 50000] [--runs 3] [--partitions 3]

Starts its own PostgreSQL, Kafka and Schema Registry (esbridge.testing: Apicurio
Registry from Maven Central), stores a backlog of 200-byte events (as
bench/relay.py), then publishes it with one relay per format, each to a fresh
topic, in turn, ``--runs`` times: the default format (the stored event's
bytes), CloudEvents JSON (:class:`~esbridge_connectors.analytics.CloudEventsEncoder`),
and the registry encoder in Avro and in JSON Schema (validating each value,
and not: ``-nv``). Prints events/s (median
of runs), each format's ratio to the default one and to CloudEvents JSON, and
CPU per event (steadier than rates on a shared machine), then the CPU cost of
each encoder hook alone, without Kafka.
The registry is called only when each encoder is built, outside the timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.relay import APP, EVENT_BYTES, BenchLog, store_backlog
from esbridge.relay.relay import Relay
from esbridge.testing import make_kafka, make_postgres, make_schema_registry
from esbridge_connectors.analytics import CloudEventsEncoder
from esbridge_connectors.registry import SchemaRegistryEncoder
from esbridge_connectors.schemas import discover_event_classes
from esbridge_connectors.upstream import application_mapper

FORMATS = ("default", "cloudevents-json", "registry-avro", "registry-json", "registry-json-nv")


def encoder_for(fmt: str, env: dict[str, str], registry_url: str, topic: str) -> Any:
    if fmt == "default":
        return None
    mapper = application_mapper(BenchLog, env)
    if fmt == "cloudevents-json":
        return CloudEventsEncoder(APP, mapper)
    return SchemaRegistryEncoder(
        APP,
        mapper,
        {"url": registry_url},
        topic=topic,
        event_classes=discover_event_classes(["bench.relay"]),
        format="avro" if fmt == "registry-avro" else "json",
        validate=fmt != "registry-json-nv",  # nv: validate=False
    )


def run(
    fmt: str, env: dict[str, str], kafka: dict[str, Any], broker: Any, url: str, p: int
) -> tuple[float, float]:
    """Events/s and CPU microseconds per event (this process, librdkafka's threads too)."""
    topic = str(broker.create_topic(partitions=p))
    encoder = encoder_for(fmt, env, url, topic)  # registers the schemas: not timed
    relay = Relay(APP, kafka_config=kafka, topic=topic, env=env, partitions=p, encoder=encoder)
    try:
        relay.prepare()
        start, cpu = time.perf_counter(), time.process_time()
        count = relay.publish_available()
        return count / (time.perf_counter() - start), (time.process_time() - cpu) / count * 1e6
    finally:
        relay.close()


def encode_only(fmt: str, env: dict[str, str], url: str, notifications: list[Any]) -> float:
    """CPU microseconds per event of the encoder hook alone (no Kafka), best of 3."""
    encoder = encoder_for(fmt, env, url, f"encode-only-{fmt}")
    if encoder is None:
        return 0.0
    best = float("inf")
    for _ in range(3):
        cpu = time.process_time()
        for n in notifications:
            encoder(n)
        best = min(best, (time.process_time() - cpu) / len(notifications) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args()
    postgres, broker, registry = make_postgres(), make_kafka(), make_schema_registry()
    try:
        db = postgres.create_database()
        store_backlog(db.env, db.dsn, args.events)
        print(f"backlog: {args.events} events of {EVENT_BYTES} B")
        kafka = broker.config()
        rates: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
        cpus: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
        run(FORMATS[0], db.env, kafka, broker, registry.url, args.partitions)  # warm-up
        for i in range(args.runs):
            for fmt in FORMATS:
                rate, cpu = run(fmt, db.env, kafka, broker, registry.url, args.partitions)
                rates[fmt].append(rate)
                cpus[fmt].append(cpu)
            print(
                f"run {i + 1}: "
                + ", ".join(
                    f"{f} {rates[f][-1]:,.0f}/s ({cpus[f][-1]:.0f} us CPU)" for f in FORMATS
                )
            )
        median = {fmt: statistics.median(r) for fmt, r in rates.items()}
        cpu_median = {fmt: statistics.median(c) for fmt, c in cpus.items()}
        for fmt in FORMATS:
            print(
                f"{fmt}: {median[fmt]:,.0f} events/s (median of {args.runs}), "
                f"{median[fmt] / median['default']:.2f}x default, "
                f"{median[fmt] / median['cloudevents-json']:.2f}x cloudevents-json; "
                f"{cpu_median[fmt]:.1f} us CPU/event"
            )
        from esbridge.eventlog.notification_log import open_recorder

        notifications = open_recorder(APP, db.env).select_notifications(start=1, limit=5000)
        for fmt in FORMATS[1:]:
            us = encode_only(fmt, db.env, registry.url, notifications)
            print(f"encoder hook alone, {fmt}: {us:.1f} us CPU/event (best of 3 x 5000)")
    finally:
        registry.close()
        broker.close()
        postgres.close()


if __name__ == "__main__":
    main()
