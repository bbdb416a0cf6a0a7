"""How much and how long an HTTP client may make the server hold: head size and head time.

Why a protocol class of our own: uvicorn bounds a request head only in its h11
parser (``h11_max_incomplete_event_size``), but it picks httptools whenever
httptools is installed (``esbridge[connectors]`` installs it), and uvicorn's
httptools protocol buffers a head of any size and waits for it for ever. So an
unauthenticated client could make a worker hold a 64 MB header in memory, or
hold hundreds of connections with unfinished heads. :class:`GuardedHttpToolsProtocol`
is uvicorn's httptools protocol plus:

- ``max_head_bytes``: the request line and headers together; a longer head is
  answered 431 and the connection closed as soon as the limit is passed (the
  rest is never read);
- ``head_timeout``: seconds from the connection (or from the first byte of the
  next request on a kept-alive connection) to the end of the head; later, 408
  and the connection is closed. The same time is allowed, after a response, for
  the rest of a request body the application did not read (e.g. after a 413),
  then the connection is closed.

The time a *body* may take is the application's business (``WebhookIntake``'s
``body_timeout``, answered 408). Idle time between requests is uvicorn's
``timeout_keep_alive``; the number of connections is uvicorn's
``limit_concurrency`` (503 beyond it): :meth:`HttpLimits.uvicorn_config` sets
all of them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from esbridge.errors import ConfigurationError

OPS_LISTENER = "esbridge.listener"
"""Scope key set to ``"ops"`` on requests that arrived on an operations listener."""


@dataclass(frozen=True)
class HttpLimits:
    """The server's limits on each connection (defaults suit webhooks from the internet)."""

    max_head_bytes: int = 16_384
    head_timeout: float = 10.0
    keep_alive_timeout: int = 5
    max_connections: int | None = None

    def __post_init__(self) -> None:
        if self.max_head_bytes <= 0 or self.head_timeout <= 0 or self.keep_alive_timeout <= 0:
            raise ConfigurationError(
                "max_head_bytes, head_timeout and keep_alive_timeout must be positive"
            )
        if self.max_connections is not None and self.max_connections <= 0:
            raise ConfigurationError("max_connections must be positive (or None: no limit)")

    def uvicorn_config(self, ops_ports: Collection[int] = ()) -> dict[str, Any]:
        """``uvicorn.Config`` keyword arguments that enforce these limits.

        Requests on a port in ``ops_ports`` carry ``scope["esbridge.listener"] ==
        "ops"`` (how one app served on two sockets tells the operations
        listener from the public one). The protocol is a ``functools.partial``
        of a module-level class so that the config pickles into worker processes.
        """
        protocol = functools.partial(
            GuardedHttpToolsProtocol, limits=self, ops_ports=frozenset(ops_ports)
        )
        return {
            "http": protocol,
            "h11_max_incomplete_event_size": self.max_head_bytes,  # if http="h11" overrides it
            "timeout_keep_alive": self.keep_alive_timeout,
            "limit_concurrency": self.max_connections,
        }


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit and a head time limit."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HttpLimits,
        ops_ports: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.ops_ports = ops_ports
        self._in_head = True
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._timer is None:  # the first byte of the next request on this connection
                self._arm_timer()
        super().data_received(data)
        if self._in_head and self._head_bytes > self.limits.max_head_bytes:
            self._refuse(431, f"Request head larger than {self.limits.max_head_bytes} bytes.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.server is not None and self.server[1] in self.ops_ports:
            self.scope[OPS_LISTENER] = "ops"  # type: ignore[literal-required]

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        self._cancel_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self._arm_timer()  # the unread rest of the body gets head_timeout, then we close

    def _arm_timer(self) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(self.limits.head_timeout, self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self._in_head:
            self._refuse(408, f"Request head not received within {self.limits.head_timeout:g} s.")
        elif not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with ``message`` (unless a response is under way) and close."""
        if self.transport.is_closing():
            return
        self._cancel_timer()
        if self.cycle is None or self.cycle.response_complete:
            body = message.encode("ascii")
            self.transport.write(
                STATUS_LINE[status]
                + b"content-type: text/plain; charset=utf-8\r\n"
                + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
                + body
            )
        self.transport.close()
