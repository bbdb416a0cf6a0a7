"""Analytics topics read by a consumer that knows nothing of esbridge.

An application with UUIDs, datetimes, decimals, enums, nested dataclasses,
optional and collection fields records events in a real PostgreSQL; they are
published by the relay in the analytics format (CloudEvents, structured and
binary mode) to a real Kafka topic; a PLAIN confluent-kafka
consumer reads every message, finds its JSON Schema (generated from the event
classes, written to files) by the CloudEvents ``type`` alone, and validates it
with ``jsonschema``. It also checks the values a non-Python reader sees
(decimals and ids as strings, per-aggregate order, one message per notification).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from confluent_kafka import Consumer, TopicPartition
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import Transcoder, Transcoding

from esbridge.errors import MessageFormatError
from esbridge.relay.relay import Relay
from esbridge_connectors.analytics import (
    BINARY,
    STRUCTURED,
    AnalyticsPayloadEncoder,
    CloudEventsEncoder,
    read_cloudevent,
)
from esbridge_connectors.replay import Replay
from esbridge_connectors.schemas import (
    discover_event_classes,
    event_data_schema,
    write_schemas,
)
from esbridge_connectors.upstream import application_mapper


class Tier(Enum):
    BASIC = "basic"
    GOLD = "gold"


@dataclass(frozen=True)
class Address:
    street: str
    city: str


class AddressAsDict(Transcoding):
    type = Address
    name = "address"

    def encode(self, obj: Address) -> dict[str, str]:
        return {"street": obj.street, "city": obj.city}

    def decode(self, data: dict[str, str]) -> Address:
        return Address(**data)


class DateAsISO(Transcoding):
    type = date
    name = "date_iso"

    def encode(self, obj: date) -> str:
        return obj.isoformat()

    def decode(self, data: str) -> date:
        return date.fromisoformat(data)


class TierAsValue(Transcoding):
    type = Tier
    name = "tier"

    def encode(self, obj: Tier) -> str:
        return obj.value

    def decode(self, data: str) -> Tier:
        return Tier(data)


class Customer(Aggregate):
    @event("Registered")
    def __init__(
        self, name: str, tier: Tier, born: date, address: Address, referrer: uuid.UUID | None
    ) -> None:
        self.name = name
        self.tier = tier
        self.born = born
        self.address = address
        self.referrer = referrer
        self.balance = Decimal("0")

    @event("Charged")
    def charge(self, amount: Decimal, tags: list[str], at: datetime) -> None:
        self.balance -= amount

    @event("Upgraded")
    def upgrade(self, tier: Tier, notes: dict[str, int]) -> None:
        self.tier = tier


class Shop(Application[uuid.UUID]):
    def register_transcodings(self, transcoder: Transcoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(AddressAsDict())
        transcoder.register(DateAsISO())
        transcoder.register(TierAsValue())


def record_history(app: Shop, customers: int) -> None:
    """Each customer: Registered, two Charged, and every third one Upgraded."""
    referrer: uuid.UUID | None = None
    for i in range(customers):
        c = Customer(
            f"customer-{i}",
            Tier.BASIC,
            date(1990, 1, 1 + i % 28),
            Address(f"{i} Main St", "Oslo"),
            referrer,
        )
        c.charge(Decimal(f"{i}.50"), ["web", f"batch-{i % 3}"], datetime(2026, 11, 23, 12, i % 60))
        c.charge(Decimal("0.10"), [], datetime(2026, 11, 23, 13, 0))
        if i % 3 == 0:
            c.upgrade(Tier.GOLD, {"points": i})
        app.save(c)
        referrer = c.id


@pytest.fixture
def shop(postgres_db) -> Shop:
    return Shop(env=postgres_db.env)


@pytest.fixture
def schemas(tmp_path: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    classes = discover_event_classes([Customer])
    index = write_schemas(classes, tmp_path / "schemas")
    return tmp_path / "schemas", index


def plain_consume(kafka_config: dict[str, Any], topic: str, partitions: int, expected: int):
    """Everything in ``topic``, read by a plain consumer (explicit assignment, no group)."""
    consumer = Consumer(
        {
            **kafka_config,
            "group.id": "plain-analytics-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    messages = []
    try:
        empty_polls = 0
        while len(messages) < expected or empty_polls < 3:
            batch = consumer.consume(500, timeout=1.0)
            if not batch:
                empty_polls += 1
                if empty_polls > 30:
                    break
                continue
            empty_polls = 0 if len(messages) < expected else empty_polls
            for m in batch:
                assert m.error() is None, m.error()
                messages.append(m)
    finally:
        consumer.close()
    return messages


def validator_for(directory: Path, index: dict[str, dict[str, str]], type_: str, part: str):
    """A Draft 2020-12 validator (with format checks) for a message of CloudEvents ``type``."""
    schema = json.loads((directory / index[type_][part]).read_text())
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@pytest.mark.parametrize("mode", [STRUCTURED, BINARY])
def test_plain_consumer_validates_every_message(
    mode, shop, postgres_db, kafka_config, create_topic, schemas
):
    directory, index = schemas
    record_history(shop, 30)
    total = shop.recorder.max_notification_id()
    assert total == 30 * 3 + 10
    topic = create_topic(partitions=3)
    mapper = application_mapper(Shop, postgres_db.env)
    relay = Relay(
        shop.name,
        kafka_config=kafka_config,
        topic=topic,
        env=postgres_db.env,
        encoder=CloudEventsEncoder(shop.name, mapper, mode=mode),
    )
    try:
        assert relay.publish_available() == total
    finally:
        relay.close()

    messages = plain_consume(kafka_config, topic, 3, total)
    assert len(messages) == total
    seen_nids: list[int] = []
    versions: dict[str, list[int]] = {}
    charges: dict[str, list[str]] = {}
    for m in messages:
        headers = {k: (v or b"").decode() for k, v in m.headers() or ()}
        if mode == STRUCTURED:
            assert headers["content-type"] == "application/cloudevents+json; charset=UTF-8"
            ce = json.loads(m.value())
            validator_for(directory, index, ce["type"], "cloudevent").validate(ce)
            nid, subject, data = ce["esbnid"], ce["subject"], ce["data"]
            assert ce["id"] == f"{shop.name}:{nid}"
        else:
            assert headers["content-type"] == "application/json"
            data = json.loads(m.value())
            validator_for(directory, index, headers["ce_type"], "data").validate(data)
            nid, subject = int(headers["ce_esbnid"]), headers["ce_subject"]
            assert headers["ce_id"] == f"{shop.name}:{nid}"
            assert headers["ce_specversion"] == "1.0"
        assert m.key().decode() == subject == data["originator_id"]
        seen_nids.append(nid)
        versions.setdefault(subject, []).append(data["originator_version"])
        if "amount" in data:
            charges.setdefault(subject, []).append(data["amount"])
            assert isinstance(data["amount"], str)
            assert datetime.fromisoformat(data["at"]).year == 2026
        if "address" in data:
            assert data["address"]["city"] == "Oslo"
            assert data["tier"] == "basic"
            assert data["born"].startswith("1990-01-")
    assert sorted(seen_nids) == list(range(1, total + 1))
    assert all(v == sorted(v) == list(range(1, len(v) + 1)) for v in versions.values())
    assert len(versions) == 30
    assert sorted(c[0] for c in charges.values()) == sorted(f"{i}.50" for i in range(30))
    assert all(c[1] == "0.10" for c in charges.values())


def test_reference_reader_gives_the_same_cloudevent_in_both_modes(shop, postgres_db):
    record_history(shop, 2)
    mapper = application_mapper(Shop, postgres_db.env)
    notifications = shop.recorder.select_notifications(start=1, limit=100)
    structured = CloudEventsEncoder(shop.name, mapper, dataschema_base="https://example.com/s/")
    binary = CloudEventsEncoder(
        shop.name, mapper, mode=BINARY, dataschema_base="https://example.com/s"
    )
    for n in notifications:
        a = read_cloudevent(*structured.encode(n))
        b = read_cloudevent(*binary.encode(n))
        b["datacontenttype"] = a["datacontenttype"]
        assert a == b
        assert a["dataschema"].startswith(f"https://example.com/s/{__name__}.Customer.")
        assert a["dataschema"].endswith(".data.json")


def test_schema_rejects_what_the_encoder_never_writes():
    """The schemas are strict enough to catch a consumer-visible format change."""
    schema = event_data_schema(Customer.Charged)
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    good = {
        "originator_id": str(uuid.uuid4()),
        "originator_version": 2,
        "timestamp": "2026-11-23T12:00:00+00:00",
        "amount": "1.50",
        "tags": ["a"],
        "at": "2026-11-23T12:00:00",
    }
    validator.validate(good)
    for bad in (
        {**good, "amount": 1.5},  # a decimal must be a string
        {**good, "amount": "1,50"},
        {**good, "originator_id": "not-a-uuid"},
        {**good, "at": "yesterday"},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "tags"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)


def test_analytics_encoder_keeps_the_relay_key_partition_and_esb_headers(shop, postgres_db):
    """The analytics encoder is a drop-in PayloadEncoder: same key, partition, esb_* headers."""
    from esbridge.wire.encoding import PayloadEncoder

    record_history(shop, 6)
    mapper = application_mapper(Shop, postgres_db.env)
    plain = PayloadEncoder(shop.name, 4)
    analytics = AnalyticsPayloadEncoder(shop.name, 4, mapper, mode=BINARY)
    chain_a, chain_b = [0] * 4, [0] * 4
    for n in shop.recorder.select_notifications(start=1, limit=100):
        key_a, _, headers_a, part_a = plain.message(n, chain_a)
        key_b, value_b, headers_b, part_b = analytics.message(n, chain_b)
        assert (key_a, part_a) == (key_b, part_b)
        esb_a = [(k, v) for k, v in headers_a if k.startswith("esb_")]
        esb_b = [(k, v) for k, v in headers_b if k.startswith("esb_")]
        assert esb_a == esb_b
        assert json.loads(value_b)["originator_version"] == n.originator_version
    assert chain_a == chain_b


def test_undecodable_message_is_a_clear_error():
    with pytest.raises(MessageFormatError, match="CloudEvents"):
        read_cloudevent(b"{}", [("content-type", b"application/json")])


def test_replay_of_an_analytics_topic_repeats_the_relays_messages(
    shop, postgres_db, kafka_config, create_topic
):
    """Same encoder hook for the relay and the replay: byte-identical messages."""
    record_history(shop, 8)
    total = shop.recorder.max_notification_id()
    topic = create_topic(partitions=2)
    mapper = application_mapper(Shop, postgres_db.env)
    encoder = CloudEventsEncoder(shop.name, mapper)
    relay = Relay(
        shop.name, kafka_config=kafka_config, topic=topic, env=postgres_db.env, encoder=encoder
    )
    try:
        relay.publish_available()
    finally:
        relay.close()
    Replay(
        shop.name, kafka_config=kafka_config, topic=topic, env=postgres_db.env, encoder=encoder
    ).run(1, 10)
    messages = plain_consume(kafka_config, topic, 2, total + 10)
    assert len(messages) == total + 10
    first: dict[int, Any] = {}
    for m in messages:
        nid = json.loads(m.value())["esbnid"]
        if nid in first:
            original = first[nid]
            assert (m.key(), m.partition(), m.headers(), m.value()) == (
                original.key(),
                original.partition(),
                original.headers(),
                original.value(),
            )
        else:
            first[nid] = m
    assert sorted(first) == list(range(1, total + 1))
