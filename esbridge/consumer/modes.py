"""What differs between payload and prompt mode, as one strategy object chosen at construction.

Payload mode (:mod:`.payloads`) turns the topic's messages into steps; prompt
mode (:mod:`.prompts`) takes the topic's messages as mere prompts to pull
events from the upstream log. Everything else (the Kafka client, assignments,
offsets, batches, status) is the same and stays in the adapter, which hands
each strategy a :class:`ModeContext`: the parts it shares with them.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, Message

from esbridge.consumer.batch_commit import ConsumerCounts
from esbridge.consumer.client import TopicClient
from esbridge.consumer.metrics import ConsumerMetrics
from esbridge.consumer.state import Assignment, Partition, Tuning
from esbridge.consumer.upstream import UpstreamLog
from esbridge.processing.steps import Step, StepFactory


@dataclass(frozen=True)
class ModeContext:
    """What a mode strategy shares with its adapter (the same objects, not copies)."""

    upstream: str
    tuning: Tuning
    metrics: ConsumerMetrics
    steps: StepFactory
    counts: ConsumerCounts
    assignment: Assignment
    client: TopicClient
    upstream_log: UpstreamLog | None  # None: not configured
    stop: threading.Event
    #: Record steps in Postgres; False when another consumer's writes collided (resynced).
    commit: Callable[[Sequence[Step]], bool]
    #: The Postgres position of a tracking name (retried while Postgres is unreachable).
    position: Callable[[str], int]
    #: Refresh the gauges at the end of a round.
    update_gauges: Callable[[], None]


class Mode(ABC):
    """A consumer mode: how messages become recorded events."""

    #: The mode's name, as in :data:`esbridge.names.MODES`.
    name: str
    #: Whether committed offsets must be checked against Postgres positions on assignment.
    checks_offsets: bool

    def __init__(self, context: ModeContext) -> None:
        self.context = context

    @abstractmethod
    def tracking_names(self, partitions: int) -> list[str]:
        """The tracking names of a topic with ``partitions`` partitions."""

    @abstractmethod
    def tracking_name(self, partition: int) -> str:
        """The tracking name that records ``partition``'s progress."""

    @abstractmethod
    def round(self, consumer: Consumer, messages: list[Message]) -> int:
        """Process what ``messages`` made ready; returns the messages seen."""

    @abstractmethod
    def caught_up(self, consumer: Consumer) -> bool:
        """Whether nothing is left to process (assignment is complete)."""

    def lag(self, consumer: Consumer) -> tuple[int, float]:
        """Messages behind, and the age of the oldest: none unless messages are the events."""
        return 0, 0.0

    def assigned(self) -> None:  # noqa: B027 (a hook: most modes need nothing)
        """Partitions were just assigned (their positions read)."""

    def resynced(self, consumer: Consumer, part: Partition) -> None:  # noqa: B027 (a hook)
        """``part`` restarts from its Postgres position after a collision."""

    def close(self) -> None:  # noqa: B027 (a hook)
        """Release what the mode opened (idempotent)."""
