"""The webhook intake against a real Postgres and a real uvicorn on 127.0.0.1.

Each refused push gets its status and reason and records nothing; duplicates
(sequential and concurrent) record nothing twice; concurrent deliveries that
change the same aggregate are all applied; a stopped database gives 503 and
the sender's retry is recorded once after the restart.

The module also serves as the intake's factory for the subprocess load tests
(``make_intake``), see ``test_webhooks_load.py``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from esbridge_connectors.serving import BackgroundServer
from esbridge_connectors.signatures import HmacSignature
from esbridge_connectors.webhooks import (
    FieldSource,
    RejectDelivery,
    WebhookIntake,
    WebhookReceipt,
)

SECRET = "test-secret-do-not-use"
SIGNATURE = HmacSignature(secrets=[SECRET], header="X-Signature", timestamp_header="X-Timestamp")


class Payment(Aggregate):
    @event("Received")
    def __init__(self, ref: str, amount: int) -> None:
        self.ref = ref
        self.amount = amount


class Account(Aggregate):
    @event("Opened")
    def __init__(self, name: str) -> None:
        self.name = name
        self.balance = 0

    @staticmethod
    def create_id(name: str) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"account:{name}")

    @event("Credited")
    def credit(self, amount: int) -> None:
        self.balance += amount


class Payments(Application[uuid.UUID]):
    pass


def receive_payment(app: Payments, payload: Any, delivery_id: str) -> Payment:
    if not isinstance(payload.get("amount"), int):
        raise RejectDelivery("amount must be an integer")
    # A random id on purpose: deduplication must come from the receipt, not from the handler.
    return Payment(payload["ref"], payload["amount"])


def credit_account(app: Payments, payload: Any, delivery_id: str) -> Account:
    account = app.repository.get(Account.create_id(payload["account"]))
    assert isinstance(account, Account)
    account.credit(payload["amount"])
    return account


HANDLERS = {"payment.received": receive_payment, "account.credited": credit_account}


def make_intake(env: dict[str, str] | None = None, **options: Any) -> WebhookIntake[Payments]:
    """The intake the tests run (in-process, or in a subprocess through uvicorn's factory)."""
    settings: dict[str, Any] = {
        "max_body_bytes": 10_000,
        "max_concurrency": int(os.environ.get("INTAKE_CONCURRENCY", "16")),
    }
    return WebhookIntake(
        Payments(env=env),
        HANDLERS,
        delivery_id=FieldSource.from_header("X-Delivery-Id"),
        kind=FieldSource.from_body("type"),
        signature=SIGNATURE,
        **(settings | options),
    )


def push(
    url: str, body: bytes, delivery_id: str | None, headers: dict[str, str] | None = None
) -> httpx.Response:
    sent = SIGNATURE.sign(body)
    if delivery_id is not None:
        sent["X-Delivery-Id"] = delivery_id
    sent.update(headers or {})
    return httpx.post(f"{url}/webhooks", content=body, headers=sent, timeout=60)


def payment_body(ref: str, amount: int = 1) -> bytes:
    return json.dumps({"type": "payment.received", "ref": ref, "amount": amount}).encode()


def recorded(app: Application[Any]) -> dict[str, list[Any]]:
    """Every event in the application's notification log, grouped by class name."""
    by_type: dict[str, list[Any]] = {}
    last = 0
    while True:
        page = app.recorder.select_notifications(last + 1, 1000)
        if not page:
            return by_type
        for n in page:
            e = app.mapper.to_domain_event(n)
            by_type.setdefault(type(e).__qualname__, []).append(e)
        last = page[-1].id


@pytest.fixture
def intake(postgres_db):
    env = postgres_db.env | {"POSTGRES_CONNECT_TIMEOUT": "2", "POSTGRES_POOL_SIZE": "8"}
    intake = make_intake(env)
    with BackgroundServer(intake) as server, BackgroundServer(intake.ops) as ops:
        intake.url = server.url  # type: ignore[attr-defined]
        intake.ops_url = ops.url  # type: ignore[attr-defined]
        yield intake
    intake.app.close()


def test_each_bad_push_gets_its_status_and_reason_and_records_nothing(intake):
    url = intake.url
    good = payment_body("p-1")
    cases: list[tuple[str, int, str, httpx.Response]] = []

    r = httpx.post(f"{url}/webhooks", content=good, headers={"X-Delivery-Id": "a"})
    cases.append(("no signature", 401, "missing timestamp header", r))
    r = push(url, good, "b", headers={"X-Signature": "00" * 32})
    cases.append(("wrong signature", 401, "invalid signature", r))
    other = HmacSignature(secrets=["another-secret"]).sign(good)
    r = push(url, good, "c", headers=other)
    cases.append(("signed with another secret", 401, "invalid signature", r))
    stale = SIGNATURE.sign(good, timestamp=time.time() - 3600)
    r = push(url, good, "d", headers=stale)
    cases.append(("stale timestamp", 401, "stale timestamp", r))
    future = SIGNATURE.sign(good, timestamp=time.time() + 3600)
    r = push(url, good, "d2", headers=future)
    cases.append(("timestamp from the future", 401, "stale timestamp", r))
    tampered = SIGNATURE.sign(good)
    r = push(url, payment_body("p-1", amount=1000), "e", headers=tampered)
    cases.append(("body changed after signing", 401, "invalid signature", r))
    r = push(url, b"{not json", "f")
    cases.append(("malformed JSON", 400, "not JSON", r))
    r = push(url, payment_body("p-1"), None)
    cases.append(("no delivery id", 400, "no delivery id", r))
    r = push(url, json.dumps({"ref": "x"}).encode(), "g")
    cases.append(("no kind", 400, "no event kind", r))
    r = push(url, json.dumps({"type": "refund.issued", "ref": "x"}).encode(), "h")
    cases.append(("unknown kind", 422, "unknown event kind 'refund.issued'", r))
    r = push(url, json.dumps({"type": "payment.received", "ref": "x", "amount": "1"}).encode(), "i")
    cases.append(("handler rejects", 422, "amount must be an integer", r))
    big = json.dumps({"type": "payment.received", "ref": "x" * 20_000, "amount": 1}).encode()
    r = push(url, big, "j")
    cases.append(("oversize body", 413, "larger than 10000 bytes", r))

    def chunks():  # no Content-Length: the limit must hold while streaming too
        for _ in range(30):
            yield b" " * 1000

    r = httpx.post(f"{url}/webhooks", content=chunks(), headers={"X-Delivery-Id": "k"})
    cases.append(("oversize chunked body", 413, "larger than 10000 bytes", r))

    for name, status, reason, response in cases:
        assert response.status_code == status, (name, response.text)
        assert reason in response.json()["reason"], (name, response.text)
    assert recorded(intake.app) == {}

    ok = push(url, good, "z")
    assert ok.status_code == 200 and ok.json()["status"] == "recorded", ok.text
    events = recorded(intake.app)
    assert [e.ref for e in events["Payment.Received"]] == ["p-1"]
    assert [e.delivery_id for e in events["WebhookReceipt.Received"]] == ["z"]

    metrics = httpx.get(f"{intake.ops_url}/metrics").text
    assert 'esbridge_webhook_requests_total{outcome="bad_signature"} 6.0' in metrics
    assert 'esbridge_webhook_requests_total{outcome="too_large"} 2.0' in metrics
    assert 'esbridge_webhook_requests_total{outcome="recorded"} 1.0' in metrics
    assert httpx.get(f"{intake.ops_url}/healthz").json() == {"status": "ok"}


def test_duplicates_sequential_and_concurrent_record_once(intake):
    url = intake.url
    first = push(url, payment_body("once"), "dup-1")
    assert first.json()["status"] == "recorded"
    again = push(url, payment_body("once"), "dup-1")
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert again.json()["receipt_id"] == first.json()["receipt_id"]
    changed = push(url, payment_body("once", amount=2), "dup-1")
    assert changed.json() | {"receipt_id": None} == {
        "status": "duplicate", "delivery_id": "dup-1", "receipt_id": None, "body_differs": True
    }  # fmt: skip

    # 20 threads push the same new delivery at the same instant.
    barrier = threading.Barrier(20)
    answers: list[str] = []

    def send() -> None:
        body = payment_body("race")
        barrier.wait()
        answers.append(push(url, body, "dup-2").json()["status"])

    threads = [threading.Thread(target=send) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == ["duplicate"] * 19 + ["recorded"]
    events = recorded(intake.app)
    assert sorted(e.ref for e in events["Payment.Received"]) == ["once", "race"]
    assert receipt_ids(events) == {
        WebhookReceipt.create_id("webhooks", "dup-1"),
        WebhookReceipt.create_id("webhooks", "dup-2"),
    }


def receipt_ids(events: dict[str, list[Any]]) -> set[uuid.UUID]:
    return {e.originator_id for e in events["WebhookReceipt.Received"]}


def test_concurrent_deliveries_changing_one_aggregate_are_all_applied(intake):
    account = Account("shared")
    intake.app.save(account)
    url = intake.url
    n_threads, per_thread = 10, 12

    def send(t: int) -> None:
        for i in range(per_thread):
            body = json.dumps({"type": "account.credited", "account": "shared", "amount": 1})
            while True:  # a sender retries 503s (too many conflicts) like any real sender
                r = push(url, body.encode(), f"credit-{t}-{i}")
                if r.status_code == 200:
                    break
                assert r.status_code == 503, r.text
                time.sleep(0.05)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loaded = intake.app.repository.get(account.id)
    assert loaded.balance == n_threads * per_thread
    events = recorded(intake.app)
    assert len(events["Account.Credited"]) == n_threads * per_thread
    assert len(receipt_ids(events)) == n_threads * per_thread


def test_database_down_answers_503_and_the_retry_records_once(intake, postgres_server):
    url = intake.url
    assert push(url, payment_body("before"), "db-0").json()["status"] == "recorded"
    postgres_server.stop()
    try:
        started = time.monotonic()
        statuses = []
        for _ in range(3):
            r = push(url, payment_body("during"), "db-1")
            statuses.append(r.status_code)
            assert r.json()["status"] == "unavailable" and r.headers["Retry-After"] == "1"
            assert r.json()["reason"] == "not recorded, retry later"  # no database error text
        health = httpx.get(f"{intake.ops_url}/healthz", timeout=60)
        assert (health.status_code, health.json()) == (503, {"status": "unavailable"})
        print(f"3 pushes answered 503 in {time.monotonic() - started:.1f} s")
        assert statuses == [503, 503, 503]
    finally:
        postgres_server.start()
    deadline = time.monotonic() + 60
    while True:  # the sender keeps retrying until it gets a 2xx
        r = push(url, payment_body("during"), "db-1")
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        assert r.status_code == 503, r.text
        time.sleep(0.2)
    assert r.json()["status"] == "recorded", r.text
    assert push(url, payment_body("during"), "db-1").json()["status"] == "duplicate"
    events = recorded(intake.app)
    assert [e.ref for e in events["Payment.Received"]] == ["before", "during"]
    assert httpx.get(f"{intake.ops_url}/healthz").status_code == 200
