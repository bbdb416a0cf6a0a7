"""The follower's repository as a policy sees it inside a batch of upstream events.

A batch applies many upstream events before anything is committed, so the
follower's real repository does not yet hold what earlier events of the batch
changed. :class:`BatchRepository` stands in for it while the batch runs
(:mod:`esbridge.processing.application_sink` switches it in for the running thread): ``get``
returns aggregates as changed by the batch so far, exactly the state a policy
would see one event at a time, and everything else from the real repository.
It also reads many aggregates in one query (``prefetch``) and copies cached
aggregates faster than ``deepcopy`` (:func:`copy_aggregate`), two costs that
dominate a batch otherwise.
"""

from __future__ import annotations

import copyreg
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext, suppress
from copy import deepcopy
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import (
    AggregateNotFoundError,
    ProcessingEvent,
    Repository,
    project_aggregate,
)
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import StoredEvent
from psycopg.sql import SQL, Identifier

_ATOMIC_TYPES = frozenset({UUID, datetime, str, int, float, bool, bytes, type(None)})

_EMPTY_CONTAINERS = frozenset({list, dict, set})

_plain_classes: dict[type, bool] = {}


def _is_plain(cls: type) -> bool:
    """Whether ``deepcopy`` copies instances of ``cls`` by copying their ``__dict__`` only.

    True when nothing customises copying: no ``__deepcopy__``, ``__reduce__``,
    ``__reduce_ex__``, ``__getstate__`` or ``__setstate__`` of its own, no
    ``copyreg`` entry and no slots. ``deepcopy`` then does exactly
    ``new = cls.__new__(cls)`` and ``new.__dict__.update(deepcopy(state))``.
    """
    plain = _plain_classes.get(cls)
    if plain is None:
        plain = (
            getattr(cls, "__deepcopy__", None) is None
            and getattr(cls, "__reduce_ex__", None) is object.__reduce_ex__
            and getattr(cls, "__reduce__", None) is object.__reduce__
            and getattr(cls, "__getstate__", None) is object.__getstate__
            and getattr(cls, "__setstate__", None) is None
            and cls not in copyreg.dispatch_table
            and not any(
                set(_slot_names(base)) - {"__dict__", "__weakref__"} for base in cls.__mro__
            )
        )
        _plain_classes[cls] = plain
    return plain


def _slot_names(cls: type) -> tuple[str, ...]:
    slots = cls.__dict__.get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)


def copy_aggregate(aggregate: Any) -> Any:
    """``deepcopy(aggregate)``, about 8x faster for typical aggregates.

    ``deepcopy`` rebuilds every ``UUID`` and ``datetime`` through
    ``__reduce_ex__`` although they are immutable: they are shared instead.
    For a class that does not customise copying (:func:`_is_plain`) the
    instance dictionary is copied directly, as ``deepcopy`` would, without
    its generic reduce/reconstruct machinery. Everything else (lists, dicts,
    nested objects) is deep-copied exactly as before, in one memo, so shared
    references stay shared.
    """
    attributes = getattr(aggregate, "__dict__", None)
    if attributes is None:
        return deepcopy(aggregate)
    cls: Any = type(aggregate)
    atomic = _ATOMIC_TYPES
    plain = _plain_classes.get(cls)
    if plain is None:
        plain = _is_plain(cls)
    if plain:
        new = cls.__new__(cls)
        memo: dict[int, Any] = {id(aggregate): new}
        state = {}
        for key, value in attributes.items():
            kind = type(value)
            if kind in atomic:
                state[key] = value
            elif not value and kind in _EMPTY_CONTAINERS and id(value) not in memo:
                state[key] = memo[id(value)] = kind()  # what deepcopy gives, faster
            else:
                state[key] = deepcopy(value, memo)
        new.__dict__.update(state)
        return new
    memo = {}
    for value in attributes.values():
        if type(value) in atomic:
            memo[id(value)] = value
    return deepcopy(aggregate, memo)


class BatchRepository:
    """The follower's repository as seen from inside a batch.

    Aggregates changed by earlier steps of the batch (not yet committed) are
    returned at their in-batch version; everything else comes from the real
    repository. Returned aggregates are copies, like the library's cache.

    It also notes, for optimistic concurrency between threads
    (:mod:`esbridge.processing.concurrent_batches`), the version of each aggregate read
    from the real repository (``reads``, 0: not found) and the ids asked for
    by the current step (``requested``, to learn prefetch hints).
    ``fill_lock``: held while an aggregate missing from a non-fast-forwarding
    cache is read and put there, so that a read racing a commit by another
    thread never leaves an older version in the cache than the one committed
    (commits update the cache under the same lock).
    """

    def __init__(self, base: Repository[Any], fill_lock: Any = None) -> None:
        self.base = base
        self.fill_lock = fill_lock
        self.reads: dict[Any, int] = {}
        self.requested: list[Any] = []
        self._events: dict[Any, list[DomainEventProtocol[Any]]] = {}
        self._aggregates: dict[Any, Any] = {}
        self._absent: set[Any] = set()  # prefetched: no stored events (as of the prefetch)
        self._fetched: dict[Any, Any] = {}  # prefetched aggregates when there is no cache
        self._fresh: set[Any] = set()  # cached aggregates prefetch brought up to date

    def _cache_lock(self) -> Any:
        """The lock to fill the cache under (a no-op context when none is needed)."""
        base = self.base
        if self.fill_lock is None or base.cache is None or base.fastforward:
            return nullcontext()
        return self.fill_lock

    def prefetch(self, aggregate_ids: Iterable[Any]) -> int:
        """Read the stored events of many aggregates in ONE query; returns how many were asked.

        Saves one SELECT per aggregate that is not in the repository's cache
        (typically: aggregates the batch is about to create) and, when the cache
        fast-forwards (``AGGREGATE_CACHE_FASTFORWARD``, the library's default,
        needed when other processes write the same aggregates), one SELECT per
        cached aggregate: the query also reads the events stored after each
        cached version, and the cache gets the aggregates brought up to date,
        as ``Repository.get`` would leave them. Such aggregates are then not
        fast-forwarded again by the batch's ``get`` calls (a later write by
        another process is refused by the version's unique constraint either
        way, exactly as after the library's own fast-forward); nor are the
        aggregates it read in full because they were not cached. Ids without
        stored events are remembered for this batch only, so ``get`` raises
        ``AggregateNotFoundError`` without a query. Does nothing when the
        follower takes snapshots (the library then starts from the latest
        snapshot; ``get`` keeps doing that).
        """
        base = self.base
        if base.snapshot_store is not None:
            return 0
        recorder: Any = base.event_store.recorder
        datastore = getattr(recorder, "datastore", None)
        if datastore is None or not hasattr(recorder, "events_table_name"):
            return 0
        cache = base.cache
        cached: Any = cache.cache if cache is not None else {}
        after: dict[str, tuple[Any, Any]] = {}  # str(id) -> (id, cached aggregate or None)
        fastforward = base.fastforward
        for i in aggregate_ids:
            # A cached aggregate that is not fast-forwarded needs nothing: the common
            # case with a warm cache, checked first (str(i) of a UUID is not free).
            is_cached = i in cached
            if (is_cached and not fastforward) or i in self._events or i in self._fresh:
                continue
            key = str(i)
            if key in after:
                continue
            if not is_cached:
                after[key] = (i, None)
            else:
                with suppress(KeyError):  # evicted meanwhile: read by get, as before
                    after[key] = (i, cache.get(i))  # type: ignore[union-attr]
        if not after:
            return 0
        statement = SQL(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state FROM {0}.{1} AS e "
            "JOIN unnest(%s::{2}[], %s::bigint[]) AS w(id, after) "
            "ON e.originator_id = w.id AND e.originator_version > w.after "
            "ORDER BY e.originator_id, e.originator_version"
        ).format(
            Identifier(datastore.schema or "public"),
            Identifier(recorder.events_table_name),
            Identifier(datastore.originator_id_type),
        )
        versions = [0 if a is None else a.version for _, a in after.values()]
        with self._cache_lock():
            with datastore.get_connection() as conn, conn.cursor() as curs:
                curs.execute(statement, (list(after), versions), prepare=True)
                rows = curs.fetchall()
            stored: dict[str, list[StoredEvent]] = {}
            for row in rows:
                stored.setdefault(str(row["originator_id"]), []).append(
                    StoredEvent(
                        originator_id=row["originator_id"],
                        originator_version=row["originator_version"],
                        topic=row["topic"],
                        state=bytes(row["state"]),
                    )
                )
            for key, (aggregate_id, old) in after.items():
                self._project(aggregate_id, old, stored.get(key, ()))
        return len(after)

    def _project(self, aggregate_id: Any, old: Any, events: Sequence[StoredEvent]) -> None:
        """Put what :meth:`prefetch` read where ``get`` finds it (the cache, or this batch)."""
        cache = self.base.cache
        if old is not None:
            self._fresh.add(aggregate_id)
            if not events:
                return  # the cached aggregate is current
            aggregate = copy_aggregate(old)  # others may hold the cached object: never mutate it
        else:
            aggregate = None
        to_domain_event = self.base.event_store.mapper.to_domain_event
        for stored_event in events:  # project_aggregate without its protocol assert
            domain_event: Any = to_domain_event(stored_event)
            aggregate = domain_event.mutate(aggregate)
        if aggregate is None:
            self._absent.add(aggregate_id)
            self._fresh.discard(aggregate_id)
        elif cache is None:
            self._fetched[aggregate_id] = aggregate
        else:
            # A new aggregate is put under the lock prefetch holds (_cache_lock, if any);
            # a fast-forwarded one takes the fill lock here, for the check and the put only.
            fast_forwarded = old is not None and self.fill_lock is not None
            with self.fill_lock if fast_forwarded else nullcontext():
                try:
                    current = cache.get(aggregate_id)
                except KeyError:
                    current = None
                # Put it unless a commit of this process put a newer version meanwhile.
                if current is None or current.version < aggregate.version:
                    cache.put(aggregate_id, aggregate)
            # Read in full just now (or newer): the batch's get need not fast-forward it.
            self._fresh.add(aggregate_id)

    def collect(self, processing_event: ProcessingEvent[Any]) -> None:
        for event in processing_event.events:
            self._events.setdefault(event.originator_id, []).append(event)
        self._aggregates.update(processing_event.aggregates)

    def take_requested(self) -> list[Any]:
        """The ids asked for since the last call (by the step that just ran)."""
        requested, self.requested = self.requested, []
        return requested

    def get(
        self,
        aggregate_id: Any,
        *,
        version: int | None = None,
        projector_func: Callable[..., Any] = project_aggregate,
        **kwargs: Any,
    ) -> Any:
        self.requested.append(aggregate_id)
        pending = self._events.get(aggregate_id)
        if not pending:
            if version is not None:  # a past version never changes: nothing to note
                return self.base.get(
                    aggregate_id, version=version, projector_func=projector_func, **kwargs
                )
            try:
                aggregate = self._get_current(aggregate_id, projector_func, kwargs)
            except AggregateNotFoundError:
                self.reads.setdefault(aggregate_id, 0)
                raise
            self.reads.setdefault(aggregate_id, aggregate.version)
            return aggregate
        first = pending[0].originator_version
        if version is not None and version < first:
            return self.base.get(aggregate_id, version=version, projector_func=projector_func)
        if version is None:
            aggregate = self._aggregates.get(aggregate_id)
            if aggregate is not None and aggregate.version == pending[-1].originator_version:
                return copy_aggregate(aggregate)
        base = None
        if first > 1:
            base = self.base.get(aggregate_id, version=first - 1, projector_func=projector_func)
        events = [e for e in pending if version is None or e.originator_version <= version]
        aggregate = projector_func(base, events)
        if aggregate is None:
            raise AggregateNotFoundError(aggregate_id)
        return aggregate

    def _get_current(
        self, aggregate_id: Any, projector_func: Callable[..., Any], kwargs: dict[str, Any]
    ) -> Any:
        """The aggregate as committed (not changed by this batch), as the repository gives it."""
        if aggregate_id in self._absent:
            raise AggregateNotFoundError(aggregate_id)
        if projector_func is project_aggregate and aggregate_id in self._fetched:
            return copy_aggregate(self._fetched[aggregate_id])
        repo = self.base
        if not repo.cache:
            return repo.get(aggregate_id, projector_func=projector_func, **kwargs)
        # The library would deepcopy the cached aggregate; copy_aggregate does the same faster.
        copy = kwargs.pop("deepcopy_from_cache", True) and repo.deepcopy_from_cache
        try:
            if repo.fastforward and aggregate_id not in self._fresh:
                raise KeyError(aggregate_id)  # the library fast-forwards it from the database
            cached = repo.cache.get(aggregate_id)
        except KeyError:
            with self._cache_lock():
                cached = repo.get(
                    aggregate_id,
                    projector_func=projector_func,
                    deepcopy_from_cache=False,
                    **kwargs,
                )
        return copy_aggregate(cached) if copy else cached

    def __contains__(self, aggregate_id: Any) -> bool:
        self.requested.append(aggregate_id)
        if aggregate_id in self._events:
            return True
        found = aggregate_id not in self._absent and aggregate_id in self.base
        if not found:
            self.reads.setdefault(aggregate_id, 0)
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)
