"""Causal dependencies across partitions: an event waits for what it depends on elsewhere.

A relay with ``causal_dependencies=True`` gives a message on partition ``p``
the ``esb_deps`` header: for other partitions ``q``, the notification id
``n`` that must be processed before it (the last one published to ``q``
before it, named only when ``q`` received something since ``p``'s previous
message: see :func:`esbridge.wire.encoding.causal_deps`). Processing each
partition in its chain order and honouring these makes a follower apply the
upstream log's order across partitions: it never sees an event before one
that precedes it in the log, whichever member of the group owns which
partition.

Where a dependency stands is read from the follower's tracking records in
Postgres (``<upstream>#<q>/<N>``), the truth whoever owns ``q``, or from the
batch being built when this member owns ``q`` too (a step earlier in the
batch is applied earlier in the same transaction). A step whose dependency
is not there yet is held, with every later step of its partition, and
offered again each round (a round runs at least every ``poll_timeout``);
the partition's committed Kafka offset stays at the first held message, so
a crash loses nothing. No deadlock: dependencies point backwards in the log,
so the lowest id held anywhere in the group never waits for anything held.
After ``causal_timeout`` seconds without the head of a partition's held
steps being released, :class:`~esbridge.errors.CausalDependencyTimeoutError`
says which partition it waits for.

Without the header (a relay without causal dependencies, events read from
the upstream log to fill a gap) a step waits for nothing; with the
consumer's ``causal_dependencies=False`` the header is ignored.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Iterator

from esbridge import wire
from esbridge.consumer.modes import ModeContext
from esbridge.consumer.state import Partition
from esbridge.errors import CausalDependencyTimeoutError
from esbridge.processing.steps import Step

log = logging.getLogger("esbridge.consumer")


def step_deps(step: Step) -> list[tuple[int, int]]:
    """The ``(partition, notification id)`` pairs a step's message waits for (often none)."""
    value = getattr(step.source, "deps", "")
    return wire.decode_deps(value) if value else []


def _none(step: Step) -> list[tuple[int, int]]:
    return []


class CausalGate:
    """Holds steps whose causal dependencies are not processed yet (module docstring)."""

    def __init__(self, context: ModeContext) -> None:
        self.context = context

    def release(self, steps: list[Step], now: float) -> list[Step]:
        """The steps that may be committed now, in order; the others wait in their partitions.

        Steps held in earlier rounds come first: they precede their partition's
        new steps. Raises :class:`CausalDependencyTimeoutError` when a
        partition's first held step has waited longer than ``causal_timeout``.
        """
        parts = self.context.assignment.parts
        held = [step for part in parts.values() for step in part.causal_held]
        # Turned off on a running consumer: what it held goes now, in order.
        deps_of = step_deps if self.context.tuning.causal_dependencies else _none
        if not held and not any(deps_of(step) for step in steps):
            return steps  # the common case: nothing to wait for
        by_name = {part.tracking_name: part for part in parts.values()}
        for part in parts.values():
            part.causal_held = []
        released: list[Step] = []
        done: dict[int, int] = {}  # partition -> highest id released in this batch
        stored: dict[int, int] = {}  # partition -> Postgres position, read once a round
        blocked: dict[int, tuple[int, int]] = {}  # partition -> the dependency it waits for
        waits = 0
        for owner, step in self._in_log_order((*held, *steps), by_name):
            if owner.number not in blocked:
                missing = self._missing(deps_of(step), done, stored)
                if missing is None:
                    released.append(step)
                    if step.tracking is not None:
                        done[owner.number] = step.tracking.notification_id
                    continue
                blocked[owner.number] = missing
            owner.causal_held.append(step)
        for part in parts.values():
            waits += self._held_since(part, now, blocked.get(part.number), stored)
        metrics = self.context.metrics
        metrics.causal_waits.inc(waits)
        metrics.causal_held.set(sum(len(part.causal_held) for part in parts.values()))
        return released

    def holding(self) -> bool:
        """Whether any assigned partition holds steps."""
        return any(part.causal_held for part in self.context.assignment.parts.values())

    def _in_log_order(
        self, steps: Iterable[Step], by_name: dict[str, Partition]
    ) -> Iterator[tuple[Partition, Step]]:
        """Each partition's steps in their order, merged by notification id across partitions.

        So a step whose dependency is in this batch comes after it (dependencies
        point backwards in the log) and is released in the same transaction,
        whatever order the partitions' messages were fetched in. A step without
        a position (a parked malformed message) keeps its place behind the step
        before it. Steps of partitions revoked meanwhile are dropped: their new
        owner reads them again.
        """
        streams: dict[int, list[tuple[int, int, Partition, Step]]] = {}
        for index, step in enumerate(steps):
            owner = self._part_of(step, by_name)
            if owner is None:
                continue
            stream = streams.setdefault(owner.number, [])
            key = (
                step.tracking.notification_id if step.tracking else (stream[-1][0] if stream else 0)
            )
            stream.append((key, index, owner, step))
        for _key, _index, owner, step in heapq.merge(*streams.values()):
            yield owner, step

    def _part_of(self, step: Step, by_name: dict[str, Partition]) -> Partition | None:
        if step.tracking is not None:
            return by_name.get(step.tracking.application_name)
        number = getattr(step.source, "kafka_partition", None)
        return self.context.assignment.parts.get(number) if number is not None else None

    def _missing(
        self, deps: list[tuple[int, int]], done: dict[int, int], stored: dict[int, int]
    ) -> tuple[int, int] | None:
        """The first dependency not processed yet, or None."""
        for partition, nid in deps:
            if done.get(partition, 0) >= nid:
                continue
            if partition not in stored:
                stored[partition] = self._position(partition)
            if stored[partition] < nid:
                return partition, nid
        return None

    def _position(self, partition: int) -> int:
        names = self.context.assignment.names
        if not 0 <= partition < len(names):
            return -1  # a partition this topic does not have: never satisfied, times out
        return self.context.position(names[partition])

    def _held_since(
        self,
        part: Partition,
        now: float,
        waiting: tuple[int, int] | None,
        stored: dict[int, int],
    ) -> int:
        """Start or check the clock of ``part``'s first held step; 1 if a new step waits."""
        if not part.causal_held:
            part.causal_since = None
            return 0
        head = part.causal_held[0].tracking
        head_nid = head.notification_id if head is not None else None
        if part.causal_since is None or part.causal_since[0] != head_nid:
            part.causal_since = (head_nid, now)
            return 1
        waited = now - part.causal_since[1]
        timeout = self.context.tuning.causal_timeout
        if waited > timeout and waiting is not None:
            topic = self.context.assignment.topic
            other, nid = waiting
            position = stored.get(other)
            raise CausalDependencyTimeoutError(
                f"partition {topic}[{part.number}] of {self.context.upstream!r}: notification "
                f"{head_nid} has waited {waited:.0f} s (causal_timeout {timeout:g} s) for "
                f"notification {nid} of partition {other}, which the follower's tracking "
                f"record there has not reached (it is at {position}). Check the group member "
                f"that owns partition {other} (down, stuck or far behind?); nothing was "
                "recorded past the waiting event, a restart resumes there. To process "
                "partitions independently, set causal_dependencies=False on this consumer",
                topic=topic,
                partition=part.number,
                nid=head_nid,
                waiting_for=other,
                waiting_for_nid=nid,
                position=position,
            )
        return 0
