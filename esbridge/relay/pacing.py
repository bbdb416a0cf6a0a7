"""How long a payload relay waits after a transaction: chosen from the rate events arrive at.

Every Kafka transaction costs the same whatever it holds: a flush, a round trip
to the transaction coordinator, commit markers in each partition, and, in each
follower, one Postgres commit for the batch it becomes. When events come
slowly that cost is small and the relay should publish each at once (a few
milliseconds from commit to Kafka). When they come fast, one transaction per
handful of events spends the machine on commits: waiting ``linger`` after each
transaction lets the events written meanwhile share the next one.

The deciding figure is the arrival rate, not the size of the last
transaction: a transaction's size depends on the wait before it, so sizing the
wait from it feeds back on itself and never grows at moderate rates (measured:
the orders system lost a third of its throughput that way). :class:`Pacing`
estimates the rate from what the relay published, counted with weights that
halve every ``HALF_LIFE`` seconds (so steps that published nothing, and the
length of the steps, do not bias it), and lingers while it is at least ``linger_rate``,
stopping when it falls below half of that (so that the longer steps of a
lingering relay do not make it flip back and forth).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from esbridge.relay.tuning import RelayTuning

#: Seconds after which a published event counts half in the rate.
HALF_LIFE = 0.35
_TAU = HALF_LIFE / math.log(2)  # the decay's time constant: weighted count = rate * _TAU


class Pacing:
    """The wait after each transaction of a payload relay (see the module's docs)."""

    def __init__(self, tuning: RelayTuning, clock: Callable[[], float] = time.monotonic) -> None:
        self.tuning = tuning
        self._clock = clock
        self._last = clock()
        self._weighted = 0.0  # events published, each weighted by exp(-age / _TAU)
        #: True while the rate is high enough to linger after each transaction.
        self.lingering = False

    @property
    def rate(self) -> float:
        """Events a second published lately (as of the last step)."""
        return self._weighted / _TAU

    def after(self, count: int) -> float:
        """Seconds to wait after a step that published ``count`` notifications."""
        now = self._clock()
        self._weighted = self._weighted * math.exp((self._last - now) / _TAU) + count
        self._last = now
        tuning = self.tuning
        threshold = tuning.linger_rate
        self.lingering = self.rate >= (threshold / 2 if self.lingering else threshold)
        if count <= 0 or count >= tuning.batch_size or not self.lingering:
            return 0.0  # idle (waits for events), a backlog, or a quiet log
        return tuning.linger
