"""Retrying parked messages: running them through their follower again, after the cause was fixed.

Parked rows are retried per key (upstream aggregate) in parking order, each
in its own transaction that also marks the row done (stored status
``replayed``, the table's name for it since its first release), so a row is
never applied twice, even by two concurrent ``esbridge dlq retry`` runs. When
a row fails again its attempt count and error are updated and the rest of
that key stays parked, so per-aggregate order still holds; other keys go on.

A consumer that runs meanwhile keeps parking new messages of a key while the
key has parked rows; a retry repeats its passes until one finds nothing new.

Rows may be chosen (``ids``, ``keys``, ``since``); a chosen row with an
earlier parked row of its key that was not chosen stays parked (reported as
skipped): applying it first would break its aggregate's order. Skipped (by a
``skip`` policy) and discarded rows are never retried.

"Retry", not "replay": ``esbridge replay`` is the backfill of a notification-id
range to a topic (:mod:`esbridge_connectors.replay`). ``replay_dead_letters``
and ``ReplayResult`` are the former names, kept for one release.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from eventsourcing.system import Follower

from esbridge.deadletters.store import REASON_FOREIGN, DeadLetter, DeadLetterStore
from esbridge.processing.application_sink import ProcessApplicationSink
from esbridge.processing.sink import StepFailed
from esbridge.processing.steps import Source, StepFactory
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS

log = logging.getLogger("esbridge.dlq")


@dataclass
class RetryResult:
    """What a retry did: rows applied, and rows that failed again (id -> error)."""

    retried: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)  # behind a row that failed again

    @property
    def replayed(self) -> list[int]:
        """Former name of :attr:`retried`, kept for one release."""
        return self.retried


#: Former name of :class:`RetryResult`, kept for one release.
ReplayResult = RetryResult


def retry_dead_letters(
    follower: Follower[Any],
    *,
    ids: Sequence[int] | None = None,
    upstream_classes: dict[str, type] | None = None,
    max_passes: int = 10,
    keys: Sequence[str] | None = None,
    since: int | datetime | None = None,
    steps: Mapping[str, StepFactory] | None = None,
) -> RetryResult:
    """Retry parked rows of ``follower`` (all, or those chosen); see the module docstring.

    ``keys``: only rows of these keys; ``since``: only rows from this id on
    (an int) or parked at or after this time (a datetime). ``steps``: the
    step factory of an upstream whose messages the default one cannot decode
    (a Schema Registry topic: ``esbridge_connectors.registry_follower``), by
    upstream name.
    """
    sink = ProcessApplicationSink(follower)
    store: DeadLetterStore = sink.dead_letters
    factories: dict[str, StepFactory] = dict(steps or {})
    result = RetryResult()
    blocked: set[tuple[str, str]] = set()
    chosen = ids is not None or keys is not None or since is not None
    for _pass in range(max_passes):
        rows = [
            r
            for r in store.list(follower.name, ids=ids, keys=keys, since=since)
            if r.id not in result.failed
            and r.id not in result.skipped
            and (r.upstream, r.key) not in blocked
        ]
        if chosen:
            rows = _behind_unchosen(store.list(follower.name), rows, result)
        if not rows:
            break
        for letter in rows:
            group = (letter.upstream, letter.key)
            assert letter.id is not None
            if group in blocked:
                result.skipped.append(letter.id)
                continue
            factory = factories.get(letter.upstream)
            if factory is None:
                cls = (upstream_classes or {}).get(letter.upstream)
                factory = StepFactory.for_follower(follower, letter.upstream, cls)
                factories[letter.upstream] = factory
            refusal = _inspect_only(letter)
            error = refusal or _retry_one(sink, factory, letter)
            if error is None:
                result.retried.append(letter.id)
                continue
            if refusal is None:  # the row keeps the error it was parked with
                store.record_attempt(letter.id, error)
            result.failed[letter.id] = error
            blocked.add(group)
            log.error("dead letter %d (key %s) failed again: %s", letter.id, letter.key, error)
        if ids is not None:
            break
    result.skipped = sorted(set(result.skipped))
    return result


def _behind_unchosen(
    parked: Sequence[DeadLetter], rows: list[DeadLetter], result: RetryResult
) -> list[DeadLetter]:
    """``rows`` without those behind an earlier parked row of their key that was not chosen."""
    chosen = {r.id for r in rows}
    first_unchosen: dict[tuple[str, str], int] = {}
    for r in parked:
        assert r.id is not None
        if r.id not in chosen and r.tracking_name is not None:
            first_unchosen.setdefault((r.upstream, r.key), r.id)
    kept = []
    for r in rows:
        assert r.id is not None
        earlier = first_unchosen.get((r.upstream, r.key))
        if earlier is not None and earlier < r.id:
            result.skipped.append(r.id)
        else:
            kept.append(r)
    return kept


def replay_dead_letters(
    follower: Follower[Any],
    *,
    ids: Sequence[int] | None = None,
    upstream_classes: dict[str, type] | None = None,
    max_passes: int = 10,
) -> RetryResult:
    """Former name of :func:`retry_dead_letters`, kept for one release (it warns)."""
    warnings.warn(
        "replay_dead_letters is now retry_dead_letters (esbridge.deadletters.retry)",
        DeprecationWarning,
        stacklevel=2,
    )
    return retry_dead_letters(
        follower, ids=ids, upstream_classes=upstream_classes, max_passes=max_passes
    )


def _inspect_only(letter: DeadLetter) -> str | None:
    """Why ``letter`` cannot be retried at all (None when it can)."""
    if letter.reason == REASON_FOREIGN:
        return (
            "cannot retry: a foreign message (not in the upstream notification log it "
            f"claims to come from: {letter.error}); it can only be inspected"
        )
    if letter.event_topic is None or letter.originator_version is None:
        return (
            f"cannot retry: the message is not an esbridge payload ({letter.error}); "
            "it can only be inspected"
        )
    return None


def _retry_one(
    sink: ProcessApplicationSink, factory: StepFactory, letter: DeadLetter
) -> str | None:
    """Apply one parked row; the error text when it fails (nothing recorded then)."""
    assert letter.event_topic is not None and letter.originator_version is not None
    source = Source(
        key=letter.key,
        value=letter.value,
        headers=letter.headers,
        event_topic=letter.event_topic,
        originator_version=letter.originator_version,
        nid=letter.nid,
    )
    step = factory.step(source, None)
    if step.dead_letter is not None:
        return step.dead_letter.error
    step.replay_of = letter.id  # the step marks the row done when it commits
    try:
        sink.apply([step], {})
    except StepFailed as e:
        return f"{type(e.cause).__name__}: {e.cause}"
    except TRANSIENT_ERRORS:
        raise
    return None
