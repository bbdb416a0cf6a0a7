"""Outbound calls against a real Postgres and a local test API (uvicorn on 127.0.0.1).

The test API behaves like a payment provider that honours idempotency keys
(Stripe-style): the first request with a key applies its effect and stores
the answer; later requests with the key get the stored answer and no new
effect. Per order it can fail first (500), time out after applying the effect
(the answer is lost: the retry must not apply it twice), rate-limit (429 +
Retry-After), be unavailable (503 + Retry-After), refuse (422: permanent),
or always fail (500: the retries run out). Every event's call must have
exactly one effect on the API side, and every outcome must be recorded once.

The module also provides the follower factory for the kill -9 test's subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.system import SingleThreadedRunner, System
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from esbridge.deadletters.store import DeadLetterStore
from esbridge_connectors.calling import OutboundRequest, RetryPolicy
from esbridge_connectors.outbound import (
    OutboundCall,
    OutboundFollower,
    OutboundSink,
    OutboundWorker,
)
from esbridge_connectors.serving import BackgroundServer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


class Order(Aggregate):
    @event("Placed")
    def __init__(self, amount: int, mode: str) -> None:
        self.amount = amount
        self.mode = mode

    @event("Noted")
    def note(self, text: str) -> None:  # not followed: no call
        self.text = text


class Shop(Application[uuid.UUID]):
    pass


class ChargeCards(OutboundFollower):
    """Charges each placed order through the payment API."""

    timeout = 0.5
    retry = RetryPolicy(max_attempts=4, initial_backoff=0.02, max_backoff=0.1)
    breaker_threshold = 3
    breaker_reset = 0.3

    def request(self, domain_event: Any) -> OutboundRequest | None:
        if isinstance(domain_event, Order.Placed):
            return OutboundRequest(
                "POST",
                "/charges",
                json={
                    "order": str(domain_event.originator_id),
                    "amount": domain_event.amount,
                    "mode": domain_event.mode,
                },
            )
        return None


def make_follower() -> ChargeCards:
    """Factory for ``python -m esbridge_connectors.outbound`` (settings from the environment)."""
    return ChargeCards()


class PaymentAPI:
    """The test API's state and behaviour (single event loop thread: no locks needed)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.effects: dict[str, int] = defaultdict(int)  # key -> charges applied
        self.attempts: dict[str, list[float]] = defaultdict(list)  # key -> request times
        self.answers: dict[str, tuple[int, dict[str, Any]]] = {}
        self.no_key = 0
        self.asgi = Starlette(routes=[Route("/charges", self.charge, methods=["POST"])])

    async def charge(self, request: Request) -> Response:
        key = request.headers.get("idempotency-key")
        if not key:
            self.no_key += 1
            return JSONResponse({"error": "Idempotency-Key required"}, status_code=400)
        body = await request.json()
        self.attempts[key].append(time.monotonic())
        attempt = len(self.attempts[key])
        if self.delay:
            await anyio.sleep(self.delay)
        if key in self.answers:  # a repeated key: the stored answer, no new effect
            status, content = self.answers[key]
            return JSONResponse(content, status_code=status)
        mode = body["mode"]
        if mode == "flaky" and attempt <= 2:
            return JSONResponse({"error": "internal"}, status_code=500)
        if mode == "ratelimited" and attempt == 1:
            return JSONResponse(
                {"error": "slow down"}, status_code=429, headers={"Retry-After": "1"}
            )
        if mode == "unavailable" and attempt == 1:
            return JSONResponse({"error": "maint"}, status_code=503, headers={"Retry-After": "1"})
        if mode == "broken":
            return JSONResponse({"error": "always fails"}, status_code=500)
        if mode == "invalid":
            self.answers[key] = (422, {"error": "card declined"})
            return JSONResponse(self.answers[key][1], status_code=422)
        self.effects[key] += 1
        self.answers[key] = (201, {"charge": f"ch_{len(self.answers)}", "amount": body["amount"]})
        if mode == "slow" and attempt == 1:  # effect applied, answer lost to the client timeout
            await anyio.sleep(2.0)
        return JSONResponse(self.answers[key][1], status_code=201)


@pytest.fixture
def api():
    payment_api = PaymentAPI()
    with BackgroundServer(payment_api.asgi) as server:
        payment_api.url = server.url  # type: ignore[attr-defined]
        payment_api.server = server  # type: ignore[attr-defined]
        yield payment_api


def place(shop: Shop, modes: list[str]) -> list[Order]:
    orders = []
    for i, mode in enumerate(modes):
        order = Order(amount=100 + i, mode=mode)
        order.note("gift wrap")
        orders.append(order)
    shop.save(*orders)
    return orders


def calls_by_key(follower: Application[Any]) -> dict[str, list[Any]]:
    """Every OutboundCall event in the follower's log, grouped by idempotency key."""
    created: dict[uuid.UUID, str] = {}
    events: dict[str, list[Any]] = defaultdict(list)
    last = 0
    while page := follower.recorder.select_notifications(last + 1, 1000):
        for n in page:
            e = follower.mapper.to_domain_event(n)
            if isinstance(e, OutboundCall.Created):
                created[e.originator_id] = e.idempotency_key
            events[created[e.originator_id]].append(e)
        last = page[-1].id
    return dict(events)


def keys_of(shop: Shop) -> dict[uuid.UUID, str]:
    """Order id -> the idempotency key its Placed event's call must carry."""
    keys = {}
    for n in shop.recorder.select_notifications(1, 10_000):
        if n.topic.endswith("Order.Placed"):
            keys[n.originator_id] = f"Shop:{n.id}"
    return keys


def wait_caught_up(
    follower: Application[Any], shop: Shop, timeout: float, interval: float = 0.05
) -> None:
    """Wait until ``follower`` has processed the whole of ``shop``'s log."""
    last = shop.recorder.max_notification_id()
    deadline = time.monotonic() + timeout
    while follower.recorder.max_tracking_id("Shop") != last:
        assert time.monotonic() < deadline, "the follower did not catch up"
        time.sleep(interval)


def test_each_event_has_exactly_one_effect_and_its_outcome_recorded(postgres_db, api):
    env = postgres_db.env
    shop = Shop(env=env)
    modes = ["ok"] * 12 + ["flaky", "slow", "ratelimited", "unavailable", "invalid", "broken"]
    orders = place(shop, modes)
    follower = ChargeCards(env=env | {"OUTBOUND_BASE_URL": api.url})
    worker = OutboundWorker(follower, "Shop", batch_size=7)
    started = time.monotonic()
    assert worker.run_once() == 2 * len(orders)
    print(f"{len(orders)} calls in {time.monotonic() - started:.1f} s")

    keys = keys_of(shop)
    mode_of = {keys[o.id]: o.mode for o in orders}
    assert api.no_key == 0
    assert set(api.attempts) == set(mode_of)  # one key per event, no call for Noted
    for key, mode in mode_of.items():
        expected = 0 if mode in ("invalid", "broken") else 1
        assert api.effects.get(key, 0) == expected, (key, mode)
    by_mode = {mode: key for key, mode in mode_of.items() if mode != "ok"}
    assert len(api.attempts[by_mode["flaky"]]) == 3
    assert len(api.attempts[by_mode["slow"]]) == 2  # timed out once, effect not applied twice
    for mode in ("ratelimited", "unavailable"):  # Retry-After: 1 honoured
        first, second = api.attempts[by_mode[mode]]
        assert second - first >= 0.95, mode
    assert len(api.attempts[by_mode["invalid"]]) == 1  # 4xx: permanent, no retry
    assert len(api.attempts[by_mode["broken"]]) == ChargeCards.retry.max_attempts

    recorded = calls_by_key(follower)
    assert set(recorded) == set(mode_of)
    for key, events in recorded.items():
        names = [type(e).__qualname__ for e in events]
        mode = mode_of[key]
        if mode == "invalid":
            assert names == ["OutboundCall.Created", "OutboundCall.Failed"]
            assert events[1].reason == "permanent" and events[1].status_code == 422
        elif mode == "broken":
            assert names == ["OutboundCall.Created", "OutboundCall.Failed"]
            assert events[1].reason == "exhausted" and events[1].attempts == 4
        else:
            assert names == ["OutboundCall.Created", "OutboundCall.Succeeded"], key
            assert events[1].response == api.answers[key][1]
    parked = DeadLetterStore(follower.recorder.datastore).list(follower.name)
    assert sorted((d.reason, f"Shop:{d.nid}") for d in parked) == sorted(
        [
            ("outbound_exhausted", by_mode["broken"]),
            ("outbound_permanent", by_mode["invalid"]),
        ]
    )
    assert follower.recorder.max_tracking_id("Shop") == shop.recorder.max_notification_id()

    # Nothing more to do: running again calls nothing and records nothing.
    calls_before = sum(len(a) for a in api.attempts.values())
    assert worker.run_once() == 0
    assert sum(len(a) for a in api.attempts.values()) == calls_before
    worker.close()
    assert worker.recorder.datastore.pool.closed  # type: ignore[attr-defined]
    follower.close()
    shop.close()


def test_api_down_opens_the_breaker_and_parks_nothing(postgres_db, api):
    env = postgres_db.env
    shop = Shop(env=env)
    follower = ChargeCards(env=env | {"OUTBOUND_BASE_URL": api.url})
    worker = OutboundWorker(follower, "Shop", batch_size=50, poll_interval=0.1)
    api.server.stop()
    place(shop, ["ok"] * 10)
    thread = threading.Thread(target=worker.run_forever)
    thread.start()
    try:
        time.sleep(2.0)  # several breaker periods with the API refusing connections
        assert follower.breaker.times_opened >= 2
        assert follower.recorder.max_tracking_id("Shop") is None
        api.server.start()
        wait_caught_up(follower, shop, timeout=30)
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert sorted(api.effects.values()) == [1] * 10
    recorded = calls_by_key(follower)
    assert all(type(e[-1]).__qualname__ == "OutboundCall.Succeeded" for e in recorded.values())
    assert DeadLetterStore(follower.recorder.datastore).list(follower.name) == []
    follower.close()
    shop.close()


def test_database_down_mid_stream_waits_and_does_not_call_again(postgres_db, postgres_server):
    """Calls made for a batch whose commit failed are not repeated once the database is back."""
    payment_api = PaymentAPI(delay=0.2)  # 60 calls, 8 at a time: ~1.5 s of calls
    env = postgres_db.env | {"POSTGRES_CONNECT_TIMEOUT": "2"}
    shop = Shop(env=env)
    place(shop, ["ok"] * 60)
    with BackgroundServer(payment_api.asgi) as server:
        follower = ChargeCards(env=env | {"OUTBOUND_BASE_URL": server.url})
        worker = OutboundWorker(follower, "Shop", batch_size=40, poll_interval=0.1)
        thread = threading.Thread(target=worker.run_forever)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while sum(payment_api.effects.values()) < 5:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            postgres_server.stop()
            try:
                stopped_at = sum(payment_api.effects.values())
                time.sleep(2.0)
            finally:
                postgres_server.start()
            print(f"database stopped after {stopped_at} of 60 calls")
            assert stopped_at < 60, "the database stopped after the last call: nothing tested"
            wait_caught_up(follower, shop, timeout=90, interval=0.1)
        finally:
            worker.stop()
            thread.join(30)
    assert not thread.is_alive()
    keys = keys_of(shop)
    assert set(payment_api.effects) == set(keys.values())
    assert set(payment_api.effects.values()) == {1}
    assert {len(a) for a in payment_api.attempts.values()} == {1}  # no call made twice
    recorded = calls_by_key(follower)
    assert {len(e) for e in recorded.values()} == {2} and set(recorded) == set(keys.values())
    follower.close()
    shop.close()


def test_fed_from_kafka_through_the_consumer_adapter(postgres_db, api, create_topic, kafka_config):
    """Relay -> 3-partition topic -> ConsumerAdapter with OutboundSink: same keys, same outcomes."""
    from esbridge.consumer.adapter import ConsumerAdapter
    from esbridge.relay.relay import Relay

    env = postgres_db.env
    shop = Shop(env=env)
    modes = ["ok"] * 20 + ["flaky", "invalid"]
    place(shop, modes)
    topic = create_topic(partitions=3)
    relay = Relay("Shop", kafka_config=kafka_config, topic=topic, env=shop.env, partitions=3)
    try:
        assert relay.publish_available() == 2 * len(modes)
    finally:
        relay.close()
    follower = ChargeCards(env=env | {"OUTBOUND_BASE_URL": api.url})
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
        assert consumer.process_available(timeout=60) == 2 * len(modes)
    finally:
        consumer.close()
    keys = keys_of(shop)  # "Shop:{nid}": the application's name from the message headers
    assert set(api.attempts) == set(keys.values())
    assert sorted(api.effects.values()) == [1] * 21  # 20 ok + flaky, not invalid
    recorded = calls_by_key(follower)
    assert set(recorded) == set(keys.values())
    outcomes = sorted(type(e[-1]).__qualname__ for e in recorded.values())
    assert outcomes == ["OutboundCall.Failed"] + ["OutboundCall.Succeeded"] * 21
    parked = DeadLetterStore(follower.recorder.datastore).list(follower.name)
    assert [d.reason for d in parked] == ["outbound_permanent"]
    follower.close()
    shop.close()


def test_library_runner_calls_through_the_policy(postgres_db, api, monkeypatch):
    """The same follower class runs under eventsourcing's own SingleThreadedRunner."""
    for name, value in (postgres_db.env | {"OUTBOUND_BASE_URL": api.url}).items():
        monkeypatch.setenv(name, value)
    runner = SingleThreadedRunner(System(pipes=[[Shop, ChargeCards]]))
    runner.start()
    try:
        shop = runner.get(Shop)
        place(shop, ["ok", "flaky", "invalid"])
        follower = runner.get(ChargeCards)
        recorded = calls_by_key(follower)
        keys = keys_of(shop)
        assert set(recorded) == set(keys.values())
        assert sorted(api.effects.values()) == [1, 1]
        outcomes = sorted(type(e[-1]).__qualname__ for e in recorded.values())
        assert outcomes == [
            "OutboundCall.Failed",
            "OutboundCall.Succeeded",
            "OutboundCall.Succeeded",
        ]
    finally:
        runner.stop()


@pytest.mark.slow
def test_kill_9_mid_stream_still_one_effect_per_event(postgres_db, tmp_path):
    """kill -9 the worker subprocess mid-batch; after restart every event has one effect."""
    n_orders = 300
    payment_api = PaymentAPI(delay=0.03)  # slow enough that the kill lands inside a batch
    env = postgres_db.env
    shop = Shop(env=env)
    place(shop, ["ok"] * n_orders)
    with BackgroundServer(payment_api.asgi) as server:
        child_env = (
            os.environ
            | env
            | {
                "OUTBOUND_BASE_URL": server.url,
                # the events' topics name this module as pytest imported it: the child
                # must import it by the same name.
                "PYTHONPATH": str(ROOT),
            }
        )
        command = [
            sys.executable, "-m", "esbridge_connectors.outbound",
            f"{__name__}:make_follower", "Shop", "--batch-size", "40",
        ]  # fmt: skip
        log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(command, env=child_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while sum(payment_api.effects.values()) < 90:  # inside the fifth batch of 20 calls
                assert time.monotonic() < deadline and worker.poll() is None, (
                    tmp_path / "worker.log"
                ).read_text()
                time.sleep(0.002)
        finally:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()
        killed_at = sum(payment_api.effects.values())
        follower = ChargeCards(env=env | {"OUTBOUND_BASE_URL": server.url})
        position = follower.recorder.max_tracking_id("Shop") or 0
        restarted = subprocess.Popen(command, env=child_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            last = shop.recorder.max_notification_id()
            deadline = time.monotonic() + 90
            while follower.recorder.max_tracking_id("Shop") != last:
                assert time.monotonic() < deadline and restarted.poll() is None, (
                    tmp_path / "worker.log"
                ).read_text()
                time.sleep(0.05)
        finally:
            restarted.send_signal(signal.SIGTERM)
            try:
                assert restarted.wait(20) == 0, (tmp_path / "worker.log").read_text()
            finally:
                restarted.kill()
                log.close()
    repeated = [k for k, a in payment_api.attempts.items() if len(a) > 1]
    print(
        f"killed with {killed_at} effects applied and the tracking at {position}; "
        f"{len(repeated)} calls were made again after the restart"
    )
    keys = keys_of(shop)
    assert set(payment_api.effects) == set(keys.values())
    assert set(payment_api.effects.values()) == {1}  # exactly one effect per event
    assert repeated, "the kill did not land inside a batch: the test proved nothing"
    recorded = calls_by_key(follower)
    assert set(recorded) == set(keys.values())
    for key, events in recorded.items():
        assert [type(e).__qualname__ for e in events] == [
            "OutboundCall.Created",
            "OutboundCall.Succeeded",
        ], key
        assert events[1].response == payment_api.answers[key][1]
    follower.close()
    shop.close()
