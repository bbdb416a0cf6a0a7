"""Trace context from a command, through Postgres, the relay and Kafka, to consumers and APIs.

Against the harness's real Postgres and Kafka. The relay and the consumer run
in this process, but after the command's span has ended and in no span of
their own: a parent/child relation found below can only have come through the
side table in Postgres and the Kafka message headers.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.persistence import IntegrityError
from eventsourcing.system import ProcessApplication
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from esbridge import DeadLetterPolicy, record_trace_context
from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.relay.relay import Relay
from esbridge_connectors.analytics import BINARY, CloudEventsEncoder
from esbridge_connectors.outbound import OutboundCall, OutboundSink
from esbridge_connectors.serving import BackgroundServer
from esbridge_connectors.upstream import application_mapper
from tests.integration.connectors.test_outbound import ChargeCards, Order, Shop
from tests.integration.connectors.test_webhooks import make_intake, payment_body, push
from tests.support.relay_support import read_all


def _reset_global_tracer_provider() -> None:
    """Let the next ``set_tracer_provider`` take effect (as OpenTelemetry's own test utils do).

    The API accepts one global provider per process; the docs' example sets its own.
    """
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The SDK's in-memory exporter behind the global tracer provider, for one test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_global_tracer_provider()
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    _reset_global_tracer_provider()


class TracedAPI:
    """An HTTP API that notes the ``traceparent`` each idempotency key's call carried."""

    def __init__(self) -> None:
        self.traceparents: dict[str, str | None] = {}
        self.asgi = Starlette(routes=[Route("/charges", self.charge, methods=["POST"])])

    async def charge(self, request: Request) -> Response:
        self.traceparents[request.headers["idempotency-key"]] = request.headers.get("traceparent")
        return JSONResponse({"charge": "ch"}, status_code=201)


def w3c(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def side_table(dsn: str, table: str) -> dict[int, str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT notification_id, traceparent FROM {table}").fetchall()
    return dict(rows)


def test_trace_goes_from_command_through_relay_and_kafka_to_consumer_and_api(
    postgres_db, create_topic, kafka_config, spans
):
    env = postgres_db.env
    shop = Shop(env=env)
    record_trace_context(shop)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("place orders") as command:
        traced = [Order(amount=100 + i, mode="ok") for i in range(3)]
        for order in traced:
            order.note("gift wrap")
        shop.save(*traced)  # 6 events: 3 Placed, 3 Noted
    untraced = Order(amount=7, mode="ok")  # saved in no span: no context stored
    shop.save(untraced)
    assert side_table(postgres_db.dsn, "shop_events_trace") == {
        nid: w3c(command) for nid in range(1, 7)
    }

    topic = create_topic(partitions=2)
    relay = Relay("Shop", kafka_config=kafka_config, topic=topic, env=shop.env, partitions=2)
    try:
        assert relay.publish_available() == 7
    finally:
        relay.close()
    records = read_all(kafka_config, topic, 7)
    by_nid = {int(r.headers["esb_nid"]): r.headers for r in records}
    assert sorted(by_nid) == list(range(1, 8))
    assert {nid: h.get("traceparent") for nid, h in by_nid.items()} == {
        **{nid: w3c(command) for nid in range(1, 7)},
        7: None,
    }
    assert all("tracestate" not in h for h in by_nid.values())

    api = TracedAPI()
    with BackgroundServer(api.asgi) as server:
        follower = ChargeCards(env=env | {"OUTBOUND_BASE_URL": server.url})
        record_trace_context(follower)
        consumer = ConsumerAdapter(
            follower,
            upstream="Shop",
            topic=topic,
            kafka_config={**kafka_config, "session.timeout.ms": 6000},
            group_id=f"{topic}.outbound",
            upstream_env=env,
            sink=OutboundSink(follower),
        )
        try:
            assert consumer.process_available(timeout=60) == 7
        finally:
            consumer.close()

    finished = spans.get_finished_spans()
    process = {
        s.attributes["esbridge.notification_id"]: s for s in finished if s.kind == SpanKind.CONSUMER
    }
    clients = [s for s in finished if s.kind == SpanKind.CLIENT]
    # One processing span per traced event (none for the untraced one), a child of the
    # command's span and linked to it.
    assert sorted(process) == list(range(1, 7))
    for nid, span in process.items():
        assert span.name == f"process {topic}"
        assert span.parent is not None
        assert span.parent.span_id == command.get_span_context().span_id
        assert span.context.trace_id == command.get_span_context().trace_id
        assert [link.context.span_id for link in span.links] == [command.get_span_context().span_id]
        assert span.attributes["messaging.destination.name"] == topic
        assert span.attributes["esbridge.event_topic"].endswith(
            "Order.Placed" if nid % 2 else "Order.Noted"
        )
    # One call per Placed event; each CLIENT span is the child of its event's processing
    # span, and the API received that CLIENT span as the call's traceparent.
    placed = [nid for nid in range(1, 7) if nid % 2]
    assert len(clients) == 3
    by_parent = {c.parent.span_id: c for c in clients if c.parent is not None}
    assert sorted(by_parent) == sorted(process[nid].context.span_id for nid in placed)
    for nid in placed:
        client = by_parent[process[nid].context.span_id]
        assert client.name == "POST"
        assert client.attributes["http.response.status_code"] == 201
        assert api.traceparents[f"Shop:{nid}"] == w3c(client)
    assert api.traceparents["Shop:7"] is None  # the untraced event's call carries none

    # The follower's own events (the calls' outcomes) were saved under the processing
    # spans: their context is in the follower's side table, for its relay to publish.
    recorded = side_table(postgres_db.dsn, "chargecards_events_trace")
    expected: dict[int, str] = {}
    calls: dict[uuid.UUID, int] = {}
    for n in follower.recorder.select_notifications(1, 100):
        e: Any = follower.mapper.to_domain_event(n)
        if isinstance(e, OutboundCall.Created):
            calls[e.originator_id] = e.notification_id
        upstream_nid = calls[e.originator_id]
        if upstream_nid in process:
            expected[n.id] = w3c(process[upstream_nid])
    assert len(expected) == 6  # Created + Succeeded of each traced call
    assert recorded == expected
    follower.close()
    shop.close()


def test_without_trace_context_recording_nothing_changes(
    postgres_db, create_topic, kafka_config, spans
):
    """An application not set up for tracing: no side table, no headers, even inside a span."""
    shop = Shop(env=postgres_db.env)
    with trace.get_tracer("test").start_as_current_span("place"):
        shop.save(Order(amount=1, mode="ok"))
    topic = create_topic()
    relay = Relay("Shop", kafka_config=kafka_config, topic=topic, env=shop.env)
    try:
        assert relay.publish_available() == 1
    finally:
        relay.close()
    [record] = read_all(kafka_config, topic, 1)
    assert "traceparent" not in record.headers
    with psycopg.connect(postgres_db.dsn) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    assert sorted(t for (t,) in tables) == ["shop_events"]
    shop.close()


def test_analytics_cloudevents_carry_the_distributed_tracing_extension(
    postgres_db, create_topic, kafka_config, spans
):
    """Structured mode: ``traceparent`` attribute in the JSON; binary mode: ``ce_traceparent``."""
    shop = Shop(env=postgres_db.env)
    record_trace_context(shop)
    with trace.get_tracer("test").start_as_current_span("place") as command:
        shop.save(Order(amount=1, mode="ok"))
    shop.save(Order(amount=2, mode="ok"))
    mapper = application_mapper(Shop, postgres_db.env)
    topic = create_topic()
    relay = Relay(
        "Shop",
        kafka_config=kafka_config,
        topic=topic,
        env=shop.env,
        encoder=CloudEventsEncoder("Shop", mapper),
    )
    try:
        assert relay.publish_available() == 2
    finally:
        relay.close()
    records = sorted(read_all(kafka_config, topic, 2), key=lambda r: int(r.headers["esb_nid"]))
    events = [json.loads(r.value) for r in records]
    assert [e.get("traceparent") for e in events] == [w3c(command), None]
    assert [r.headers.get("traceparent") for r in records] == [w3c(command), None]

    first = shop.recorder.select_notifications(1, 1)[0]
    _, headers = CloudEventsEncoder("Shop", mapper, mode=BINARY).encode(
        first, trace=(w3c(command).encode(), b"k=v")
    )
    found = dict(headers)
    assert (found["ce_traceparent"], found["ce_tracestate"]) == (w3c(command).encode(), b"k=v")
    shop.close()


def test_webhook_intake_continues_an_incoming_traceparent(postgres_db, spans):
    """The push's span is the parent of the intake's SERVER span, whose context is saved."""
    intake = make_intake(postgres_db.env)
    record_trace_context(intake.app)
    sender = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with BackgroundServer(intake) as server:
        answer = push(server.url, payment_body("r1"), "d1", {"traceparent": sender})
        assert answer.status_code == 200, answer.text
        assert push(server.url, payment_body("r2"), "d2").status_code == 200
    servers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.name for s in servers] == ["webhook payment.received"] * 2
    continued, fresh = servers
    assert continued.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert continued.parent is not None and continued.parent.span_id == 0xB7AD6B7169203331
    assert continued.parent.is_remote
    assert fresh.parent is None  # no traceparent: the intake starts the trace
    # Both pushes' events (receipt + payment, one transaction each) carry their span's context.
    assert side_table(postgres_db.dsn, "payments_events_trace") == {
        1: w3c(continued),
        2: w3c(continued),
        3: w3c(fresh),
        4: w3c(fresh),
    }
    intake.app.close()


def test_trace_rows_commit_and_roll_back_with_their_events(postgres_db, spans):
    """A save that fails writes no trace row; the next one gets the ids it really took."""
    shop = Shop(env=postgres_db.env)
    record_trace_context(shop)
    tracer = trace.get_tracer("test")
    order = Order(amount=1, mode="ok")
    with tracer.start_as_current_span("first") as first:
        shop.save(order)
    stale = shop.repository.get(order.id)
    order.note("a")
    stale.note("b")  # the same version: its save collides and rolls back
    with tracer.start_as_current_span("second") as second:
        shop.save(order)
    with tracer.start_as_current_span("third"), pytest.raises(IntegrityError):
        shop.save(stale)
    with tracer.start_as_current_span("fourth") as fourth:
        shop.save(Order(amount=2, mode="ok"), Order(amount=3, mode="ok"))
    ids = [n.id for n in shop.recorder.select_notifications(1, 10)]
    assert side_table(postgres_db.dsn, "shop_events_trace") == dict(
        zip(ids, [w3c(first), w3c(second), w3c(fourth), w3c(fourth)], strict=True)
    )
    shop.close()


class Picky(ProcessApplication[uuid.UUID]):
    """Records a note per order, except that its policy raises for amount 13."""

    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: Any) -> None:
        pass

    @policy.register
    def _(self, domain_event: Order.Placed, processing_event: Any) -> None:
        if domain_event.amount == 13:
            raise ValueError("unlucky amount")
        processing_event.collect_events(Order(amount=domain_event.amount, mode="copy"))


def test_a_failing_policy_marks_its_span_and_every_span_ends_once(
    postgres_db, create_topic, kafka_config, spans
):
    """The batch runs again after the failure: its events keep their spans, each ends once."""
    shop = Shop(env=postgres_db.env)
    record_trace_context(shop)
    with trace.get_tracer("test").start_as_current_span("place"):
        shop.save(*[Order(amount=a, mode="ok") for a in (12, 13, 14)])
    topic = create_topic()
    relay = Relay("Shop", kafka_config=kafka_config, topic=topic, env=shop.env)
    try:
        assert relay.publish_available() == 3
    finally:
        relay.close()
    picky = Picky(env=postgres_db.env)
    consumer = ConsumerAdapter(
        picky,
        upstream="Shop",
        topic=topic,
        kafka_config={**kafka_config, "session.timeout.ms": 6000},
        group_id=f"{topic}.picky",
        upstream_env=postgres_db.env,
        dead_letter_policy=DeadLetterPolicy(max_attempts=2, backoff=0.01, on_exhausted="skip"),
    )
    try:
        assert consumer.process_available(timeout=60) == 3
    finally:
        consumer.close()
    process = sorted(
        (s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER),
        key=lambda s: s.attributes["esbridge.notification_id"],
    )
    assert [s.attributes["esbridge.notification_id"] for s in process] == [1, 2, 3]
    assert [s.status.status_code for s in process] == [
        StatusCode.UNSET,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    # One exception event per attempt of the failing policy (2 attempts), none elsewhere.
    assert [[e.name for e in s.events] for s in process] == [[], ["exception"] * 2, []]
    assert process[1].events[0].attributes["exception.message"] == "unlucky amount"
    assert picky.recorder.max_tracking_id("Shop") == 3
    picky.close()
    shop.close()
