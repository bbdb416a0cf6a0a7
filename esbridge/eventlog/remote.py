"""Reading an upstream notification log over HTTP, from ``esbridge serve-log``.

When each service owns its database, a follower may not hold the upstream's
Postgres credentials. The upstream team serves its log read-only
(``esbridge serve-log``, :mod:`esbridge_connectors.log_service`) and the
follower reads it with :class:`RemoteNotificationLog`, which has the two
methods esbridge's readers call on a recorder (``select_notifications`` and
``max_notification_id``, see
:class:`~esbridge.eventlog.notification_log.NotificationReader`): gap filling
and prompt mode work unchanged on top of it.

Why the standard library (``http.client``) and not httpx: the client is part of
the core package, which must not need the ``connectors`` extra. One persistent
connection (keep-alive) per log, reopened after an error; ``Accept-Encoding:
gzip``. The wire format is the ``eventsourcing`` library's
(``NotificationLogJSONService.get_notifications``): a JSON list of
``{id, originator_id, originator_version, topic, state}`` with ``state`` in
base64 (docs/remote-log.md).
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.persistence import Notification

from esbridge.errors import (
    ConfigurationError,
    RemoteLogError,
    RemoteLogRefusedError,
    RemoteLogResponseError,
    RemoteLogUnreachableError,
)

#: The versioned prefix of every route (docs/remote-log.md).
API_VERSION = "v1"
#: Variables read by :meth:`RemoteNotificationLog.from_env` (and ``esbridge consume``).
URL_VARIABLE = "UPSTREAM_LOG_URL"
TOKEN_VARIABLE = "UPSTREAM_LOG_TOKEN"
CA_VARIABLE = "UPSTREAM_LOG_CA_FILE"
#: The response header saying how many notifications the server allowed in the page.
LIMIT_HEADER = "Esbridge-Limit"

_ADVICE = {
    401: "set UPSTREAM_LOG_TOKEN (or token=) to a token listed in the service's token file",
    403: "ask the log's owners to add this application to your token's line in their token "
    "file, or use a token allowed for it",
    404: "check the application name (it is case-sensitive) and that the service serves it",
    400: "this client sent a parameter the service does not accept: check that both run "
    "compatible esbridge versions",
}


@dataclass(frozen=True)
class RemoteLogSettings:
    """Where an upstream's log service is and how to sign in: one service, any of its logs.

    Every command that reads an upstream log (``consume``, ``status``,
    ``replay``) resolves its ``--upstream-url`` option and the
    ``UPSTREAM_LOG_*`` variables here, so that they mean the same everywhere.
    The token is kept out of ``repr``: settings end up in logs.
    """

    url: str
    token: str | None = field(default=None, repr=False)
    cafile: str | None = None

    @classmethod
    def resolve(
        cls, url: str | None, env: Mapping[str, str] | None = None
    ) -> RemoteLogSettings | None:
        """``url`` (an option's value) or ``UPSTREAM_LOG_URL``, with ``UPSTREAM_LOG_TOKEN`` and
        ``UPSTREAM_LOG_CA_FILE``; ``None`` when neither gives a URL (read the database)."""
        env = os.environ if env is None else env
        url = url or env.get(URL_VARIABLE) or None
        if url is None:
            return None
        return cls(url, env.get(TOKEN_VARIABLE) or None, env.get(CA_VARIABLE) or None)

    def log(self, application: str, **options: Any) -> RemoteNotificationLog:
        """The log of ``application`` served there (``options``: as for the log's class)."""
        options.setdefault("cafile", self.cafile)
        return RemoteNotificationLog(self.url, application, self.token, **options)


def given_remote_log(
    application: str,
    url: str | None,
    token: str | None,
    *,
    other_ways: bool,
    cafile: str | None = None,
) -> RemoteNotificationLog | None:
    """The remote log of a component's ``upstream_url=`` keyword (``None``: not given).

    Components that read an upstream log (the consumer adapter, SQL
    projections) take it one way only: its database settings, an open
    recorder, or the address of its log service. ``other_ways``: whether one
    of the others was given too, a :class:`ConfigurationError`.
    """
    if url is None:
        return None
    if other_ways:
        raise ConfigurationError(
            "give the upstream log one way only: upstream_url (its log service), "
            "upstream_env (its database) or upstream_recorder"
        )
    return RemoteNotificationLog(url, application, token, cafile=cafile)


class RemoteNotificationLog:
    """The notification log of ``application``, served at ``url`` by ``esbridge serve-log``.

    ``token``: the bearer token (sent in the ``Authorization`` header, never in
    the URL). ``timeout``: seconds for connecting and for each response.
    Connection errors, timeouts and 5xx answers are retried ``retries`` times
    with exponential backoff from ``backoff`` seconds (at most
    ``max_backoff``), then :class:`~esbridge.errors.RemoteLogUnreachableError`;
    a refusal (401, 403, 400, 404) raises
    :class:`~esbridge.errors.RemoteLogRefusedError` at once with the server's
    reason. ``cafile``: the CA bundle that signed the service's TLS certificate
    (``https://`` URLs; default: the system's).
    """

    def __init__(
        self,
        url: str,
        application: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        cafile: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"remote log URL {url!r} is not an http:// or https:// address: give the "
                "address esbridge serve-log listens on, e.g. https://orders-log.internal:8443"
            )
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ConfigurationError("retries must be >= 0, timeout > 0 and backoff >= 0")
        self.url = url.rstrip("/")
        self.application = application
        self._token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=cafile) if self._https else None
        self._connection: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(
        cls, application: str, env: Mapping[str, str] | None = None, **options: Any
    ) -> RemoteNotificationLog:
        """The log of ``application`` at ``UPSTREAM_LOG_URL`` with ``UPSTREAM_LOG_TOKEN``."""
        settings = RemoteLogSettings.resolve(None, env)
        if settings is None:
            raise ConfigurationError(f"set {URL_VARIABLE} to the address of esbridge serve-log")
        return settings.log(application, **options)

    def __repr__(self) -> str:  # no token: reprs end up in logs
        return f"RemoteNotificationLog({self.url!r}, {self.application!r})"

    # --- the recorder's reads -------------------------------------------------

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> list[Notification]:
        """As ``ApplicationRecorder.select_notifications``, in as many requests as it takes.

        The server caps each page (``Esbridge-Limit``); a shorter page than the
        cap means the end of the log (or of ``stop``), so asking for more than
        the cap is safe: callers that stop at a short page see no false end.
        """
        first = 1 if start is None else (start if inclusive_of_start else start + 1)
        result: list[Notification] = []
        while len(result) < limit:
            query: dict[str, str] = {"start": str(first), "limit": str(limit - len(result))}
            if stop is not None:
                query["stop"] = str(stop)
            if topics:
                query["topics"] = ",".join(topics)
            body, headers = self._get("notifications", query)
            page = notifications_from_json(body, self._address("notifications"))
            result.extend(page)
            allowed = _int_header(headers, LIMIT_HEADER, self._address("notifications"))
            if len(page) < allowed or not page:
                break
            first = page[-1].id + 1
        return result

    def max_notification_id(self) -> int | None:
        """The log's highest notification id (``None``: the log is empty)."""
        body, _ = self._get("max-id", {})
        try:
            value = json.loads(body)["max_id"]
        except (ValueError, KeyError, TypeError) as e:
            raise self._bad_response("max-id", f"no max_id in the answer ({e})") from None
        if value is not None and not isinstance(value, int):
            raise self._bad_response("max-id", f"max_id is {value!r}, not an integer or null")
        return value

    def close(self) -> None:
        """Close the kept-alive connection (a later read opens a new one)."""
        with self._lock:
            self._disconnect()

    # --- HTTP -------------------------------------------------------------------

    def _address(self, route: str) -> str:
        app = urllib.parse.quote(self.application, safe="")
        return f"{self.url}/{API_VERSION}/{app}/{route}"

    def _get(self, route: str, query: Mapping[str, str]) -> tuple[bytes, http.client.HTTPMessage]:
        """GET a route; retried while the service is unreachable or answers 5xx."""
        app = urllib.parse.quote(self.application, safe="")
        target = f"{self._prefix}/{API_VERSION}/{app}/{route}"
        if query:
            target += "?" + urllib.parse.urlencode(query)
        address = self._address(route)
        started = time.monotonic()
        delay = self.backoff
        attempt = 0
        while True:
            failed: int | None = None
            try:
                with self._lock:
                    status, body, headers = self._request(target)
            except ssl.SSLCertVerificationError as e:
                raise RemoteLogError(
                    f"the TLS certificate of {address} could not be verified ({e.verify_message}):"
                    " give the CA file that signed it (cafile=, UPSTREAM_LOG_CA_FILE)",
                    url=address,
                ) from None
            except (OSError, http.client.HTTPException) as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if status == 200:
                    return body, headers
                if status < 500:
                    raise self._refused(address, status, body)
                failed, problem = status, f"HTTP {status} {_reason(body)}"
            attempt += 1
            if attempt > self.retries:
                waited = time.monotonic() - started
                raise RemoteLogUnreachableError(
                    f"the notification log service at {address} did not answer ({problem}) "
                    f"after {attempt} attempts over {waited:.1f} s: check that esbridge "
                    "serve-log runs at that address and that this machine can reach it",
                    url=address,
                    status=failed,
                    waited=waited,
                )
            self._sleep(delay)
            delay = min(max(delay * 2, 0.01), self.max_backoff)

    def _request(self, target: str) -> tuple[int, bytes, http.client.HTTPMessage]:
        connection = self._connection or self._connect()
        headers = {"Accept": "application/json", "Accept-Encoding": "gzip"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            body = response.read()
        except BaseException:
            self._disconnect()  # a half-read connection cannot carry the next request
            raise
        if response.getheader("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        if response.will_close:
            self._disconnect()
        return response.status, body, response.headers

    def _connect(self) -> http.client.HTTPConnection:
        if self._https:
            self._connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=self._ssl
            )
        else:
            self._connection = http.client.HTTPConnection(
                self._host, self._port, timeout=self.timeout
            )
        return self._connection

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _refused(self, address: str, status: int, body: bytes) -> RemoteLogRefusedError:
        reason = _reason(body)
        advice = _ADVICE.get(status, "see the service's documentation (docs/remote-log.md)")
        return RemoteLogRefusedError(
            f"the notification log service at {address} refused the request: HTTP {status} "
            f"{reason}; {advice}",
            url=address,
            status=status,
            reason=reason,
        )

    def _bad_response(self, route: str, problem: str) -> RemoteLogResponseError:
        address = self._address(route)
        return RemoteLogResponseError(
            f"the service at {address} did not answer in the notification log wire format "
            f"v1: {problem}. Check that the URL points at esbridge serve-log",
            url=address,
            status=200,
        )


def notifications_from_json(body: bytes, address: str = "") -> list[Notification]:
    """Decode a page in the wire format (the library's ``NotificationLogJSONService``'s)."""
    try:
        items = json.loads(body)
        return [
            Notification(
                id=int(item["id"]),
                originator_id=_originator_id(item["originator_id"]),
                originator_version=int(item["originator_version"]),
                topic=str(item["topic"]),
                state=base64.b64decode(item["state"], validate=True),
            )
            for item in items
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise RemoteLogResponseError(
            f"the service at {address} did not answer in the notification log wire format "
            f"v1 ({type(e).__name__}: {e}). Check that the URL points at esbridge serve-log",
            url=address,
            status=200,
        ) from None


def _originator_id(value: str) -> uuid.UUID | str:
    try:
        return uuid.UUID(value)
    except ValueError:
        return value


def _reason(body: bytes) -> str:
    """The server's ``error: detail`` from a JSON error body (else a short excerpt)."""
    try:
        error = json.loads(body)
        return f"{error['error']}: {error['detail']}"
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


def _int_header(headers: http.client.HTTPMessage, name: str, address: str) -> int:
    value = headers.get(name)
    try:
        return int(value or "")
    except ValueError:
        raise RemoteLogResponseError(
            f"the service at {address} sent no {name} header: it is not esbridge serve-log "
            "(wire format v1), or a proxy removed the header",
            url=address,
            status=200,
        ) from None
