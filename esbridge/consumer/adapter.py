"""The consumer adapter: a Kafka topic -> an eventsourcing process application, exactly once.

A :class:`ConsumerAdapter` feeds the messages a relay published into a
downstream ``ProcessApplication`` (its ``policy()`` unchanged) and records the
new events together with the tracking position reached in ONE Postgres
transaction per batch (:mod:`esbridge.processing.application_sink`). Whatever crashes, each
upstream event has its effect exactly once:

* the **position** of each tracking name lives in the follower's tracking
  table and moves in the same transaction as the effects, with a
  compare-and-set, so a consumer that lost its partition in a rebalance (a
  zombie) cannot record a batch twice;
* Kafka's committed offsets are only a **hint** where to resume reading:
  anything at or below the Postgres position is skipped as a duplicate, and a
  message whose ``esb_prev_nid`` is past the position reveals a **gap**
  (:mod:`esbridge.consumer.reconcile`), filled from the upstream notification log when
  the consumer may read it, else held (and, after ``hold_timeout`` seconds,
  a :class:`~esbridge.errors.GapNotReconciledError`);
* **poison** messages (undecodable, unknown event type, a policy that keeps
  raising) are retried, then parked in the dead-letter table in the same
  transaction that moves the position past them; later messages of the same
  key are parked behind them (``held_behind``) so per-aggregate order holds
  (:mod:`esbridge.consumer.batch_commit`). A ``dead_letter_policy``
  (:class:`~esbridge.deadletters.policy.DeadLetterPolicy`) sets the attempts,
  the backoff, and whether to park, skip (recorded) or stop instead.

Tracking names: a single-partition topic (and prompt mode) records under the
upstream application's name, exactly like the library's runners, so a system
can move between the library's runners and esbridge without reprocessing. A
topic with ``N > 1`` partitions records one position per partition, named
``"{upstream}#{p}/{N}"`` (:func:`tracking_names`): an aggregate's events all
go to one partition, and each partition is an ordered sub-log of the upstream
log.

Prompt mode: the topic carries tiny prompts; on a prompt (or every
``prompt_interval`` seconds) the owner of the prompt partition pulls from the
upstream log from its tracking position in large pages and processes them in
batches: the library's ``pull_and_process`` without one transaction per event.

The adapter only wires the parts together and runs the loop: the mode is a
strategy chosen once (:mod:`esbridge.consumer.payloads`,
:mod:`esbridge.consumer.prompts`); the package docstring lists the other parts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message
from eventsourcing.system import Follower
from prometheus_client import CollectorRegistry

from esbridge.consumer import offsets
from esbridge.consumer.batch_commit import Abandoned, BatchCommitter, ConsumerCounts
from esbridge.consumer.client import TopicClient
from esbridge.consumer.metrics import ConsumerMetrics
from esbridge.consumer.modes import Mode, ModeContext
from esbridge.consumer.payloads import PayloadMode
from esbridge.consumer.prompts import PromptMode
from esbridge.consumer.rebalance import Rebalance
from esbridge.consumer.reconcile import PartitionOrder
from esbridge.consumer.stable_offsets import LsoGapProbe
from esbridge.consumer.state import Assignment, ConsumerStatus, HeldMessage, HeldPartition, Tuning
from esbridge.consumer.upstream import UpstreamLog
from esbridge.consumer.waiting import PostgresWait
from esbridge.errors import ConfigurationError
from esbridge.eventlog.notification_log import NotificationReader
from esbridge.eventlog.remote import RemoteNotificationLog
from esbridge.kafka.partitioning import key_partitioner
from esbridge.names import MODES, PAYLOADS, PROMPTS
from esbridge.processing.application_sink import PrefetchFunc, ProcessApplicationSink
from esbridge.processing.sink import BatchSink
from esbridge.processing.steps import Step, StepFactory
from esbridge.runtime import gc_pause
from esbridge.runtime.catch_up import CatchUpLog
from esbridge.runtime.persistence import require_postgres, require_postgres_app

__all__ = ["ConsumerAdapter", "ConsumerStatus", "HeldPartition"]

log = logging.getLogger("esbridge.consumer")

#: The mode strategies, by mode name.
_MODES: dict[str, type[Mode]] = {PAYLOADS: PayloadMode, PROMPTS: PromptMode}


class ConsumerAdapter:
    """Consumes a relay's topic into ``follower`` exactly once (see the module docstring).

    ``upstream_env``: read-only ``POSTGRES_*`` settings of the upstream
    application (prefixed ``{UPSTREAM}_POSTGRES_*`` settings win, as in the
    library); needed for prompt mode and to fill gaps. Without it a gap holds
    its partition and fails after ``hold_timeout`` seconds.

    The tuning keywords (``batch_size``, ``hold_timeout``, ``retries``...) are
    documented on :class:`~esbridge.consumer.state.Tuning`. Also:
    ``upstream_class`` (its ``env`` supplies cipher/compressor defaults),
    ``upstream_recorder`` (an open recorder of the upstream log, used instead of
    opening one with ``upstream_env``; never closed by the adapter),
    ``upstream_url``, ``upstream_token`` and ``upstream_cafile`` (the upstream log
    read over HTTP from ``esbridge serve-log``, instead of its database; the CA
    that signed its certificate: docs/remote-log.md),
    ``partitions`` (expected count), ``registry`` (Prometheus), ``sink``
    (another :class:`~esbridge.processing.sink.BatchSink`), ``prefetch`` (a function
    from an upstream event to the ids of the aggregates its policy gets: each
    batch then reads them in one query; see
    :data:`~esbridge.processing.application_sink.PrefetchFunc`).

    A sink that is not a process application (a SQL projection: see
    ``esbridge_connectors.sql_projection_kafka``) passes ``follower=None``
    with its ``sink`` and the ``steps`` that decode the upstream events for it
    (:class:`~esbridge.processing.steps.StepFactory`): the same loop, the same
    ordering, gap filling, parking and offsets-as-hints.
    """

    def __init__(
        self,
        follower: Follower[Any] | None,
        *,
        upstream: str,
        topic: str,
        kafka_config: Mapping[str, Any],
        group_id: str,
        mode: str = PAYLOADS,
        upstream_env: Mapping[str, str] | None = None,
        upstream_class: type | None = None,
        partitions: int | None = None,
        registry: CollectorRegistry | None = None,
        sink: BatchSink | None = None,
        prefetch: PrefetchFunc | None = None,
        steps: StepFactory | None = None,
        upstream_recorder: NotificationReader | None = None,
        upstream_url: str | None = None,
        upstream_token: str | None = None,
        upstream_cafile: str | None = None,
        **tuning: Any,
    ) -> None:
        _check_arguments(mode, follower, sink, steps, prefetch)
        self._remote_log: RemoteNotificationLog | None = None
        if upstream_url is not None:
            if upstream_recorder is not None or upstream_env is not None:
                raise ConfigurationError(
                    "give the upstream log one way only: upstream_url (its log service), "
                    "upstream_env (its database) or upstream_recorder"
                )
            self._remote_log = RemoteNotificationLog(
                upstream_url, upstream, upstream_token, cafile=upstream_cafile
            )
            upstream_recorder = self._remote_log
        # Now, not in run(): with in-memory storage nothing would ever be consumed.
        if follower is not None and sink is None:
            require_postgres_app(follower)
        if upstream_env is not None and upstream_recorder is None:
            require_postgres(upstream, upstream_env)
        self.follower = follower
        self.upstream = upstream
        self.topic = topic
        self.group_id = group_id
        self.mode = mode
        self.kafka_config = dict(kafka_config)
        self.upstream_env = dict(upstream_env) if upstream_env is not None else None
        if upstream_recorder is not None and self.upstream_env is None:
            self.upstream_env = {}  # the log is readable: through the caller's recorder
        self.expected_partitions = partitions
        self.tuning = Tuning.checked(tuning, upstream_log=self.upstream_env is not None)
        if mode == PROMPTS and self.upstream_env is None:
            raise ConfigurationError(
                "prompt mode pulls events from the upstream notification log: pass "
                "upstream_env (read-only POSTGRES_* settings of the upstream application) "
                "or upstream_url (the address of its esbridge serve-log)"
            )
        self.steps: StepFactory = steps or StepFactory.for_follower(
            _given(follower), upstream, upstream_class
        )
        self.name = self.steps.follower_name
        self.metrics = ConsumerMetrics(self.name, upstream, topic, registry)
        self._lso_gap = LsoGapProbe(
            self.kafka_config, lambda: self.tuning.lso_interval, self.metrics.lso_gap
        )
        self._sink_arg = sink
        self._prefetch = prefetch
        self.sink: BatchSink | None = None
        self._assignment = Assignment(topic)
        self._consumer: Consumer | None = None
        self._counts = ConsumerCounts()
        self._stop = threading.Event()
        self._postgres = PostgresWait(f"consumer {self.name} <- {upstream}", self._stop)
        self._running = False
        self._error: str | None = None
        self._last_lag: tuple[int, float] = (0, 0.0)
        self._catch_up = CatchUpLog(log, f"consumer {self.name} <- {upstream}", "messages", done=0)
        self._upstream_log = (
            UpstreamLog(
                upstream, self.upstream_env, self.tuning, self._postgres.retry, upstream_recorder
            )
            if self.upstream_env is not None
            else None
        )
        self._client = TopicClient(
            self.kafka_config, group_id, topic, upstream, self.tuning, self._stop
        )
        self._committer = BatchCommitter(
            sink=self._sink,
            steps=self.steps,
            follower=self.name,
            upstream=upstream,
            tuning=self.tuning,
            positions=self._assignment.positions,
            counts=self._counts,
            metrics=self.metrics,
            retry_db=self._postgres.retry,
            stop=self._stop,
        )
        self._mode: Mode = _MODES[mode](
            ModeContext(
                upstream=upstream,
                tuning=self.tuning,
                metrics=self.metrics,
                steps=self.steps,
                counts=self._counts,
                assignment=self._assignment,
                client=self._client,
                upstream_log=self._upstream_log,
                stop=self._stop,
                commit=self._commit,
                position=self._position,
                update_gauges=self._update_gauges,
            )
        )
        self._rebalance = Rebalance(self._assignment, self._mode, self._position, self._order)

    @property
    def partitions(self) -> int:
        """The topic's partition count (0 until started)."""
        return self._assignment.partitions

    @property
    def names(self) -> list[str]:
        """The tracking names this consumer records under (empty until started)."""
        return self._assignment.names

    # -- lifecycle -------------------------------------------------------------------

    def run(self) -> None:
        """Consume until :meth:`stop`; raises on a permanent failure (after closing)."""
        self._running = True
        try:
            self._start()
            while not self._stop.is_set():
                self._poll_once(self.tuning.poll_timeout)
        except Abandoned:
            pass
        except BaseException as e:
            self._error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._running = False
            self.close()
            if self._error is None:
                counts = self._counts
                log.info(
                    "consumer %s <- %s stopped: %d events processed, %d duplicates skipped, "
                    "%d messages parked by this process",
                    self.name,
                    self.upstream,
                    counts.processed,
                    counts.duplicates,
                    counts.parked,
                )

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch (thread-safe, idempotent)."""
        self._stop.set()

    def close(self) -> None:
        """Leave the consumer group and release connections (idempotent)."""
        self._committer.parking.flush()  # parked counts not said yet
        self._lso_gap.close()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                offsets.commit_offsets(consumer, self._assignment, asynchronous=False)
            except KafkaException as e:  # only a hint: losing it costs duplicates, skipped
                log.debug("offset commit on close failed: %s", e)
            consumer.close()
        self._assignment.parts.clear()
        self._mode.close()
        if self._upstream_log is not None:
            self._upstream_log.close()  # now: closed at exit, its pool would hang the process
        if self._remote_log is not None:
            self._remote_log.close()

    def process_available(self, timeout: float = 10.0) -> int:
        """Consume until caught up with the topic (or the upstream log); returns events processed.

        For tests and one-shot use. Waits for the group to assign partitions
        first. Returns when every assigned partition has been read to its end
        and nothing is held, or when ``timeout`` seconds have passed.
        """
        self._start()
        before = self._counts.processed
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self._poll_once(min(self.tuning.poll_timeout, 0.2))
            if got == 0 and self._caught_up():
                break
        return self._counts.processed - before

    @property
    def upstream_log(self) -> UpstreamLog | None:
        """The upstream notification log, when the consumer may read it (else None)."""
        return self._upstream_log

    def held_partitions(self) -> list[HeldPartition]:
        """The partitions held behind a gap, from the consumer's in-memory bookkeeping only.

        Unlike :meth:`status`, which reports lag as of the consumer's last round,
        this asks nothing of librdkafka or Postgres: safe from any thread, even
        while the consumer's own thread polls.
        """
        return self._assignment.held()

    # -- start -----------------------------------------------------------------------

    def _start(self) -> None:
        if self._consumer is not None:
            return
        # Started while Postgres is down (restarting): wait for it, up to connect_timeout.
        wait = partial(self._postgres.wait, timeout=self.tuning.connect_timeout)
        if self.sink is None:
            self.sink = self._sink_arg or wait(
                f"creating the dead-letter table of {self.name}",
                lambda: ProcessApplicationSink(_given(self.follower), prefetch=self._prefetch),
            )
        if self._upstream_log is not None:
            self._upstream_log.open(wait)
        consumer, count = self._client.open(self.expected_partitions)
        assignment = self._assignment
        assignment.partitions = count
        assignment.names = self._mode.tracking_names(count)
        assignment.partition_of = key_partitioner(max(1, count))
        self._rebalance.subscribe(consumer)
        self._consumer = consumer
        log.info(
            "consumer %s <- %s: topic %s (%d partitions), group %s, mode %s, upstream log %s",
            self.name,
            self.upstream,
            self.topic,
            count,
            self.group_id,
            self.mode,
            "readable" if self._upstream_log is not None else "not configured",
        )

    # -- the loop ----------------------------------------------------------------------

    def _position(self, name: str) -> int:
        sink = self._sink()
        position: int = self._postgres.retry(lambda: sink.position(name))
        return position

    def _order(self, position: int) -> PartitionOrder[HeldMessage]:
        # With the upstream log, suspect messages wait to be checked against it.
        return PartitionOrder(position, verify=self._upstream_log is not None)

    def _sink(self) -> BatchSink:
        assert self.sink is not None
        return self.sink

    def _poll_once(self, timeout: float) -> int:
        """One round: consume a batch of messages, process what is ready. Returns messages seen."""
        consumer = self._consumer
        assert consumer is not None
        # consume(n, timeout) waits the whole timeout unless n messages arrive, which
        # would add the timeout to every hop's latency: wait for the first message
        # only, then take what librdkafka has already fetched.
        first = consumer.poll(timeout)
        if first is None:
            return self._round(consumer, [])
        with gc_pause.gc_paused(self.tuning.pause_gc):
            messages = [first]
            del first
            if self.tuning.batch_size > 1:
                messages.extend(consumer.consume(self.tuning.batch_size - 1, 0))
            seen = self._round(consumer, messages)
            messages.clear()  # freed before the collector runs again: it has nothing to scan
        return seen

    def _round(self, consumer: Consumer, messages: list[Message]) -> int:
        """Process what ``messages`` made ready (:attr:`_mode`); returns messages seen."""
        self._rebalance.init_assigned()
        seen = self._mode.round(consumer, messages)
        self._lso_gap.tick(self._assignment.topic, self._assignment.parts)
        self._committer.parking.tick()  # parked counts not yet said, once the interval passed
        return seen

    # -- committing batches ----------------------------------------------------------

    def _commit(self, steps: Sequence[Step]) -> bool:
        """Record ``steps`` (:mod:`esbridge.consumer.batch_commit`); on a collision with another
        consumer's writes, restart every partition from its Postgres position: False."""
        if self._committer.commit(steps):
            return True
        self._resync()
        return False

    def _resync(self) -> None:
        """Positions moved under us (another consumer): restart every partition from Postgres."""
        consumer = self._consumer
        for part in self._assignment.parts.values():
            position = self._position(part.tracking_name)
            self._assignment.positions[part.tracking_name] = position
            part.order = self._order(position)
            if consumer is not None:
                self._mode.resynced(consumer, part)

    # -- status ------------------------------------------------------------------------

    def _caught_up(self) -> bool:
        if not self._assignment.parts or self._rebalance.pending:
            return False
        consumer = self._consumer
        assert consumer is not None
        return self._mode.caught_up(consumer)

    def _update_gauges(self) -> None:
        held = self._assignment.held()
        self.metrics.held.set(len(held))
        self.metrics.held_age.set(max((h.age_seconds for h in held), default=0.0))
        self.metrics.dlq.set(self._counts.dead_letters)
        self._committer.parked_gauges()
        consumer = self._consumer
        events, seconds = (0, 0.0) if consumer is None else self._mode.lag(consumer)
        self._last_lag = (events, seconds)
        self.metrics.lag_events.set(events)
        self.metrics.lag_seconds.set(seconds)
        counts = self._counts
        self._catch_up.update(counts.processed + counts.duplicates + counts.parked, events)

    def status(self) -> ConsumerStatus:
        """A snapshot of counters, positions, held partitions and lag (thread-safe).

        Lag is as of the consumer's last round (Kafka is only asked from its thread).
        """
        events, seconds = self._last_lag
        counts = self._counts
        return ConsumerStatus(
            follower=self.name,
            upstream=self.upstream,
            topic=self.topic,
            mode=self.mode,
            group_id=self.group_id,
            running=self._running,
            assigned=sorted(self._assignment.parts),
            positions=dict(self._assignment.positions),
            processed=counts.processed,
            duplicates=counts.duplicates,
            gaps_reconciled=counts.gaps,
            reconciled_events=counts.reconciled,
            batches=counts.batches,
            dead_letters=counts.dead_letters,
            parked=counts.parked,
            held_partitions=self._assignment.held(),
            lag_events=events,
            lag_seconds=seconds,
            error=self._error,
            skipped=counts.skipped,
        )


def _check_arguments(
    mode: str,
    follower: Follower[Any] | None,
    sink: BatchSink | None,
    steps: StepFactory | None,
    prefetch: PrefetchFunc | None,
) -> None:
    """Refuse argument combinations that cannot work, before anything is opened."""
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {MODES}, not {mode!r}")
    if follower is None and (sink is None or steps is None):
        raise ConfigurationError(
            "a consumer without a follower application needs both its sink and its steps "
            "(a StepFactory that decodes the upstream events for that sink)"
        )
    if sink is not None and prefetch is not None:
        raise ConfigurationError(
            "prefetch is a hint for the default sink: give it to your sink instead"
        )


def _given(follower: Follower[Any] | None) -> Follower[Any]:
    assert follower is not None  # checked in ConsumerAdapter.__init__
    return follower
