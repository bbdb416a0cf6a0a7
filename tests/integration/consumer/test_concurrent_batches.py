"""Two threads applying batches to ONE follower at the same time (one consumer per leader).

The follower ``Tally`` counts pings per counter. Two sinks of one ``Tally``
(as the runner makes for a follower of two leaders) apply batches from two
upstream names concurrently, hammering the same counters: every counter must
end with exactly one increment per ping (its version proves no increment was
recorded twice or lost), whatever conflicts forced batches to run again. The
conflict paths are also forced deterministically (a barrier makes both
threads read the same version before either writes): in one process the
commit log catches it; between two processes (two ``Tally`` objects) the
recorder's unique ``(originator_id, version)`` constraint does. Real Postgres.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Count
from collections.abc import Callable, Sequence
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

import pytest
from eventsourcing.application import AggregateNotFoundError, ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError, Tracking
from eventsourcing.system import ProcessApplication

from esbridge.eventlog.notification_log import read_pages
from esbridge.processing.application_sink import ProcessApplicationSink
from esbridge.processing.concurrent_batches import HINT_WINDOW, CommitLog, LearnedHints
from esbridge.processing.steps import Step

CACHED = {"AGGREGATE_CACHE_MAXSIZE": "1000", "AGGREGATE_CACHE_FASTFORWARD": "n"}
#: The library's default cache: every read of a cached aggregate fast-forwards it.
FASTFORWARD = {"AGGREGATE_CACHE_MAXSIZE": "1000"}


class Ping(Aggregate):
    @event("Created")
    def __init__(self, counter: str) -> None:
        self.counter = counter


class Bump(Aggregate):
    @event("Created")
    def __init__(self, counter_id: UUID) -> None:
        self.counter_id = counter_id


class Tally(Aggregate):
    @staticmethod
    def create_id(name: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/tally/{name}")

    @event("Started")
    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    @event("Incremented")
    def increment(self) -> None:
        self.count += 1


class Tallies(ProcessApplication[UUID]):
    #: Called by the policy after it read the counter, before it changes it (test hook).
    gate: Callable[[str], None] | None = None

    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """Other events change nothing."""

    @policy.register(Ping.Created)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        try:
            tally: Tally = self.repository.get(Tally.create_id(domain_event.counter))
        except AggregateNotFoundError:
            tally = Tally(domain_event.counter)
        if self.gate is not None:
            self.gate(domain_event.counter)
        tally.increment()
        processing_event.collect_events(tally)

    @policy.register(Bump.Created)
    def _(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        tally: Tally = self.repository.get(domain_event.counter_id)
        tally.increment()
        processing_event.collect_events(tally)


def pings(upstream: str, first_nid: int, counters: Sequence[str]) -> list[Step]:
    steps = []
    for offset, name in enumerate(counters):
        (sent,) = Ping(name).collect_events()
        steps.append(Step(Tracking(upstream, first_nid + offset), str(sent.originator_id), sent))
    return steps


def feed(sink: ProcessApplicationSink, upstream: str, batches: Sequence[Sequence[str]]) -> None:
    """Apply ``batches`` (counter names) in order, as a consumer of ``upstream`` would."""
    position = 0
    for names in batches:
        steps = pings(upstream, position + 1, names)
        sink.apply(steps, {upstream: position})
        position += len(names)


def run_threads(*targets: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as e:
                errors.append(e)

        return run

    threads = [threading.Thread(target=guarded(t)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a batch thread hung"
    if errors:
        raise errors[0]


def assert_counts(app: Tallies, expected: Count[str]) -> None:
    """Read from the database (not through ``app``'s cache, which other writers may outdate)."""
    reader = Tallies(env={k: v for k, v in app.env.items() if k not in CACHED})  # no cache
    try:
        for name, count in expected.items():
            tally: Tally = reader.repository.get(Tally.create_id(name))
            assert tally.count == count, name
            assert tally.version == count + 1, name  # Started + one Incremented per ping
        recorded = sum(len(page) for page in read_pages(reader.recorder, 0))
        assert recorded == len(expected) + sum(expected.values())
    finally:
        reader.close()


@pytest.fixture(params=["cache", "no-cache", "fastforward"])
def env(request: Any, postgres_db: Any) -> dict[str, str]:
    settings = {"cache": CACHED, "fastforward": FASTFORWARD}.get(request.param, {})
    return {**postgres_db.env, **settings}


def test_two_consumers_of_one_follower_hammer_the_same_aggregates(env: dict[str, str]) -> None:
    app = Tallies(env=env)
    try:
        left, right = ProcessApplicationSink(app), ProcessApplicationSink(app)
        names = ["a", "b", "c"]
        left_batches = [[names[(i + j) % 3] for j in range(15)] for i in range(25)]
        right_batches = [[names[(i * j) % 3] for j in range(10)] for i in range(30)]
        run_threads(
            lambda: feed(left, "Left", left_batches),
            lambda: feed(right, "Right", right_batches),
        )
        expected = Count(n for b in left_batches + right_batches for n in b)
        assert_counts(app, expected)
        assert app.recorder.max_tracking_id("Left") == 25 * 15
        assert app.recorder.max_tracking_id("Right") == 30 * 10
    finally:
        app.close()


def barrier_gate(parties: int) -> tuple[Callable[[str], None], threading.Barrier]:
    """A gate where the first call of each thread waits for the others (then never again)."""
    barrier = threading.Barrier(parties, timeout=20)
    passed = threading.local()

    def gate(name: str) -> None:
        if not getattr(passed, "done", False):
            passed.done = True
            barrier.wait()

    return gate, barrier


def test_conflict_in_one_process_runs_the_batch_again(env: dict[str, str]) -> None:
    """Both batches read the tally at the same version: the second to write runs again."""
    app = Tallies(env=env)
    try:
        setup, left, right = (ProcessApplicationSink(app) for _ in range(3))
        feed(setup, "Setup", [["x"]])
        app.gate, _ = barrier_gate(2)
        run_threads(lambda: feed(left, "Left", [["x"]]), lambda: feed(right, "Right", [["x"]]))
        app.gate = None
        assert left.reruns + right.reruns == 1
        assert_counts(app, Count({"x": 3}))
    finally:
        app.close()


def test_conflict_between_processes_is_caught_by_the_version_constraint(
    env: dict[str, str],
) -> None:
    """Two follower objects (as two worker processes) write the same version: one runs again."""
    first, second = Tallies(env=env), Tallies(env=env)
    try:
        feed(ProcessApplicationSink(first), "Setup", [["x", "y"]])
        second.repository.get(Tally.create_id("x"))  # cached (when caching) at the old version
        gate, _ = barrier_gate(2)
        first.gate = second.gate = gate
        left, right = ProcessApplicationSink(first), ProcessApplicationSink(second)
        run_threads(lambda: feed(left, "Left", [["x", "y"]]), lambda: feed(right, "Right", [["x"]]))
        assert left.reruns + right.reruns == 1
        assert_counts(first, Count({"x": 3, "y": 2}))
        # The loser dropped its stale cached copy: its next batch builds on the new version.
        first.gate = second.gate = None
        loser = right if right.reruns else left
        feed(loser, "More", [["x"]])
        assert_counts(first, Count({"x": 4, "y": 2}))
    finally:
        first.close()
        second.close()


def test_a_moved_tracking_position_is_raised_not_retried(env: dict[str, str]) -> None:
    """Another consumer recorded first (a zombie's batch): refused at once, nothing recorded."""
    app = Tallies(env=env)
    try:
        sink = ProcessApplicationSink(app)
        sink.apply(pings("Left", 1, ["a", "a"]), {"Left": 0})
        with pytest.raises(IntegrityError):
            sink.apply(pings("Left", 3, ["a"]), {"Left": 0})  # expects 0, the table has 2
        assert sink.reruns == 0
        assert_counts(app, Count({"a": 2}))
        assert app.recorder.max_tracking_id("Left") == 2
    finally:
        app.close()


def test_other_threads_never_see_a_batch_before_it_commits(env: dict[str, str]) -> None:
    app = Tallies(env=env)
    inside, release = threading.Event(), threading.Event()
    seen: list[Any] = []

    def gate(name: str) -> None:
        if name == "late":
            inside.set()
            release.wait(20)

    try:
        sink = ProcessApplicationSink(app)
        app.gate = gate
        batch = threading.Thread(target=feed, args=(sink, "Left", [["early", "late"]]))
        batch.start()
        assert inside.wait(20)
        try:
            app.repository.get(Tally.create_id("early"))
        except AggregateNotFoundError as e:
            seen.append(e)
        release.set()
        batch.join(20)
        assert len(seen) == 1  # not committed yet: this thread sees the real repository
        app.gate = None
        assert_counts(app, Count({"early": 1, "late": 1}))
    finally:
        release.set()
        app.close()


def test_learned_hints_prefetch_and_never_change_the_result(env: dict[str, str]) -> None:
    app = Tallies(env=env)
    try:
        sink = ProcessApplicationSink(app)
        feed(sink, "Setup", [["p", "q", "r"]])
        ids = [Tally.create_id(n) for n in "pqr"]
        sink.apply(bumps("Bumps", 1, ids), {"Bumps": 0})
        (probe,) = Bump(ids[0]).collect_events()
        assert sink.batches.hints.ids(probe) == [ids[0]]  # learned: Bump.Created.counter_id
        if app.repository.cache is not None:
            app.repository.cache.get(ids[1], evict=True)  # not cached: the prefetch reads it
        sink.apply(bumps("Bumps", 4, ids * 3), {"Bumps": 3})
        assert_counts(app, Count({"p": 5, "q": 5, "r": 5}))
    finally:
        app.close()


def test_prefetch_fast_forwards_cached_aggregates_in_one_query(postgres_db: Any) -> None:
    """Two processes (two ``Tallies``) write the same tallies, with the library's
    fast-forwarding cache: a batch's prefetch brings every cached tally up to date in
    one query, so its policies see the other process's increments without one
    fast-forward SELECT per tally, and the batch records without a collision."""
    env = {**postgres_db.env, **FASTFORWARD}
    here, there = Tallies(env=env), Tallies(env=env)
    names = [f"t{n}" for n in range(20)]
    ids = [Tally.create_id(n) for n in names]
    try:
        sink = ProcessApplicationSink(here, prefetch=lambda e: [e.counter_id])
        feed(ProcessApplicationSink(there), "Setup", [names])
        sink.apply(bumps("Bumps", 1, ids), {"Bumps": 0})  # caches the 20 tallies here
        feed(ProcessApplicationSink(there), "More", [names, names[:5]])  # there: +1 or +2 each
        fast_forwards = note_event_store_reads(here)
        sink.apply(bumps("Bumps", 21, ids * 2), {"Bumps": 20})
        assert fast_forwards == []  # the prefetch brought them all up to date
        assert sink.reruns == 0  # no stale read, so no collision
        expected = Count({n: 1 + 1 + 2 + 1 for n in names})  # Setup, first bump, 2 bumps, More
        expected.update({n: 1 for n in names[:5]})  # More's second batch
        assert_counts(here, expected)
    finally:
        here.close()
        there.close()


def test_prefetch_reads_uncached_aggregates_once_with_a_fast_forwarding_cache(
    postgres_db: Any,
) -> None:
    """With the library's fast-forwarding cache (its default), tallies that another
    process wrote and this one has not cached yet are read by the prefetch's one query,
    and the batch's policies then get them without a fast-forward SELECT each (before:
    one per tally, on every first read and after every collision's eviction)."""
    env = {**postgres_db.env, **FASTFORWARD}
    here, there = Tallies(env=env), Tallies(env=env)
    names = [f"u{n}" for n in range(20)]
    ids = [Tally.create_id(n) for n in names]
    try:
        feed(ProcessApplicationSink(there), "Setup", [names])  # written there, not cached here
        sink = ProcessApplicationSink(here, prefetch=lambda e: [e.counter_id])
        reads = note_event_store_reads(here)
        sink.apply(bumps("Bumps", 1, ids * 2), {"Bumps": 0})
        assert reads == []  # the prefetch read each tally; no get read it again
        assert_counts(here, Count({n: 1 + 2 for n in names}))
    finally:
        here.close()
        there.close()


def note_event_store_reads(app: Tallies) -> list[Any]:
    """The ids the repository reads from the event store from now on (a fast-forward or
    a full read per ``get``; the prefetch's own query does not go through it)."""
    reads: list[Any] = []
    store_get = app.repository.event_store.get

    def noting_get(originator_id: Any, **kwargs: Any) -> Any:
        reads.append(originator_id)
        return store_get(originator_id, **kwargs)

    app.repository.event_store.get = noting_get  # type: ignore[method-assign]
    return reads


def bumps(upstream: str, first: int, targets: Sequence[UUID]) -> list[Step]:
    steps = []
    for offset, target in enumerate(targets):
        (sent,) = Bump(target).collect_events()
        steps.append(Step(Tracking(upstream, first + offset), str(target), sent))
    return steps


def test_commit_log_reports_only_newer_versions_and_stays_small() -> None:
    log = CommitLog()
    a, b = log.begin(), log.begin()
    log.committed([_Event("x", 3)])
    assert log.conflict(a, {"x": 2}) == "x"
    assert log.conflict(a, {"x": 3}) is None  # read after that commit: fresh
    assert log.conflict(b, {"y": 0}) is None
    log.end(a)
    c = log.begin()
    assert log.conflict(c, {"x": 2}) is None  # committed before c started
    log.end(b)
    log.end(c)
    assert len(log) == 0


def test_learned_hints_ignore_unrelated_and_unhashable_values() -> None:
    hints = LearnedHints()
    event = _Event("x", 1)
    hints.learn(event, ["x", ["unhashable"]])
    assert hints.ids(_Event("z", 7)) == ["z"]
    hints.forget([event])
    assert hints.ids(_Event("z", 7)) == []


def test_a_hint_the_policy_mostly_ignores_is_switched_off_then_on_again() -> None:
    hints = LearnedHints()
    hints.learn(_Event("a", 1), ["a"])
    for n in range(HINT_WINDOW):  # the policy reads only one event in ten
        hints.learn(_Event(f"id{n}", 1), [f"id{n}"] if n % 10 == 0 else [])
    assert hints.ids(_Event("z", 7)) == []
    for n in range(HINT_WINDOW * 2):  # now it reads every one
        hints.learn(_Event(f"id{n}", 1), [f"id{n}"])
    assert hints.ids(_Event("z", 7)) == ["z"]


class _Event:
    def __init__(self, originator_id: Any, originator_version: int) -> None:
        self.originator_id = originator_id
        self.originator_version = originator_version
        self.tags = ["not", "an", "id"]


def advisory_locks_held(env: dict[str, str], key: int) -> int:
    """Sessions holding the advisory lock ``key`` now (read from another connection)."""
    probe = Tallies(env={k: v for k, v in env.items() if k not in CACHED})
    try:
        with probe.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            row = conn.execute(
                "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid = ((%(k)s::bigint >> 32) & 4294967295)::oid "
                "AND objid = (%(k)s::bigint & 4294967295)::oid",
                {"k": key},
            ).fetchone()
            assert row is not None
            return int(row["n"])
    finally:
        probe.close()


def test_a_collision_between_processes_makes_the_loser_take_turns(env: dict[str, str]) -> None:
    """The loser of a collision with another process runs its re-run and its next batches
    holding the follower's advisory lock (other members wait for it); the winner, which
    did not collide, does not; once ``quiet`` passes, the loser is optimistic again."""
    first, second = Tallies(env=env), Tallies(env=env)
    try:
        feed(ProcessApplicationSink(first), "Setup", [["x", "y"]])
        second.repository.get(Tally.create_id("x"))  # cached (when caching) at the old version
        gate, _ = barrier_gate(2)
        first.gate = second.gate = gate
        left, right = ProcessApplicationSink(first), ProcessApplicationSink(second)
        run_threads(lambda: feed(left, "Left", [["x", "y"]]), lambda: feed(right, "Right", [["x"]]))
        loser, winner = (right, left) if right.reruns else (left, right)
        assert (loser.reruns, winner.reruns) == (1, 0)
        assert (loser.turns.turns, winner.turns.turns) == (1, 0)  # the re-run took its turn
        assert loser.turns.contended and not winner.turns.contended
        held: list[tuple[str, int]] = []
        key = loser.turns.key

        def note(name: str) -> None:
            held.append((name, advisory_locks_held(env, key)))

        first.gate = second.gate = note
        feed(loser, "LoserMore", [["x"]])  # contended: holds the lock while it runs the policy
        feed(winner, "WinnerMore", [["y"]])  # never collided: optimistic, no lock
        assert held == [("x", 1), ("y", 0)]
        assert advisory_locks_held(env, key) == 0  # released after the batch
        assert loser.turns.turns == 2
        loser.turns.quiet = 0.0
        loser.turns.collided()  # quiet passed: optimistic again
        feed(loser, "LoserLater", [["x"]])
        assert held[-1] == ("x", 0) and loser.turns.turns == 2
        first.gate = second.gate = None
        assert_counts(first, Count({"x": 5, "y": 3}))
    finally:
        first.close()
        second.close()


def test_members_taking_turns_never_run_batches_at_the_same_time(env: dict[str, str]) -> None:
    """Two follower objects (two members) taking turns on the same tallies: their policies
    never run at the same time (a sleep in the policy makes an overlap near-certain
    otherwise), every ping counted once, and no batch collides unless a stale cache
    (``AGGREGATE_CACHE_FASTFORWARD=n``, wrong when processes share aggregates) made it."""
    first, second = Tallies(env=env), Tallies(env=env)
    active, overlaps = [0], [0]
    guard = threading.Lock()

    def gate(name: str) -> None:
        with guard:
            active[0] += 1
            overlaps[0] += active[0] > 1
        time.sleep(0.02)
        with guard:
            active[0] -= 1

    try:
        feed(ProcessApplicationSink(first), "Setup", [["a", "b"]])
        left, right = ProcessApplicationSink(first), ProcessApplicationSink(second)
        for sink in (left, right):
            sink.turns.collided()  # as after a collision: take turns
        first.gate = second.gate = gate
        batches = [["a", "b", "a"]] * 4
        run_threads(lambda: feed(left, "Left", batches), lambda: feed(right, "Right", batches))
        first.gate = second.gate = None
        assert overlaps == [0]
        assert left.turns.turns + right.turns.turns == 8 + left.reruns + right.reruns
        if env.get("AGGREGATE_CACHE_FASTFORWARD") != "n":
            assert left.reruns + right.reruns == 0
        assert_counts(first, Count({"a": 1 + 16, "b": 1 + 8}))
    finally:
        first.close()
        second.close()


def test_a_member_stuck_in_its_turn_does_not_stop_the_others(env: dict[str, str]) -> None:
    """Another session holds the turn and does not let go (a frozen member): a contended
    sink waits ``wait`` seconds for it, then records its batch without a turn, exactly."""
    app, stuck = Tallies(env=env), Tallies(env=env)
    try:
        sink = ProcessApplicationSink(app)
        feed(sink, "Setup", [["s"]])
        sink.turns.collided()
        sink.turns.wait = 0.3
        with stuck.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            conn.execute("SELECT pg_advisory_lock(%s)", (sink.turns.key,))
            try:
                assert advisory_locks_held(env, sink.turns.key) == 1
                started = time.monotonic()
                sink.apply(pings("Late", 1, ["s", "s"]), {"Late": 0})
                waited = time.monotonic() - started
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (sink.turns.key,))
        assert (sink.turns.missed, sink.turns.turns) == (1, 0)
        assert 0.3 <= waited < 5
        assert_counts(app, Count({"s": 3}))
        feed(sink, "After", [["s"]])  # the lock is free again: the next batch takes its turn
        assert (sink.turns.missed, sink.turns.turns) == (1, 1)
        assert_counts(app, Count({"s": 4}))
    finally:
        app.close()
        stuck.close()
