"""The harness gives real servers: Postgres round trips, Kafka produce/consume, groups,
transactions (these fail on a broker that does not implement them), and restarts."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition


def consume_all(config, topic, isolation="read_committed", expect=None, timeout=20.0, **extra):
    """Every message on ``topic`` from the beginning (stops after ``expect`` or a quiet spell)."""
    consumer = Consumer(
        config
        | {
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
        | extra
    )
    consumer.subscribe([topic])
    messages = []
    deadline = time.monotonic() + timeout
    quiet_since = None
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if (
                    expect is None
                    and messages
                    and quiet_since
                    and time.monotonic() - quiet_since > 2
                ):
                    break
                quiet_since = quiet_since or time.monotonic()
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(msg.error())
            quiet_since = time.monotonic()
            messages.append(msg)
            if expect is not None and len(messages) >= expect:
                break
    finally:
        consumer.close()
    return messages


def test_postgres_round_trip(postgres_server, postgres_db):
    with postgres_server.connect(postgres_db.dbname, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int primary key, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        rows = conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()
    assert rows == [(1, "one"), (2, "two")]
    assert postgres_db.env["POSTGRES_DBNAME"] == postgres_db.dbname
    assert postgres_server.host == "127.0.0.1"


def test_produce_consume_with_headers_on_partitions(kafka_config, create_topic):
    topic = create_topic(partitions=3)
    producer = Producer(kafka_config | {"enable.idempotence": True})
    for i in range(30):
        producer.produce(
            topic, key=f"k{i % 5}".encode(), value=f"v{i}".encode(),
            headers=[("n", str(i).encode()), ("src", b"test")], partition=i % 3,
        )  # fmt: skip
    assert producer.flush(10) == 0
    messages = consume_all(kafka_config, topic, expect=30)
    assert len(messages) == 30
    assert {m.partition() for m in messages} == {0, 1, 2}
    by_partition: dict[int, list[int]] = {}
    for m in messages:
        headers = dict(m.headers())
        assert headers["src"] == b"test"
        by_partition.setdefault(m.partition(), []).append(int(headers["n"]))
    for p, ns in by_partition.items():
        assert ns == sorted(ns) and all(n % 3 == p for n in ns)


def test_consumer_group_of_two_splits_partitions(kafka_config, create_topic):
    topic = create_topic(partitions=4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    conf = kafka_config | {
        "group.id": group,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    }
    c1, c2 = Consumer(conf), Consumer(conf)
    c1.subscribe([topic])
    c2.subscribe([topic])
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            c1.poll(0.1)
            c2.poll(0.1)
            a1 = {tp.partition for tp in c1.assignment()}
            a2 = {tp.partition for tp in c2.assignment()}
            if a1 and a2 and len(a1) + len(a2) == 4:
                break
        assert a1 and a2, "both members must get partitions"
        assert a1.isdisjoint(a2) and a1 | a2 == {0, 1, 2, 3}
    finally:
        c1.close()
        c2.close()


def transactional_producer(kafka_config, txn_id):
    producer = Producer(
        kafka_config | {"transactional.id": txn_id, "transaction.timeout.ms": 10000}
    )
    producer.init_transactions(30)
    return producer


def test_aborted_transaction_invisible_committed_visible(kafka_config, create_topic):
    topic = create_topic(partitions=2)
    producer = transactional_producer(kafka_config, f"tx-{uuid.uuid4().hex[:8]}")
    producer.begin_transaction()
    for i in range(10):
        producer.produce(topic, key=b"k", value=f"aborted-{i}".encode(), partition=i % 2)
    producer.flush(10)
    producer.abort_transaction(10)
    producer.begin_transaction()
    for i in range(10):
        producer.produce(topic, key=b"k", value=f"committed-{i}".encode(), partition=i % 2)
    producer.commit_transaction(10)

    committed = consume_all(kafka_config, topic, "read_committed")
    assert sorted(m.value().decode() for m in committed) == sorted(
        f"committed-{i}" for i in range(10)
    )
    # The aborted messages are in the log: read_uncommitted sees them. This is what makes
    # the test fail on a broker that does not filter aborted transactions.
    uncommitted = consume_all(kafka_config, topic, "read_uncommitted")
    assert len([m for m in uncommitted if m.value().startswith(b"aborted")]) == 10


def test_open_transaction_not_visible_until_commit(kafka_config, create_topic):
    topic = create_topic()
    producer = transactional_producer(kafka_config, f"tx-{uuid.uuid4().hex[:8]}")
    producer.begin_transaction()
    producer.produce(topic, value=b"pending")
    producer.flush(10)
    assert consume_all(kafka_config, topic, timeout=3) == []
    producer.commit_transaction(10)
    assert [m.value() for m in consume_all(kafka_config, topic, expect=1)] == [b"pending"]


def test_second_producer_with_same_transactional_id_fences_first(kafka_config, create_topic):
    topic = create_topic()
    txn_id = f"tx-{uuid.uuid4().hex[:8]}"
    zombie = transactional_producer(kafka_config, txn_id)
    zombie.begin_transaction()
    zombie.produce(topic, value=b"zombie")
    zombie.flush(10)
    successor = transactional_producer(kafka_config, txn_id)  # fences the zombie, aborts its txn
    successor.begin_transaction()
    successor.produce(topic, value=b"successor")
    successor.commit_transaction(10)
    with pytest.raises(KafkaException) as excinfo:
        zombie.produce(topic, value=b"zombie-2")
        zombie.commit_transaction(10)
    error = excinfo.value.args[0]
    assert error.fatal() or error.code() in (
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
    ), error
    values = [m.value() for m in consume_all(kafka_config, topic, timeout=5)]
    assert values == [b"successor"]


def test_broker_restart_keeps_committed_messages(kafka_broker, create_topic):
    topic = create_topic(partitions=2)
    config = kafka_broker.config()
    producer = transactional_producer(config, f"tx-{uuid.uuid4().hex[:8]}")
    producer.begin_transaction()
    for i in range(50):
        producer.produce(topic, value=str(i).encode(), partition=i % 2)
    producer.commit_transaction(10)
    del producer
    kafka_broker.restart(kill=True)
    messages = consume_all(kafka_broker.config(), topic, expect=50, timeout=60)
    assert sorted(int(m.value()) for m in messages) == list(range(50))
    # And the broker takes new transactional writes after the restart.
    producer = transactional_producer(kafka_broker.config(), f"tx-{uuid.uuid4().hex[:8]}")
    producer.begin_transaction()
    producer.produce(topic, value=b"after", partition=0)
    producer.commit_transaction(30)
    _low, high = Consumer(config | {"group.id": "w"}).get_watermark_offsets(
        TopicPartition(topic, 0), timeout=10
    )
    assert high > 25


@pytest.mark.parametrize("kill", [False, True], ids=["clean", "kill-9"])
def test_postgres_restart_keeps_data(postgres_server, postgres_db, kill):
    with postgres_server.connect(postgres_db.dbname, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int primary key)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 100)")
    postgres_server.restart(kill=kill)
    with postgres_server.connect(postgres_db.dbname) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (100,)


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """One random id in 64 starts with "-", which Kafka's storage tool reads as an option."""
    from esbridge.testing import local_kafka

    draws = iter([uuid.UUID(bytes=b"\xf8" + b"\x01" * 15), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(local_kafka.uuid, "uuid4", lambda: next(draws))
    cluster_id = local_kafka.random_cluster_id()
    assert cluster_id == "AQEBAQEBAQEBAQEBAQEBAQ"  # the second draw: the first began with "-"
