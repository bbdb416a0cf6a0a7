"""Replaying parked messages into their follower, after the cause was fixed.

Parked rows are replayed per key (upstream aggregate) in parking order, each
in its own transaction that also marks the row ``replayed`` (so a row is never
replayed twice, even by two concurrent ``esbridge dlq replay`` runs). When a
row fails again its attempt count and error are updated and the rest of that
key stays parked, so per-aggregate order still holds; other keys go on.

A consumer that runs meanwhile keeps parking new messages of a key while the
key has parked rows; replay repeats its passes until one finds nothing new.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.system import Follower

from esbridge.deadletters.store import REASON_FOREIGN, DeadLetter, DeadLetterStore
from esbridge.processing.application_sink import ProcessApplicationSink
from esbridge.processing.sink import StepFailed
from esbridge.processing.steps import Source, StepFactory, UpstreamDecoder
from esbridge.runtime.postgres_retry import TRANSIENT_ERRORS

log = logging.getLogger("esbridge.dlq")


@dataclass
class ReplayResult:
    """What a replay did: rows replayed, and rows that failed again (id -> error)."""

    replayed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)  # behind a row that failed again


def replay_dead_letters(
    follower: Follower[Any],
    *,
    ids: Sequence[int] | None = None,
    upstream_classes: dict[str, type] | None = None,
    max_passes: int = 10,
) -> ReplayResult:
    """Replay parked rows of ``follower`` (all, or ``ids``); see the module docstring."""
    sink = ProcessApplicationSink(follower)
    store: DeadLetterStore = sink.dead_letters
    factories: dict[str, StepFactory] = {}
    result = ReplayResult()
    blocked: set[tuple[str, str]] = set()
    for _pass in range(max_passes):
        rows = [
            r
            for r in store.list(follower.name, ids=ids)
            if r.id not in result.failed and (r.upstream, r.key) not in blocked
        ]
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
                factory = StepFactory(follower, UpstreamDecoder(follower, letter.upstream, cls))
                factories[letter.upstream] = factory
            error = _replay_one(sink, factory, letter)
            if error is None:
                result.replayed.append(letter.id)
                continue
            store.record_attempt(letter.id, error)
            result.failed[letter.id] = error
            blocked.add(group)
            log.error("dead letter %d (key %s) failed again: %s", letter.id, letter.key, error)
        if ids is not None:
            break
    result.skipped = sorted(set(result.skipped))
    return result


def _replay_one(
    sink: ProcessApplicationSink, factory: StepFactory, letter: DeadLetter
) -> str | None:
    """Apply one parked row; the error text when it fails (nothing recorded then)."""
    if letter.reason == REASON_FOREIGN:
        return (
            "cannot replay: a foreign message (not in the upstream notification log it "
            f"claims to come from: {letter.error}); it can only be inspected"
        )
    if letter.event_topic is None or letter.originator_version is None:
        return (
            f"cannot replay: the message is not an esbridge payload ({letter.error}); "
            "it can only be inspected"
        )
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
    step.replay_of = letter.id
    try:
        sink.apply([step], {})
    except StepFailed as e:
        return f"{type(e.cause).__name__}: {e.cause}"
    except TRANSIENT_ERRORS:
        raise
    return None
