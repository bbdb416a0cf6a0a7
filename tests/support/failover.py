"""Helpers of the cluster failover tests: crash a chosen broker, time the recovery.

A :class:`Progress` thread samples positions (a relay's last published
notification id, a follower's tracking id per partition) every few
milliseconds; the recovery time of a fault is the time from the crash until
the position it stops (one partition's, or all) first moves past where it
stood at the crash, so it measures what a user sees: how long publishing, or
consuming, stops.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from esbridge.testing.kafka_cluster import LocalKafkaCluster

SAMPLE_SECONDS = 0.02


class Progress(threading.Thread):
    """Samples ``positions()`` until stopped: (monotonic time, positions) pairs.

    ``watch``: which position :meth:`now` and :meth:`wait_past` follow (an
    index of ``positions()``; ``None``: their sum, i.e. any progress).
    """

    def __init__(self, positions: Callable[[], Sequence[int]]) -> None:
        super().__init__(daemon=True)
        self.positions = positions
        self.watch: int | None = None
        self.samples: list[tuple[float, Sequence[int]]] = []
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # Postgres busy: the next sample will do
                self.samples.append((time.monotonic(), self.positions()))
            self._stop.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        self.join(5)

    def value(self, positions: Sequence[int]) -> int:
        return sum(positions) if self.watch is None else positions[self.watch]

    def now(self) -> int:
        return self.value(self.positions())

    def wait_past(self, value: int, timeout: float, what: str) -> float:
        """Wait until the watched position passes ``value``; when it first did (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.samples and self.value(self.samples[-1][1]) > value:
                return next(t for t, p in self.samples if self.value(p) > value)
            time.sleep(SAMPLE_SECONDS)
        raise AssertionError(f"{what}: no progress past {value} within {timeout:.0f} s")


@dataclass
class Fault:
    """One crash of a broker and how long the pipeline took to go on."""

    kind: str  # what the broker was: "leader of partition 1", "transaction coordinator", ...
    node_id: int
    how: str  # "kill -9" or "clean stop"
    watch: int | None = None  # the position it stops (Progress.watch); None: any
    roles: str = ""  # everything the broker led when it was crashed
    recovery: float = 0.0  # seconds from the crash until the position moved on
    restart: float = 0.0  # seconds until the broker ran again (JVM start, registered)
    in_sync: float = 0.0  # seconds more until every replica was in sync again

    def line(self) -> str:
        return (
            f"{self.how:10} broker {self.node_id} ({self.kind}; it led {self.roles}): "
            f"progress resumed after "
            f"{self.recovery:5.2f} s; broker back after {self.restart:4.1f} s, "
            f"replicas in sync {self.in_sync:4.1f} s later"
        )


def roles(
    cluster: LocalKafkaCluster,
    node_id: int,
    topic: str,
    partitions: int,
    *,
    group: str | None = None,
    transactional_id: str | None = None,
) -> str:
    """What ``node_id`` leads now: partitions of ``topic``, the group's or the transaction's
    coordinator (a broker often leads several, and its crash stops all of them)."""
    led = [f"partition {p}" for p in range(partitions) if cluster.leader(topic, p) == node_id]
    if group is not None and cluster.group_coordinator(group) == node_id:
        led.append("the group coordinator")
    if transactional_id is not None and cluster.coordinator(transactional_id) == node_id:
        led.append("the transaction coordinator")
    return ", ".join(led) or "nothing of this test"


def crash_and_restart(
    cluster: LocalKafkaCluster,
    fault: Fault,
    progress: Progress,
    *,
    timeout: float = 60.0,
    down: float = 0.0,
    while_down: Callable[[], object] | None = None,
    since: Callable[[], int] | None = None,
) -> Fault:
    """Crash ``fault.node_id`` while ``progress`` moves, start it again, time both.

    The broker is started again ``down`` seconds after the crash (0: at once,
    as a supervisor would), after ``while_down()`` (another fault while the
    broker is gone: a worker killed, say) if given; then this waits until the
    position moved past where it stood at the crash (or past ``since()``, read
    at the crash: say, the head of the upstream log, so that only an event
    written after the crash counts) and until every replica is in sync again,
    so the next fault meets a whole cluster.
    """
    progress.watch = fault.watch
    before = progress.now() if since is None else since()
    t0 = time.monotonic()
    cluster.stop_broker(fault.node_id, kill=fault.how == "kill -9")
    if down:
        time.sleep(down)
    if while_down is not None:
        while_down()
    cluster.start_broker(fault.node_id)
    fault.restart = time.monotonic() - t0
    fault.recovery = progress.wait_past(before, timeout, fault.line()) - t0
    fault.in_sync = cluster.wait_in_sync(timeout)
    return fault
