"""The relay: follows one application's notification log and publishes it to Kafka.

Two modes:

* ``payloads`` — every notification becomes one Kafka message (format v1,
  :mod:`esbridge.wire`), published by :class:`~esbridge.relay.publisher.KafkaPublisher`:
  exactly once with Kafka transactions (the relay's position commits in the
  same transaction), or at least once with an idempotent producer.
* ``prompts`` — tiny "application X has notifications up to id N" messages;
  bursts are coalesced (at most one prompt per ``prompt_interval``) and the
  latest prompt is repeated every ``prompt_repeat`` seconds, so a lost prompt
  only delays a follower. Followers pull the events from the log themselves.

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
full). Broker and Postgres outages are retried with exponential backoff; the
recovery path re-reads the committed position, like a restart does.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException, Producer
from eventsourcing.persistence import (
    ApplicationRecorder,
)
from prometheus_client import CollectorRegistry

from esbridge import wire
from esbridge.errors import (
    BrokerUnavailable,
    ConfigurationError,
    EsbridgeError,
    RelayError,
    RelayFencedError,
)
from esbridge.eventlog.follower import LogWaker, connection_kwargs
from esbridge.eventlog.notification_log import (
    close_recorder,
    open_recorder,
    read_pages,
    upstream_environment,
)
from esbridge.kafka.partitioning import partition_for_key
from esbridge.kafka.topics import (
    check_topic_access,
    ensure_topic,
    kafka_admin,
    topic_setting,
    wait_for_broker,
)
from esbridge.names import MODES, PAYLOADS, PROMPTS, default_position_topic, default_relay_id
from esbridge.relay.gaps import GapGuard, guarded_pages
from esbridge.relay.lease import DEFAULT_EXPIRY, check_expiry
from esbridge.relay.metrics import RelayMetrics
from esbridge.relay.position import POSITION_TOPIC_CONFIG
from esbridge.relay.publisher import KafkaPublisher, TransientPublishError
from esbridge.relay.reader import read_pages_for_publishing
from esbridge.relay.standby import Tenure
from esbridge.runtime.logs import kafka_client_config
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS, connection_diagnosis
from esbridge.wire.encoding import Encoder, PayloadEncoder, content_type_for

log = logging.getLogger("esbridge.relay")


#: Seconds between the checks whether a gap's writers ended (instead of ``poll_interval``).
GAP_POLL = 0.05

_row_id = operator.itemgetter(0)
_notification_id = operator.attrgetter("id")


@dataclass(frozen=True)
class RelayTuning:
    """Knobs of a relay (keyword arguments of :class:`Relay`), with their defaults."""

    #: Notifications read from Postgres per query.
    page_size: int = 2000
    #: Most notifications in one Kafka transaction (one position write each).
    batch_size: int = 50_000
    #: Longest time a transaction stays open while a backlog is published.
    batch_seconds: float = 2.0
    #: Payload mode: seconds to wait after a transaction that did not fill a batch, so
    #: that events written meanwhile share the next one. Fewer, larger transactions
    #: cost the broker (commit markers, transaction log) and the followers (one
    #: Postgres commit per batch) less, for at most this much more latency. 0: publish
    #: as soon as new events are seen.
    linger: float = 0.05
    #: Fallback polling interval when no NOTIFY arrives.
    poll_interval: float = 1.0
    #: Create missing topics (``partitions`` or 1 partition for prompts).
    create_topics: bool = True
    replication_factor: int | None = None
    #: Compacted topic holding the relay position (default ``<topic>.esbridge-relay-position``).
    position_topic: str | None = None
    #: Prompt mode: minimum seconds between prompts (coalescing) and repeat period.
    prompt_interval: float = 0.05
    prompt_repeat: float = 10.0
    #: Longest backoff between retries of a failed broker or Postgres operation.
    max_retry_delay: float = 10.0
    #: ``init_transactions`` / commit timeouts (seconds).
    init_timeout: float = 60.0
    commit_timeout: float = 60.0
    #: Seconds to wait for Postgres and the broker at start-up (None: for ever, retrying).
    connect_timeout: float | None = None
    #: Publish only while holding this relay id's lease (a Postgres advisory lock,
    #: see :mod:`esbridge.relay.lease`): a second relay with the same id stands by
    #: and takes over when the first stops or dies. False: no lease; a second relay
    #: takes over at once, fencing the first (which stops with RelayFencedError).
    standby: bool = True
    #: Seconds between the checks that the lease is still held.
    lease_check: float = 2.0
    #: Seconds after which Postgres ends the session of a lease holder that made
    #: no check: a hung relay (frozen, deadlocked) loses its lease to a standby.
    #: None: the lease never expires (a hung relay keeps it until killed).
    lease_expiry: float | None = DEFAULT_EXPIRY
    #: Seconds a lease holder may keep failing to reach Kafka before it gives its
    #: lease up, so that a standby that can reach Kafka publishes (it then stands
    #: by itself). None: it keeps the lease, retrying, for as long as it takes.
    lease_yield: float | None = 60.0


@dataclass(frozen=True)
class RelayStatus:
    """A snapshot of a relay's progress (also exported as Prometheus metrics)."""

    app: str
    topic: str
    mode: str
    position: int  # last notification id published (payloads) or prompted (prompts)
    upstream_max: int  # largest notification id seen in the log
    lag: int  # upstream_max - position
    published: int  # messages committed since this relay object was made
    running: bool
    error: str | None
    standby: bool = False  # waiting for the lease: another relay with this id publishes


class Relay:
    """Publishes application ``app_name``'s notification log to Kafka topic ``topic``.

    ``env`` holds the ``POSTGRES_*`` settings used to read the log (default
    ``os.environ``; ``{APP}_POSTGRES_*`` names win, as in eventsourcing).
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
        if self.tuning.standby:
            check_expiry(self.tuning.lease_check, self.tuning.lease_expiry)
        self.app = app_name
        self.kafka_config = dict(kafka_config)
        self.topic = topic
        self.mode = mode
        self.env = dict(os.environ if env is None else env)
        self.relay_id = relay_id or default_relay_id(app_name, topic)
        self.exactly_once = exactly_once
        self.partitions = partitions
        self.position_topic = self.tuning.position_topic or default_position_topic(topic)
        self.metrics = RelayMetrics(app_name, topic, registry)

        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running = False
        self._error: str | None = None
        self._published = 0
        self._position = 0
        self._upstream_max = 0
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
        self._publisher: KafkaPublisher | None = None
        self._prompter: Producer | None = None
        self._prompt_partition = 0
        self._producer_overrides: dict[str, Any] = {}
        self._last_prompt = (0, 0.0)  # (max_nid, monotonic time) of the last prompt sent

    # -- public API -------------------------------------------------------

    def run(self) -> None:
        """Publish until :meth:`stop` is called; raise on a permanent failure."""
        with self._lock:
            self._running = True
        try:
            try:
                self._setup(self.tuning.connect_timeout)
            except BrokerUnavailable:
                if not self._stop.is_set():
                    raise
            if self._stop.is_set():
                return  # stopped while waiting for the broker or the lease
            log.info(
                "relay %s -> %s (%s, %s) started at notification %d",
                self.app,
                self.topic,
                self.mode,
                "may be lost or repeated"
                if self.mode == PROMPTS
                else "exactly once"
                if self.exactly_once
                else "at least once",
                self._position,
                extra={"app": self.app, "topic": self.topic},
            )
            while not self._stop.is_set():
                if not self._keep_lease():
                    continue  # stopped while standing by
                waker = self._waker
                assert waker is not None
                waker.clear()
                try:
                    count = self._step_with_retries()
                except RelayFencedError as e:
                    self._after_fencing(e)  # raises when neither standing by nor restarting
                    continue
                if 0 < count < self.tuning.batch_size and self.mode == PAYLOADS:
                    self._sleep(self.tuning.linger)
                if count == 0 and not self._stop.is_set():
                    self._wait_for_events(waker, self._idle_wait())
        except BaseException as e:
            self._error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._teardown()
            with self._lock:
                self._running = False

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
        total = 0
        while True:
            count = self._step()
            total += count
            if count == 0 or self.mode == PROMPTS:
                if self._prompter is not None:
                    self._prompter.flush(30)
                return total

    def close(self) -> None:
        """Release connections made by :meth:`publish_available` (run() does it itself)."""
        self._teardown()

    def status(self) -> RelayStatus:
        position, upstream = self._position, max(self._upstream_max, self._position)
        return RelayStatus(
            app=self.app,
            topic=self.topic,
            mode=self.mode,
            position=position,
            upstream_max=upstream,
            lag=upstream - position,
            published=self._published,
            running=self._running,
            error=self._error,
            standby=self._tenure.standing_by,
        )

    # -- set-up -----------------------------------------------------------

    def _setup(self, timeout: float | None) -> None:
        """Check the configuration, connect, and read the position (idempotent)."""
        if self._recorder is None:
            self._recorder = self._retry(
                "open the notification log", self._open_recorder, timeout=timeout
            )
        partitions = None
        if self._publisher is None and self._prompter is None:
            # Before the lease: a relay that cannot reach Kafka (a wrong bootstrap.servers,
            # a host cut off from the brokers) never keeps a standby that can from publishing.
            partitions = self._check_topics(timeout)
        if not self._take_lease(timeout):
            return  # stopped while standing by
        if partitions is not None and self.mode == PAYLOADS:
            self._publisher = self._make_publisher(partitions)
            # After standing by, the relay before this one used the broker's transactions:
            # a timeout now is an outage, not a broker unfit for them.
            took_over = self._tenure.waited
            self._retry(
                "start the Kafka producer",
                lambda: self._start_publisher(first=not took_over),
                timeout=timeout,
            )
        elif partitions is not None:
            self._prompt_partition = partition_for_key(self.app.encode(), partitions)
            conf = {**self.kafka_config, "enable.idempotence": True, "linger.ms": 0}
            self._prompter = Producer(kafka_client_config(conf))
        if self._waker is None:
            self._waker = LogWaker(self._recorder, name=f"esbridge relay waker {self.app}")

    def _open_recorder(self) -> ApplicationRecorder:
        """The application's recorder; Postgres unreachable (restarting) raises for _setup
        to retry, settings the server refuses and a missing table are ConfigurationErrors."""
        connection_diagnosis(self.app, self.env)()  # now, not after the pool's timeout
        recorder = open_recorder(self.app, self.env)
        self._upstream_max = recorder.max_notification_id() or 0
        self._gap_guard = GapGuard.for_recorder(self.app, recorder, self.metrics)
        return recorder

    def _check_topics(self, timeout: float | None) -> int:
        with kafka_admin(self.kafka_config) as admin:
            wait_for_broker(
                admin, str(self.kafka_config["bootstrap.servers"]), timeout, self._stop.is_set
            )
            create = self.tuning.create_topics
            rf = self.tuning.replication_factor
            client = self.kafka_config
            publish = {self.topic: ("WRITE", f"publish the log of {self.app!r}")}
            if self.mode == PROMPTS:
                wanted = self.partitions or 1
                count = ensure_topic(
                    admin, self.topic, wanted if create else None, rf, client=client
                )
                check_topic_access(admin, client, publish)
                return count
            partitions = ensure_topic(
                admin, self.topic, self.partitions if create else None, rf, client=client
            )
            if self.partitions is not None and partitions != self.partitions:
                raise ConfigurationError(
                    f"topic {self.topic!r} has {partitions} partitions, but {self.partitions} "
                    "were configured"
                )
            ensure_topic(admin, self.position_topic, 1, rf, POSITION_TOPIC_CONFIG, client=client)
            position = ("READ+WRITE", "store and read the relay's position")
            check_topic_access(admin, client, {**publish, self.position_topic: position})
            self._producer_overrides = self._size_limits(admin)
            return partitions

    def _size_limits(self, admin: Any) -> dict[str, Any]:
        """Cap the producer's message size at the topic's ``max.message.bytes``.

        Then librdkafka refuses a too-large message at ``produce()``, so the
        relay names that notification, and sizes batches so the broker never
        refuses a whole batch of small ones.
        """
        if "message.max.bytes" in self.kafka_config:
            return {}
        try:
            value = topic_setting(admin, self.topic, "max.message.bytes")
        except Exception as e:  # describe_configs not allowed: keep librdkafka's default
            log.info(
                "relay %s: cannot read max.message.bytes of %s (%s); the producer's "
                "message.max.bytes applies (DESCRIBE_CONFIGS on the topic lets the relay read it)",
                self.app,
                self.topic,
                e,
            )
            return {}
        if not value or int(value) >= 1_000_000:
            return {}
        limit = int(value)
        return {"message.max.bytes": limit, "batch.size": limit}

    def _make_publisher(self, partitions: int) -> KafkaPublisher:
        content_type = content_type_for(upstream_environment(self.app, self.env))
        encoder = PayloadEncoder(self.app, partitions, content_type, self.encoder_hook)
        return KafkaPublisher(
            {**self.kafka_config, **self._producer_overrides},
            app=self.app,
            topic=self.topic,
            position_topic=self.position_topic,
            relay_id=self.relay_id,
            encoder=encoder,
            num_partitions=partitions,
            exactly_once=self.exactly_once,
            transactional_id=self.relay_id,
            init_timeout=self.tuning.init_timeout,
            commit_timeout=self.tuning.commit_timeout,
        )

    def _start_publisher(self, first: bool) -> None:
        assert self._publisher is not None
        try:
            position = self._publisher.start(first=first)
        except (ConfigurationError, RelayError):
            raise
        except (KafkaException, EsbridgeError) as e:  # reading the position: broker went away
            raise TransientPublishError(f"reading the relay position: {e}") from e
        self._position = position.nid
        self.metrics.position.set(position.nid)

    def _take_lease(self, timeout: float | None) -> bool:
        """Hold the relay's lease (waiting while another relay holds it); False if stopped.

        No lease with ``standby=False``, nor for a log that is not in Postgres.
        """
        tenure = self._tenure
        if self.tuning.standby and tenure.lease is None and self._recorder is not None:
            kwargs = connection_kwargs(self._recorder)
            if kwargs is not None:
                tenure.attach(kwargs)
        return tenure.take(self._stop.is_set, timeout)

    def _keep_lease(self) -> bool:
        """Make sure the lease is still held; if lost, stop publishing and stand by.

        False when stopped while standing by.
        """
        if self._tenure.held():
            return True
        if self._publisher is not None:
            self._publisher.close()  # its successor aborts whatever it left open
        if not self._take_lease(None):
            return False
        self._recover_publisher()
        return not self._stop.is_set()

    def _teardown(self) -> None:
        if self._waker is not None:
            self._waker.stop()
            self._waker = None
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        if self._prompter is not None:
            self._prompter.flush(5)
            self._prompter = None
        self._tenure.release()  # after the producer is gone: a successor may start now
        recorder, self._recorder = self._recorder, None
        close_recorder(recorder)

    # -- the loop ---------------------------------------------------------

    def _idle_wait(self) -> float:
        if self.mode == PROMPTS:
            return min(self.tuning.poll_interval, self.tuning.prompt_repeat)
        guard = self._gap_guard
        if guard is not None and guard.waiting:
            return min(self.tuning.poll_interval, GAP_POLL)  # a rollback sends no NOTIFY
        return self.tuning.poll_interval

    def _step_with_retries(self) -> int:
        """One step; transient failures are retried with backoff (recovering first)."""
        delay = 0.2
        while not self._stop.is_set():
            try:
                count = self._step()
                self._tenure.kafka_reached()
                return count
            except TransientPublishError as e:
                self.metrics.error("kafka")
                self._tenure.kafka_failed()
                log.warning(
                    "relay %s: Kafka failed (%s); reconnecting in %.1f s", self.app, e, delay
                )
                self._sleep(delay)
                delay = min(delay * 2, self.tuning.max_retry_delay)
                if not self._tenure.held() or self._yield_lease():
                    return 0  # the run loop stands by; the new holder publishes
                self._recover_publisher()
            except TRANSIENT_ERRORS as e:
                self.metrics.error("postgres")
                log.warning(
                    "relay %s: reading the notification log failed (%s: %s); retrying in %.1f s",
                    self.app,
                    type(e).__name__,
                    e,
                    delay,
                )
                self._sleep(delay)
                delay = min(delay * 2, self.tuning.max_retry_delay)
                if not self._tenure.held():
                    return 0  # Postgres restarted: the run loop takes the lease again first
        return 0

    def _recover_publisher(self) -> None:
        """Make a new producer and re-read the committed position, until it works."""
        if self._publisher is None:
            return
        delay = 0.5
        while not self._stop.is_set():
            if not self._tenure.held() or self._yield_lease():
                return  # never fence the relay that holds the lease now
            try:
                self._start_publisher(first=False)
                self._tenure.kafka_reached()
                log.info("relay %s: reconnected at notification %d", self.app, self._position)
                return
            except TransientPublishError as e:
                self.metrics.error("kafka")
                self._tenure.kafka_failed()
                log.warning(
                    "relay %s: still cannot reach Kafka (%s); retry in %.1f s", self.app, e, delay
                )
            except KafkaException as e:
                self._tenure.kafka_failed()
                log.warning("relay %s: %s; retry in %.1f s", self.app, e, delay)
            self._sleep(delay)
            delay = min(delay * 2, self.tuning.max_retry_delay)

    def _step(self) -> int:
        if self.mode == PROMPTS:
            return self._prompt_step()
        return self._payload_step()

    def _payload_step(self) -> int:
        """Publish what is in the log after the position, in transactions; the count."""
        publisher, recorder = self._publisher, self._recorder
        assert publisher is not None and recorder is not None
        tuning = self.tuning
        total = 0
        started = time.monotonic()
        pages = self._pages(recorder, publisher.working_nid)
        try:
            for last_nid in pages:
                self._upstream_max = max(self._upstream_max, last_nid)
                if (
                    publisher.batch_count >= tuning.batch_size
                    or time.monotonic() - started >= tuning.batch_seconds
                ):
                    total += self._commit(publisher)
                    started = time.monotonic()
                if self._stop.is_set():
                    break
        except TRANSIENT_ERRORS:
            # Keep what was read: commit it (consistent: position = last added) first.
            self._commit(publisher)
            raise
        except RelayError:
            publisher.close()
            raise
        finally:
            # Closing fetches a page read ahead; a failure there (Postgres gone)
            # must not hide the error that ended the loop, nor a clean stop.
            with contextlib.suppress(Exception):
                pages.close()
        total += self._commit(publisher)
        if total == 0:
            self._refresh_upstream_max(recorder)
        return total

    def _pages(self, recorder: ApplicationRecorder, after: int) -> Generator[int, None, None]:
        """Add the log after ``after`` to the publisher, page by page; yields each page's last id.

        Without an encoder hook, pages are rows produced by the encoder's fast
        loop (:meth:`~esbridge.wire.encoding.PayloadEncoder.produce_rows`);
        with a hook, notifications are read and encoded one by one. Either way
        the pages end before a gap that may still fill (:mod:`esbridge.relay.gaps`).
        """
        publisher = self._publisher
        assert publisher is not None
        page_size = self.tuning.page_size
        guard = self._gap_guard
        if self.encoder_hook is not None:
            for notifications in guarded_pages(
                lambda start: read_pages(recorder, start, page_size=page_size),
                after,
                guard,
                _notification_id,
            ):
                publisher.add(notifications)
                yield notifications[-1].id
            return
        pages = guarded_pages(
            lambda start: read_pages_for_publishing(recorder, start, page_size=page_size),
            after,
            guard,
            _row_id,
        )
        try:
            for rows in pages:
                publisher.add_rows(rows)
                yield rows[-1][0]
        finally:
            pages.close()  # now, not when garbage-collected: it holds a pooled connection

    def _commit(self, publisher: KafkaPublisher) -> int:
        count = publisher.commit()
        if count:
            self._published += count
            self._position = publisher.committed.nid
            self.metrics.published.inc(count)
            self.metrics.batches.inc()
            self.metrics.batch_size.observe(count)
            self.metrics.position.set(self._position)
            self._update_lag()
            log.debug("relay %s: committed %d up to %d", self.app, count, self._position)
        return count

    def _refresh_upstream_max(self, recorder: ApplicationRecorder) -> None:
        self._upstream_max = max(self._upstream_max, recorder.max_notification_id() or 0)
        self._update_lag()

    def _update_lag(self) -> None:
        upstream = max(self._upstream_max, self._position)
        self.metrics.upstream_max.set(upstream)
        self.metrics.lag.set(upstream - self._position)

    def _prompt_step(self) -> int:
        """Send a prompt when the log grew (coalesced) or the repeat period passed."""
        recorder, producer = self._recorder, self._prompter
        assert recorder is not None and producer is not None
        max_nid = recorder.max_notification_id() or 0
        self._upstream_max = max_nid
        last_nid, last_time = self._last_prompt
        now = time.monotonic()
        grew = max_nid > last_nid
        if not grew and now - last_time < self.tuning.prompt_repeat:
            self._update_lag()
            return 0
        wait = self.tuning.prompt_interval - (now - last_time)
        if grew and wait > 0:
            self._sleep(wait)  # coalesce a burst into one prompt
            max_nid = recorder.max_notification_id() or 0
        key, value, headers = wire.Prompt(self.app, max_nid).encode()
        try:
            producer.produce(
                self.topic,
                value,
                key,
                self._prompt_partition,
                headers=headers,  # type: ignore[arg-type]
            )
            producer.poll(0)
        except (BufferError, KafkaException) as e:
            raise TransientPublishError(f"producing a prompt: {e}") from e
        self._last_prompt = (max_nid, time.monotonic())
        self._position = max_nid
        self._published += 1
        self.metrics.prompts.inc()
        self.metrics.position.set(max_nid)
        self._update_lag()
        return 1 if grew else 0

    # -- helpers ----------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (less if stopped), keeping the lease's session busy meanwhile."""
        self._wait_for_events(None, seconds)

    def _wait_for_events(self, waker: LogWaker | None, seconds: float) -> None:
        """Wait ``seconds``, until ``waker`` wakes (new events) or the relay is stopped.

        In steps of at most ``lease_check`` with a lease check between them: a
        waiting relay is not a hung one, and its lease must not expire.
        """
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._tenure.keep_alive()  # a round trip at most every lease_check seconds
            if self._publisher is not None:
                self._publisher.serve()
            step = min(left, self.tuning.lease_check)
            if waker is None:
                self._stop.wait(step)
            elif waker.wait(step):
                return

    def _yield_lease(self) -> bool:
        """Give the lease up after failing to reach Kafka for ``lease_yield`` s; True if it did.

        A standby that can reach Kafka then publishes; this relay stands by
        (the run loop's next lease check).
        """
        if not self._tenure.should_yield():
            return False
        if self._publisher is not None:
            self._publisher.close()
        self._tenure.give_up()
        self._sleep(1.0)  # a standby waiting for the lock gets it first
        return True

    def _after_fencing(self, error: RelayFencedError) -> None:
        """Fenced by a newer producer with this relay id: stand by, or restart the producer.

        Raises when that is no answer (see :meth:`~esbridge.relay.standby.Tenure.fenced`).
        """
        if self._tenure.fenced(error):
            self._recover_publisher()

    def _retry(self, what: str, action: Callable[[], Any], timeout: float | None) -> Any:
        """Run ``action``, retrying transient failures with backoff until ``timeout``."""
        start = time.monotonic()
        delay = 0.5
        while True:
            try:
                return action()
            except (TransientPublishError, KafkaException, *TRANSIENT_ERRORS) as e:
                if self._stop.is_set() or (
                    timeout is not None and time.monotonic() - start >= timeout
                ):
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
                self._sleep(delay)
                delay = min(delay * 2, self.tuning.max_retry_delay)
