"""A follower's dead-letter policy: how often a failing message is tried, and what then.

Operators of event pipelines ask for the same three knobs (Axon's sequenced
dead letters, Sequin's ``max_retry_count``, Kafka Connect's
``errors.tolerance``): how many attempts, how long between them, and what
happens to a message that never succeeds. One small frozen value carries
them, so a policy can be shared, compared and printed, and a consumer's
settings cannot change under a retry in progress.

What happens once the attempts are exhausted (``on_exhausted``):

* ``park`` (the default): the message waits in the dead-letter table, and the
  later messages of its key wait behind it, so an aggregate's events are never
  applied out of order; ``esbridge dlq retry`` runs them again once fixed.
* ``skip``: the message is recorded in the dead-letter table as ``skipped``
  (inspectable, never retried automatically) and the later messages of its key
  go on; the tracking position moves past it as for any processed message.
* ``stop``: the consumer raises :class:`~esbridge.errors.PoisonMessageError`;
  nothing after the message is processed, and a restarted consumer tries it again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from esbridge.errors import ConfigurationError

PARK = "park"
SKIP = "skip"
STOP = "stop"
#: The choices of :attr:`DeadLetterPolicy.on_exhausted`.
ON_EXHAUSTED = (PARK, SKIP, STOP)

OnExhausted = Literal["park", "skip", "stop"]


@dataclass(frozen=True)
class DeadLetterPolicy:
    """How a consumer treats a message whose processing fails (see the module docstring).

    ``max_attempts``: tries in all, the first one included (1: no retry).
    ``backoff``: seconds before the first retry, doubled before each next one,
    never more than ``backoff_cap``. ``jitter``: the fraction of each delay
    drawn at random (0: exact delays; 0.2: each delay between 80 % and 100 %
    of its nominal value), so that consumers failing together do not retry in
    lockstep.
    """

    max_attempts: int = 4
    backoff: float = 0.2
    backoff_cap: float = 10.0
    jitter: float = 0.1
    on_exhausted: OnExhausted = "park"

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigurationError(
                f"DeadLetterPolicy max_attempts must be an integer >= 1 (tries in all, the "
                f"first one included), not {self.max_attempts!r}"
            )
        if self.backoff < 0 or self.backoff_cap < 0:
            raise ConfigurationError(
                f"DeadLetterPolicy backoff ({self.backoff!r}) and backoff_cap "
                f"({self.backoff_cap!r}) are seconds: they cannot be negative"
            )
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError(
                f"DeadLetterPolicy jitter is the random fraction of each delay, between 0 and "
                f"1, not {self.jitter!r}"
            )
        if self.on_exhausted not in ON_EXHAUSTED:
            raise ConfigurationError(
                f"DeadLetterPolicy on_exhausted must be one of {list(ON_EXHAUSTED)}, not "
                f"{self.on_exhausted!r}"
            )

    @classmethod
    def from_retries(cls, retries: int, retry_backoff: float) -> DeadLetterPolicy:
        """The policy of the former ``retries``/``retry_backoff`` settings (parks, no jitter)."""
        return cls(max_attempts=max(1, retries) + 1, backoff=retry_backoff, jitter=0.0)

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1: the first retry)."""
        nominal = min(self.backoff_cap, self.backoff * 2 ** max(0, retry - 1))
        if not self.jitter:
            return nominal
        draw = (rng or random).random()
        return nominal * (1 - self.jitter * draw)

    def delays(self, rng: random.Random | None = None) -> list[float]:
        """The waits between the ``max_attempts`` tries, in order (one fewer than the tries)."""
        return [self.delay(n, rng) for n in range(1, self.max_attempts)]
