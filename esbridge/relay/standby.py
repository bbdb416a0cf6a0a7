"""Standby relays: a relay's own turn at its lease, and when it steps aside.

Relays started with one relay id (``standby=True``, the default) share a lease
(:class:`~esbridge.relay.lease.RelayLease`, a Postgres advisory lock): its
holder publishes, the others wait. :class:`Tenure` is what one relay knows of
its turn: whether it holds the lease or waits for it, how long Kafka has been
failing it, and what being fenced means. It decides; the relay acts on its
producer — closing it before the lease goes (so a successor never races it),
restarting it after a fencing that did not cost it the lease.

Why a holder steps aside: a relay cut off from Kafka (its host's network, not
the brokers) would keep the lease for ever while a standby that can reach Kafka
waits. After ``yield_after`` seconds of failures it gives the lease up; if no
standby was waiting, it takes the lease back a moment later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Gauge

from esbridge.errors import RelayFencedError, RelayStandbyError
from esbridge.relay.lease import RelayLease

log = logging.getLogger("esbridge.relay_standby")

#: Fenced twice within this many seconds while holding the lease: another relay
#: with this relay id publishes without taking the lease.
REFENCE_WINDOW = 60.0


class Tenure:
    """One relay's turn at the lease of ``relay_id`` (no lease until :meth:`attach`).

    Without a lease (``standby=False``, or a log that is not in Postgres) the
    relay always publishes: every question here answers "go on", and a
    fencing is raised (nothing else can have taken over).
    ``active`` is the relay's gauge: 1 while it publishes (holding its lease, or
    with no lease to take), 0 while it stands by or after it stopped.
    """

    def __init__(
        self,
        relay_id: str,
        app: str,
        active: Gauge,
        *,
        check: float,
        expiry: float | None,
        yield_after: float | None,
    ) -> None:
        self.relay_id = relay_id
        self.app = app
        self.lease: RelayLease | None = None
        #: True while waiting for the lease (another relay with this id publishes).
        self.standing_by = False
        self._active = active
        self._check = check
        self._expiry = expiry
        self._yield_after = yield_after
        self._fenced_at = -3600.0  # monotonic time of the last fencing while holding the lease
        self._kafka_down_since: float | None = None  # first of the current Kafka failures

    def attach(self, connection_kwargs: dict[str, Any]) -> None:
        """Take turns through a lease on the server these psycopg settings reach."""
        if self.lease is None:
            self.lease = RelayLease(self.relay_id, connection_kwargs, self._check, self._expiry)

    @property
    def waited(self) -> bool:
        """True when this relay waited for the lease: another relay published before it."""
        return self.lease is not None and self.lease.waited

    def take(self, stopped: Callable[[], bool], timeout: float | None) -> bool:
        """Hold the lease, waiting while another relay holds it; False if stopped meanwhile.

        Raises :class:`RelayStandbyError` when ``timeout`` passes first.
        """
        lease = self.lease
        if lease is None or lease.check():
            self._active.set(1)  # it publishes: with its lease, or with none to take
            return True
        self.standing_by = True
        self._active.set(0)
        try:
            held = lease.acquire(stopped, timeout)
        finally:
            self.standing_by = False
        if held:
            self._active.set(1)
            self._fenced_at = -3600.0  # a new tenure: fencings of the last one do not count
            return True
        if stopped():
            return False
        raise RelayStandbyError(
            f"relay {self.relay_id!r} did not get its lease within {timeout:.0f} s: "
            f"{lease.holder() or 'another relay'} publishes application {self.app!r} to "
            "Kafka with this relay id. Stop that relay or wait for it; or give this relay "
            "another relay id (it then publishes the log again, to its own position)"
        )

    def held(self) -> bool:
        """False once a lease this relay took is lost (expired, Postgres gone).

        A round trip to Postgres at most every ``check`` seconds.
        """
        lease = self.lease
        if lease is None or lease.check():
            return True
        self._active.set(0)
        return False

    def keep_alive(self) -> None:
        """Keep a held lease's session busy while the relay waits, so it does not expire."""
        lease = self.lease
        if lease is not None and lease.held:
            lease.check()

    def kafka_failed(self) -> None:
        if self._kafka_down_since is None:
            self._kafka_down_since = time.monotonic()

    def kafka_reached(self) -> None:
        self._kafka_down_since = None

    def should_yield(self) -> bool:
        """True when the holder has failed to reach Kafka for ``yield_after`` seconds.

        The relay then closes its producer and calls :meth:`give_up`.
        """
        lease, since, limit = self.lease, self._kafka_down_since, self._yield_after
        if lease is None or not lease.held or since is None or limit is None:
            return False
        failing = time.monotonic() - since
        if failing < limit:
            return False
        log.warning(
            "relay %s has not reached Kafka for %.0f s: it gives its lease up so that a "
            "standby relay that can reach Kafka publishes, and stands by",
            self.relay_id,
            failing,
        )
        self._kafka_down_since = None
        return True

    def give_up(self) -> None:
        """Release the lease, keeping it attached (the relay takes it again to go on)."""
        if self.lease is not None:
            self.lease.release()
        self._active.set(0)

    def fenced(self, error: RelayFencedError) -> bool:
        """A newer producer with this relay's ``transactional.id`` fenced it: restart it?

        False: the lease is lost (a standby took over while this relay stalled);
        it goes on to stand by. True: the lease is still held, usually because
        a relay whose lease expired while it hung fenced this one once, waking
        up, before it saw its lease gone; the relay restarts its producer.
        Fenced again within a minute while holding the same lease, a relay
        with this id that takes no lease (``standby=False``) publishes too,
        and the two would fence each other for ever: raise. No lease at all:
        ``error`` is raised.
        """
        lease = self.lease
        if lease is None:
            raise error
        if not lease.check(now=True):
            self._active.set(0)
            return False
        now = time.monotonic()
        if now - self._fenced_at < REFENCE_WINDOW:
            raise RelayFencedError(
                f"relay {self.relay_id!r} holds its lease but was fenced twice within a "
                "minute: another relay publishes with this relay id without taking the lease "
                "(standby=False, --no-standby). Give that relay another relay id, or let it "
                "take the lease"
            ) from error
        self._fenced_at = now
        log.warning(
            "relay %s was fenced while it holds its lease (by a relay that lost its lease "
            "while it hung, waking up); it restarts its producer and goes on",
            self.relay_id,
        )
        return True

    def release(self) -> None:
        """End the tenure: release and forget the lease (after the producer is gone)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        self._active.set(0)
