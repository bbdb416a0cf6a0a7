"""Applying batches of upstream events to a downstream process application, atomically.

The library's ``Follower.process_event()`` records one upstream event per
transaction (one fsync per event). Here a whole batch of upstream events is
processed by the follower's unchanged ``policy()`` and recorded in ONE
transaction together with the tracking positions reached, so the effect of
each upstream event is recorded exactly once, whatever crashes.

Two things keep batching invisible to policies:

* a batch-scoped repository overlay
  (:class:`~esbridge.processing.batch_repository.BatchRepository`): while a batch
  is processed, ``self.repository.get(id)`` returns aggregates as changed by
  earlier events of the same batch, exactly the state a policy would see one
  event at a time;
* a policy that raises is reported with its position in the batch
  (:class:`StepFailed`), so the caller records the events before it, retries
  or parks the failing one, and carries on.

The write path reuses the library's recorder (``Application._record`` →
``EventStore.put`` → ``PostgresProcessRecorder.insert_events``: table lock,
NOTIFY, one transaction). esbridge extends the recorder's ``_insert_events``
hook so the same transaction also writes (a) the tracking records of several
names with a compare-and-set on the expected previous position, which keeps a
zombie consumer (one that lost its partition in a rebalance but still runs)
from recording a batch twice, (b) dead letters and (c) replay marks.

:class:`BatchSink` is the small interface the consumer loop talks to;
:class:`ProcessApplicationSink` is the default. Another sink (e.g. a SQL
projection) implements ``position()`` and ``apply()`` the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.application import ProcessingEvent
from eventsourcing.domain import CollectEventsProtocol, DomainEventProtocol
from eventsourcing.persistence import (
    Mapper,
    Notification,
    StoredEvent,
    Tracking,
)
from eventsourcing.system import Follower
from eventsourcing.utils import TopicError
from psycopg.sql import SQL, Identifier

from esbridge.deadletters.store import (
    REASON_UNDECODABLE,
    REASON_UNKNOWN_TYPE,
    DeadLetter,
    DeadLetterStore,
)
from esbridge.errors import ConfigurationError, EsbridgeError
from esbridge.processing.batch_repository import BatchRepository
from esbridge.processing.pg_binary import use_binary_stored_events
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS

log = logging.getLogger("esbridge.processing")

WRITE_KWARG = "esbridge_write"
"""The keyword that carries esbridge's extra writes through ``EventStore.put``."""

PrefetchFunc = Callable[[DomainEventProtocol[Any]], Iterable[Any]]
"""A hint: the ids of the aggregates the follower's policy will get for an upstream event.

Given to :class:`ProcessApplicationSink` (``ConsumerAdapter(prefetch=...)``), it
lets a batch read all those aggregates in one query instead of one per
aggregate. Ids it misses are read as usual; extra ids only cost a little.
"""


@dataclass
class Step:
    """One upstream notification's place in a batch.

    ``tracking`` is the position reached after this step (``None`` for replays
    of parked messages and for malformed messages that have no position).
    ``event`` is ``None`` when the step only advances the position (an event
    the follower does not follow, a gap passed over) or parks a message.
    """

    tracking: Tracking | None
    key: str
    event: DomainEventProtocol[Any] | None = None
    dead_letter: DeadLetter | None = None
    replay_of: int | None = None
    source: Any = None  # the Kafka message or notification, for the caller's bookkeeping


class StepFailed(EsbridgeError):
    """The policy raised while processing step ``index`` of a batch; nothing was recorded."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(f"policy failed on step {index}: {type(cause).__name__}: {cause}")
        self.index = index
        self.cause = cause


class BatchSink(Protocol):
    """Where a consumer applies batches: positions per tracking name, atomic batches.

    ``apply`` must record the effects of all ``steps``, their dead letters and
    the last tracking position of each name in ONE transaction, and refuse
    (raise, recording nothing) when a name's stored position is not
    ``expected[name]`` (another consumer got there first). It raises
    :class:`StepFailed` when processing one step fails for a reason of its own.
    """

    def position(self, tracking_name: str) -> int:
        """The stored position of ``tracking_name`` (0 when none)."""
        ...

    def apply(self, steps: Sequence[Step], expected: Mapping[str, int]) -> None:
        """Process and record ``steps`` atomically (see the class docstring)."""
        ...


@dataclass
class EsbridgeWrite:
    """The extra writes that ride in the recorder's transaction."""

    trackings: list[tuple[Tracking, int]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    replayed: list[int] = field(default_factory=list)
    store: DeadLetterStore | None = None

    def execute(self, recorder: Any, curs: Any) -> None:
        from eventsourcing.persistence import IntegrityError

        table = SQL("{0}.{1}").format(
            Identifier(recorder.datastore.schema or "public"),
            Identifier(recorder.tracking_table_name),
        )
        statement = SQL(
            "INSERT INTO {0} AS t (application_name, notification_id) VALUES (%s, %s) "
            "ON CONFLICT (application_name) "
            "DO UPDATE SET notification_id = EXCLUDED.notification_id "
            "WHERE t.notification_id = %s RETURNING notification_id"
        ).format(table)
        for tracking, expected in self.trackings:
            curs.execute(
                statement,
                (tracking.application_name, tracking.notification_id, expected),
                prepare=True,
            )
            if curs.fetchone() is None:
                raise IntegrityError(
                    f"tracking position of {tracking.application_name!r} is no longer "
                    f"{expected}: another consumer recorded it first"
                )
        if self.store is not None:
            if self.dead_letters:
                self.store.insert(curs, self.dead_letters)
            if self.replayed:
                self.store.mark_replayed(curs, self.replayed)


class _RecorderHook:
    """Mixed into the follower's ``PostgresProcessRecorder`` class (see module docstring)."""

    def _insert_events(self, curs: Any, stored_events: Any, **kwargs: Any) -> None:
        write = kwargs.get(WRITE_KWARG)
        if write is not None:
            write.execute(self, curs)
        super()._insert_events(curs, stored_events, **kwargs)  # type: ignore[misc]

    def _insert_stored_events(self, curs: Any, stored_events: Any, **kwargs: Any) -> None:
        # The library's statement and values; the array parameter travels in binary.
        use_binary_stored_events(self, curs, stored_events)
        super()._insert_stored_events(curs, stored_events, **kwargs)  # type: ignore[misc]


_hooked_classes: dict[type, type] = {}


def install_recorder_hook(follower: Follower[Any]) -> None:
    """Let the follower's recorder write esbridge's extras in its transactions.

    Refuses configurations where tracking records could be lost or are not
    single-row (compare-and-set needs one row per name).
    """
    from eventsourcing.postgres import PostgresProcessRecorder

    recorder = follower.recorder
    if isinstance(recorder, _RecorderHook):
        return
    if not isinstance(recorder, PostgresProcessRecorder):
        raise ConfigurationError(
            f"follower {follower.name!r} does not use eventsourcing's Postgres process "
            f"recorder ({type(recorder).__name__}): set PERSISTENCE_MODULE=eventsourcing.postgres "
            "and the POSTGRES_* settings for it"
        )
    datastore = recorder.datastore
    if datastore.enable_db_functions:
        raise ConfigurationError(
            f"follower {follower.name!r} has POSTGRES_ENABLE_DB_FUNCTIONS=y, with which "
            "eventsourcing 9.5.6 silently drops tracking records: unset it (or set it to 'n') "
            "for applications that esbridge feeds"
        )
    if not datastore.single_row_tracking:
        raise ConfigurationError(
            f"follower {follower.name!r} uses legacy multi-row tracking "
            "(SINGLE_ROW_TRACKING=n): esbridge needs the default single-row tracking table"
        )
    cls = type(recorder)
    hooked = _hooked_classes.get(cls)
    if hooked is None:
        hooked = type(f"Esbridge{cls.__name__}", (_RecorderHook, cls), {})
        _hooked_classes[cls] = hooked
    recorder.__class__ = hooked


class UpstreamDecoder:
    """Turns upstream stored-event bytes into domain events, as ``Follower.follow()`` does.

    The mapper is built from the follower's environment read under the
    upstream application's name (so ``{UPSTREAM}_CIPHER_KEY`` etc. apply),
    with the follower's transcoder and mapper class. ``upstream_class``
    contributes its class-level ``env`` defaults (cipher/compressor topics).
    """

    def __init__(
        self,
        follower: Follower[Any],
        upstream_name: str,
        upstream_class: type | None = None,
    ) -> None:
        base_env = dict(getattr(upstream_class, "env", {}) or {})
        base_env.update(follower.env)
        env = follower.construct_env(upstream_name, base_env)
        factory = follower.construct_factory(env)
        self.mapper: Mapper[Any] = factory.mapper(
            follower.construct_transcoder(), mapper_class=type(follower.mapper)
        )
        self.upstream_name = upstream_name

    def decode(self, stored: StoredEvent) -> DomainEventProtocol[Any]:
        return self.mapper.to_domain_event(stored)


@dataclass
class Source:
    """Where a message came from, for dead letters and offset bookkeeping."""

    key: str
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = field(default_factory=list)
    kafka_topic: str | None = None
    kafka_partition: int | None = None
    kafka_offset: int | None = None
    event_topic: str | None = None
    originator_version: int | None = None
    nid: int | None = None


class StepFactory:
    """Builds batch steps for one follower of one upstream application."""

    def __init__(self, follower: Follower[Any], decoder: UpstreamDecoder) -> None:
        self.follower = follower
        self.decoder = decoder
        self.follower_name = follower.name
        self.upstream = decoder.upstream_name
        self.topics = set(follower.topics or ())

    def dead_letter(
        self, source: Source, tracking_name: str | None, reason: str, error: str
    ) -> DeadLetter:
        return DeadLetter(
            follower=self.follower_name,
            upstream=self.upstream,
            key=source.key,
            reason=reason,
            error=error,
            value=source.value,
            headers=[(k, v or b"") for k, v in source.headers],
            tracking_name=tracking_name,
            nid=source.nid,
            kafka_topic=source.kafka_topic,
            kafka_partition=source.kafka_partition,
            kafka_offset=source.kafka_offset,
            event_topic=source.event_topic,
            originator_version=source.originator_version,
        )

    def step(self, source: Source, tracking: Tracking | None) -> Step:
        """Decode ``source``; undecodable input becomes a parking step (never an exception)."""
        assert source.event_topic is not None and source.originator_version is not None
        name = tracking.application_name if tracking else None
        if self.topics and source.event_topic not in self.topics:
            return Step(tracking=tracking, key=source.key, source=source)
        stored = StoredEvent(
            originator_id=_originator_id(source.key),
            originator_version=source.originator_version,
            topic=source.event_topic,
            state=source.value or b"",
        )
        try:
            event = self.decoder.decode(stored)
        except TopicError as e:
            letter = self.dead_letter(
                source,
                name,
                REASON_UNKNOWN_TYPE,
                f"event type {source.event_topic!r} cannot be imported here ({e}); deploy "
                "the upstream event classes to the consumer, then run 'esbridge dlq replay'",
            )
            return Step(tracking=tracking, key=source.key, dead_letter=letter, source=source)
        except Exception as e:
            letter = self.dead_letter(source, name, REASON_UNDECODABLE, f"{type(e).__name__}: {e}")
            return Step(tracking=tracking, key=source.key, dead_letter=letter, source=source)
        return Step(tracking=tracking, key=source.key, event=event, source=source)

    def step_from_notification(self, notification: Notification, tracking_name: str) -> Step:
        source = Source(
            key=str(notification.originator_id),
            value=notification.state,
            event_topic=notification.topic,
            originator_version=notification.originator_version,
            nid=notification.id,
        )
        return self.step(source, Tracking(tracking_name, notification.id))


_last_id: tuple[str, Any] = ("", "")  # consecutive messages often share a key (one save)


def _originator_id(key: str) -> Any:
    """The upstream originator id from a message key (the mapper converts it as the event needs)."""
    global _last_id
    last = _last_id
    if last[0] == key:
        return last[1]  # UUIDs are immutable: sharing one is safe
    try:
        value: Any = UUID(key)
    except ValueError:
        value = key
    _last_id = (key, value)
    return value


class _BatchProcessingEvent(ProcessingEvent[Any]):
    """``ProcessingEvent`` whose ``collect_events`` decides what an object is once per type.

    The library's version checks every collected object against two
    ``runtime_checkable`` protocols (slow attribute scans, a tenth of a
    batch's time); the answer depends on the object's class, so it is cached.
    """

    _kinds: dict[type, int] = {}  # 0: domain event, 1: aggregate with events, 2: other

    def collect_events(self, *objs: Any, **kwargs: Any) -> None:
        kinds = self._kinds
        for obj in objs:
            if obj is None:
                continue
            kind = kinds.get(type(obj))
            if kind is None:
                if isinstance(obj, DomainEventProtocol):
                    kind = 0
                elif isinstance(obj, CollectEventsProtocol):
                    kind = 1
                else:
                    kind = 2
                kinds[type(obj)] = kind
            if kind == 0:
                self.events.append(obj)
                continue
            if kind == 1:
                self.events.extend(obj.collect_events())
            self.aggregates[obj.id] = obj
        self.saved_kwargs.update(kwargs)


class ProcessApplicationSink:
    """The default :class:`BatchSink`: an eventsourcing ``ProcessApplication`` (or ``Follower``).

    Calls the follower's unchanged ``policy()`` once per event, in order, and
    records all new events + dead letters + tracking positions in one
    transaction through the follower's own recorder, then notifies like the
    library does after recording (``_take_snapshots``, ``notify``, ``_notify``).

    Several sinks of one follower (one consumer adapter per leader, each in
    its thread) run their policies at the same time; only the write (and what
    follows it) holds the follower's ``processing_lock``. A batch that read an
    aggregate another batch changed meanwhile, or whose write collides with
    another writer's version of an aggregate, records nothing and runs again
    (see :mod:`esbridge.processing.concurrent_batches`); after ``OPTIMISTIC_ATTEMPTS`` it
    runs with the lock held throughout, like the library's ``process_event``.
    """

    #: Runs of a batch with only its write under the lock, before it holds the lock throughout.
    OPTIMISTIC_ATTEMPTS = 3
    #: Runs of a batch whose write keeps colliding before the collision is raised (the
    #: consumer then re-reads its positions and the batch is delivered again).
    MAX_ATTEMPTS = 5

    def __init__(
        self,
        follower: Follower[Any],
        dead_letters: DeadLetterStore | None = None,
        prefetch: PrefetchFunc | None = None,
    ):
        from esbridge.processing.concurrent_batches import follower_batches

        install_recorder_hook(follower)
        self.follower = follower
        self.prefetch = prefetch
        self.dead_letters = dead_letters or DeadLetterStore(follower.recorder.datastore)  # type: ignore[attr-defined]
        self.dead_letters.create_table()
        self.batches = follower_batches(follower)
        self.reruns = 0  # batches run again after a conflict (for tests and diagnostics)

    def position(self, tracking_name: str) -> int:
        return self.follower.recorder.max_tracking_id(tracking_name) or 0

    def apply(self, steps: Sequence[Step], expected: Mapping[str, int]) -> None:
        attempt = 1
        while not self._attempt(steps, expected, attempt):
            self.reruns += 1
            attempt += 1

    def _attempt(self, steps: Sequence[Step], expected: Mapping[str, int], attempt: int) -> bool:
        """Run and record the batch once; False when it recorded nothing and must run again."""
        lock = self.follower.processing_lock
        commits = self.batches.log
        ticket = commits.begin()
        try:
            if attempt > self.OPTIMISTIC_ATTEMPTS:
                with lock:
                    combined = self._process(steps, ticket, fill_lock=None)
                    assert combined is not None
                    return self._record(steps, expected, combined, attempt)
            combined = self._process(steps, ticket, fill_lock=lock)
            if combined is None:
                return False
            with lock:
                if commits.conflict(ticket, combined.reads) is not None:
                    return False
                return self._record(steps, expected, combined, attempt)
        finally:
            commits.end(ticket)

    def _process(
        self, steps: Sequence[Step], ticket: int, fill_lock: Any
    ) -> _ProcessedBatch | None:
        """Call the policy for every step; None when a policy failed on state that changed."""
        follower = self.follower
        hints = self.batches.hints
        combined = _ProcessedBatch(tracking=None)
        with _overlay(follower, fill_lock) as overlay:
            if self.prefetch is not None:
                self._prefetch(overlay, steps)
            else:
                self._prefetch_learned(overlay, steps)
            # Bound once: the library's singledispatchmethod builds a new function per access.
            policy = follower.policy
            learn = self.prefetch is None
            for index, step in enumerate(steps):
                event = step.event
                if event is None:
                    continue
                processing_event = _BatchProcessingEvent(tracking=step.tracking)
                try:
                    policy(event, processing_event)
                except TRANSIENT_ERRORS:
                    raise
                except Exception as e:
                    if fill_lock is not None:
                        with fill_lock:  # commits in flight are noted under the lock
                            if self.batches.log.conflict(ticket, overlay.reads) is not None:
                                return None  # it may have failed on a stale read: run again
                    raise StepFailed(index, e) from e
                requested = overlay.take_requested()
                if learn:  # a given hint makes learning one useless work
                    hints.learn(event, requested)
                overlay.collect(processing_event)
                combined.events.extend(processing_event.events)
                combined.aggregates.update(processing_event.aggregates)
                combined.saved_kwargs.update(processing_event.saved_kwargs)
        combined.reads = overlay.reads
        return combined

    def _record(
        self,
        steps: Sequence[Step],
        expected: Mapping[str, int],
        combined: _ProcessedBatch,
        attempt: int,
    ) -> bool:
        """Write the batch (under the processing lock); False after a collision worth retrying."""
        from eventsourcing.persistence import IntegrityError

        follower = self.follower
        combined.saved_kwargs[WRITE_KWARG] = self._write(steps, expected)
        try:
            recordings = follower._record(combined)
        except IntegrityError as e:
            self._evict(combined)
            if attempt >= self.MAX_ATTEMPTS or self._positions_moved(expected):
                raise
            log.info("batch of %s collided with another writer (%s): running it again",
                     follower.name, e)  # fmt: skip
            return False
        self.batches.log.committed(combined.events)
        follower._take_snapshots(combined)
        follower.notify(combined.events)
        follower._notify(recordings)
        return True

    def _evict(self, combined: ProcessingEvent[Any]) -> None:
        """Drop the batch's aggregates from the cache: another writer has newer versions."""
        cache = self.batches.switch.base.cache
        if cache is None:
            return
        for aggregate_id in {e.originator_id for e in combined.events}:
            with suppress(KeyError):
                cache.get(aggregate_id, evict=True)

    def _positions_moved(self, expected: Mapping[str, int]) -> bool:
        """True when a tracking position is no longer what the batch expects (another consumer)."""
        return any(self.position(name) != position for name, position in expected.items())

    def _prefetch(self, overlay: BatchRepository, steps: Sequence[Step]) -> None:
        """Load the aggregates the hint names for this batch in one query (a hint only)."""
        hint = self.prefetch
        assert hint is not None
        ids: list[Any] = []
        try:
            for step in steps:
                if step.event is not None:
                    ids.extend(hint(step.event))
        except Exception as e:  # a wrong hint costs speed, never correctness
            log.warning("prefetch hint failed (%s: %s); reading aggregates one by one",
                        type(e).__name__, e)  # fmt: skip
            return
        overlay.prefetch(ids)

    def _prefetch_learned(self, overlay: BatchRepository, steps: Sequence[Step]) -> None:
        """Load the aggregates earlier batches' policies read for such events, in one query."""
        hints = self.batches.hints
        ids: list[Any] = []
        for step in steps:
            if step.event is not None:
                ids.extend(hints.ids(step.event))
        if len(ids) < 2:
            return  # one read either way
        try:
            overlay.prefetch(ids)
        except TRANSIENT_ERRORS:
            raise
        except Exception as e:  # a learned hint can be wrong (a value of another type)
            log.info("prefetching %d aggregates failed (%s: %s); reading them one by one",
                     len(ids), type(e).__name__, e)  # fmt: skip
            self.batches.hints.forget(s.event for s in steps if s.event is not None)

    def _write(self, steps: Sequence[Step], expected: Mapping[str, int]) -> EsbridgeWrite:
        last: dict[str, Tracking] = {}
        write = EsbridgeWrite(store=self.dead_letters)
        for step in steps:
            if step.tracking is not None:
                last[step.tracking.application_name] = step.tracking
            if step.dead_letter is not None:
                write.dead_letters.append(step.dead_letter)
            if step.replay_of is not None:
                write.replayed.append(step.replay_of)
        for name, tracking in last.items():
            previous = expected.get(name, 0)
            if tracking.notification_id > previous:
                write.trackings.append((tracking, previous))
        return write


class _ProcessedBatch(ProcessingEvent[Any]):
    """The new events of a whole batch, and the aggregate versions its policies read."""

    reads: Mapping[Any, int] = {}


class _overlay:
    """Context manager: inside, this thread's ``follower.repository`` is a :class:`BatchRepository`.

    Other threads keep seeing the real repository (or their own batch), so
    batches of several consumers of one follower can run at the same time.
    """

    def __init__(self, follower: Follower[Any], fill_lock: Any = None) -> None:
        from esbridge.processing.concurrent_batches import follower_batches

        self.switch = follower_batches(follower).switch
        self.fill_lock = fill_lock

    def __enter__(self) -> BatchRepository:
        overlay = BatchRepository(self.switch.base, self.fill_lock)
        self.switch.activate(overlay)
        return overlay

    def __exit__(self, *exc: object) -> None:
        self.switch.deactivate()


def iter_batches(steps: Sequence[Step], size: int) -> Iterator[Sequence[Step]]:
    """``steps`` in slices of at most ``size``."""
    for i in range(0, len(steps), size):
        yield steps[i : i + size]
