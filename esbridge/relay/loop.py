"""The relay's publishing loop: steps, retried through outages, while holding the lease.

Whatever the mode (:mod:`.strategy`), a publishing relay must: retry broker
and Postgres failures with exponential backoff, recovering its producer the
way a restart does (re-reading the committed position); publish only while
it holds its lease (:mod:`.standby`), standing by when it loses it and giving
it up when it cannot reach Kafka; and, while it waits, keep the lease's
session busy so that a waiting relay is not taken for a hung one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException

from esbridge.errors import RelayError, RelayFencedError
from esbridge.eventlog.follower import LogWaker
from esbridge.relay.metrics import RelayMetrics
from esbridge.relay.publisher import TransientPublishError
from esbridge.relay.standby import Tenure
from esbridge.relay.status import Progress
from esbridge.relay.strategy import PublishingStrategy
from esbridge.relay.tuning import RelayTuning
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS

log = logging.getLogger("esbridge.relay")  # the relay's logger, whichever module logs


def _serve_nothing() -> None:
    """Until the relay sets :attr:`Waits.serve`: no producer to serve."""


class Waits:
    """The relay's waits: cut short by :meth:`Relay.stop`, never a lease check long.

    ``serve`` is set by the relay to its publishing strategy's, so that an
    idle relay hands over what its producer queued meanwhile.
    """

    def __init__(self, stop: threading.Event, tenure: Tenure, lease_check: float) -> None:
        self.stop = stop
        self.tenure = tenure
        self.lease_check = lease_check
        self.serve: Callable[[], None] = _serve_nothing

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (less if stopped), keeping the lease's session busy meanwhile."""
        self.for_events(None, seconds)

    def for_events(self, waker: LogWaker | None, seconds: float) -> None:
        """Wait ``seconds``, until ``waker`` wakes (new events) or the relay is stopped.

        In steps of at most ``lease_check`` with a lease check between them: a
        waiting relay is not a hung one, and its lease must not expire.
        """
        deadline = time.monotonic() + seconds
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.tenure.keep_alive()  # a round trip at most every lease_check seconds
            self.serve()
            step = min(left, self.lease_check)
            if waker is None:
                self.stop.wait(step)
            elif waker.wait(step):
                return


class PublishingLoop:
    """Runs ``publishing``'s steps until stopped, through outages and changes of lease holder."""

    def __init__(
        self,
        app: str,
        publishing: PublishingStrategy,
        *,
        tuning: RelayTuning,
        tenure: Tenure,
        waits: Waits,
        progress: Progress,
        metrics: RelayMetrics,
    ) -> None:
        self.app = app
        self.publishing = publishing
        self.tuning = tuning
        self.tenure = tenure
        self.waits = waits
        self.progress = progress
        self.metrics = metrics
        self.stop = waits.stop

    def run(self, waker: LogWaker) -> None:
        """Publish, then wait for new events, until stopped; raise on a permanent failure."""
        while not self.stop.is_set():
            if not self.keep_lease():
                continue  # stopped while standing by
            waker.clear()
            try:
                count = self.step_with_retries()
            except RelayFencedError as e:
                self.after_fencing(e)  # raises when neither standing by nor restarting
                continue
            self.publishing.after_step(count)
            if count == 0 and not self.stop.is_set():
                self.waits.for_events(waker, self.publishing.idle_wait())

    def take_lease(self, timeout: float | None) -> bool:
        """Hold the relay's lease (waiting while another relay holds it); False if stopped."""
        return self.tenure.take(self.stop.is_set, timeout)

    def keep_lease(self) -> bool:
        """Make sure the lease is still held; if lost, stop publishing and stand by.

        False when stopped while standing by.
        """
        if self.tenure.held():
            return True
        self.publishing.suspend()  # its successor aborts whatever it left open
        if not self.take_lease(None):
            return False
        self.recover()
        return not self.stop.is_set()

    def step_with_retries(self) -> int:
        """One step; transient failures are retried with backoff (recovering first)."""
        delay = 0.2
        while not self.stop.is_set():
            try:
                count = self.publishing.step()
                self.tenure.kafka_reached()
                return count
            except TransientPublishError as e:
                self.metrics.error("kafka")
                self.tenure.kafka_failed()
                log.warning(
                    "relay %s: Kafka failed (%s); reconnecting in %.1f s", self.app, e, delay
                )
                self.waits.sleep(delay)
                delay = min(delay * 2, self.tuning.max_retry_delay)
                if not self.tenure.held() or self.yield_lease():
                    return 0  # the run loop stands by; the new holder publishes
                self.recover()
            except TRANSIENT_ERRORS as e:
                self.metrics.error("postgres")
                log.warning(
                    "relay %s: reading the notification log failed (%s: %s); retrying in %.1f s",
                    self.app,
                    type(e).__name__,
                    e,
                    delay,
                )
                self.waits.sleep(delay)
                delay = min(delay * 2, self.tuning.max_retry_delay)
                if not self.tenure.held():
                    return 0  # Postgres restarted: the run loop takes the lease again first
        return 0

    def recover(self) -> None:
        """Make a new producer and re-read the committed position, until it works."""
        if not self.publishing.restartable:
            return
        delay = 0.5
        while not self.stop.is_set():
            if not self.tenure.held() or self.yield_lease():
                return  # never fence the relay that holds the lease now
            try:
                self.publishing.restart()
                self.tenure.kafka_reached()
                log.info(
                    "relay %s: reconnected at notification %d", self.app, self.progress.position
                )
                return
            except TransientPublishError as e:
                self.metrics.error("kafka")
                self.tenure.kafka_failed()
                log.warning(
                    "relay %s: still cannot reach Kafka (%s); retry in %.1f s", self.app, e, delay
                )
            except KafkaException as e:
                self.tenure.kafka_failed()
                log.warning("relay %s: %s; retry in %.1f s", self.app, e, delay)
            self.waits.sleep(delay)
            delay = min(delay * 2, self.tuning.max_retry_delay)

    def yield_lease(self) -> bool:
        """Give the lease up after failing to reach Kafka for ``lease_yield`` s; True if it did.

        A standby that can reach Kafka then publishes; this relay stands by
        (the run loop's next lease check).
        """
        if not self.tenure.should_yield():
            return False
        self.publishing.suspend()
        self.tenure.give_up()
        self.waits.sleep(1.0)  # a standby waiting for the lock gets it first
        return True

    def after_fencing(self, error: RelayFencedError) -> None:
        """Fenced by a newer producer with this relay id: stand by, or restart the producer.

        Raises when that is no answer (see :meth:`~esbridge.relay.standby.Tenure.fenced`).
        """
        if self.tenure.fenced(error):
            self.recover()

    def retry(self, what: str, action: Callable[[], Any], timeout: float | None) -> Any:
        """Run ``action``, retrying transient failures with backoff until ``timeout``."""
        start = time.monotonic()
        delay = 0.5
        while True:
            try:
                return action()
            except (TransientPublishError, KafkaException, *TRANSIENT_ERRORS) as e:
                if self.stop.is_set():
                    raise RelayError(f"relay {self.app!r} stopped before it could {what}") from e
                if timeout is not None and time.monotonic() - start >= timeout:
                    raise RelayError(
                        f"relay {self.app!r} could not {what} within {timeout} s: {e}"
                    ) from e
                log.warning(
                    "relay %s: cannot %s yet (%s: %s); retrying in %.1f s",
                    self.app,
                    what,
                    type(e).__name__,
                    e,
                    delay,
                )
                self.waits.sleep(delay)
                delay = min(delay * 2, self.tuning.max_retry_delay)
