"""The upstream application's notification log, as a consumer reads it (read-only).

Optional in payload mode, where it fills gaps and checks suspect messages, and
required in prompt mode, where events are pulled from it. Every read is
bounded by the log's highest id (:meth:`UpstreamLog.highest`): ids commit in
order, so every id up to it is final, while an id a message claims proves
nothing (it may be forged).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from eventsourcing.persistence import Notification

from esbridge import wire
from esbridge.consumer.state import Tuning
from esbridge.eventlog.notification_log import (
    NotificationReader,
    close_recorder,
    open_recorder,
    read_pages,
)
from esbridge.runtime.postgres_retry import connection_diagnosis

#: ``wait(what, call, diagnose=...)``: ``call()``, retried while Postgres is unreachable.
Wait = Callable[..., Any]


class UpstreamLog:
    """Reads the upstream log of ``name`` with read-only settings ``env``, opened on demand.

    ``retry_db(call)`` retries a read while Postgres is unreachable. A
    ``recorder`` given here is the caller's: used as it is, never closed.
    """

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        tuning: Tuning,
        retry_db: Callable[[Callable[[], Any]], Any],
        recorder: NotificationReader | None = None,
    ) -> None:
        self.name = name
        self.env = env
        self._tuning = tuning
        self._retry_db = retry_db
        self._given = recorder
        self.recorder: NotificationReader | None = recorder
        self.known_max = 0  # the log's highest id, as last read

    def open(self, wait: Wait) -> None:
        """Open the log (idempotent), waiting for its Postgres with ``wait``."""
        if self.recorder is None:
            name, env = self.name, self.env
            self.recorder = wait(
                f"opening the notification log of {name}",
                lambda: open_recorder(name, env),
                diagnose=connection_diagnosis(name, env),
            )

    def close(self) -> None:
        """Close the log's pool now: closed at exit, it would hang the process."""
        recorder, self.recorder = self.recorder, self._given
        if recorder is not self._given:
            close_recorder(recorder)

    def _opened(self) -> NotificationReader:
        recorder = self.recorder
        assert recorder is not None
        return recorder

    def highest(self, at_least: int) -> int:
        """The log's highest id, re-read only when ``at_least`` is beyond the last one read."""
        if at_least > self.known_max:
            self.known_max = self._retry_db(self._opened().max_notification_id) or 0
        return self.known_max

    def read_range(self, after: int, stop: int) -> list[Sequence[Notification]]:
        """The notifications in ``(after, stop]``, in pages of ``page_size``."""
        recorder = self._opened()
        size = self._tuning.page_size
        pages: list[Sequence[Notification]] = self._retry_db(
            lambda: list(read_pages(recorder, after, stop=stop, page_size=size))
        )
        return pages

    def page_after(self, position: int) -> Sequence[Notification]:
        """One page (``page_size``) of the notifications after ``position``."""
        recorder = self._opened()
        page: Sequence[Notification] = self._retry_db(
            lambda: recorder.select_notifications(
                start=position, limit=self._tuning.page_size, inclusive_of_start=False
            )
        )
        return page


def not_in_log(payload: wire.PayloadHeaders, genuine: Notification | None, log_max: int) -> str:
    """Why a message is not the log's event under its id (``genuine``: the log's, if any)."""
    if payload.nid > log_max:
        return f"notification id {payload.nid} is beyond the upstream log's highest id {log_max}"
    if genuine is None:
        return f"the upstream log has no notification {payload.nid} for this message's partition"
    return (
        f"the upstream log's notification {payload.nid} is another event ({genuine.topic} "
        f"v{genuine.originator_version} of {genuine.originator_id}; the message says "
        f"{payload.topic} v{payload.originator_version} of {payload.originator_id})"
    )
