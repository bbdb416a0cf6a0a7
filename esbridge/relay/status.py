"""How far a relay got: the counters behind :meth:`Relay.status` and its gauges.

Both publishing modes (:mod:`.payloads`, :mod:`.prompts`) move the same
position, so the counters and the metrics that mirror them are updated in
one place. The publishing thread writes them; ``status()`` reads them from
any thread (single attribute reads, no lock needed).
"""

from __future__ import annotations

from dataclasses import dataclass

from esbridge.relay.metrics import RelayMetrics
from esbridge.runtime.catch_up import CatchUpLog


@dataclass(frozen=True)
class RelayStatus:
    """A snapshot of a relay's progress (also exported as Prometheus metrics)."""

    app: str
    topic: str
    mode: str
    position: int  # last notification id published (payloads) or prompted (prompts)
    upstream_max: int  # largest notification id seen in the log
    lag: int  # upstream_max - position
    published: int  # messages committed since this relay object was made
    running: bool
    error: str | None
    standby: bool = False  # waiting for the lease: another relay with this id publishes


class Progress:
    """The relay's position, the log's largest id seen, and messages published.

    ``catch_up`` (if given) reports the relay's way through a backlog.
    """

    def __init__(self, metrics: RelayMetrics, catch_up: CatchUpLog | None = None) -> None:
        self.metrics = metrics
        self.catch_up = catch_up
        #: Last notification id published (payloads) or prompted (prompts).
        self.position = 0
        #: Largest notification id seen in the log.
        self.upstream_max = 0
        #: Messages committed since the relay object was made.
        self.published = 0

    def saw(self, nid: int) -> None:
        """The log holds notifications up to ``nid`` at least."""
        self.upstream_max = max(self.upstream_max, nid)

    def resumed(self, nid: int) -> None:
        """The committed position read back when a producer (re)starts."""
        self.position = nid
        self.metrics.position.set(nid)
        self._report()

    def committed(self, count: int, nid: int) -> None:
        """A transaction of ``count`` notifications up to ``nid`` was committed."""
        self.published += count
        self.position = nid
        metrics = self.metrics
        metrics.published.inc(count)
        metrics.batches.inc()
        metrics.batch_size.observe(count)
        metrics.position.set(nid)
        self.update_lag()
        self._report()

    def prompted(self, nid: int) -> None:
        """A prompt saying the log has notifications up to ``nid`` was sent."""
        self.position = nid
        self.published += 1
        self.metrics.prompts.inc()
        self.metrics.position.set(nid)
        self.update_lag()
        self._report()

    def _report(self) -> None:
        if self.catch_up is not None:
            self.catch_up.update(self.position, max(0, self.upstream_max - self.position))

    def update_lag(self) -> None:
        upstream = max(self.upstream_max, self.position)
        self.metrics.upstream_max.set(upstream)
        self.metrics.lag.set(upstream - self.position)
