"""What a consumer adapter knows while it runs: its settings, its partitions, its snapshot.

Kept in one place, apart from the code that changes it, because every part of
the consumer reads it: the Kafka side (assignments, offsets), the mode
strategies (:mod:`.payloads`, :mod:`.prompts`) and the status. Plain data: no
Kafka or Postgres calls here, so :meth:`Assignment.held` can be read from any
thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Message

from esbridge import wire
from esbridge.consumer.reconcile import PartitionOrder
from esbridge.deadletters.policy import DeadLetterPolicy
from esbridge.errors import ConfigurationError
from esbridge.eventlog.notification_log import DEFAULT_PAGE_SIZE
from esbridge.processing.steps import Step

#: What a partition holds while it waits for a gap to close: the messages, decoded.
HeldMessage = tuple[Message, wire.PayloadHeaders]


@dataclass
class Tuning:
    """The tuning keywords of :class:`~esbridge.consumer.ConsumerAdapter`.

    ``batch_size`` (messages per transaction, default 1000), ``poll_timeout``,
    ``hold_timeout`` (60 s: how long a partition may be held behind a gap the
    consumer cannot fill), ``retries`` (3) and ``retry_backoff`` (0.2 s,
    doubling) for a failing policy, ``page_size`` (log reads),
    ``prompt_interval`` (1 s), ``park_behind`` (True), ``pause_gc`` (True:
    Python's cyclic garbage collector waits while a batch is processed, see
    :func:`~esbridge.runtime.gc_pause.gc_paused`), ``fair_partitions`` (True:
    smaller fetches per partition, so no partition waits long behind the
    others' backlog, see :mod:`~esbridge.consumer.partition_flow`),
    ``topic_timeout`` (how long to wait for the topic to exist),
    ``trailing_gap_after`` (10 s: how long a partition is idle before the
    upstream log, or the relay's ``position_topic``, is asked whether its last
    messages are missing), ``verify_messages`` (False: with the upstream log,
    check every message against it, one read a batch, so that not even a
    forgery that continues a partition's chain exactly is applied),
    ``connect_timeout`` (how long to wait for an unreachable Postgres or broker
    at start-up; None, the default, waits for ever, logging each retry),
    ``dlq_refresh`` (2 s: how often the dead-letter count is re-read),
    ``dead_letter_policy`` (a :class:`~esbridge.deadletters.policy.DeadLetterPolicy`,
    or a mapping of follower names to policies with ``"*"`` for the others:
    attempts, backoff and what to do with a message that keeps failing; without
    one, ``retries`` and ``retry_backoff`` make a policy that parks),
    ``lso_interval`` (5 s: how often the last stable offset of each assigned
    partition is asked, for ``esbridge_partition_lso_gap_messages``, in the
    background, see :mod:`~esbridge.consumer.stable_offsets`),
    ``causal_dependencies`` (True: a message whose relay gave it causal
    dependencies, the ``esb_deps`` header, waits until the events it names on
    other partitions are processed, as the follower's tracking records in
    Postgres say; False: each partition goes its own way, see
    docs/partitioning.md and :mod:`~esbridge.consumer.causal`),
    ``causal_timeout`` (60 s: how long an event may wait for them before the
    consumer stops with :class:`~esbridge.errors.CausalDependencyTimeoutError`).

    Read at each use, never copied: changing one on a running adapter takes effect.
    """

    batch_size: int = 1000
    poll_timeout: float = 0.2
    hold_timeout: float = 60.0
    retries: int = 3
    retry_backoff: float = 0.2
    page_size: int = DEFAULT_PAGE_SIZE * 2
    prompt_interval: float = 1.0
    trailing_gap_after: float = 10.0
    position_topic: str | None = None
    verify_messages: bool = False
    park_behind: bool = True
    topic_timeout: float = 30.0
    dlq_refresh: float = 2.0
    connect_timeout: float | None = None
    pause_gc: bool = True
    fair_partitions: bool = True
    dead_letter_policy: DeadLetterPolicy | Mapping[str, DeadLetterPolicy] | None = None
    lso_interval: float = 5.0
    causal_dependencies: bool = True
    causal_timeout: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)

    def policy_for(self, follower: str) -> DeadLetterPolicy:
        """``follower``'s dead-letter policy (read at each use: a change takes effect)."""
        given = self.dead_letter_policy
        if isinstance(given, Mapping):
            given = given.get(follower, given.get("*"))
        if given is None:
            return DeadLetterPolicy.from_retries(self.retries, self.retry_backoff)
        return given

    @classmethod
    def checked(cls, keywords: Mapping[str, Any], *, upstream_log: bool) -> Tuning:
        """The tuning of ``keywords``, refusing unknown ones and settings that cannot work.

        ``upstream_log``: whether the consumer may read the upstream log.
        """
        known = set(cls.__dataclass_fields__) - {"extra"}
        unknown = set(keywords) - known
        if unknown:
            raise ConfigurationError(
                f"unknown ConsumerAdapter settings {sorted(unknown)}; known: {sorted(known)}"
            )
        tuning = cls(**keywords)
        _check_policy(tuning.dead_letter_policy, keywords)
        if tuning.verify_messages and not upstream_log:
            raise ConfigurationError(
                "verify_messages checks every message against the upstream notification log: "
                "pass upstream_env (read-only POSTGRES_* settings of the upstream application)"
            )
        return tuning


def _check_policy(given: Any, keywords: Mapping[str, Any]) -> None:
    """Refuse a dead-letter policy that is not one, or that contradicts ``retries``."""
    if given is None:
        return
    policies = list(given.values()) if isinstance(given, Mapping) else [given]
    for policy in policies:
        if not isinstance(policy, DeadLetterPolicy):
            raise ConfigurationError(
                "dead_letter_policy must be a DeadLetterPolicy (from esbridge import "
                "DeadLetterPolicy) or a mapping of follower names to them, not "
                f"{type(policy).__name__} {policy!r}"
            )
    both = sorted({"retries", "retry_backoff"} & set(keywords))
    if both:
        raise ConfigurationError(
            f"give either dead_letter_policy or {' and '.join(both)}, not both: the policy's "
            "max_attempts and backoff replace them"
        )


@dataclass
class Partition:
    """What the consumer knows of one assigned partition."""

    number: int
    tracking_name: str
    order: PartitionOrder[HeldMessage]
    resume_offset: int  # where reading may safely start again (Kafka offset)
    last_offset: int = -1  # last offset whose message is recorded (or skipped) in Postgres
    last_timestamp: float = 0.0
    last_seen: float = 0.0  # monotonic time of its last message, or of its assignment
    trailing: tuple[int, float] | None = None  # (relay's last id here, since): a held end
    #: Steps ready but waiting for causal dependencies on other partitions, in order.
    causal_held: list[Step] = field(default_factory=list)
    #: (first held step's id, since when) while ``causal_held`` is not empty.
    causal_since: tuple[int | None, float] | None = None


@dataclass
class HeldPartition:
    """A partition held behind a gap (missing notifications)."""

    partition: int
    position: int
    missing: str
    age_seconds: float
    held_messages: int


@dataclass
class ConsumerStatus:
    """A snapshot of a consumer adapter (also exported as Prometheus metrics)."""

    follower: str
    upstream: str
    topic: str
    mode: str
    group_id: str
    running: bool
    assigned: list[int]
    positions: dict[str, int]
    processed: int
    duplicates: int
    gaps_reconciled: int
    reconciled_events: int
    batches: int
    dead_letters: int
    parked: int
    held_partitions: list[HeldPartition]
    lag_events: int
    lag_seconds: float
    error: str | None = None
    #: Messages recorded as skipped by this process (a ``skip`` dead-letter policy).
    skipped: int = 0


@dataclass
class Assignment:
    """The topic's shape and the partitions assigned to this consumer, with their positions.

    ``positions`` are the tracking positions last committed to Postgres (the
    compare-and-set's expected values), shared with the batch committer.
    """

    topic: str
    partitions: int = 0  # the topic's partition count, once known
    names: list[str] = field(default_factory=list)  # the tracking names
    parts: dict[int, Partition] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    partition_of: Callable[[bytes], int] = lambda key: 0  # a key's partition

    def owns(self, part: Partition, key: bytes) -> bool:
        """Whether an event with ``key`` belongs to ``part`` (always, on one partition)."""
        return self.partitions <= 1 or part.number == self.partition_of(key)

    def held(self) -> list[HeldPartition]:
        """The partitions waiting for missing notifications (a gap, or a trailing gap)."""
        result = []
        now = time.time()
        for part in list(self.parts.values()):
            gap = part.order.gap()
            if gap is not None:
                result.append(
                    HeldPartition(
                        part.number,
                        gap.after,
                        gap.describe(),
                        now - gap.since,
                        part.order.held_count,
                    )
                )
            elif part.trailing is not None:
                published, since = part.trailing
                result.append(
                    HeldPartition(
                        part.number,
                        part.order.position,
                        f"this partition's notifications after {part.order.position} up to "
                        f"{published} (published by the relay, not on the topic)",
                        now - since,
                        0,
                    )
                )
        return result
