"""The relay: follows one application's notification log and publishes it to Kafka.

Two modes, each a publishing strategy chosen once, when the relay is made
(:mod:`.strategy`):

* ``payloads`` (:mod:`.payloads`) — every notification becomes one Kafka
  message, exactly once with Kafka transactions (the relay's position commits
  in the same transaction), or at least once with an idempotent producer.
* ``prompts`` (:mod:`.prompts`) — tiny "application X has notifications up to
  id N" messages, coalesced and repeated; followers pull the events themselves.

The relay only reads the application's database (it creates and writes
nothing there). It wakes on the recorder's ``NOTIFY`` (:class:`LogWaker`)
and polls every ``poll_interval`` seconds as a fallback. The ``eventsourcing``
Postgres recorder serialises writers with a table lock, so notification ids
commit in increasing order, and a gap is a rolled-back insert that never
fills. Writers that skip the lock may commit an id after higher ones: the
relay never publishes past a gap while a transaction that may fill it is in
progress (:mod:`esbridge.relay.gaps`), so it passes over no id in either case.

Memory stays bounded whatever the backlog: one page of notifications at a
time in Python, and librdkafka's bounded queue (``produce`` waits when it is
full). Broker and Postgres outages are retried with exponential backoff
(:mod:`.loop`); the recovery path re-reads the committed position, like a
restart does. This module is the facade: checking the configuration, setting
up and tearing down, and the status.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from eventsourcing.persistence import ApplicationRecorder
from prometheus_client import CollectorRegistry

from esbridge.errors import BrokerUnavailable, ConfigurationError, RelayError
from esbridge.eventlog.follower import LogWaker, connection_kwargs
from esbridge.eventlog.notification_log import close_recorder, open_recorder
from esbridge.kafka.topics import kafka_admin, wait_for_broker
from esbridge.names import MODES, PAYLOADS, PROMPTS, default_position_topic, default_relay_id
from esbridge.relay.gaps import GapGuard
from esbridge.relay.lease import check_expiry
from esbridge.relay.loop import PublishingLoop, Waits
from esbridge.relay.metrics import RelayMetrics
from esbridge.relay.payloads import PayloadPublishing
from esbridge.relay.prompts import PromptPublishing
from esbridge.relay.standby import Tenure
from esbridge.relay.status import Progress, RelayStatus
from esbridge.relay.strategy import PublishingStrategy
from esbridge.relay.tuning import RelayTuning
from esbridge.runtime.catch_up import CatchUpLog
from esbridge.runtime.persistence import require_postgres
from esbridge.runtime.postgres_retry import connection_diagnosis
from esbridge.runtime.signals import waiting_for
from esbridge.wire.encoding import Encoder

__all__ = ["Relay", "RelayStatus", "RelayTuning"]

log = logging.getLogger("esbridge.relay")


class Relay:
    """Publishes application ``app_name``'s notification log to Kafka topic ``topic``.

    ``env`` holds the ``POSTGRES_*`` settings used to read the log (default
    ``os.environ``; ``{APP}_POSTGRES_*`` names win, as in eventsourcing); a log
    not stored in Postgres is a :class:`ConfigurationError` here.
    ``kafka_config`` is passed to librdkafka (``bootstrap.servers`` at least).
    See :class:`RelayTuning` for the other keyword arguments; ``encoder`` (a
    :data:`~esbridge.wire.encoding.Encoder`) and ``registry`` (Prometheus) are
    accepted too.
    """

    def __init__(
        self,
        app_name: str,
        *,
        kafka_config: Mapping[str, Any],
        topic: str,
        mode: str = PAYLOADS,
        env: Mapping[str, str] | None = None,
        relay_id: str | None = None,
        exactly_once: bool = True,
        partitions: int | None = None,
        **tuning: Any,
    ) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"relay mode {mode!r} is not one of {', '.join(MODES)}")
        if not app_name:
            raise ConfigurationError("the relay needs an application name")
        if not kafka_config.get("bootstrap.servers"):
            raise ConfigurationError(
                "kafka_config has no 'bootstrap.servers' (set KAFKA_BOOTSTRAP_SERVERS)"
            )
        if partitions is not None and partitions < 1:
            raise ConfigurationError(f"partitions must be at least 1, not {partitions}")
        self.encoder_hook: Encoder | None = tuning.pop("encoder", None)
        registry: CollectorRegistry | None = tuning.pop("registry", None)
        try:
            self.tuning = RelayTuning(**tuning)
        except TypeError as e:
            known = ", ".join(RelayTuning.__dataclass_fields__)
            raise ConfigurationError(f"unknown relay setting: {e}; known: {known}") from None
        if self.tuning.linger_rate < 0:
            raise ConfigurationError(
                f"linger_rate must be at least 0 (events a second), not "
                f"{self.tuning.linger_rate}; 0 lingers after every transaction"
            )
        if self.tuning.standby:
            check_expiry(self.tuning.lease_check, self.tuning.lease_expiry)
        self.app = app_name
        self.kafka_config = dict(kafka_config)
        self.topic = topic
        self.mode = mode
        self.env = dict(os.environ if env is None else env)
        # Now, not in run(): an in-memory log would be empty, and the relay would wait for ever.
        require_postgres(app_name, self.env)
        self.relay_id = relay_id or default_relay_id(app_name, topic)
        self.exactly_once = exactly_once
        self.partitions = partitions
        self.position_topic = self.tuning.position_topic or default_position_topic(topic)
        self.metrics = RelayMetrics(app_name, topic, registry)

        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running = False
        self._error: str | None = None
        self._progress = Progress(
            self.metrics, CatchUpLog(log, f"relay {app_name} -> {topic}", "notifications")
        )
        self._recorder: ApplicationRecorder | None = None
        self._gap_guard: GapGuard | None = None
        self._tenure = Tenure(
            self.relay_id,
            app_name,
            self.metrics.active,
            check=self.tuning.lease_check,
            expiry=self.tuning.lease_expiry,
            yield_after=self.tuning.lease_yield,
        )
        self._waker: LogWaker | None = None
        waits = Waits(self._stop, self._tenure, self.tuning.lease_check)
        self._publishing = self._publishing_strategy(waits)
        waits.serve = self._publishing.serve
        self._loop = PublishingLoop(
            app_name,
            self._publishing,
            tuning=self.tuning,
            tenure=self._tenure,
            waits=waits,
            progress=self._progress,
            metrics=self.metrics,
        )

    def _publishing_strategy(self, waits: Waits) -> PublishingStrategy:
        """The mode, decided here once: nothing else asks which one it is."""
        if self.mode == PROMPTS:
            return PromptPublishing(
                self.app,
                topic=self.topic,
                kafka_config=self.kafka_config,
                tuning=self.tuning,
                partitions=self.partitions,
                progress=self._progress,
                sleep=waits.sleep,
            )
        return PayloadPublishing(
            self.app,
            topic=self.topic,
            kafka_config=self.kafka_config,
            env=self.env,
            tuning=self.tuning,
            relay_id=self.relay_id,
            position_topic=self.position_topic,
            exactly_once=self.exactly_once,
            partitions=self.partitions,
            encoder_hook=self.encoder_hook,
            progress=self._progress,
            stop=self._stop,
            sleep=waits.sleep,
        )

    # -- public API -------------------------------------------------------

    def run(self) -> None:
        """Publish until :meth:`stop` is called; raise on a permanent failure."""
        with self._lock:
            self._running = True
        try:
            try:
                self._setup(self.tuning.connect_timeout)
            except (BrokerUnavailable, RelayError):
                # Stopped while it waited or retried (a standby handed the lease as it was
                # asked to stop, a pooled connection Postgres closed): no failure.
                if not self._stop.is_set():
                    raise
            if self._stop.is_set():
                return  # stopped while waiting for the broker or the lease
            log.info(
                "relay %s -> %s (%s, %s) started at notification %d",
                self.app,
                self.topic,
                self.mode,
                self._publishing.guarantee,
                self._progress.position,
                extra={"app": self.app, "topic": self.topic},
            )
            waker = self._waker
            assert waker is not None
            self._loop.run(waker)
        except BaseException as e:
            self._error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._teardown()
            with self._lock:
                self._running = False
            if self._error is None:
                self._log_stop()

    def _log_stop(self) -> None:
        """The stop summary, the same from ``esbridge relay`` and from a runner's relay."""
        s = self.status()
        log.info(
            "relay %s stopped at notification %d (%d published by this process)",
            self.app,
            s.position,
            s.published,
            extra={"app": self.app, "topic": self.topic, "position": s.position},
        )

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch (thread-safe, idempotent)."""
        self._stop.set()
        waker = self._waker
        if waker is not None:
            waker.wake()

    def prepare(self, timeout: float | None = 60.0) -> None:
        """Check the configuration, connect, create topics, read the position.

        :meth:`run` and :meth:`publish_available` do this themselves; call it
        to fail early (a :class:`ConfigurationError` names what is wrong).
        """
        try:
            self._setup(timeout)
        except BaseException:
            self._teardown()
            raise

    def publish_available(self) -> int:
        """Publish everything in the log now and return.

        Up to a gap that a transaction in progress may still fill, if any
        (:mod:`esbridge.relay.gaps`): a later call publishes the rest. The
        number of notifications published (payload mode) or of prompts sent
        (prompt mode). Sets up the relay on first use; call :meth:`close`
        when done.
        """
        self.prepare(self.tuning.connect_timeout or 60.0)
        return self._publishing.publish_available()

    def close(self) -> None:
        """Release connections made by :meth:`publish_available` (run() does it itself)."""
        self._teardown()

    def status(self) -> RelayStatus:
        progress = self._progress
        position, upstream = progress.position, max(progress.upstream_max, progress.position)
        return RelayStatus(
            app=self.app,
            topic=self.topic,
            mode=self.mode,
            position=position,
            upstream_max=upstream,
            lag=upstream - position,
            published=progress.published,
            running=self._running,
            error=self._error,
            standby=self._tenure.standing_by,
        )

    # -- set-up -----------------------------------------------------------

    def _setup(self, timeout: float | None) -> None:
        """Check the configuration, connect, and read the position (idempotent)."""
        if self._recorder is None:
            with waiting_for(f"Postgres (the notification log of {self.app})"):
                self._recorder = self._loop.retry(
                    "open the notification log", self._open_recorder, timeout
                )
        recorder = self._recorder
        assert recorder is not None
        partitions = None
        if not self._publishing.started:
            # Before the lease: a relay that cannot reach Kafka (a wrong bootstrap.servers,
            # a host cut off from the brokers) never keeps a standby that can from publishing.
            partitions = self._check_topics(timeout)
        if not self._take_lease(recorder, timeout):
            return  # stopped while standing by
        if partitions is not None:
            with waiting_for(f"the Kafka producer of relay {self.relay_id!r} to start"):
                self._publishing.start(
                    partitions,
                    recorder,
                    self._gap_guard,
                    took_over=self._tenure.waited,
                    retry=self._loop.retry,
                    timeout=timeout,
                )
        if self._waker is None:
            self._waker = LogWaker(recorder, name=f"esbridge relay waker {self.app}")

    def _open_recorder(self) -> ApplicationRecorder:
        """The application's recorder; Postgres unreachable (restarting) raises for _setup
        to retry, settings the server refuses and a missing table are ConfigurationErrors."""
        connection_diagnosis(self.app, self.env)()  # now, not after the pool's timeout
        recorder = open_recorder(self.app, self.env)
        self._progress.upstream_max = recorder.max_notification_id() or 0
        self._gap_guard = GapGuard.for_recorder(self.app, recorder, self.metrics)
        return recorder

    def _check_topics(self, timeout: float | None) -> int:
        """Wait for the broker, then create or check the mode's topics: their partitions."""
        servers = str(self.kafka_config["bootstrap.servers"])
        with kafka_admin(self.kafka_config) as admin, waiting_for(f"topic {self.topic!r}"):
            wait_for_broker(admin, servers, timeout, self._stop.is_set)
            return self._publishing.check_topics(admin)

    def _take_lease(self, recorder: ApplicationRecorder, timeout: float | None) -> bool:
        """Hold the relay's lease (waiting while another relay holds it); False if stopped.

        No lease with ``standby=False``, nor for a log that is not in Postgres.
        """
        tenure = self._tenure
        if self.tuning.standby and tenure.lease is None:
            kwargs = connection_kwargs(recorder)
            if kwargs is not None:
                tenure.attach(kwargs)
        return self._loop.take_lease(timeout)

    def _teardown(self) -> None:
        if self._waker is not None:
            self._waker.stop()
            self._waker = None
        self._publishing.close()
        self._tenure.release()  # after the producer is gone: a successor may start now
        recorder, self._recorder = self._recorder, None
        close_recorder(recorder)
