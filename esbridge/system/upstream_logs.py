"""How a system's followers read their leaders' logs: the leader's database, or its log service.

A follower reads its leader's notification log to fill gaps and, in prompt
mode, to pull every event. When applications share a database (or the
follower may hold read-only credentials for the leader's), it reads the
leader's Postgres with the leader's settings (``{LEADER}_POSTGRES_*`` win
over plain ``POSTGRES_*``, as in the library). When every service owns its
database, the leader's team runs ``esbridge serve-log`` and the follower
reads the log over HTTP, with the variables ``esbridge consume`` and
``esbridge status`` read, prefixed per leader as the library prefixes every
per-application setting (the prefixed name wins over the plain one):

* ``UPSTREAM_LOG_URL`` (every leader) or ``{LEADER}_UPSTREAM_LOG_URL`` (that
  leader): the address of the ``esbridge serve-log`` serving it
  (``esbridge run --upstream-url [LEADER=]URL`` sets them);
* ``UPSTREAM_LOG_TOKEN`` / ``{LEADER}_UPSTREAM_LOG_TOKEN``: the bearer token
  (never on a command line, where ``ps`` would show it);
* ``UPSTREAM_LOG_CA_FILE`` / ``{LEADER}_UPSTREAM_LOG_CA_FILE``: the CA that
  signed the service's certificate (``https://``; default: the system's CAs).

``{LEADER}`` is the application's name in upper case (``ORDERS_UPSTREAM_LOG_URL``).
With a URL, the follower never opens the leader's database. Without one, a
follower whose settings do not reach the leader's events table is refused at
start with both remedies named (:func:`check_upstream_readable`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from eventsourcing.system import System
from eventsourcing.utils import Environment

from esbridge.errors import ConfigurationError
from esbridge.eventlog.notification_log import close_recorder, open_recorder
from esbridge.eventlog.remote import (
    CA_VARIABLE,
    TOKEN_VARIABLE,
    URL_VARIABLE,
    RemoteLogSettings,
)
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS


def variable(leader: str, name: str) -> str:
    """``variable("Orders", URL_VARIABLE)`` -> ``"ORDERS_UPSTREAM_LOG_URL"``."""
    return f"{leader.upper()}_{name}"


def log_service(leader: str, env: Mapping[str, str]) -> RemoteLogSettings | None:
    """The log service ``env`` gives for ``leader`` (None: read its database)."""
    settings = Environment(leader, dict(env))
    url = settings.get(URL_VARIABLE)
    if not url:
        return None
    token, cafile = settings.get(TOKEN_VARIABLE), settings.get(CA_VARIABLE)
    return RemoteLogSettings(url, token or None, cafile or None)


def log_services(leaders: Iterable[str], env: Mapping[str, str]) -> dict[str, RemoteLogSettings]:
    """The log services of those of ``leaders`` read over HTTP, by leader name."""
    found = {}
    for leader in leaders:
        service = log_service(leader, env)
        if service is not None:
            found[leader] = service
    return found


def parse_upstream_urls(values: Iterable[str], system: System) -> dict[str, str]:
    """``--upstream-url`` values as variables, leader names checked.

    ``"URL"`` -> ``{"UPSTREAM_LOG_URL": URL}`` (every leader);
    ``"Orders=URL"`` -> ``{"ORDERS_UPSTREAM_LOG_URL": URL}``. Refuses a name
    that is not a leader of ``system``: a typo would otherwise leave the
    follower reading a database it may not reach.
    """
    result = {}
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or "://" in name:  # a URL (perhaps with a query): every leader
            name, url = "", value
        if not url or "://" not in url:
            raise ConfigurationError(
                f"--upstream-url {value!r}: give URL (every leader) or LEADER=URL, e.g. "
                "Orders=https://orders-log.internal:8443"
            )
        if not name:
            result[URL_VARIABLE] = url
        elif name not in system.leaders:
            raise ConfigurationError(
                f"--upstream-url {value!r}: {name!r} is not a leader of the system "
                f"(its leaders are {list(system.leaders)}; names are case-sensitive)"
            )
        else:
            result[variable(name, URL_VARIABLE)] = url
    return result


def check_upstream_readable(leader: str, follower: str, env: Mapping[str, str]) -> None:
    """Refuse a follower that has neither a log service for ``leader`` nor its events table.

    With separate databases, the plain ``POSTGRES_*`` settings point at the
    follower's own server, which has no table of the leader: without this
    check its consumer would fail as it starts, naming the missing table but
    not the log service it should have been given. An unreachable database is not refused here (it
    may be restarting: the consumer waits for it, as it always did).
    """
    try:
        recorder = open_recorder(leader, env)
    except TRANSIENT_ERRORS:
        return
    except ConfigurationError as e:
        per_leader = variable(leader, URL_VARIABLE)
        raise ConfigurationError(
            f"application {follower!r} cannot read the notification log of its upstream "
            f"{leader!r}: {e}. Give the address of the log service of {leader} (the "
            f"esbridge serve-log its owners run): esbridge run --upstream-url {leader}=URL "
            f"(or {per_leader}=URL), its token in {variable(leader, TOKEN_VARIABLE)} (or "
            f"{TOKEN_VARIABLE}); or {leader.upper()}_POSTGRES_* settings that reach the "
            f"database of {leader}"
        ) from e
    close_recorder(recorder)
