"""How a system's followers read their leaders' logs: the leader's database, or its log service.

A follower reads its leader's notification log to fill gaps and, in prompt
mode, to pull every event. When applications share a database (or the
follower may hold read-only credentials for the leader's), it reads the
leader's Postgres with the leader's settings (``{LEADER}_POSTGRES_*`` win
over plain ``POSTGRES_*``, as in the library). When every service owns its
database, the leader's team runs ``esbridge serve-log`` and the follower
reads the log over HTTP, given, per leader, in the follower's environment:

* ``{LEADER}_LOG_URL``: the address of the leader's ``esbridge serve-log``
  (``esbridge run --upstream-url Leader=URL`` sets it);
* ``{LEADER}_LOG_TOKEN``: the bearer token (never on a command line, where
  ``ps`` would show it);
* ``{LEADER}_LOG_CA_FILE``: the CA that signed the service's certificate
  (``https://``; default: the system's CAs).

``{LEADER}`` is the application's name in upper case, the library's own
prefix for per-application settings (``ORDERS_LOG_URL``). With a URL, the
follower never opens the leader's database. Without one, a follower whose
settings do not reach the leader's events table is refused at start with
both remedies named (:func:`check_upstream_readable`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from eventsourcing.system import System

from esbridge.errors import ConfigurationError
from esbridge.eventlog.notification_log import close_recorder, open_recorder
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS

#: Suffixes of the per-leader variables (after ``{LEADER}_``).
URL_SUFFIX = "_LOG_URL"
TOKEN_SUFFIX = "_LOG_TOKEN"
CA_SUFFIX = "_LOG_CA_FILE"


@dataclass(frozen=True)
class LogService:
    """Where a leader's log is served, and how to authenticate (the token is not in repr)."""

    url: str
    token: str | None = None
    cafile: str | None = None

    def __repr__(self) -> str:  # reprs end up in logs: no token
        return f"LogService({self.url!r})"


def variable(leader: str, suffix: str) -> str:
    """``variable("Orders", URL_SUFFIX)`` -> ``"ORDERS_LOG_URL"``."""
    return leader.upper() + suffix


def log_service(leader: str, env: Mapping[str, str]) -> LogService | None:
    """The log service ``env`` gives for ``leader`` (None: read its database)."""
    url = env.get(variable(leader, URL_SUFFIX))
    if not url:
        return None
    return LogService(
        url,
        env.get(variable(leader, TOKEN_SUFFIX)) or None,
        env.get(variable(leader, CA_SUFFIX)) or None,
    )


def log_services(leaders: Iterable[str], env: Mapping[str, str]) -> dict[str, LogService]:
    """The log services of those of ``leaders`` read over HTTP, by leader name."""
    found = {}
    for leader in leaders:
        service = log_service(leader, env)
        if service is not None:
            found[leader] = service
    return found


def parse_upstream_urls(values: Iterable[str], system: System) -> dict[str, str]:
    """``["Orders=http://..."]`` -> ``{"ORDERS_LOG_URL": "http://..."}``, names checked.

    Refuses a name that is not a leader of ``system``: a typo would otherwise
    leave the follower reading a database it may not reach.
    """
    result = {}
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name or not url:
            raise ConfigurationError(
                f"--upstream-url {value!r}: give LEADER=URL, e.g. Orders=https://orders-log:8443"
            )
        if name not in system.leaders:
            raise ConfigurationError(
                f"--upstream-url {value!r}: {name!r} is not a leader of the system "
                f"(its leaders are {list(system.leaders)}; names are case-sensitive)"
            )
        result[variable(name, URL_SUFFIX)] = url
    return result


def check_upstream_readable(leader: str, follower: str, env: Mapping[str, str]) -> None:
    """Refuse a follower that has neither a log service for ``leader`` nor its events table.

    With separate databases, the plain ``POSTGRES_*`` settings point at the
    follower's own server, which has no table of the leader: without this
    check the follower would start and fail only at its first gap (payload
    mode) or first prompt. An unreachable database is not refused here (it
    may be restarting: the consumer waits for it, as it always did).
    """
    try:
        recorder = open_recorder(leader, env)
    except TRANSIENT_ERRORS:
        return
    except ConfigurationError as e:
        prefix = leader.upper()
        raise ConfigurationError(
            f"application {follower!r} cannot read the notification log of its upstream "
            f"{leader!r}: {e}. Give the address of the log service of {leader} (the "
            f"esbridge serve-log its owners run): esbridge run --upstream-url {leader}=URL "
            f"(or {prefix}{URL_SUFFIX}=URL), its token in {prefix}{TOKEN_SUFFIX}; or "
            f"{prefix}_POSTGRES_* settings that reach the database of {leader}"
        ) from e
    close_recorder(recorder)
