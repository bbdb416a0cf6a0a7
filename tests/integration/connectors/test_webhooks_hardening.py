"""The intake against hostile or broken clients: real uvicorn and sockets, real Postgres.

Each test is one reproduction from issue 29 part 4: a huge request head,
unfinished heads and slow bodies held open, clients vanishing mid-body, a
deeply nested signed body, a NaN timestamp, a handler bug's text sent to the
sender, and the operations routes on the public port. Slow clients are raw
sockets driven by loops with a deadline, so every test ends by itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from esbridge_connectors import webhooks
from esbridge_connectors.http_limits import HttpLimits
from esbridge_connectors.serving import BackgroundServer
from esbridge_connectors.webhooks import WebhookIntake
from tests.integration.connectors.test_webhooks import (
    SECRET,
    SIGNATURE,
    Payments,
    make_intake,
    payment_body,
    push,
    recorded,
)
from tests.integration.connectors.test_webhooks_load import IntakeProcess, free_port

HEAD_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
HEAD_SENT_BOUND = 16 * 1024 * 1024  # a quarter of the 64 MB head that was read whole


class Served:
    def __init__(self, intake: WebhookIntake[Payments], public: str, ops: str) -> None:
        self.intake = intake
        self.url = public
        self.ops_url = ops
        host, port = public.removeprefix("http://").split(":")
        self.address = (host, int(port))

    def outcomes(self) -> dict[str, float]:
        """``esbridge_webhook_requests_total`` by outcome, from the operations listener."""
        counts: dict[str, float] = {}
        for line in httpx.get(f"{self.ops_url}/metrics").text.splitlines():
            if line.startswith("esbridge_webhook_requests_total{"):
                label, value = line.split("} ")
                counts[label.split('"')[1]] = float(value)
        return counts


@pytest.fixture
def served(postgres_db) -> Iterator[Served]:
    intake = make_intake(postgres_db.env, max_body_bytes=1_000_000, body_timeout=BODY_TIMEOUT)
    limits = HttpLimits(head_timeout=HEAD_TIMEOUT)
    with (
        BackgroundServer(intake, limits=limits) as public,
        BackgroundServer(intake.ops, limits=limits) as ops,
    ):
        yield Served(intake, public.url, ops.url)
    intake.app.close()


def signed_head(body_length: int, delivery_id: str, body: bytes) -> bytes:
    headers = SIGNATURE.sign(body) | {"X-Delivery-Id": delivery_id}
    lines = [
        "POST /webhooks HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Length: {body_length}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_until_closed(
    socks: list[socket.socket], deadline: float, trickle: bytes = b""
) -> dict[socket.socket, bytes]:
    """What each socket received until the server closed it (or the deadline passed).

    With ``trickle``, one byte of it is sent on every still-open socket every 0.2 s
    (a slow client). Returns only the sockets the server closed.
    """
    selector = selectors.DefaultSelector()
    received = {s: b"" for s in socks}
    for s in socks:
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)
    closed: dict[socket.socket, bytes] = {}
    sent = 0
    next_trickle = time.monotonic()
    while len(closed) < len(socks) and time.monotonic() < deadline:
        if trickle and time.monotonic() >= next_trickle and sent < len(trickle):
            for s in socks:
                if not received[s]:  # no more once the answer started: it would meet a reset
                    with contextlib.suppress(OSError):
                        s.send(trickle[sent : sent + 1])
            sent += 1
            next_trickle = time.monotonic() + 0.2
        for key, _ in selector.select(timeout=0.05):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            received[s] += data
            if not data:
                closed[s] = received[s]
                selector.unregister(s)
    selector.close()
    for s in socks:
        s.close()
    return closed


def test_a_head_over_max_head_bytes_is_answered_431_and_never_read_to_the_end(served):
    """Was: a 64 MB header from an unauthenticated client was read whole (and answered)."""
    head = b"POST /webhooks HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: "
    sent, answer = send_huge_head(served.address, head, 64 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert answer.endswith(b"Request head larger than 16384 bytes."), answer
    # The kernel's loopback buffers take a few MB before the client sees the answer.
    assert sent < HEAD_SENT_BOUND, f"the client could send {sent} bytes of a head"

    # A head under the limit is served as before.
    body = payment_body("big-head")
    ok = push(served.url, body, "h-1", headers={"X-Padding": "x" * 12_000})
    assert ok.status_code == 200 and ok.json()["status"] == "recorded", ok.text


def send_huge_head(address: tuple[str, int], head: bytes, total: int) -> tuple[int, bytes]:
    """Send ``head`` then up to ``total`` bytes of one header value; (bytes sent, answer)."""
    chunk = b"a" * 65536
    sent = 0
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(head)
        selector = selectors.DefaultSelector()
        selector.register(s, selectors.EVENT_READ)
        try:
            while sent < total and not selector.select(timeout=0):
                s.sendall(chunk)
                sent += len(chunk)
            if sent >= total:
                s.sendall(b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        selector.close()
        answer = b""
        try:
            while data := s.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
    return sent, answer


def test_unfinished_heads_are_answered_408_and_closed_after_head_timeout(served):
    """Was: 300 unfinished request heads were held open 40 s, none closed."""
    socks = [socket.create_connection(served.address) for _ in range(300)]
    for s in socks[:-1]:
        s.sendall(b"POST /webhooks HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Delivery-")
    started = time.monotonic()  # the last socket sends nothing at all
    closed = read_until_closed(socks, deadline=started + 10 * HEAD_TIMEOUT)
    elapsed = time.monotonic() - started
    print(f"\n300 unfinished heads closed in {elapsed:.1f} s (head_timeout {HEAD_TIMEOUT} s)")
    assert len(closed) == 300
    assert {answer.split(b"\r\n")[0] for answer in closed.values()} == {
        b"HTTP/1.1 408 Request Timeout"
    }
    assert all(
        answer.endswith(b"Request head not received within 1 s.") for answer in closed.values()
    )
    assert 0.5 * HEAD_TIMEOUT <= elapsed < 5 * HEAD_TIMEOUT


def test_slow_bodies_are_answered_408_after_body_timeout_and_closed(served):
    """Was: 100 slow bodies were held open 40 s, none closed."""
    body = payment_body("slow") + b" " * 100
    socks = [socket.create_connection(served.address) for _ in range(100)]
    for i, s in enumerate(socks):
        s.sendall(signed_head(len(body), f"slow-{i}", body))
    # One more: a body the application never reads (no such route) is cut off too.
    unread = socket.create_connection(served.address)
    unread.sendall(b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")
    started = time.monotonic()
    closed = read_until_closed([*socks, unread], deadline=started + 10, trickle=body)
    elapsed = time.monotonic() - started
    print(f"\n100 slow bodies answered 408 and closed in {elapsed:.1f} s")
    assert len(closed) == 101
    statuses = [closed[s].split(b"\r\n")[0] for s in socks]
    assert statuses == [b"HTTP/1.1 408 Request Timeout"] * 100
    answer = json.loads(closed[socks[0]].split(b"\r\n\r\n", 1)[1])
    assert answer == {
        "status": "body_timeout", "delivery_id": None, "reason": "body not received within 1 s"
    }  # fmt: skip
    assert closed[unread].startswith(b"HTTP/1.1 404 Not Found")
    assert elapsed < 5 * BODY_TIMEOUT
    assert served.outcomes()["body_timeout"] == 100
    assert recorded(served.intake.app) == {}


def test_a_client_leaving_mid_body_is_one_info_line_not_a_handler_error(served, caplog):
    """Was: logged as ``handler failed on push None`` with a traceback, counted handler_error."""
    caplog.set_level(logging.INFO, logger=webhooks.__name__)
    body = payment_body("gone")
    for i in range(20):
        with socket.create_connection(served.address) as s:
            s.sendall(signed_head(len(body) + 100, f"gone-{i}", body) + body[:10])
            time.sleep(0.01)  # the intake is reading the body when the client leaves
    deadline = time.monotonic() + 10
    while served.outcomes().get("client_disconnected", 0) < 20:
        assert time.monotonic() < deadline, served.outcomes()
        time.sleep(0.05)
    assert "handler_error" not in served.outcomes()
    ours = [r for r in caplog.records if r.name == webhooks.__name__]
    assert [(r.levelno, r.getMessage()) for r in ours] == [
        (logging.INFO, "client disconnected before its whole body arrived; nothing recorded")
    ] * 20
    assert not any(r.exc_info for r in caplog.records)
    assert recorded(served.intake.app) == {}


def test_json_nested_deeper_than_max_json_depth_is_400_not_500(served):
    """Was: a signed 40,000-deep body answered 500 ``RecursionError`` (retried for ever)."""
    deep = b"[" * 40_000 + b"]" * 40_000
    r = push(served.url, deep, "deep-1")
    assert r.status_code == 400, r.text
    assert r.json() == {
        "status": "too_deep", "delivery_id": None, "reason": "JSON nested deeper than 64 levels"
    }  # fmt: skip

    def nested(levels: int) -> bytes:  # the top object is level 1
        inner: object = 1
        for _ in range(levels - 1):
            inner = [inner]
        return json.dumps(
            {"type": "payment.received", "ref": "n", "amount": 1, "x": inner}
        ).encode()

    r = push(served.url, nested(65), "deep-2")
    assert r.status_code == 400 and r.json()["status"] == "too_deep", r.text
    r = push(served.url, nested(64), "deep-3")
    assert r.status_code == 200 and r.json()["status"] == "recorded", r.text
    assert served.outcomes()["too_deep"] == 2


def test_a_timestamp_that_is_not_unix_seconds_is_refused_401(served):
    """Was: ``X-Timestamp: nan`` passed the freshness check (every comparison with NaN is false)."""
    body = payment_body("nan")
    now = int(time.time())
    for stamp in ["nan", "NaN", "inf", "-inf", f"{now:e}", f"+{now}", f"{now:_}", f"0x{now:x}"]:
        digest = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
        headers = {"X-Timestamp": stamp, "X-Signature": digest, "X-Delivery-Id": "nan"}
        r = httpx.post(f"{served.url}/webhooks", content=body, headers=headers)
        assert r.status_code == 401, (stamp, r.text)
        assert r.json()["reason"] == "timestamp header X-Timestamp is not Unix seconds", stamp
    assert recorded(served.intake.app) == {}

    # A decimal fraction, as some senders write it, is still accepted.
    stamp = f"{time.time():.3f}"
    digest = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    headers = {"X-Timestamp": stamp, "X-Signature": digest, "X-Delivery-Id": "decimal"}
    r = httpx.post(f"{served.url}/webhooks", content=body, headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "recorded", r.text


def test_a_handler_bug_answers_a_generic_500_with_an_error_id_that_the_log_has(served, caplog):
    """Was: the handler's exception text (``KeyError: 'ref'``) was returned to the sender."""
    caplog.set_level(logging.INFO, logger=webhooks.__name__)
    body = json.dumps({"type": "payment.received", "amount": 1}).encode()  # no "ref"
    r = push(served.url, body, "bug-1")
    assert r.status_code == 500, r.text
    error_id = r.json()["error_id"]
    assert len(error_id) == 16 and int(error_id, 16) >= 0
    assert r.json() == {
        "status": "handler_error",
        "delivery_id": "bug-1",
        "reason": f"internal error, nothing recorded (error id {error_id})",
        "error_id": error_id,
    }
    assert "KeyError" not in r.text and "ref" not in r.text
    [logged] = [r for r in caplog.records if r.name == webhooks.__name__]
    assert logged.levelno == logging.ERROR
    assert (
        logged.getMessage()
        == f"handler failed on push bug-1 (error id {error_id}); nothing recorded"
    )
    assert logged.exc_info is not None and logged.exc_info[0] is KeyError
    assert recorded(served.intake.app) == {}


def test_metrics_and_healthz_are_not_on_the_public_port_and_healthz_shows_no_error_text(served):
    """Was: ``/metrics``, ``/healthz`` on the public port; ``/healthz`` showed database errors."""
    for path in ("/metrics", "/healthz"):
        r = httpx.get(f"{served.url}{path}")
        assert (r.status_code, r.text) == (404, "Not Found"), path
    assert httpx.post(f"{served.ops_url}/webhooks", content=b"{}").status_code == 404
    assert httpx.get(f"{served.ops_url}/healthz").json() == {"status": "ok"}
    metrics = httpx.get(f"{served.ops_url}/metrics")
    assert metrics.status_code == 200 and "esbridge_webhook_request_seconds" in metrics.text

    served.intake.app.recorder.datastore.pool.close()  # type: ignore[attr-defined]
    r = httpx.get(f"{served.ops_url}/healthz", timeout=60)
    assert (r.status_code, r.json()) == (503, {"status": "unavailable"})


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory so far (``VmHWM``: a freed buffer still counts)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.mark.parametrize("workers", [1, 2])
def test_the_command_serves_pushes_and_operations_on_separate_listeners(
    postgres_db, tmp_path, workers
):
    """``python -m esbridge_connectors.webhooks``: the same limits, ops on their own port."""
    Payments(env=postgres_db.env).close()
    intake = IntakeProcess(
        postgres_db.env, free_port(), tmp_path / "intake.log", ops_port=free_port(), workers=workers
    )
    intake.start()
    try:
        for path in ("/metrics", "/healthz"):
            assert httpx.get(f"{intake.url}{path}").status_code == 404
        assert httpx.get(f"{intake.ops_url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{intake.ops_url}/metrics").status_code == 200
        r = push(intake.url, payment_body("cli"), f"cli-{workers}")
        assert r.status_code == 200 and r.json()["status"] == "recorded", r.text

        assert intake.process is not None
        before = peak_rss_bytes(intake.process.pid)
        head = b"POST /webhooks HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: "
        sent, answer = send_huge_head(("127.0.0.1", intake.port), head, 64 * 1024 * 1024)
        grown = peak_rss_bytes(intake.process.pid) - before
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        assert sent < HEAD_SENT_BOUND
        if workers == 1:  # then the process is the one that parsed the head (was: +134 MB)
            print(f"\nhead refused after {sent} bytes sent, the worker's peak RSS +{grown} bytes")
            assert grown < 8 * 1024 * 1024
    finally:
        intake.stop()
