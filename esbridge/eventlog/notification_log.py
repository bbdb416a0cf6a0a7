"""Reading an application's notification log straight from its recorder.

The library's ``LocalNotificationLog`` serves sections of at most
``section_size`` (10) notifications, which costs a round trip per ten events.
Relays and consumers read through the recorder instead, in large pages, and
open the upstream application's recorder *for reading only*: no tables are
created and nothing is written, so a relay or a gap-reconciling consumer needs
only read access to the upstream database.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from eventsourcing.persistence import (
    ApplicationRecorder,
    InfrastructureFactory,
    Notification,
)
from eventsourcing.utils import Environment

from esbridge.errors import ConfigurationError
from esbridge.runtime.postgres_privileges import current_role, privilege_advice
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS

DEFAULT_PAGE_SIZE = 1000


class NotificationReader(Protocol):
    """The two reads of a notification log that relays' and consumers' readers make.

    An ``ApplicationRecorder`` is one; so is a remote log read over HTTP
    (:class:`esbridge.eventlog.remote.RemoteNotificationLog`), which is how a
    follower reads an upstream log without the upstream's database credentials.
    """

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]: ...

    def max_notification_id(self) -> int | None: ...


def upstream_environment(name: str, env: Mapping[str, str]) -> Environment:
    """The environment of application ``name`` as the library resolves it.

    Settings prefixed with the upstream name (``DOGSCHOOL_POSTGRES_DBNAME``)
    win over plain ones (``POSTGRES_DBNAME``), as in ``Follower.follow()``.
    Table creation is switched off: a reader never creates tables.
    """
    values = dict(env)
    values["CREATE_TABLE"] = "n"
    values[f"{name.upper()}_CREATE_TABLE"] = "n"
    return Environment(name, values)


def open_recorder(name: str, env: Mapping[str, str]) -> ApplicationRecorder:
    """The application recorder of application ``name`` (read-only use).

    Raises :class:`ConfigurationError` when the application's events table is
    missing, naming the table and the settings used, and the library's
    ``OperationalError`` when Postgres is unreachable (worth retrying).
    """
    environment = upstream_environment(name, env)
    try:
        factory = InfrastructureFactory.construct(environment)
        recorder = factory.application_recorder()
    except TRANSIENT_ERRORS:
        raise
    except Exception as e:
        raise ConfigurationError(
            f"cannot open the notification log of application {name!r}: "
            f"{type(e).__name__}: {e}. Check PERSISTENCE_MODULE and the POSTGRES_* settings"
        ) from e
    check_readable(name, recorder)
    return recorder


def close_recorder(recorder: NotificationReader | None) -> None:
    """Close the connection pool behind a recorder from :func:`open_recorder` (idempotent),
    or a remote log's connection.

    Why explicitly: a pool left to the garbage collector may be closed by the
    datastore's ``__del__`` only at interpreter exit, which then joins the pool's
    worker threads after they can no longer run: the process waits for seconds
    instead of exiting (long enough for a supervisor to kill it). A broken pool
    is ignored: there is nothing more to release.
    """
    datastore = getattr(recorder, "datastore", None)
    # A remote log (no datastore) closes its kept-alive HTTP connection.
    close = getattr(datastore if datastore is not None else recorder, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def release_recorder(
    recorder: NotificationReader | None, given: NotificationReader | None
) -> NotificationReader | None:
    """Close ``recorder`` unless it is ``given`` (the caller's, which only the caller closes).

    For components that take an optional recorder and otherwise open their own:
    returns what they hold afterwards (``given``; ``None`` opens the log again on use).
    """
    if recorder is not given:
        close_recorder(recorder)
    return given


def check_readable(name: str, recorder: ApplicationRecorder) -> None:
    """Raise :class:`ConfigurationError` unless the notification log can be read.

    An unreachable server is not a configuration error: its ``OperationalError``
    goes up unchanged, for the caller to wait and retry (see
    :mod:`esbridge.runtime.postgres_retry`).
    """
    try:
        recorder.max_notification_id()
    except TRANSIENT_ERRORS:
        raise
    except Exception as e:  # the driver's UndefinedTable, ProgrammingError, ...
        table = getattr(recorder, "events_table_name", f"{name.lower()}_events")
        text = (
            f"cannot read the notification log of application {name!r} (table {table!r}): "
            f"{type(e).__name__}: {e}. "
        )
        datastore = getattr(recorder, "datastore", None)
        advice = privilege_advice(str(e), current_role(datastore), "SELECT")
        raise ConfigurationError(
            text
            + (
                advice
                or "Check the application name and its POSTGRES_* settings, and that the "
                "application has created its tables."
            )
        ) from e


def read_pages(
    recorder: NotificationReader,
    after: int,
    *,
    stop: int | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    topics: Sequence[str] = (),
) -> Iterator[Sequence[Notification]]:
    """Pages of notifications with ids greater than ``after`` (and at most ``stop``).

    Ends at the end of the log (or at ``stop``). Gaps left by rolled-back
    inserts are simply absent: ids are increasing, not contiguous.
    """
    position = after
    while stop is None or position < stop:
        page = recorder.select_notifications(
            start=position, limit=page_size, stop=stop, topics=topics, inclusive_of_start=False
        )
        if not page:
            return
        yield page
        position = page[-1].id
        if len(page) < page_size:
            return
