"""The seed's replication assertions.

``check_replication`` creates things in the original before the runner
starts (the seed's "check aggregates not in replica" before the first
pull), then starts the runner, which catches up. ``check_resume`` is the
seed's "terminate the replicator, create another aggregate, pull after
restart": it needs durable storage (Postgres), because a restarted runner
must find the replica's position where the first one left it.
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from eventsourcing.system import Runner

from examples.replication.application import Original, Replica, Thing


def created_before_start(original: Original, names: list[str]) -> list[UUID]:
    return [original.create_thing(name) for name in names]


def check_replication(
    runner: Runner, before: list[UUID], settle: Callable[[], None] = lambda: None
) -> list[UUID]:
    """``before``: things the original created before the runner started."""
    original = runner.get(Original)
    replica = runner.get(Replica)
    settle()

    # The things created before the start are now in the replica, identical.
    for thing_id in before:
        copy: Thing = replica.repository.get(thing_id)
        thing: Thing = original.repository.get(thing_id)
        assert copy.created_on == thing.created_on
        assert copy.version == thing.version
        assert copy.name == thing.name

    # Create another thing, and change one: the replica follows.
    thing4 = original.create_thing("four")
    original.rename_thing(before[0], "one, renamed")
    settle()
    assert thing4 in replica.repository
    copy1: Thing = replica.repository.get(before[0])
    assert copy1.name == "one, renamed"
    assert copy1.version == 2
    return [*before, thing4]


def check_resumed(runner: Runner, all_ids: list[UUID], settle: Callable[[], None]) -> None:
    """After a restart, things created while the replicator was down are replicated."""
    settle()
    replica = runner.get(Replica)
    original = runner.get(Original)
    for thing_id in all_ids:
        assert thing_id in replica.repository
        assert replica.repository.get(thing_id).version == original.repository.get(thing_id).version
