"""The relay against a real Postgres and a real Kafka broker (payloads, exactly once)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import uuid4

import pytest
from confluent_kafka import KafkaError, KafkaException
from eventsourcing.persistence import Notification

from esbridge.errors import ConfigurationError, RelayError, RelayFencedError
from esbridge.relay.relay import Relay
from tests.support.relay_support import (
    APP_NAME,
    Account,
    check_exactly_once_in_order,
    db_ids,
    ledger,
    ledger_relay,
    publish_and_close,
    read_all,
    rolled_back_insert,
    write_events,
)


@pytest.mark.parametrize("partitions", [1, 3])
def test_publishes_every_notification_once_in_order(
    postgres_db, kafka_config, create_topic, partitions
):
    app = ledger(postgres_db.env)
    write_events(app, 1200, accounts=40)
    topic = create_topic(partitions=partitions)
    relay = ledger_relay(postgres_db, kafka_config, topic)
    try:
        assert relay.publish_available() == 1200
        assert relay.publish_available() == 0  # nothing new: nothing again
        write_events(app, 300)
        assert relay.publish_available() == 300
    finally:
        relay.close()
    expected = db_ids(postgres_db.dsn)
    records = read_all(kafka_config, topic, 1500)
    check_exactly_once_in_order(records, expected, partitions)
    status = relay.status()
    assert (status.position, status.published, status.lag) == (expected[-1][0], 1500, 0)


def test_headers_and_value_are_the_stored_event(postgres_db, kafka_config, create_topic):
    app = ledger(postgres_db.env)
    write_events(app, 20, accounts=5)
    topic = create_topic(partitions=1)
    publish_and_close(ledger_relay(postgres_db, kafka_config, topic))
    recorder = app.recorder
    stored = {n.id: n for n in recorder.select_notifications(start=1, limit=100)}
    records = read_all(kafka_config, topic, 20)
    assert len(records) == 20
    for r in records:
        nid = int(r.headers["esb_nid"])
        n = stored[nid]
        assert r.value == n.state
        assert r.key == str(n.originator_id).encode()
        h = r.headers
        assert h["esb_format"] == "1"
        assert h["esb_kind"] == "payload"
        assert h["esb_app"] == APP_NAME
        assert h["esb_topic"] == n.topic == h["ce_type"]
        assert h["esb_version"] == str(n.originator_version)
        assert h["content-type"] == "application/json"
        assert h["ce_specversion"] == "1.0"
        assert h["ce_id"] == f"{APP_NAME}:{nid}"
        assert h["ce_source"] == f"esbridge://{APP_NAME}"
        assert h["ce_subject"] == str(n.originator_id)
        assert h["ce_time"].startswith("20") and "T" in h["ce_time"]
    # The event decodes with the application's own mapper.
    first = stored[min(stored)]
    assert app.mapper.to_domain_event(recorder.select_notifications(1, 1)[0]).originator_id == (
        first.originator_id
    )


def test_gaps_from_rolled_back_inserts_never_stall(postgres_db, kafka_config, create_topic):
    app = ledger(postgres_db.env)
    write_events(app, 50)
    topic = create_topic(partitions=3)
    relay = ledger_relay(postgres_db, kafka_config, topic, poll_interval=0.2)
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        for _ in range(5):
            rolled_back_insert(postgres_db.dsn, rows=3)  # a gap of three ids
            write_events(app, 40, per_save=7)
        rolled_back_insert(postgres_db.dsn)  # a gap at the very end
        expected = db_ids(postgres_db.dsn)
        assert len(expected) == 250
        assert expected[-1][0] > 250  # there are gaps
        deadline = time.monotonic() + 30
        while relay.status().position < expected[-1][0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay.status().position == expected[-1][0]
        write_events(app, 10)  # after the trailing gap, still going
        expected = db_ids(postgres_db.dsn)
        while relay.status().position < expected[-1][0] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        relay.stop()
        thread.join(10)
    assert not thread.is_alive()
    check_exactly_once_in_order(read_all(kafka_config, topic, 260), expected, 3)


def test_run_wakes_on_commit_and_resumes_after_stop(postgres_db, kafka_config, create_topic):
    """run() publishes within moments of a commit; a new relay resumes where it stopped."""
    app = ledger(postgres_db.env)
    topic = create_topic(partitions=3)

    def run_once(count: int) -> float:
        relay = ledger_relay(postgres_db, kafka_config, topic, poll_interval=30)
        thread = threading.Thread(target=relay.run)
        thread.start()
        try:
            while relay.status().position == 0 and relay.status().upstream_max == 0:
                time.sleep(0.05)
                if not relay.status().running:
                    break
            time.sleep(1.0)  # started and idle (waiting on NOTIFY, not polling: interval 30 s)
            start = time.monotonic()
            write_events(app, count)
            target = db_ids(postgres_db.dsn)[-1][0]
            while relay.status().position < target:
                assert time.monotonic() - start < 10, "the relay did not wake on NOTIFY"
                time.sleep(0.01)
            latency = time.monotonic() - start
        finally:
            relay.stop()
            thread.join(10)
        assert not thread.is_alive()
        return latency

    write_events(app, 100)
    assert run_once(200) < 5
    assert run_once(200) < 5
    check_exactly_once_in_order(read_all(kafka_config, topic, 500), db_ids(postgres_db.dsn), 3)


@pytest.mark.parametrize(
    ("linger", "linger_rate", "most", "fewest"),
    [(5.0, 0, 2, 1), (5.0, 2000, 25, 4), (0.0, 2000, 25, 4)],
    ids=["whole-linger", "adaptive", "no-linger"],
)
def test_linger_gathers_a_trickle_into_few_transactions(
    postgres_db, kafka_config, create_topic, linger, linger_rate, most, fewest
):
    """25 commits 40 ms apart (about 1.5 s): with a 5 s linger after every transaction
    (``linger_rate=0``) the relay publishes them in at most two transactions. Adaptive (the
    default ``linger_rate``, 2,000 events/s), 25 events a second is a quiet log: the
    trickle is published as it comes, as with no linger at all."""
    from prometheus_client import CollectorRegistry

    app = ledger(postgres_db.env)
    topic = create_topic(partitions=1)
    registry = CollectorRegistry()
    labels = {"app": APP_NAME, "topic": topic}
    relay = ledger_relay(
        postgres_db, kafka_config, topic, linger=linger, linger_rate=linger_rate, registry=registry
    )
    write_events(app, 1)
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        while relay.status().position < 1:
            assert thread.is_alive()
            time.sleep(0.02)
        time.sleep(0.5)  # idle (waiting on NOTIFY), or lingering after the first event
        before = registry.get_sample_value("esbridge_relay_batches_total", labels)
        for _ in range(25):
            write_events(app, 1)
            time.sleep(0.04)
        target = db_ids(postgres_db.dsn)[-1][0]
        deadline = time.monotonic() + 20
        while relay.status().position < target:
            assert time.monotonic() < deadline, relay.status()
            time.sleep(0.02)
    finally:
        relay.stop()
        thread.join(10)
    batches = registry.get_sample_value("esbridge_relay_batches_total", labels) - before
    assert fewest <= batches <= most, f"{batches} transactions for 25 commits (linger {linger})"
    check_exactly_once_in_order(read_all(kafka_config, topic, 26), db_ids(postgres_db.dsn), 1)


def test_at_least_once_mode_publishes_in_order(postgres_db, kafka_config, create_topic):
    app = ledger(postgres_db.env)
    write_events(app, 800)
    topic = create_topic(partitions=3)
    at_least_once = {"exactly_once": False, "relay_id": "alo-relay"}
    relay = ledger_relay(postgres_db, kafka_config, topic, **at_least_once)
    try:
        assert relay.publish_available() == 800
        write_events(app, 200)
        assert relay.publish_available() == 200
    finally:
        relay.close()
    again = ledger_relay(postgres_db, kafka_config, topic, **at_least_once)
    try:
        assert again.publish_available() == 0  # position was stored
    finally:
        again.close()
    check_exactly_once_in_order(read_all(kafka_config, topic, 1000), db_ids(postgres_db.dsn), 3)


def test_wrong_configuration_is_refused_before_publishing(postgres_db, kafka_config, create_topic):
    ledger(postgres_db.env)  # creates the tables
    topic = create_topic(partitions=3)
    env = postgres_db.env

    with pytest.raises(ConfigurationError, match="partitions"):
        Relay(APP_NAME, kafka_config=kafka_config, topic=topic, env=env, partitions=2).close()
        r = Relay(APP_NAME, kafka_config=kafka_config, topic=topic, env=env, partitions=2)
        r.publish_available()
    with pytest.raises(ConfigurationError, match="NoSuchApp"):
        Relay("NoSuchApp", kafka_config=kafka_config, topic=topic, env=env).publish_available()
    with pytest.raises(ConfigurationError, match="does not exist"):
        Relay(
            APP_NAME, kafka_config=kafka_config, topic=topic + "-missing", env=env
        ).publish_available()
    with pytest.raises(ConfigurationError, match="mode"):
        Relay(APP_NAME, kafka_config=kafka_config, topic=topic, env=env, mode="everything")
    with pytest.raises(ConfigurationError, match="unknown relay setting"):
        Relay(APP_NAME, kafka_config=kafka_config, topic=topic, env=env, pagesize=3)
    assert read_all(kafka_config, topic, timeout=2) == []


def test_creates_missing_topic_with_partitions(postgres_db, kafka_config, topic_name):
    app = ledger(postgres_db.env)
    write_events(app, 30)
    relay = Relay(
        APP_NAME, kafka_config=kafka_config, topic=topic_name, env=postgres_db.env, partitions=2
    )
    try:
        assert relay.publish_available() == 30
    finally:
        relay.close()
    check_exactly_once_in_order(read_all(kafka_config, topic_name, 30), db_ids(postgres_db.dsn), 2)


def test_message_too_large_stops_naming_the_notification(postgres_db, kafka_config, create_topic):
    app = ledger(postgres_db.env)
    write_events(app, 10)
    account = Account(owner="big")
    app.save(account)
    account.credit(amount=1, note="x" * 5000)  # notification 12: about 5 kB
    app.save(account)
    write_events(app, 10)
    topic = create_topic(partitions=1, config={"max.message.bytes": "3000"})
    relay = ledger_relay(postgres_db, kafka_config, topic)
    big_nid = db_ids(postgres_db.dsn)[11][0]
    try:
        with pytest.raises(RelayError, match=f"notification {big_nid}\\b.*{APP_NAME}"):
            relay.publish_available()
    finally:
        relay.close()
    records = read_all(kafka_config, topic, timeout=3)
    assert all(int(r.headers["esb_nid"]) < big_nid for r in records)


@contextmanager
def fenced_pair(
    postgres_db: Any, kafka_config: dict[str, Any], topic: str, before: int, after: int
) -> Iterator[tuple[Any, Relay, Relay]]:
    """(app, first, second): ``first`` published ``before`` events, then ``second`` (the same
    relay id) published ``after`` more and so fenced ``first``. Both closed at the end.

    Both without the lease (``standby=False``): with it, ``second`` would wait for ``first``
    to stop instead of fencing it (see test_relay_standby.py)."""
    app = ledger(postgres_db.env)
    write_events(app, before)
    first = ledger_relay(postgres_db, kafka_config, topic, standby=False)
    second = ledger_relay(postgres_db, kafka_config, topic, standby=False)
    try:
        assert first.publish_available() == before
        write_events(app, after)
        assert second.publish_available() == after  # fences the first, resumes at its position
        yield app, first, second
    finally:
        first.close()
        second.close()


def test_a_fenced_relay_says_fenced_when_a_call_gets_only_fatal(
    postgres_db, kafka_config, create_topic
):
    """After fencing, librdkafka answers produce() with a bare _FATAL: the cause is found."""
    topic = create_topic(partitions=1)
    with fenced_pair(postgres_db, kafka_config, topic, 10, 10) as (_, first, _):
        publisher = first._publishing._publisher
        assert publisher is not None
        producer = publisher.producer
        publisher._begin(producer)
        codes = []
        for _ in range(100):  # the first produce after fencing learns it; the next say _FATAL
            try:
                producer.produce(topic, b"x", b"k", 0)
                producer.poll(0.05)
            except KafkaException as e:
                codes.append(e.args[0].code())
                if e.args[0].code() == KafkaError._FATAL:
                    break
        assert codes[-1] == KafkaError._FATAL, codes
        with pytest.raises(RelayFencedError, match="fenced"):
            publisher._produce_position(producer, b"{}")
        # A relay woken from a hang meets it producing a notification: fenced, not refused.
        woken = Notification(
            id=publisher.working_nid + 1,
            originator_id=uuid4(),
            originator_version=1,
            topic="ledger:Entry",
            state=b"{}",
        )
        with pytest.raises(RelayFencedError, match="fenced"):
            publisher.add([woken])
    check_exactly_once_in_order(read_all(kafka_config, topic, 20), db_ids(postgres_db.dsn), 1)


def test_a_second_relay_with_the_same_id_fences_the_first(postgres_db, kafka_config, create_topic):
    topic = create_topic(partitions=3)
    with fenced_pair(postgres_db, kafka_config, topic, 100, 50) as (app, first, second):
        write_events(app, 50)
        with pytest.raises(RelayFencedError, match="fenced"):
            first.publish_available()
        assert second.publish_available() == 50
    check_exactly_once_in_order(read_all(kafka_config, topic, 200), db_ids(postgres_db.dsn), 3)


def test_a_broker_without_transactions_is_refused_before_publishing(postgres_db, topic_name):
    """A real single broker whose transaction log needs 3 replicas cannot do transactions:
    exactly-once refuses it with a clear error (nothing published); at-least-once works."""
    from esbridge.testing.local_kafka import LocalKafkaBroker

    broker = LocalKafkaBroker(
        heap="256m", properties={"transaction.state.log.replication.factor": "3"}
    )
    try:
        broker.start()
        kafka = broker.config()
        write_events(ledger(postgres_db.env), 20)
        relay = ledger_relay(postgres_db, kafka, topic_name, partitions=1, init_timeout=5)
        try:
            with pytest.raises(ConfigurationError, match="may not support transactions"):
                relay.publish_available()
        finally:
            relay.close()
        assert read_all(kafka, topic_name, timeout=2, isolation="read_uncommitted") == []
        at_least_once = ledger_relay(
            postgres_db, kafka, topic_name, partitions=1, exactly_once=False, relay_id="alo"
        )
        assert publish_and_close(at_least_once) == 20
    finally:
        broker.close()


def test_a_first_start_whose_broker_is_gone_is_an_outage_not_a_configuration_error():
    """init_transactions times out because no broker answers (it went away after the relay
    checked its topics): retried as an outage, not reported as a broker without transactions."""
    from esbridge.relay.publisher import KafkaPublisher, TransientPublishError
    from esbridge.wire.encoding import PayloadEncoder

    publisher = KafkaPublisher(
        {"bootstrap.servers": "127.0.0.1:9"},  # nothing listens there
        app=APP_NAME,
        topic="t",
        position_topic="t.position",
        relay_id="gone",
        encoder=PayloadEncoder(APP_NAME, 1),
        num_partitions=1,
        exactly_once=True,
        transactional_id="gone",
        init_timeout=2,
    )
    try:
        with pytest.raises(TransientPublishError, match="init_transactions"):
            publisher.start(first=True)
    finally:
        publisher.close()
