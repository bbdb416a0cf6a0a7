"""Inbound push API: an ASGI service that turns each push into a command, exactly once.

The seed's "push-API adapter": an external system pushes (webhooks, callbacks)
and retries until it gets a 2xx. Each push carries a delivery id. The intake
runs the user's handler for the push's kind, then saves the aggregates the
handler changed *together with a* :class:`WebhookReceipt` *aggregate whose id
is derived from the delivery id* (uuid5), in one ``Application.save()`` call,
i.e. one database transaction. So:

- a redelivery, or a concurrent duplicate, collides on the receipt's version 1
  (eventsourcing's optimistic concurrency: ``IntegrityError``), its whole
  transaction rolls back, and it is answered ``200 {"status": "duplicate"}``;
- the sender gets its 2xx only after that transaction committed; a crash or a
  database failure before the commit leaves nothing behind and the sender's
  retry records the push then.

Why a receipt aggregate rather than a dedup table: it needs no extra table or
SQL, it commits atomically through the library's own recorder (whatever
persistence module the application uses), and the receipt event in the
application's notification log is an audit record of every accepted push.

Run it with uvicorn (``python -m esbridge_connectors.webhooks pkg.module:factory``,
see :func:`main`), where ``factory()`` returns a :class:`WebhookIntake`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import anyio.to_thread
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError, PersistenceError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from esbridge.errors import ConfigurationError, EsbridgeError
from esbridge.runtime.tracing import server_span
from esbridge_connectors.http_limits import OPS_LISTENER, HttpLimits
from esbridge_connectors.signatures import HmacSignature, SignatureError

logger = logging.getLogger(__name__)

RECEIPT_NAMESPACE = uuid.UUID("6f1d7c2e-4a4b-5b9e-9d0a-2c1f0e5b7a31")
"""uuid5 namespace of receipt ids (fixed forever: changing it would forget past deliveries)."""

TApp = TypeVar("TApp", bound=Application[Any])

Handler = Callable[[TApp, Any, str], Iterable[Any] | Aggregate | None]
"""``handler(app, payload, delivery_id)``: run the command, return what to save.

Return the aggregates (or domain events) the command created or changed, a
single aggregate, or ``None``. Do not call ``app.save()``: the intake saves
them with the delivery's receipt in one transaction. Raise
:class:`RejectDelivery` to refuse a push (422, nothing recorded).
"""


class RejectDelivery(EsbridgeError):
    """Raised by a handler to refuse a push: answered 422 with this message, nothing recorded.

    Use it for pushes that will never be acceptable (the sender should stop
    retrying): a payload missing a field, an unknown order id, and so on.
    """


class ConcurrentUpdateError(EsbridgeError):
    """Other deliveries kept changing the same aggregates; answered 503 so the sender retries."""


class WebhookReceipt(Aggregate):
    """The record that a delivery was accepted. Its id is a function of the delivery id."""

    @event("Received")
    def __init__(self, source: str, delivery_id: str, kind: str, body_sha256: str) -> None:
        self.source = source
        self.delivery_id = delivery_id
        self.kind = kind
        self.body_sha256 = body_sha256

    @staticmethod
    def create_id(source: str, delivery_id: str, *_: Any, **__: Any) -> uuid.UUID:
        """``uuid5(RECEIPT_NAMESPACE, source + NUL + delivery_id)``: same delivery, same id."""
        return uuid.uuid5(RECEIPT_NAMESPACE, f"{source}\x00{delivery_id}")


@dataclass(frozen=True)
class FieldSource:
    """Where a value (delivery id, kind) is found: a header, or a field of the JSON body."""

    header: str | None = None
    body_path: tuple[str, ...] = ()

    @classmethod
    def from_header(cls, name: str) -> FieldSource:
        return cls(header=name)

    @classmethod
    def from_body(cls, dotted_path: str) -> FieldSource:
        """A field of the JSON object body; ``"data.id"`` reads ``body["data"]["id"]``."""
        return cls(body_path=tuple(dotted_path.split(".")))

    def describe(self) -> str:
        return f"header {self.header}" if self.header else f"body field {'.'.join(self.body_path)}"

    def extract(self, headers: Mapping[str, str], payload: Any) -> str | None:
        if self.header is not None:
            return headers.get(self.header) or None
        value = payload
        for name in self.body_path:
            if not isinstance(value, dict) or name not in value:
                return None
            value = value[name]
        if value is None or isinstance(value, dict | list) or value == "":
            return None
        return str(value)


class _Refused(Exception):
    """A push refused before anything was recorded (status code + reason for the sender)."""

    def __init__(
        self, status: int, outcome: str, reason: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.outcome = outcome
        self.reason = reason
        self.headers = headers


@dataclass(frozen=True)
class _Accepted:
    outcome: str  # "recorded" or "duplicate"
    receipt_id: uuid.UUID
    body_differs: bool = False


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "esbridge_webhook_requests",
            "Pushes received, by outcome (recorded, duplicate, or why refused).",
            ["outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "esbridge_webhook_request_seconds",
            "Time from request to answer.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )


class WebhookIntake(Generic[TApp]):
    """An ASGI application that records each push once on an event-sourced ``app``.

    Routes: ``POST {path}`` (the pushes). The operations routes, ``GET
    /healthz`` (checks the database) and ``GET /metrics`` (Prometheus), are
    the separate ASGI app :attr:`ops`, served on its own listener (loopback
    by default, see :func:`main`) so that the public port never shows them.

    Answers: 200 recorded / duplicate; 400 malformed JSON, JSON nested deeper
    than ``max_json_depth``, or missing delivery id or kind; 401 bad, missing
    or stale signature; 408 body not received within ``body_timeout``; 413
    body over ``max_body_bytes``; 422 unknown kind or :class:`RejectDelivery`;
    503 database unavailable (with ``Retry-After``); 500 a handler bug (a
    generic reason with an error id, also logged with the traceback). Every
    answer but 200 means nothing was recorded.
    """

    def __init__(
        self,
        app: TApp,
        handlers: Mapping[str, Handler[TApp]],
        *,
        delivery_id: FieldSource,
        kind: FieldSource,
        signature: HmacSignature | None,
        source: str = "webhooks",
        path: str = "/webhooks",
        max_body_bytes: int = 1_000_000,
        body_timeout: float = 30.0,
        max_json_depth: int = 64,
        max_concurrency: int = 16,
        conflict_retries: int = 5,
        retry_after_seconds: int = 1,
        probe_window_seconds: float = 30.0,
        registry: CollectorRegistry | None = None,
        close_app_on_shutdown: bool = True,
    ) -> None:
        """``signature=None`` turns verification off: do that only behind a verifying proxy."""
        if not handlers:
            raise ConfigurationError("WebhookIntake needs at least one handler (kind -> function)")
        if max_body_bytes <= 0 or max_concurrency <= 0 or body_timeout <= 0:
            raise ConfigurationError(
                "max_body_bytes, body_timeout and max_concurrency must be positive"
            )
        if not 0 < max_json_depth <= MAX_JSON_DEPTH:
            raise ConfigurationError(
                f"max_json_depth must be between 1 and {MAX_JSON_DEPTH} (Python's json parser "
                "recurses once per level)"
            )
        self.app = app
        self.handlers = dict(handlers)
        self.delivery_id = delivery_id
        self.kind = kind
        self.signature = signature
        self.source = source
        self.path = path
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.max_json_depth = max_json_depth
        self.max_concurrency = max_concurrency
        self.conflict_retries = conflict_retries
        self.retry_after_seconds = retry_after_seconds
        self.probe_window_seconds = probe_window_seconds
        self._last_database_error = float("-inf")
        self.close_app_on_shutdown = close_app_on_shutdown
        self.metrics = _Metrics(registry or CollectorRegistry(auto_describe=True))
        self._limiter: anyio.CapacityLimiter | None = None
        self.asgi = Starlette(
            routes=[Route(path, self._receive, methods=["POST"])], lifespan=self._lifespan
        )
        self.ops = Starlette(
            routes=[
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The push route; :attr:`ops` for requests that arrived on the operations listener."""
        if scope.get(OPS_LISTENER) == "ops":
            await self.ops(scope, receive, send)
        else:
            await self.asgi(scope, receive, send)

    @asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        yield
        if self.close_app_on_shutdown:
            self.app.close()

    async def _in_thread(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run blocking eventsourcing calls in worker threads, at most ``max_concurrency``."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.max_concurrency)
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)

    # --- the push endpoint -------------------------------------------------

    async def _receive(self, request: Request) -> Response:
        started = time.perf_counter()
        delivery_id: str | None = None
        try:
            body = await self._read_body(request)
            if self.signature is not None:
                try:
                    self.signature.verify(request.headers, body)
                except SignatureError as e:
                    raise _Refused(401, "bad_signature", e.reason) from None
            payload = self._parse(body)
            delivery_id = self.delivery_id.extract(request.headers, payload)
            if delivery_id is None:
                raise _Refused(
                    400, "missing_delivery_id", f"no delivery id in {self.delivery_id.describe()}"
                )
            kind = self.kind.extract(request.headers, payload)
            if kind is None:
                raise _Refused(400, "missing_kind", f"no event kind in {self.kind.describe()}")
            if kind not in self.handlers:
                raise _Refused(
                    422,
                    "unknown_kind",
                    f"unknown event kind {kind!r}; accepted: {sorted(self.handlers)}",
                )
            digest = hashlib.sha256(body).hexdigest()
            accepted = await self._in_thread(
                self._record_traced, request.headers, kind, payload, delivery_id, digest
            )
        except _Refused as e:
            return self._answer(
                started, e.status, e.outcome, delivery_id, headers=e.headers, reason=e.reason
            )
        except ClientDisconnect:
            # The sender went away mid-body: nothing to answer, nothing recorded, not a bug.
            logger.info("client disconnected before its whole body arrived; nothing recorded")
            return self._answer(started, 400, "client_disconnected", delivery_id)
        except RejectDelivery as e:
            return self._answer(started, 422, "rejected", delivery_id, reason=str(e))
        except (PersistenceError, ConcurrentUpdateError) as e:
            if isinstance(e, PersistenceError):
                self._last_database_error = time.monotonic()
            # The error's text names hosts, users and tables: the log has it, not the sender.
            logger.warning("push %s not recorded, database unavailable: %s", delivery_id, e)
            return self._answer(
                started, 503, "unavailable", delivery_id,
                reason="not recorded, retry later",
                headers={"Retry-After": str(self.retry_after_seconds)},
            )  # fmt: skip
        except Exception:
            # The exception's text may carry payload values or internals: it goes to the log
            # only; the sender gets an id to quote, which finds the traceback in the log.
            error_id = secrets.token_hex(8)
            logger.exception(
                "handler failed on push %s (error id %s); nothing recorded", delivery_id, error_id
            )
            return self._answer(
                started, 500, "handler_error", delivery_id,
                reason=f"internal error, nothing recorded (error id {error_id})",
                error_id=error_id,
            )  # fmt: skip
        extra: dict[str, Any] = {"receipt_id": str(accepted.receipt_id)}
        if accepted.body_differs:
            extra["body_differs"] = True
        return self._answer(started, 200, accepted.outcome, delivery_id, **extra)

    def _answer(
        self,
        started: float,
        status: int,
        outcome: str,
        delivery_id: str | None,
        headers: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> Response:
        self.metrics.requests.labels(outcome).inc()
        self.metrics.seconds.observe(time.perf_counter() - started)
        content = {"status": outcome, "delivery_id": delivery_id, **fields}
        return JSONResponse(content, status_code=status, headers=dict(headers or {}))

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed ``max_body_bytes``.

        The whole body must arrive within ``body_timeout`` seconds, else 408 (and
        the connection is closed): a client trickling a byte at a time must not
        hold a connection, and its memory, for ever.
        """
        too_big = _Refused(413, "too_large", f"body larger than {self.max_body_bytes} bytes")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_big
        chunks: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(self.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise too_big
                    chunks.append(chunk)
        except TimeoutError:
            raise _Refused(
                408, "body_timeout", f"body not received within {self.body_timeout:g} s",
                headers={"Connection": "close"},
            ) from None  # fmt: skip
        return b"".join(chunks)

    def _parse(self, body: bytes) -> Any:
        """The JSON body, refused with 400 if malformed or nested deeper than ``max_json_depth``.

        Without the depth limit a signed body of 40,000 ``[`` made the parser
        raise ``RecursionError``, answered 500, which the sender retries for
        ever; and a handler walking such a payload would recurse as deep.
        """
        too_deep = _Refused(
            400, "too_deep", f"JSON nested deeper than {self.max_json_depth} levels"
        )
        try:
            payload = json.loads(body)
        except RecursionError:
            raise too_deep from None
        except ValueError as e:
            raise _Refused(400, "malformed_json", f"body is not JSON: {e}") from None
        if _nesting_exceeds(payload, self.max_json_depth):
            raise too_deep
        return payload

    def _record_traced(
        self, headers: Mapping[str, str], kind: str, payload: Any, delivery_id: str, digest: str
    ) -> _Accepted:
        """:meth:`_record` in a SERVER span that continues the push's ``traceparent``.

        The events saved are then traced from the sender's span onwards
        (when the application records trace context: docs/tracing.md).
        """
        with server_span(f"webhook {kind}", headers):
            return self._record(kind, payload, delivery_id, digest)

    def _record(self, kind: str, payload: Any, delivery_id: str, digest: str) -> _Accepted:
        """Run the handler and save its aggregates with the receipt, in one transaction.

        Blocking: runs in a worker thread. An ``IntegrityError`` means either
        the receipt exists (a duplicate: answer it as such) or another delivery
        changed one of the same aggregates first (run the handler again on the
        new state, up to ``conflict_retries`` times).
        """
        if time.monotonic() - self._last_database_error < self.probe_window_seconds:
            self._probe_database()
        receipt_id = WebhookReceipt.create_id(self.source, delivery_id)
        handler = self.handlers[kind]
        for _ in range(self.conflict_retries + 1):
            existing = self._receipt(receipt_id)
            if existing is not None:
                return self._duplicate(existing, digest)
            changed = _as_objects(handler(self.app, payload, delivery_id))
            receipt = WebhookReceipt(self.source, delivery_id, kind, digest)
            try:
                self.app.save(receipt, *changed)
            except IntegrityError:
                continue
            return _Accepted("recorded", receipt_id)
        existing = self._receipt(receipt_id)
        if existing is not None:
            return self._duplicate(existing, digest)
        raise ConcurrentUpdateError(
            f"delivery {delivery_id!r} conflicted {self.conflict_retries + 1} times with "
            "concurrent deliveries changing the same aggregates"
        )

    def _probe_database(self) -> None:
        """One ``SELECT 1`` without the library's retries: fail within the connect timeout.

        The library retries each recorder call ten times when the database is
        unreachable, so a push that meets an outage could wait ten connect
        timeouts before its 503. After a database error, and for
        ``probe_window_seconds``, every push first probes once and is answered
        503 at once if the database is still down.
        """
        datastore = getattr(self.app.recorder, "datastore", None)
        if datastore is None or not hasattr(datastore, "get_connection"):
            self.app.recorder.max_notification_id()  # other persistence modules
            return
        with datastore.get_connection() as conn:
            conn.execute("SELECT 1")

    def _receipt(self, receipt_id: uuid.UUID) -> WebhookReceipt | None:
        receipt: Any
        try:
            receipt = self.app.repository.get(receipt_id)
        except AggregateNotFoundError:
            return None
        assert isinstance(receipt, WebhookReceipt)
        return receipt

    def _duplicate(self, receipt: WebhookReceipt, digest: str) -> _Accepted:
        differs = receipt.body_sha256 != digest
        if differs:
            logger.warning(
                "delivery %r was redelivered with a different body; the first one was kept",
                receipt.delivery_id,
            )
        return _Accepted("duplicate", receipt.id, body_differs=differs)

    # --- operations ----------------------------------------------------------

    async def _healthz(self, _: Request) -> Response:
        """200 ``{"status": "ok"}`` or 503 ``{"status": "unavailable"}``; the cause: in the log."""
        try:
            await self._in_thread(self._probe_database)
        except Exception as e:
            logger.warning("health check: database unavailable: %s: %s", type(e).__name__, e)
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def _metrics(self, _: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


MAX_JSON_DEPTH = 500
"""Highest allowed ``max_json_depth``: well below Python's recursion limit (1000)."""


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest deeper than ``limit`` (without recursing)."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _as_objects(result: Iterable[Any] | Aggregate | None) -> Sequence[Any]:
    if result is None:
        return ()
    if isinstance(result, Aggregate):
        return (result,)
    return tuple(result)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m esbridge_connectors.webhooks module:factory``: serve an intake with uvicorn.

    ``factory`` is called with no arguments (in each worker process) and
    returns a :class:`WebhookIntake`. Two listeners: the public one
    (``--host``/``--port``) serves the pushes only; the operations one
    (``--ops-host``/``--ops-port``, loopback by default) serves ``/healthz``
    and ``/metrics`` only. Both carry the head limits (:class:`HttpLimits`).
    """
    # Lazy: only this command needs uvicorn (serving imports it too); an intake
    # mounted in another ASGI server must import without it.
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from esbridge_connectors.serving import bind_socket

    defaults = HttpLimits()
    parser = argparse.ArgumentParser(
        prog="python -m esbridge_connectors.webhooks",
        description="Serve a WebhookIntake with uvicorn.",
    )
    parser.add_argument("factory", help="module:function returning a WebhookIntake")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--ops-host", default="127.0.0.1", help="/healthz and /metrics address")
    parser.add_argument("--ops-port", type=int, default=8081, help="/healthz and /metrics port")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--backlog", type=int, default=2048)
    parser.add_argument("--graceful-timeout", type=int, default=10, help="seconds to drain")
    parser.add_argument(
        "--max-head-bytes", type=int, default=defaults.max_head_bytes,
        help="request line + headers; longer: 431",
    )  # fmt: skip
    parser.add_argument(
        "--head-timeout", type=float, default=defaults.head_timeout,
        help="seconds to receive a request head; slower: 408",
    )  # fmt: skip
    parser.add_argument(
        "--keep-alive-timeout", type=int, default=defaults.keep_alive_timeout,
        help="seconds an idle connection is kept open",
    )  # fmt: skip
    parser.add_argument(
        "--limit-concurrency", type=int, default=None,
        help="connections + requests per worker before answering 503 (default: no limit)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    limits = HttpLimits(
        args.max_head_bytes, args.head_timeout, args.keep_alive_timeout, args.limit_concurrency
    )
    ops_socket = bind_socket(args.ops_host, args.ops_port)
    config = uvicorn.Config(
        args.factory,
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        backlog=args.backlog,
        timeout_graceful_shutdown=args.graceful_timeout,
        access_log=False,
        **limits.uvicorn_config(ops_ports=[ops_socket.getsockname()[1]]),
    )
    sockets = [config.bind_socket(), ops_socket]
    logger.info("operations (/healthz, /metrics) on http://%s:%d", *ops_socket.getsockname()[:2])
    server = uvicorn.Server(config)
    if config.workers > 1:
        Multiprocess(config, sockets=sockets).run()
    else:
        server.run(sockets=sockets)
        if not server.started:
            sys.exit(3)  # uvicorn's STARTUP_FAILURE


if __name__ == "__main__":
    main()
