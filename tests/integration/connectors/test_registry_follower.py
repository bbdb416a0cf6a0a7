"""An esbridge follower of a Schema Registry topic, against the real registry, broker and Postgres.

The upstream ``Shop`` (every value type the analytics format writes: UUIDs,
dates, datetimes, decimals, enums, a nested dataclass, lists, a mapping, an
optional UUID) is published in Avro or JSON Schema by
:class:`~esbridge_connectors.registry.SchemaRegistryEncoder`; a process
application consumes the topic through
:class:`~esbridge_connectors.registry_follower.RegistryStepFactory`. Its
policy records, per upstream event, the event's attributes as it received
them: they must equal the upstream mapper's own decoding of the stored event,
value for value and type for type, exactly once each, whatever duplicates,
losses and restarts the topic shows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from eventsourcing.application import ProcessingEvent
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import Transcoder
from eventsourcing.system import ProcessApplication
from eventsourcing.utils import get_topic

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.deadletters.retry import retry_dead_letters
from esbridge.errors import SchemaRegistryUnavailableError
from esbridge.kafka.partitioning import partition_for_key
from esbridge.names import tracking_names
from esbridge.wire.encoding import PayloadEncoder
from esbridge_connectors.analytics import CloudEventsEncoder
from esbridge_connectors.registry import AVRO, JSON_SCHEMA, SchemaRegistryEncoder
from esbridge_connectors.registry_follower import RegistryStepFactory, event_from_data
from esbridge_connectors.schemas import DEFAULT_TYPES, discover_event_classes
from esbridge_connectors.upstream import application_mapper
from tests.integration.connectors.test_analytics import (
    AddressAsDict,
    Customer,
    DateAsISO,
    Shop,
    TierAsValue,
    record_history,
)
from tests.support.consumer_apps import ManualPublisher
from tests.support.remote_log import ESBRIDGE, ROOT

FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def attributes(domain_event: Any) -> str:
    """Every attribute of an event, values and types (their reprs), in a stable order."""
    return repr(sorted(vars(domain_event).items()))


class Entry(Aggregate):
    """What the ledger saw of one upstream event."""

    @staticmethod
    def create_id(upstream_id: str, version: int, event_type: str, seen: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"{upstream_id}/{version}")

    @event("Recorded")
    def __init__(self, upstream_id: str, version: int, event_type: str, seen: str) -> None:
        self.upstream_id = upstream_id
        self.version = version
        self.event_type = event_type
        self.seen = seen


class Ledger(ProcessApplication[UUID]):
    def register_transcodings(self, transcoder: Transcoder) -> None:
        """The upstream's types: to read its log (gaps, checks), as every follower does."""
        super().register_transcodings(transcoder)
        for transcoding in (AddressAsDict(), DateAsISO(), TierAsValue()):
            transcoder.register(transcoding)

    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        processing_event.collect_events(
            Entry(
                str(domain_event.originator_id),
                domain_event.originator_version,
                get_topic(type(domain_event)),
                attributes(domain_event),
            )
        )

    def entries(self) -> list[Entry]:
        return [
            self.repository.get(n.originator_id)
            for n in self.recorder.select_notifications(start=1, limit=10**6)
        ]


class FragileLedger(Ledger):
    """Fails on upgrades until ``healed``: its upgrades are parked."""

    healed = False

    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        if isinstance(domain_event, Customer.Upgraded) and not FragileLedger.healed:
            raise ValueError("cannot record an upgrade yet")
        super().policy(domain_event, processing_event)


def consumer_of(
    ledger: Ledger, topic: str, kafka_config, registry_url: str, env, **tuning: Any
) -> ConsumerAdapter:
    return ConsumerAdapter(
        ledger,
        upstream="Shop",
        topic=topic,
        kafka_config={**kafka_config, **FAST_GROUP},
        group_id=f"{topic}.ledger",
        upstream_env=env,  # fills gaps from the log, and checks messages against it
        steps=RegistryStepFactory.of_follower(ledger, "Shop", {"url": registry_url}),
        verify_messages=True,
        **tuning,
    )


def registry_topic(shop: Shop, env, kafka_config, create_topic, registry_url: str) -> str:
    """A one-partition topic of ``shop``'s events in Avro, sent by a ManualPublisher."""
    topic = create_topic(partitions=1)
    encoder = SchemaRegistryEncoder(
        "Shop",
        application_mapper(Shop, env),
        SchemaRegistryClient({"url": registry_url}),
        topic=topic,
        event_classes=discover_event_classes([Customer]),
    )
    publisher = ManualPublisher(kafka_config, topic, "Shop", 1)
    publisher.encoder = PayloadEncoder("Shop", 1, encoder=encoder)
    publisher.send(publisher.messages(list(shop.recorder.select_notifications(start=1, limit=999))))
    return topic


def consume_all(consumer: ConsumerAdapter) -> Any:
    try:
        consumer.process_available(timeout=30)
        return consumer.status()
    finally:
        consumer.close()


@pytest.mark.parametrize("fmt", [AVRO, JSON_SCHEMA])
def test_a_follower_consumes_a_registry_topic_exactly_once(
    fmt, postgres_db, kafka_config, create_topic, schema_registry
):
    if schema_registry.can_control:
        schema_registry.start()  # a fault test may have left it stopped
    shop = Shop(env=postgres_db.env)
    record_history(shop, 8)
    notes = list(shop.recorder.select_notifications(start=1, limit=1000))
    # Random aggregate ids: rarely, all on one partition. Then add customers, for an empty
    # partition makes process_available() wait out its whole timeout.
    while len({partition_for_key(str(n.originator_id).encode(), 2) for n in notes}) < 2:
        record_history(shop, 1)
        notes = list(shop.recorder.select_notifications(start=1, limit=1000))
    total = len(notes)
    assert total >= 8 * 3 + 3
    topic = create_topic(partitions=2)
    encoder = SchemaRegistryEncoder(
        "Shop",
        application_mapper(Shop, postgres_db.env),
        SchemaRegistryClient({"url": schema_registry.url}),
        topic=topic,
        event_classes=discover_event_classes([Customer]),
        format=fmt,
    )
    # The relay's messages (the same bytes: its PayloadEncoder with the registry encoder),
    # sent with losses and duplicates, as a relay crash and a replay would leave them.
    publisher = ManualPublisher(kafka_config, topic, "Shop", 2)
    publisher.encoder = PayloadEncoder("Shop", 2, encoder=encoder)
    messages = publisher.messages(notes)
    assert all(value[0] == 0 for _key, value, _headers, _p in messages)  # registry-framed
    sent = [m for i, m in enumerate(messages) if i not in (4, 5, 11)]  # lost: nids 5, 6, 12
    publisher.send(sent + messages[:4])  # and the first four again

    ledger = Ledger(env=postgres_db.env)
    status = consume_all(consumer_of(ledger, topic, kafka_config, schema_registry.url, shop.env))

    assert (status.dead_letters, status.parked) == (0, 0)
    assert status.duplicates == 4
    assert status.gaps_reconciled >= 1 and status.reconciled_events == 3
    expected = {
        (str(n.originator_id), n.originator_version): (
            n.topic,
            attributes(shop.mapper.to_domain_event(n)),
        )
        for n in notes
    }
    entries = ledger.entries()
    assert len(entries) == total  # one entry per upstream event: none lost, none twice
    assert {(e.upstream_id, e.version): (e.event_type, e.seen) for e in entries} == expected
    last_in = {}
    for _key, _value, headers, partition in messages:
        last_in[partition] = int(dict(headers)["esb_nid"])
    for partition, name in enumerate(tracking_names("Shop", 2)):
        assert ledger.recorder.max_tracking_id(name) == last_in[partition]

    # Restarted, with the whole topic sent again: nothing is applied twice.
    publisher.send(messages)
    status = consume_all(consumer_of(ledger, topic, kafka_config, schema_registry.url, shop.env))
    assert (status.processed, status.dead_letters) == (0, 0)
    assert len(ledger.entries()) == total


def test_a_registry_out_of_reach_stops_the_follower_and_parks_nothing(
    postgres_db, kafka_config, create_topic, schema_registry
):
    """Fetching a writer's schema fails: not the message's fault, so nothing moves."""
    if not schema_registry.can_control:
        pytest.skip("an external registry cannot be stopped")
    schema_registry.start()
    shop = Shop(env=postgres_db.env)
    record_history(shop, 2)
    topic = registry_topic(shop, postgres_db.env, kafka_config, create_topic, schema_registry.url)
    ledger = Ledger(env=postgres_db.env)
    schema_registry.stop()
    try:
        consumer = consumer_of(ledger, topic, kafka_config, schema_registry.url, shop.env)
        with pytest.raises(SchemaRegistryUnavailableError, match="Nothing was recorded"):
            consume_all(consumer)
    finally:
        schema_registry.start()
    assert ledger.recorder.max_tracking_id("Shop") is None  # no position moved
    assert ledger.entries() == []


def test_parked_messages_of_a_registry_topic_are_retried_with_its_steps(
    postgres_db, kafka_config, create_topic, schema_registry
):
    if schema_registry.can_control:
        schema_registry.start()
    shop = Shop(env=postgres_db.env)
    record_history(shop, 6)  # upgrades: customers 0 and 3
    total = shop.recorder.max_notification_id()
    topic = registry_topic(shop, postgres_db.env, kafka_config, create_topic, schema_registry.url)
    FragileLedger.healed = False
    ledger = FragileLedger(env=postgres_db.env)
    consumer = consumer_of(
        ledger, topic, kafka_config, schema_registry.url, shop.env, retries=1, retry_backoff=0.01
    )
    status = consume_all(consumer)
    assert (status.processed, status.parked) == (total, 2)
    assert len(ledger.entries()) == total - 2
    FragileLedger.healed = True
    # The default decoder reads stored events, not registry-framed data: nothing is applied.
    refused = retry_dead_letters(ledger)
    assert (refused.retried, len(refused.failed)) == ([], 2)
    assert len(ledger.entries()) == total - 2
    steps = {"Shop": RegistryStepFactory.of_follower(ledger, "Shop", {"url": schema_registry.url})}
    result = retry_dead_letters(ledger, steps=steps)
    assert (len(result.retried), result.failed) == (2, {})
    assert len(ledger.entries()) == total
    upgrades = [e for e in ledger.entries() if e.event_type.endswith("Customer.Upgraded")]
    assert len(upgrades) == 2


def test_esbridge_consume_with_schema_registry_follows_a_registry_topic(
    postgres_db, kafka_config, create_topic, schema_registry, tmp_path
):
    """``esbridge consume --schema-registry URL`` as a process: every event applied once."""
    if schema_registry.can_control:
        schema_registry.start()
    shop = Shop(env=postgres_db.env)
    record_history(shop, 5)
    total = shop.recorder.max_notification_id()
    topic = registry_topic(shop, postgres_db.env, kafka_config, create_topic, schema_registry.url)
    ledger = Ledger(env=postgres_db.env)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "KAFKA_"))}
    env.update(postgres_db.env)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=kafka_config["bootstrap.servers"],
        KAFKA_SESSION_TIMEOUT_MS="6000",
        KAFKA_HEARTBEAT_INTERVAL_MS="500",
    )
    log_file = tmp_path / "consume.log"
    with log_file.open("wb") as output:
        consumer = subprocess.Popen(
            [*ESBRIDGE, "consume", f"{__name__}:Ledger", "--upstream", "Shop", "--topic", topic,
             "--group", f"{topic}.cli", "--schema-registry", schema_registry.url,
             "--upstream-log", "--verify-messages", "--app-dir", str(ROOT)],
            env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(ledger.entries()) < total:
            assert consumer.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.2)
        consumer.send_signal(signal.SIGTERM)  # graceful: after the current batch
        assert consumer.wait(30) == 0, log_file.read_text()
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    expected = {
        (str(n.originator_id), n.originator_version): attributes(shop.mapper.to_domain_event(n))
        for n in shop.recorder.select_notifications(start=1, limit=999)
    }
    entries = ledger.entries()
    assert len(entries) == total
    assert {(e.upstream_id, e.version): e.seen for e in entries} == expected
    assert ledger.recorder.max_tracking_id("Shop") == total


def test_event_from_data_rebuilds_the_mappers_event():
    """Without servers: the data of each event type back into an equal event."""
    mapper = application_mapper(Shop, {"PERSISTENCE_MODULE": "eventsourcing.popo"})
    shop = Shop(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    record_history(shop, 3)
    cloudevents = CloudEventsEncoder("Shop", mapper)
    for n in shop.recorder.select_notifications(start=1, limit=100):
        original = mapper.to_domain_event(n)
        data = cloudevents.cloudevent(n)["data"]
        rebuilt = event_from_data(
            type(original),
            data,
            aggregate_id=n.originator_id,
            version=n.originator_version,
            types=DEFAULT_TYPES,
        )
        assert attributes(rebuilt) == attributes(original)
        assert type(rebuilt) is type(original)


class Tab(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner

    @event("Paid")
    def pay(self, amount: int, note: str | None = None) -> None:
        self.paid = amount


def test_a_field_added_since_the_message_was_written_is_absent_as_from_the_mapper():
    """Data written before ``note`` existed: the event lacks it, as the library's would."""
    tab = Tab("ann")
    tab.pay(5)
    before_note = {k: v for k, v in vars(tab.collect_events()[1]).items() if k != "note"}
    data = DEFAULT_TYPES.to_json(before_note)
    paid = event_from_data(Tab.Paid, data, aggregate_id=tab.id, version=2)
    assert vars(paid) == before_note
    replica = Tab("ann")
    replica._id = tab.id  # the same aggregate, version 1
    paid.mutate(replica)  # the @event method runs, with its default note
    assert (replica.paid, replica.version) == (5, 2)
