"""Serve applications' notification logs read-only over HTTP, behind bearer tokens.

When each service owns its database, followers may not read the upstream's
Postgres. The upstream serves its log instead (``esbridge serve-log``) and
followers read it with :class:`esbridge.eventlog.remote.RemoteNotificationLog`.
The wire format is documented in docs/remote-log.md and versioned (``/v1``):

- ``GET /v1/{app}/notifications?start=N&limit=M[&stop=S][&topics=a,b]``: the
  notifications with ``start <= id [<= stop]`` in id order (a keyset read on the
  recorder's primary key), at most ``min(M, max_limit)`` of them; the number
  allowed is in the ``Esbridge-Limit`` header (a larger ``limit`` is capped,
  not refused, so a client learns the cap from any answer). The body is the
  ``eventsourcing`` library's own representation: it is produced by
  ``eventsourcing.interface.NotificationLogJSONService.get_notifications`` (a
  JSON list of ``{id, originator_id, originator_version, topic, state}``,
  ``state`` in base64), fed from the recorder instead of an application object
  so that a page can also stop at ``stop`` and no application is constructed;
- ``GET /v1/{app}/max-id``: ``{"max_id": N}`` (``null`` for an empty log);
- ``GET /healthz``: ``{"status": "ok"}``, or 503 when a log cannot be read
  (no token needed, no application named).

Every ``/v1`` request needs ``Authorization: Bearer <token>``; each token is
allowed some applications (:class:`TokenTable`). Answers: 400 malformed or
unknown parameter, 401 missing or unknown token (with ``WWW-Authenticate``),
403 token not allowed for the application, 404 an application this service
does not serve (only to a token allowed every application, so others learn
nothing), 503 the database is unreachable (``Retry-After``). Errors are JSON
``{"error": code, "detail": text}``. Tokens are compared in constant time and
never logged; bodies over ``gzip_minimum`` bytes are gzipped for clients that
accept it. Reads run in worker threads, at most ``max_concurrency`` at once:
memory is bounded by ``max_limit`` notifications per request.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
import uvicorn
from eventsourcing.interface import NotificationLogJSONService
from eventsourcing.persistence import Notification
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from esbridge.errors import ConfigurationError
from esbridge.eventlog.notification_log import NotificationReader
from esbridge.eventlog.remote import API_VERSION, LIMIT_HEADER
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS
from esbridge_connectors.http_limits import HttpLimits
from esbridge_connectors.serving import bind_socket

logger = logging.getLogger("esbridge.log_service")

#: Largest page a request may ask for, by default.
DEFAULT_MAX_LIMIT = 1000
#: Shortest token accepted in a token file: a guessable token is no protection.
MIN_TOKEN_LENGTH = 16
#: Postgres ``bigint``: a larger id is a malformed parameter, not a database error.
_MAX_ID = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")
_PARAMETERS = frozenset({"start", "limit", "stop", "topics"})


@dataclass(frozen=True)
class AccessToken:
    """A bearer token and the applications it may read (``None``: every one).

    ``label`` names the token in logs (``tokens.txt:3``); the secret never is.
    """

    secret: str
    applications: frozenset[str] | None
    label: str

    def __repr__(self) -> str:
        return f"AccessToken(label={self.label!r}, applications={self.applications!r})"

    def allows(self, application: str) -> bool:
        return self.applications is None or application in self.applications


class TokenTable:
    """The valid tokens. Several at once: rotation adds the new one, then removes the old one."""

    def __init__(self, tokens: Sequence[AccessToken]) -> None:
        if not tokens:
            raise ConfigurationError(
                "the log service needs at least one token: without one nobody can read the logs"
            )
        for token in tokens:
            if len(token.secret) < MIN_TOKEN_LENGTH or not token.secret.isprintable():
                raise ConfigurationError(
                    f"token {token.label} is shorter than {MIN_TOKEN_LENGTH} characters (or "
                    "holds non-printable ones): generate one with "
                    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        self.tokens = tuple(tokens)

    @classmethod
    def parse(cls, text: str, source: str = "tokens") -> TokenTable:
        """Lines ``TOKEN APP[,APP...]`` (``*``: every application); ``#`` starts a comment."""
        tokens = []
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            label = f"{source}:{number}"
            if len(fields) != 2:
                raise ConfigurationError(
                    f"{label}: expected 'TOKEN APPLICATIONS' (applications comma-separated, or "
                    f"'*' for all), found {len(fields)} fields"
                )
            apps = frozenset(a for a in fields[1].split(",") if a)
            tokens.append(AccessToken(fields[0], None if apps == {"*"} else apps, label))
        return cls(tokens)

    @classmethod
    def from_file(cls, path: str | Path) -> TokenTable:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigurationError(f"cannot read the token file {str(path)!r}: {e}") from e
        return cls.parse(text, str(path))

    def find(self, presented: str) -> AccessToken | None:
        """The token equal to ``presented``; every token is compared, in constant time each."""
        found = None
        candidate = presented.encode("utf-8", "replace")
        for token in self.tokens:
            if hmac.compare_digest(token.secret.encode(), candidate):
                found = token
        return found


class _Refused(Exception):
    def __init__(self, status: int, error: str, detail: str, **headers: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


class _Selection:
    """What ``NotificationLogJSONService`` reads (``app.notification_log.select``), from a recorder.

    The library's service has no ``stop``: it is bound here, per request.
    """

    def __init__(self, reader: NotificationReader, stop: int | None) -> None:
        self.notification_log = self
        self._reader = reader
        self._stop = stop

    def select(
        self,
        start: int | None,
        limit: int,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        return self._reader.select_notifications(
            start, limit, self._stop, topics, inclusive_of_start=inclusive_of_start
        )


class NotificationLogService:
    """The ASGI app serving ``logs`` (application name -> its recorder) to ``tokens``."""

    def __init__(
        self,
        logs: Mapping[str, NotificationReader],
        tokens: TokenTable,
        *,
        max_limit: int = DEFAULT_MAX_LIMIT,
        gzip_minimum: int = 1024,
        max_concurrency: int = 8,
        retry_after_seconds: int = 1,
    ) -> None:
        if not logs:
            raise ConfigurationError("the log service needs at least one application to serve")
        if max_limit <= 0 or max_concurrency <= 0:
            raise ConfigurationError("max_limit and max_concurrency must be positive")
        self.logs = dict(logs)
        self.tokens = tokens
        self.max_limit = max_limit
        self.max_concurrency = max_concurrency
        self.retry_after_seconds = retry_after_seconds
        self._limiter: anyio.CapacityLimiter | None = None
        prefix = f"/{API_VERSION}/{{app}}"
        routes = [
            Route(f"{prefix}/notifications", self._notifications, methods=["GET"]),
            Route(f"{prefix}/max-id", self._max_id, methods=["GET"]),
            Route("/healthz", self._healthz, methods=["GET"]),
        ]
        self.asgi = GZipMiddleware(Starlette(routes=routes), minimum_size=gzip_minimum)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.asgi(scope, receive, send)

    async def _in_thread(self, func: Any, *args: Any) -> Any:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.max_concurrency)
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)

    # --- routes ----------------------------------------------------------------

    async def _notifications(self, request: Request) -> Response:
        try:
            reader = self._authorised(request)
            start, limit, stop, topics = self._page_parameters(request)
            service = NotificationLogJSONService(cast(Any, _Selection(reader, stop)))
            body = await self._read(service.get_notifications, start, limit, topics)
        except _Refused as e:
            return _error(e)
        return Response(body, media_type="application/json", headers={LIMIT_HEADER: str(limit)})

    async def _max_id(self, request: Request) -> Response:
        try:
            reader = self._authorised(request)
            self._parameters(request, frozenset())
            max_id = await self._read(reader.max_notification_id)
        except _Refused as e:
            return _error(e)
        return JSONResponse({"max_id": max_id})

    async def _healthz(self, _: Request) -> Response:
        try:
            for reader in self.logs.values():
                await self._read(reader.max_notification_id)
        except _Refused:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    # --- checks ----------------------------------------------------------------

    def _authorised(self, request: Request) -> NotificationReader:
        """The log the request may read, or :class:`_Refused` (401, 403, 404)."""
        app = request.path_params["app"]
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="esbridge-log"'}
        if scheme.lower() != "bearer" or not presented.strip():
            raise _Refused(
                401,
                "missing_token",
                "send the header 'Authorization: Bearer <token>' with a token of the service's "
                "token file",
                **challenge,
            )
        token = self.tokens.find(presented.strip())
        if token is None:
            logger.info("refused a request for %r: unknown token", app)
            raise _Refused(
                401,
                "invalid_token",
                "the token is not one of the service's tokens (mistyped, or rotated out): "
                "ask the log's owners for a current one",
                **{"WWW-Authenticate": 'Bearer realm="esbridge-log", error="invalid_token"'},
            )
        if not token.allows(app):
            logger.info("refused %s access to %r: not allowed", token.label, app)
            raise _Refused(
                403,
                "forbidden",
                f"this token is not allowed to read application {app!r}: ask the log's owners "
                "to add it to the token's line of the token file",
            )
        reader = self.logs.get(app)
        if reader is None:
            raise _Refused(
                404,
                "unknown_application",
                f"this service does not serve application {app!r}; it serves "
                f"{sorted(self.logs)} (names are case-sensitive)",
            )
        return reader

    def _parameters(self, request: Request, allowed: frozenset[str]) -> Mapping[str, str]:
        params = request.query_params
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise _Refused(
                400,
                "unknown_parameter",
                f"unknown query parameter(s) {unknown}; this route takes {sorted(allowed)}",
            )
        repeated = sorted(k for k in set(params) if len(params.getlist(k)) > 1)
        if repeated:
            raise _Refused(400, "repeated_parameter", f"parameter(s) {repeated} given twice")
        return params

    def _page_parameters(self, request: Request) -> tuple[int, int, int | None, tuple[str, ...]]:
        params = self._parameters(request, _PARAMETERS)
        start = _integer(params, "start", 1, minimum=0)
        limit = min(_integer(params, "limit", self.max_limit, minimum=1), self.max_limit)
        stop = _integer(params, "stop", None, minimum=0) if "stop" in params else None
        topics = tuple(t for t in params.get("topics", "").split(",") if t)
        return start, limit, stop, topics

    async def _read(self, func: Any, *args: Any) -> Any:
        """A blocking read in a worker thread; a database failure is a 503, not a 500."""
        try:
            return await self._in_thread(func, *args)
        except TRANSIENT_ERRORS as e:
            logger.warning("reading a notification log failed: %s: %s", type(e).__name__, e)
            raise _Refused(
                503,
                "log_unavailable",
                "the notification log cannot be read right now; retry later",
                **{"Retry-After": str(self.retry_after_seconds)},
            ) from None
        except Exception:
            logger.exception("reading a notification log failed")
            raise _Refused(500, "internal_error", "the service failed; see its log") from None


def _integer(params: Mapping[str, str], name: str, default: int | None, *, minimum: int) -> int:
    value = params.get(name)
    if value is None:
        assert default is not None
        return default
    if not _DIGITS.fullmatch(value) or not minimum <= int(value) <= _MAX_ID:
        raise _Refused(
            400,
            "bad_parameter",
            f"{name} must be an integer from {minimum} to {_MAX_ID}, not {value[:40]!r}",
        )
    return int(value)


def _error(refusal: _Refused) -> Response:
    return Response(
        json.dumps({"error": refusal.error, "detail": refusal.detail}),
        status_code=refusal.status,
        media_type="application/json",
        headers=refusal.headers,
    )


def serve(
    service: NotificationLogService,
    host: str,
    port: int,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    log_level: str = "info",
    limits: HttpLimits | None = None,
) -> bool:
    """Serve ``service`` with uvicorn in this thread until SIGINT/SIGTERM; False: did not start.

    ``certfile``/``keyfile``: PEM files for TLS (uvicorn's ``ssl_certfile``,
    ``ssl_keyfile``). The access log shows method, path, query and status:
    tokens travel in a header, which it never shows.
    """
    if (certfile is None) != (keyfile is None):
        raise ConfigurationError("TLS needs both a certificate file and its key file")
    config = uvicorn.Config(
        service,
        log_level=log_level,
        access_log=True,
        lifespan="off",
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        **(limits or HttpLimits()).uvicorn_config(),
    )
    server = uvicorn.Server(config)
    server.run(sockets=[bind_socket(host, port)])
    return bool(server.started)
