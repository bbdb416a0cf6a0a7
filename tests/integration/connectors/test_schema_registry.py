"""Analytics topics in the Schema Registry wire format, against a real registry and broker.

The registry is Apicurio Registry (its Confluent-compatible API), run by the
harness's ``schema_registry`` fixture; the broker and PostgreSQL are the
harness's. Events are published by the relay with
:class:`~esbridge_connectors.registry.SchemaRegistryEncoder` and read back with
confluent_kafka's own deserializers (the ones a Confluent-based consumer uses),
through :class:`~esbridge_connectors.registry.SchemaRegistryReader`.
"""

from __future__ import annotations

import io
import json
import struct
import uuid
from typing import Any

import eventsourcing.utils
import fastavro
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from eventsourcing.application import Application
from eventsourcing.domain import ENVVAR_DISABLE_REDEFINITION_CHECK, Aggregate, event

from esbridge.errors import (
    RelayError,
    SchemaIncompatibleError,
    SchemaNotRegisteredError,
    SchemaRegistryUnavailableError,
)
from esbridge.relay.relay import Relay
from esbridge_connectors.analytics import BINARY, CloudEventsEncoder
from esbridge_connectors.registry import (
    AVRO,
    JSON_SCHEMA,
    SchemaRegistryEncoder,
    SchemaRegistryReader,
    avro_schema,
    record_name,
)
from esbridge_connectors.replay import Replay
from esbridge_connectors.schemas import discover_event_classes
from esbridge_connectors.upstream import application_mapper
from tests.integration.connectors.test_analytics import (
    Customer,
    Shop,
    plain_consume,
    record_history,
)

FORMATS = [AVRO, JSON_SCHEMA]


@pytest.fixture
def shop(postgres_db) -> Shop:
    return Shop(env=postgres_db.env)


@pytest.fixture
def registry_client(schema_registry) -> SchemaRegistryClient:
    if schema_registry.can_control:
        schema_registry.start()  # a fault test may have left it stopped
    return SchemaRegistryClient({"url": schema_registry.url})


def publish(app_name: str, env: dict[str, str], kafka_config, topic: str, encoder) -> int:
    relay = Relay(app_name, kafka_config=kafka_config, topic=topic, env=env, encoder=encoder)
    try:
        return relay.publish_available()
    finally:
        relay.close()


def schema_id_of(value: bytes) -> int:
    """The Confluent wire format: magic byte 0, then the schema id (4 bytes, big-endian)."""
    assert value[0] == 0
    return int(struct.unpack(">I", value[1:5])[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_event_type_round_trips_through_the_registry(
    fmt, shop, postgres_db, kafka_config, create_topic, registry_client, schema_registry
):
    record_history(shop, 12)
    total = shop.recorder.max_notification_id()
    assert total == 12 * 3 + 4
    topic = create_topic(partitions=3)
    mapper = application_mapper(Shop, postgres_db.env)
    classes = discover_event_classes([Customer])
    encoder = SchemaRegistryEncoder(
        shop.name, mapper, registry_client, topic=topic, event_classes=classes, format=fmt
    )
    # topic-record-name subjects, one per event type, each at version 1 with BACKWARD mode
    expected_subjects = sorted(f"{topic}-{record_name(c)}" for c in classes)
    assert sorted(s for s in registry_client.get_subjects() if s.startswith(topic)) == (
        expected_subjects
    )
    for subject in expected_subjects:
        assert registry_client.get_versions(subject) == [1]
        assert registry_client.get_compatibility(subject) == "BACKWARD"

    assert publish(shop.name, postgres_db.env, kafka_config, topic, encoder) == total

    messages = plain_consume(kafka_config, topic, 3, total)
    assert len(messages) == total
    reader = SchemaRegistryReader({"url": schema_registry.url})  # a client of its own
    reference = CloudEventsEncoder(shop.name, mapper, mode=BINARY)
    by_nid = {n.id: n for n in shop.recorder.select_notifications(start=1, limit=total)}
    nids = []
    for m in messages:
        headers = dict(m.headers())
        ce_type = headers["ce_type"].decode()
        assert headers["content-type"] == (
            b"application/avro" if fmt == AVRO else b"application/json"
        )
        assert schema_id_of(m.value()) == encoder.registered[ce_type].schema_id
        cloudevent = reader.cloudevent(topic, m.value(), m.headers())
        expected = reference.cloudevent(by_nid[cloudevent["esbnid"]])
        expected["datacontenttype"] = headers["content-type"].decode()
        assert cloudevent == expected
        assert m.key().decode() == cloudevent["subject"]
        nids.append(cloudevent["esbnid"])
    assert sorted(nids) == list(range(1, total + 1))
    assert {schema_id_of(m.value()) for m in messages} == {
        r.schema_id for r in encoder.registered.values()
    }


def test_replay_uses_the_same_serializers(
    shop, postgres_db, kafka_config, create_topic, registry_client
):
    record_history(shop, 4)
    total = shop.recorder.max_notification_id()
    topic = create_topic(partitions=2)
    mapper = application_mapper(Shop, postgres_db.env)
    encoder = SchemaRegistryEncoder(
        shop.name,
        mapper,
        registry_client,
        topic=topic,
        event_classes=discover_event_classes([Customer]),
    )
    assert publish(shop.name, postgres_db.env, kafka_config, topic, encoder) == total
    result = Replay(
        shop.name, kafka_config=kafka_config, topic=topic, env=postgres_db.env, encoder=encoder
    ).run(2, 6)
    assert (result.count, result.first, result.last) == (5, 2, 6)
    messages = plain_consume(kafka_config, topic, 2, total + 5)
    assert len(messages) == total + 5
    first: dict[int, Any] = {}
    copies = 0
    for m in messages:
        nid = int(dict(m.headers())["ce_esbnid"])
        if nid in first:
            copies += 1
            assert (m.key(), m.partition(), m.headers(), m.value()) == first[nid]
        else:
            first[nid] = (m.key(), m.partition(), m.headers(), m.value())
    assert copies == 5
    assert sorted(first) == list(range(1, total + 1))


def test_an_event_type_without_a_registered_schema_stops_the_relay_before_it(
    shop, postgres_db, kafka_config, create_topic, registry_client
):
    record_history(shop, 2)  # Registered, Charged, Charged, Upgraded; Registered, ...
    topic = create_topic(partitions=1)
    encoder = SchemaRegistryEncoder(
        shop.name,
        application_mapper(Shop, postgres_db.env),
        registry_client,
        topic=topic,
        event_classes=[Customer.Registered, Customer.Charged],  # not Upgraded (nid 4)
    )
    relay = Relay(
        shop.name, kafka_config=kafka_config, topic=topic, env=postgres_db.env, encoder=encoder
    )
    try:
        with pytest.raises(RelayError, match=r"Customer\.Upgraded") as caught:
            relay.publish_available()
        assert isinstance(caught.value.__cause__, SchemaNotRegisteredError)
    finally:
        relay.close()
    assert plain_consume(kafka_config, topic, 1, 0) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_registry_down_at_start_fails_clearly_and_down_mid_run_loses_nothing(
    fmt, schema_registry, shop, postgres_db, kafka_config, create_topic, registry_client
):
    """All registry calls happen when the encoder is built, none in a Kafka transaction."""
    if not schema_registry.can_control:
        pytest.skip("an external registry cannot be stopped")
    record_history(shop, 10)
    total = shop.recorder.max_notification_id()
    topic = create_topic(partitions=2)
    mapper = application_mapper(Shop, postgres_db.env)
    classes = discover_event_classes([Customer])
    built_before = SchemaRegistryEncoder(
        shop.name, mapper, registry_client, topic=topic, event_classes=classes, format=fmt
    )
    schema_registry.stop()
    try:
        with pytest.raises(SchemaRegistryUnavailableError, match="Nothing was published"):
            SchemaRegistryEncoder(
                shop.name,
                mapper,
                SchemaRegistryClient({"url": schema_registry.url}),
                topic=topic,
                event_classes=classes,
                format=fmt,
            )
        assert plain_consume(kafka_config, topic, 2, 0) == []
        # The registry is still down: the encoder built before publishes everything.
        assert publish(shop.name, postgres_db.env, kafka_config, topic, built_before) == total
    finally:
        schema_registry.start()
    messages = plain_consume(kafka_config, topic, 2, total)
    assert len(messages) == total
    parsed = {
        r.schema_id: fastavro.parse_schema(avro_schema(c))
        for c, r in zip(classes, built_before.registered.values(), strict=True)
    }
    nids = []
    for m in messages:
        schema_id, body = schema_id_of(m.value()), m.value()[5:]
        if fmt == AVRO:
            record = fastavro.schemaless_reader(io.BytesIO(body), parsed[schema_id])
        else:
            assert schema_id in parsed
            record = json.loads(body)
        assert isinstance(record, dict)
        assert record["originator_id"] == m.key().decode()
        nids.append(int(dict(m.headers())["ce_esbnid"]))
    assert sorted(nids) == list(range(1, total + 1))


# -- evolution ------------------------------------------------------------------------------------


def account_class(version: int) -> type[Aggregate]:
    """The ``Account`` aggregate as deployed at ``version`` (same event topics each time).

    2 adds an optional ``note`` to ``Paid`` (compatible); 3 retypes ``amount`` (incompatible).
    """
    if version == 1:

        class Account(Aggregate):
            __qualname__ = "Account"

            @event("Opened")
            def __init__(self, owner: str) -> None:
                self.owner = owner

            @event("Paid")
            def pay(self, amount: int) -> None:
                pass

    elif version == 2:

        class Account(Aggregate):  # type: ignore[no-redef]
            __qualname__ = "Account"

            @event("Opened")
            def __init__(self, owner: str) -> None:
                self.owner = owner

            @event("Paid")
            def pay(self, amount: int, note: str | None = None) -> None:
                pass

    else:

        class Account(Aggregate):  # type: ignore[no-redef]
            __qualname__ = "Account"

            @event("Opened")
            def __init__(self, owner: str) -> None:
                self.owner = owner

            @event("Paid")
            def pay(self, amount: str, note: str | None = None) -> None:
                pass

    Account.__module__ = __name__
    return Account


Account = account_class(1)


class Bank(Application[uuid.UUID]):
    pass


def deploy(monkeypatch: pytest.MonkeyPatch, version: int) -> type[Aggregate]:
    """Make ``Account`` version ``version`` the class that this module's topics resolve to.

    As a new deployment of the code would: the class is redefined in place.
    """
    monkeypatch.setenv(ENVVAR_DISABLE_REDEFINITION_CHECK, "1")
    cls = account_class(version)
    monkeypatch.setitem(globals(), "Account", cls)
    cache = eventsourcing.utils._topic_cache
    for topic in [t for t in cache if t.startswith(f"{__name__}:Account")]:
        monkeypatch.delitem(cache, topic)
    return cls


@pytest.mark.parametrize("fmt", FORMATS)
def test_adding_an_optional_field_is_compatible_and_retyping_one_is_refused_before_publishing(
    fmt, monkeypatch, postgres_db, kafka_config, create_topic, registry_client
):
    bank = Bank(env=postgres_db.env)
    topic = create_topic(partitions=1)

    def encoder_for(cls: type[Aggregate]) -> SchemaRegistryEncoder:
        return SchemaRegistryEncoder(
            bank.name,
            application_mapper(Bank, postgres_db.env),
            registry_client,
            topic=topic,
            event_classes=discover_event_classes([cls]),
            format=fmt,
        )

    v1 = deploy(monkeypatch, 1)
    a = v1("ann")
    a.pay(10)
    bank.save(a)
    first = encoder_for(v1)
    assert publish(bank.name, postgres_db.env, kafka_config, topic, first) == 2

    v2 = deploy(monkeypatch, 2)
    b = v2("bob")
    b.pay(20, note="tip")
    b.pay(30)
    bank.save(b)
    second = encoder_for(v2)
    paid_subject = f"{topic}-{__name__}.Account.Paid"
    opened_subject = f"{topic}-{__name__}.Account.Opened"
    assert registry_client.get_versions(paid_subject) == [1, 2]
    assert registry_client.get_versions(opened_subject) == [1]
    paid_type = f"{__name__}:Account.Paid"
    assert second.registered[paid_type].schema_id != first.registered[paid_type].schema_id
    opened_type = f"{__name__}:Account.Opened"
    assert second.registered[opened_type].schema_id == first.registered[opened_type].schema_id
    assert publish(bank.name, postgres_db.env, kafka_config, topic, second) == 3

    v3 = deploy(monkeypatch, 3)
    with pytest.raises(SchemaIncompatibleError, match=r"Account\.Paid") as caught:
        encoder_for(v3)
    assert caught.value.subject == paid_subject
    assert registry_client.get_versions(paid_subject) == [1, 2]

    messages = plain_consume(kafka_config, topic, 1, 5)
    assert len(messages) == 5
    reader = SchemaRegistryReader(registry_client)
    data = [reader.cloudevent(topic, m.value(), m.headers())["data"] for m in messages]
    assert [(d.get("amount"), d.get("note")) for d in data] == [
        (None, None),
        (10, None),
        (None, None),
        (20, "tip"),
        (30, None),
    ]
    assert [d["originator_version"] for d in data] == [1, 2, 1, 2, 3]
    assert "note" not in data[1]  # written with version 1 of the schema
    assert [schema_id_of(m.value()) for m in messages][1:4:2] == [
        first.registered[paid_type].schema_id,
        second.registered[paid_type].schema_id,
    ]


def test_encoder_settings_are_checked():
    with pytest.raises(ValueError, match="format"):
        SchemaRegistryEncoder(
            "A",
            None,
            {"url": "http://127.0.0.1:1"},
            topic="t",
            event_classes=[],
            format="xml",  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="compatibility"):
        SchemaRegistryEncoder(
            "A",
            None,
            {"url": "http://127.0.0.1:1"},
            topic="t",
            event_classes=[],
            compatibility="X",  # type: ignore[arg-type]
        )
    assert json.loads(json.dumps(avro_schema(Customer.Charged)))["fields"][3] == {
        "name": "amount",
        "type": "string",
    }


def test_json_values_that_do_not_fit_their_schema_are_refused_unless_validation_is_off(
    shop, postgres_db, create_topic, registry_client
):
    from decimal import Decimal

    from esbridge.errors import MessageFormatError
    from esbridge_connectors.schemas import JsonTypes

    record_history(shop, 1)
    charged = [
        n
        for n in shop.recorder.select_notifications(start=1, limit=10)
        if n.topic.endswith("Customer.Charged")
    ]
    lying = JsonTypes()  # says "a string", writes a number
    lying.register(Decimal, {"type": "string"}, float)

    def encoder(validate: bool) -> SchemaRegistryEncoder:
        return SchemaRegistryEncoder(
            shop.name,
            application_mapper(Shop, postgres_db.env),
            registry_client,
            topic=create_topic(partitions=1),
            event_classes=[Customer.Charged],
            format=JSON_SCHEMA,
            types=lying,
            validate=validate,
        )

    with pytest.raises(MessageFormatError, match="does not fit its registered schema"):
        encoder(True).encode(charged[0])
    value, _ = encoder(False).encode(charged[0])
    assert json.loads(value[5:])["amount"] == 0.5


def test_cli_replays_a_range_in_avro_through_the_registry(
    postgres_db, kafka_config, create_topic, registry_client, schema_registry
):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.support.sql_projection_domain import DogSchool

    school = DogSchool(env=postgres_db.env)
    for i in range(6):
        school.register(f"dog-{i}", tricks=1)  # Registered, TrickAdded: 12 notifications
    topic = create_topic(partitions=2)
    env = {
        **os.environ,
        **postgres_db.env,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_config["bootstrap.servers"],
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[3])]),
    }
    esbridge = str(Path(sys.executable).with_name("esbridge"))
    done = subprocess.run(
        [esbridge, "replay", "tests.support.sql_projection_domain:DogSchool", "--topic", topic,
         "--from", "3", "--to", "10", "--analytics", "avro",
         "--schema-registry", schema_registry.url],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["count"] == 8
    messages = plain_consume(kafka_config, topic, 2, 8)
    assert len(messages) == 8
    reader = SchemaRegistryReader(registry_client)
    events = [reader.cloudevent(topic, m.value(), m.headers()) for m in messages]
    assert sorted(e["esbnid"] for e in events) == list(range(3, 11))
    assert all(e["data"]["originator_id"] == e["subject"] for e in events)

    unnamed = subprocess.run(
        [esbridge, "replay", "tests.support.sql_projection_domain:DogSchool", "--topic", topic,
         "--analytics", "json-schema"],
        env={k: v for k, v in env.items() if k != "SCHEMA_REGISTRY_URL"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert unnamed.returncode == 2
    assert "--schema-registry URL or SCHEMA_REGISTRY_URL" in unnamed.stderr
