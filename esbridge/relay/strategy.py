"""What the relay asks of a publishing mode, payloads or prompts.

The two modes (:mod:`.payloads`, :mod:`.prompts`) are strategies behind this
protocol, chosen once when the relay is made; the set-up, the loop that
retries and keeps the lease (:mod:`.loop`), and the status do not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from confluent_kafka.admin import AdminClient
from eventsourcing.persistence import ApplicationRecorder

from esbridge.relay.gaps import GapGuard

#: Runs an action, retrying transient failures until a timeout: ``retry(what, action, timeout)``.
Retry = Callable[[str, Callable[[], Any], float | None], Any]


class PublishingStrategy(Protocol):
    """One way of telling Kafka what the notification log holds."""

    #: What the start-up log line says about delivery ("exactly once", ...).
    guarantee: str

    @property
    def started(self) -> bool:
        """True once topics were checked and a producer made (until :meth:`close`)."""

    @property
    def restartable(self) -> bool:
        """True when a producer failure is recovered by :meth:`restart`."""

    def check_topics(self, admin: AdminClient) -> int:
        """Create or check this mode's topics; the number of partitions of the topic."""

    def start(
        self,
        partitions: int,
        recorder: ApplicationRecorder,
        gap_guard: GapGuard | None,
        *,
        took_over: bool,
        retry: Retry,
        timeout: float | None,
    ) -> None:
        """Make the producer and read the position (``took_over``: a relay published before)."""

    def restart(self) -> None:
        """Make a new producer and re-read the committed position (after an outage)."""

    def step(self) -> int:
        """Publish what the log holds now; how many notifications or prompts."""

    def after_step(self, count: int) -> None:
        """Wait a little after a step that published ``count``, if the mode wants to."""

    def idle_wait(self) -> float:
        """Seconds to wait for new events after a step that published nothing."""

    def publish_available(self) -> int:
        """Publish everything in the log now (see :meth:`Relay.publish_available`)."""

    def serve(self) -> None:
        """Hand over what the producer queued (log lines, delivery reports); never waits."""

    def suspend(self) -> None:
        """Stop producing (the lease is lost or given up); :meth:`restart` goes on."""

    def close(self) -> None:
        """Close the producer; :meth:`start` makes a new one."""


def publish_access(topic: str, app: str) -> dict[str, tuple[str, str]]:
    """The ACL that publishing ``app``'s log to ``topic`` needs, for ``check_topic_access``."""
    return {topic: ("WRITE", f"publish the log of {app!r}")}
