"""Benchmark: one esbridge consumer vs the library's SingleThreadedRunner (dog school + counters).

Workload (the tutorial's, with many distinct counters so replay cost does not
dominate): dogs are registered and taught tricks drawn from ``--tricks``
distinct names; ``Counters`` counts each trick. Both sides process the SAME
upstream log on the SAME Postgres server (fsync on) in this run:

* **esbridge**: the log is published to a Kafka topic by the relay first;
  then one :class:`~esbridge.consumer.ConsumerAdapter` consumes the topic into
  a fresh ``Counters`` database, exactly once. events/s = the events of
  batches 2..N / the time from the commit of the first batch to the commit of
  the last: the processing rate, without the start-up (joining the consumer
  group, the first fetch) and the final "caught up?" check, as the library's
  side is timed without its runner's start-up. The whole call's rate, start-up
  included, is printed too;
* **library**: ``SingleThreadedRunner`` with the same system; its
  ``Counters.pull_and_process("DogSchool")`` (what the runner calls on each
  prompt: one transaction per event) over the first ``--baseline-events``
  events of the same log, into another fresh database.

Also measured: 2 consumer processes in one group on a 2-partition topic.
Runs ``--runs`` times (median). Usage: ``python bench/consume.py [--events N]``.

``--causal-only``: instead, what causal dependencies cost. The log is published
to two 2-partition topics, by a relay without and with
``causal_dependencies`` (relay time for each), then one consumer drains each,
alternating, ``--runs`` times: the median rate of each and their ratio. On
this workload (tricks of dogs on both partitions, interleaved) nearly every
message carries ``esb_deps``; one member owns both partitions, so every
dependency is met in its own batch: the cost measured is the gate's
bookkeeping, not waiting.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eventsourcing.persistence import IntegrityError
from eventsourcing.system import SingleThreadedRunner, System

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.eventlog.notification_log import read_pages
from esbridge.kafka.partitioning import partition_for_key
from esbridge.names import tracking_names
from esbridge.processing.application_sink import ProcessApplicationSink
from esbridge.relay.relay import Relay
from esbridge.system.setup import new_app
from esbridge.testing import make_kafka, make_postgres
from examples.dogschool.application import Counters, DogSchool
from examples.dogschool.domainmodel import Counter, Dog


def populate(env: dict[str, str], events: int, tricks: int) -> int:
    """Write about ``events`` dog-school events (1 registration per 4 tricks)."""
    rng = random.Random(1)
    school = DogSchool(env=env)
    written = 0
    while written < events:
        dogs = [Dog(f"dog-{written}-{i}") for i in range(200)]
        for dog in dogs:
            for _ in range(4):
                dog.add_trick(trick=f"trick-{rng.randrange(tricks)}")
        school.save(*dogs)
        written += 200 * 5
    total = school.recorder.max_notification_id() or 0
    school.close()
    return total


def fresh_env(server: Any, upstream: dict[str, str]) -> dict[str, str]:
    """A new database for Counters; DogSchool's settings point at the upstream one."""
    db = server.create_database()
    env = dict(db.env)
    env.update({f"DOGSCHOOL_{k}": v for k, v in upstream.items() if k.startswith("POSTGRES_")})
    env["COUNTERS_AGGREGATE_CACHE_MAXSIZE"] = "100000"
    # One process writes Counters: no need to fast-forward cached counters from the
    # database on every event (the library's default). Both sides get the same settings.
    env["COUNTERS_AGGREGATE_CACHE_FASTFORWARD"] = "n"
    return env


def counters_prefetch(event: Any) -> list[Any]:
    """The prefetch hint: the counter that ``Counters.policy`` gets for ``event``."""
    trick = getattr(event, "trick", None)
    return [_counter_id(trick)] if trick is not None else []


@functools.lru_cache(maxsize=100_000)
def _counter_id(trick: str) -> Any:
    return Counter.create_id(trick)


class TimedSink:
    """The consumer's default sink, noting when each batch committed (and its size).

    Only a timer around :meth:`apply`: the same sink, the same prefetch hint,
    the same transactions. A batch that runs again after a collision is
    noted once, when it finally commits. Also noted: the seconds spent in
    ``apply`` (the rest of a member's time is Kafka, decoding and waiting) and
    the collisions the sink gave up on (the consumer then re-reads its positions).
    """

    def __init__(self, follower: Any, prefetch: Any = counters_prefetch) -> None:
        self.inner = ProcessApplicationSink(follower, prefetch=prefetch)
        self.commits: list[tuple[float, int]] = []  # (perf_counter after commit, events)
        self.apply_seconds = 0.0
        self.collisions = 0

    def position(self, tracking_name: str) -> int:
        return self.inner.position(tracking_name)

    def apply(self, steps: Any, expected: Any) -> None:
        started = time.perf_counter()
        try:
            self.inner.apply(steps, expected)
        except IntegrityError:
            self.collisions += 1
            raise
        finally:
            self.apply_seconds += time.perf_counter() - started
        self.commits.append((time.perf_counter(), len(steps)))

    def __getattr__(self, name: str) -> Any:  # dead_letters, reruns, ...
        return getattr(self.inner, name)


def processing_rate(commits: list[tuple[float, int]]) -> tuple[int, float]:
    """(events, seconds) from the first commit to the last (the first batch's events excluded)."""
    commits = sorted(commits)
    return sum(n for _t, n in commits[1:]), commits[-1][0] - commits[0][0]


def esbridge_run(
    env: dict[str, str],
    topic: str,
    kafka: dict[str, Any],
    group: str,
    expected: int,
    batch_size: int = 2000,
) -> tuple[int, float, float, float]:
    """(events processed, processing rate, whole-call rate, CPU seconds) for one consumer.

    The processing rate runs from the first batch's commit to the last's; the
    whole-call rate from the first poll (joining the group) to the return of
    the last ``process_available`` (its final "caught up?" check).
    """
    counters = Counters(env=env)
    sink = TimedSink(counters)
    adapter = ConsumerAdapter(
        counters,
        upstream="DogSchool",
        topic=topic,
        kafka_config=kafka,
        group_id=group,
        batch_size=batch_size,
        sink=sink,
    )
    try:
        started = time.perf_counter()
        cpu_started = time.process_time()
        processed = drain(adapter, expected)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        adapter.close()
        counters.close()
    events, span = processing_rate(sink.commits)
    return processed, events / span, processed / seconds, cpu


def drain(adapter: ConsumerAdapter, expected: int, timeout: float = 120) -> int:
    """Process until ``expected`` events were processed or nothing more comes; the count."""
    processed = 0
    while processed < expected:
        got = adapter.process_available(timeout=timeout)
        processed += got
        if got == 0:
            break
    return processed


@dataclass
class MemberResult:
    """What one member of a group did (sent back from its process)."""

    processed: int
    commits: list[tuple[float, int]]
    reruns: int  # batches the sink ran again after a collision
    collisions: int  # collisions the sink gave up on: the consumer re-read its positions
    batches: int
    apply_seconds: float  # in the sink (policies + Postgres); the rest: Kafka, decoding, waiting
    seconds: float  # from the member's first poll to its end
    cpu: float  # CPU seconds of the member's process over those seconds


def _member(
    env: dict[str, str],
    topic: str,
    kafka: dict[str, Any],
    group: str,
    q: Any,
    batch_size: int,
    targets: dict[str, int],
    app: Any = Counters,
    prefetch: Any = counters_prefetch,
    go: Any = None,
) -> None:
    """One member of the group, polling once ``go`` is set (every member constructed);
    it stops when the group has processed every partition
    (``targets``: each partition's tracking name and last notification id), not when it
    idles: a rebalance on a busy machine can idle a member for many seconds."""
    # Both members start at once: new_app retries a construction that collided with the
    # other's in Postgres's catalog (the library's CREATE OR REPLACE FUNCTION, for one).
    follower = new_app(app, app.__name__, env)
    sink = TimedSink(follower, prefetch)
    adapter = ConsumerAdapter(
        follower, upstream="DogSchool", topic=topic, kafka_config=kafka, group_id=group,
        batch_size=batch_size, sink=sink,
    )  # fmt: skip
    q.put(("ready", None))
    if go is not None:
        go.wait(300)
    processed = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        got = adapter.process_available(timeout=1.0)
        if got:
            processed += got
        elif all(
            (follower.recorder.max_tracking_id(name) or 0) >= nid for name, nid in targets.items()
        ):
            break
    seconds = time.perf_counter() - started
    result = MemberResult(
        processed, sink.commits, sink.inner.reruns, sink.collisions, adapter.status().batches,
        sink.apply_seconds, seconds, time.process_time() - cpu_started,
    )  # fmt: skip
    adapter.close()
    follower.close()
    q.put(("done", result))


def run_group(
    members: int,
    env: dict[str, str],
    topic: str,
    kafka: dict[str, Any],
    group: str,
    batch_size: int,
    targets: dict[str, int],
    app: Any = Counters,
    prefetch: Any = counters_prefetch,
) -> list[MemberResult]:
    """``members`` consumer processes in one group, as a user runs them; each one's result.

    They start polling together, once all are constructed (a process takes seconds to
    start: without this, the first member could drain a small topic alone).
    """
    spawn = multiprocessing.get_context("spawn")
    queue: Any = spawn.Queue()
    go = spawn.Event()
    procs = [
        spawn.Process(
            target=_member,
            args=(env, topic, kafka, group, queue, batch_size, targets, app, prefetch, go),
        )
        for _ in range(members)
    ]
    for p in procs:
        p.start()
    results: list[MemberResult] = []
    ready = 0
    while len(results) < members:
        kind, item = queue.get(timeout=300)
        if kind == "done":
            results.append(item)
        else:
            ready += 1
            if ready == members:
                go.set()
    for p in procs:
        p.join(30)
    return results


def partition_ends(upstream: dict[str, str], partitions: int) -> dict[str, int]:
    """Each partition's tracking name and the last notification id the relay put in it."""
    school = DogSchool(env=upstream)
    ends = [0] * partitions
    try:
        for page in read_pages(school.recorder, 0, page_size=10_000):
            for n in page:
                ends[partition_for_key(str(n.originator_id).encode(), partitions)] = n.id
    finally:
        school.close()
    return dict(zip(tracking_names("DogSchool", partitions), ends, strict=True))


def library_run(env: dict[str, str], upstream: dict[str, str], events: int) -> tuple[int, float]:
    system = System(pipes=[[DogSchool, Counters]])
    runner_env = dict(env)
    runner: Any = SingleThreadedRunner(system, env=runner_env)
    runner.start()
    try:
        counters = runner.get(Counters)
        started = time.perf_counter()
        counters.pull_and_process("DogSchool", stop=events)
        seconds = time.perf_counter() - started
        processed = counters.recorder.max_tracking_id("DogSchool") or 0
    finally:
        runner.stop()
    return processed, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--baseline-events", type=int, default=1500)
    parser.add_argument("--tricks", type=int, default=5000, help="distinct counters")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2000, help="messages a transaction")
    parser.add_argument(
        "--causal-only", action="store_true", help="measure what causal dependencies cost"
    )
    args = parser.parse_args()
    if args.causal_only:
        return causal_cost(args)

    postgres = make_postgres(fsync=True)
    kafka_broker = make_kafka()
    try:
        upstream_db = postgres.create_database()
        upstream = dict(upstream_db.env)
        t0 = time.perf_counter()
        total = populate(upstream, args.events, args.tricks)
        print(f"upstream log: {total} events ({time.perf_counter() - t0:.1f} s to write)")
        kafka = kafka_broker.config()
        topics = {
            1: kafka_broker.create_topic(partitions=1),
            2: kafka_broker.create_topic(partitions=2),
        }
        for partitions, topic in topics.items():
            relay = Relay(
                "DogSchool", kafka_config=kafka, topic=topic, env=upstream, partitions=partitions
            )
            t0 = time.perf_counter()
            published = relay.publish_available()
            relay.close()
            print(f"relay: {published} events to a {partitions}-partition topic "
                  f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip

        ours: list[float] = []
        whole: list[float] = []
        theirs: list[float] = []
        cpus: list[float] = []
        for run in range(1, args.runs + 1):
            env = fresh_env(postgres, upstream)
            processed, rate, whole_rate, cpu = esbridge_run(
                env, topics[1], kafka, f"bench-{run}", total, args.batch_size
            )
            assert processed == total, (processed, total)
            check_counts(env, upstream)
            ours.append(rate)
            whole.append(whole_rate)
            cpus.append(cpu / processed * 1e6)
            env = fresh_env(postgres, upstream)
            processed, seconds = library_run(env, upstream, args.baseline_events)
            theirs.append(processed / seconds)
            print(
                f"run {run}: esbridge {rate:,.0f} events/s ({total} events; whole call, "
                f"start-up included: {whole_rate:,.0f} events/s, {total / whole_rate:.1f} s; "
                f"CPU {cpus[-1]:.0f} us/event); library SingleThreadedRunner "
                f"{theirs[-1]:,.0f} events/s ({processed} events)"
            )
        o, t = statistics.median(ours), statistics.median(theirs)
        print(
            f"MEDIAN esbridge consumer: {o:,.0f} events/s "
            f"(whole call, start-up included: {statistics.median(whole):,.0f} events/s; "
            f"CPU {statistics.median(cpus):.0f} us/event in the consumer's process)"
        )
        print(f"MEDIAN library SingleThreadedRunner: {t:,.0f} events/s")
        print(f"RATIO: {o / t:.1f}x")

        targets = partition_ends(upstream, 2)
        env = fresh_env(postgres, upstream)
        env["COUNTERS_AGGREGATE_CACHE_FASTFORWARD"] = "y"  # two processes write counters
        Counters(env=env).close()
        results = run_group(2, env, topics[2], kafka, "bench-pair", args.batch_size, targets)
        processed = sum(r.processed for r in results)
        assert processed == total, f"the two members processed {processed} of {total} events"
        events, span = processing_rate([c for r in results for c in r.commits])
        print(
            f"2 processes, 2 partitions: {processed} events, {events / span:,.0f} events/s "
            f"({sum(r.reruns for r in results)} of {sum(r.batches for r in results)} batches "
            "ran again after colliding with the other member's writes)"
        )
        check_counts(env, upstream)
    finally:
        kafka_broker.close()
        postgres.close()
    return 0


def causal_cost(args: argparse.Namespace) -> int:
    """One consumer on a 2-partition topic, without and with esb_deps (see the docstring)."""
    postgres = make_postgres(fsync=True)
    kafka_broker = make_kafka()
    try:
        upstream = dict(postgres.create_database().env)
        total = populate(upstream, args.events, args.tricks)
        print(f"upstream log: {total} events")
        kafka = kafka_broker.config()
        topics = {}
        for causal in (False, True):
            topic = kafka_broker.create_topic(partitions=2)
            relay = Relay(
                "DogSchool", kafka_config=kafka, topic=topic, env=upstream, partitions=2,
                causal_dependencies=causal,
            )  # fmt: skip
            t0 = time.perf_counter()
            assert relay.publish_available() == total
            relay.close()
            print(f"relay, causal_dependencies={causal}: {total} events in "
                  f"{time.perf_counter() - t0:.2f} s")  # fmt: skip
            topics[causal] = topic
        rates: dict[bool, list[float]] = {False: [], True: []}
        cpus: dict[bool, list[float]] = {False: [], True: []}
        for run in range(1, args.runs + 1):
            for causal in (False, True):
                env = fresh_env(postgres, upstream)
                processed, rate, _whole, cpu = esbridge_run(
                    env, topics[causal], kafka, f"causal-{causal}-{run}", total, args.batch_size
                )
                assert processed == total, (processed, total)
                check_counts(env, upstream)
                rates[causal].append(rate)
                cpus[causal].append(cpu / processed * 1e6)
                print(f"run {run}: causal_dependencies={causal}: {rate:,.0f} events/s, "
                      f"CPU {cpus[causal][-1]:.1f} us/event")  # fmt: skip
        plain, causal_rate = (statistics.median(rates[c]) for c in (False, True))
        plain_cpu, causal_cpu = (statistics.median(cpus[c]) for c in (False, True))
        print(f"MEDIAN one member, 2 partitions: without esb_deps {plain:,.0f} events/s "
              f"(CPU {plain_cpu:.1f} us/event), with {causal_rate:,.0f} events/s "
              f"(CPU {causal_cpu:.1f} us/event): {causal_rate / plain:.2f}x the rate, "
              f"{causal_cpu / plain_cpu:.2f}x the CPU")  # fmt: skip
    finally:
        kafka_broker.close()
        postgres.close()
    return 0


def check_counts(env: dict[str, str], upstream: dict[str, str]) -> None:
    """Every trick counted exactly once (every counter checked)."""
    school = DogSchool(env=upstream)
    counters = Counters(env=env)
    expected: dict[str, int] = {}
    for n in school.recorder.select_notifications(start=1, limit=10**7):
        if n.topic.endswith("TrickAdded"):
            event = school.mapper.to_domain_event(n)
            expected[event.trick] = expected.get(event.trick, 0) + 1  # type: ignore[attr-defined]
    counted = {trick: counters.get_count(trick) for trick in expected}
    wrong = [(t, counted[t], n) for t, n in expected.items() if counted[t] != n]
    assert not wrong, f"{len(wrong)} counters wrong (trick, counted, expected): {wrong[:5]}"
    school.close()
    counters.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
