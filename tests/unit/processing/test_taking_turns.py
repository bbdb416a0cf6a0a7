"""When a sink takes turns (pure logic: the lock itself is tested against Postgres in
tests/integration/consumer/test_concurrent_batches.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from esbridge.processing.taking_turns import TakingTurns


class Datastore:
    """Counts the connections a turn asks for (none is expected here)."""

    def __init__(self, max_size: int) -> None:
        self.pool = SimpleNamespace(max_size=max_size)
        self.asked = 0

    def get_connection(self) -> Any:
        self.asked += 1
        raise AssertionError("no connection expected")


def test_no_turn_without_a_recent_collision() -> None:
    datastore = Datastore(max_size=5)
    turns = TakingTurns(datastore, "Follower", clock=lambda: 100.0)
    with turns.turn():
        pass
    assert datastore.asked == 0 and turns.turns == 0


def test_a_pool_of_one_connection_never_takes_turns() -> None:
    datastore = Datastore(max_size=1)
    turns = TakingTurns(datastore, "Follower", clock=lambda: 100.0)
    turns.collided()
    assert turns.contended
    assert not turns.possible
    with turns.turn():  # would wait for the batch's own connection otherwise
        pass
    assert datastore.asked == 0


def test_turns_last_quiet_seconds_after_the_last_collision() -> None:
    now = [100.0]
    turns = TakingTurns(Datastore(max_size=5), "Follower", quiet=5.0, clock=lambda: now[0])
    turns.collided()
    now[0] = 104.9
    assert turns.contended
    now[0] = 105.1
    assert not turns.contended
