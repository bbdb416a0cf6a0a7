"""The interface between the consumer loop and whatever it feeds.

:class:`BatchSink` is the small interface the consumer loop talks to: stored
positions per tracking name, and batches applied atomically with a
compare-and-set on those positions (which keeps a zombie consumer, one that
lost its partition in a rebalance but still runs, from recording a batch
twice). :class:`~esbridge.processing.application_sink.ProcessApplicationSink`
is the default; an outbound follower and a SQL projection implement the same
two methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from esbridge.errors import EsbridgeError
from esbridge.processing.steps import Step


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
