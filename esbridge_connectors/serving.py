"""Serve an ASGI app with uvicorn in a background thread (tests, examples, embedding).

Production runs the intake with ``python -m esbridge_connectors.webhooks``
(uvicorn in the main thread, optionally several worker processes). Tests and
documentation examples need the same server inside the current process, on a
free port, stoppable at will: that is :class:`BackgroundServer`.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from esbridge.errors import EsbridgeError
from esbridge_connectors.http_limits import HttpLimits


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port=0``: a free port), for ``uvicorn.Server.run``.

    Inheritable, so that uvicorn's worker processes can serve it too.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """uvicorn serving ``asgi`` on ``host:port`` (``port=0``: a free port) in a daemon thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The
    listening socket is bound before the thread starts, so :attr:`url` is
    valid at once and :meth:`start` can bind the same port again after
    :meth:`stop` (a server that "comes back"). ``limits`` (default
    :class:`HttpLimits()`) are the same head size and time limits as the
    production server's; ``config`` is passed to ``uvicorn.Config`` last.
    """

    def __init__(
        self,
        asgi: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: HttpLimits | None = None,
        **config: Any,
    ) -> None:
        self.asgi = asgi
        self.host = host
        self.port = port
        self.config: dict[str, Any] = (
            {"log_level": "warning", "access_log": False, "lifespan": "off"}
            | (limits or HttpLimits()).uvicorn_config()
            | config
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> BackgroundServer:
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(self.asgi, **self.config))
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise EsbridgeError(f"uvicorn did not start on {self.url} within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, finish requests in flight, close the socket."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        self._server = None
        self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
