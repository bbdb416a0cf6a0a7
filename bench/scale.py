"""Benchmark: does a consumer group pay? 1 member vs 2 members, aligned and shared writes.

One upstream log (bench/consume.py's dog school: dogs registered with 4 tricks
each, tricks drawn from ``--tricks`` names) is published once to a 2-partition
topic. Then, ``--runs`` times, each workload is consumed into a fresh database
by a group of 1 member and by a group of 2 members, each member a
:class:`~esbridge.consumer.ConsumerAdapter` in its own OS process (as a user
runs them):

* **aligned**: ``Mirror`` (tests/support/consumer_apps.py) keeps one mirror
  per dog, written only from that dog's events: each follower aggregate
  follows one upstream key, so one partition;
* **shared**: ``Counters`` (bench/consume.py) counts each trick: every
  partition writes the same counters, so two members collide on them.

events/s = the events of batches 2..N (of all members) / the time from the
first batch's commit to the last's, as bench/consume.py measures. Printed for
each: the median rate, the 1-member baseline of the same run, the ratio, the
batches the sink ran again after a collision, the collisions it gave up on
(the consumer then re-read its positions), and where the members' time went
(in the sink: policies + Postgres; the rest: Kafka, decoding, waiting). Every
run is checked exact (each trick counted once; each mirror equal to its dog).

Usage: ``python bench/scale.py [--events N] [--runs 3] [--batch-size 2000]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.consume import (
    MemberResult,
    check_counts,
    counters_prefetch,
    fresh_env,
    partition_ends,
    populate,
    processing_rate,
    run_group,
)
from esbridge.relay.relay import Relay
from esbridge.testing import make_kafka, make_postgres
from examples.dogschool.application import Counters, DogSchool
from examples.dogschool.domainmodel import Dog
from tests.support.consumer_apps import DogMirror, Mirror, verify_logs

PARTITIONS = 2


def mirror_prefetch(event: Any) -> list[Any]:
    """The prefetch hint: the mirror that ``Mirror.policy`` gets for ``event``."""
    if isinstance(event, Dog.TrickAdded):
        return [DogMirror.create_id(event.originator_id)]
    return []


def cpu_of(roots: dict[str, int | None]) -> dict[str, float]:
    """CPU seconds so far of each process tree (``roots``: name -> pid), from /proc.

    A tree's time: its live processes' own time plus the time of the children
    they reaped (``cutime``/``cstime``): the postmaster reaps every backend, so a
    member's closed connection is still counted.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = sum(int(x) for x in fields[11:15]) / ticks
    totals = dict.fromkeys(roots, 0.0)
    for pid, seconds in cpu.items():
        top = pid
        while top not in roots.values() and parent.get(top, 0) > 1:
            top = parent[top]
        for name, root in roots.items():
            if top == root:
                totals[name] += seconds
    return totals


WORKLOADS: dict[str, tuple[Any, Any]] = {
    "aligned": (Mirror, mirror_prefetch),
    "shared": (Counters, counters_prefetch),
}


def workload_env(server: Any, upstream: dict[str, str], app: Any, members: int) -> dict[str, str]:
    """A fresh database for ``app``, its tables made before the members start."""
    env = fresh_env(server, upstream)
    prefix = app.__name__.upper()
    env[f"{prefix}_AGGREGATE_CACHE_MAXSIZE"] = "100000"
    # Shared aggregates written by two processes: a cached one must be fast-forwarded
    # from the database when read (the library's default), or nearly every batch
    # collides. Aligned ones are written by one member at a time (a partition's
    # keys move only at a rebalance, and a stale version then collides and is re-read).
    shared = app is Counters and members > 1
    env[f"{prefix}_AGGREGATE_CACHE_FASTFORWARD"] = "y" if shared else "n"
    app(env=env).close()
    return env


def check(app: Any, env: dict[str, str], upstream: dict[str, str]) -> None:
    """Every upstream event had exactly one effect."""
    if app is Counters:
        check_counts(env, upstream)
        return
    school, mirror = DogSchool(env=upstream), Mirror(env=env)
    try:
        verify_logs(school, mirror)
    finally:
        school.close()
        mirror.close()


def summary(results: list[MemberResult], total: int, servers: dict[str, float]) -> dict[str, float]:
    processed = sum(r.processed for r in results)
    assert processed == total, f"the members processed {processed} of {total} events"
    events, span = processing_rate([c for r in results for c in r.commits])
    # Steady state: from when every member has committed (the group joined, the start-up
    # rebalance done) to the last commit. The same as "rate" for one member.
    if any(not r.commits for r in results):  # a member got no partition in time
        joined = max(c[0] for r in results for c in r.commits)
    else:
        joined = max(min(r.commits)[0] for r in results)
    late = [c for r in results for c in r.commits if c[0] >= joined]
    steady_events, steady_span = processing_rate(late)
    idle = sum(1 for r in results if not r.commits)
    return {
        "idle": idle,
        "rate": events / span,
        "steady": steady_events / steady_span if steady_span > 0 else float("nan"),
        "joining": joined - min(c[0] for r in results for c in r.commits),
        "reruns": sum(r.reruns for r in results),
        "collisions": sum(r.collisions for r in results),
        "batches": sum(r.batches for r in results),
        "in_sink": sum(r.apply_seconds for r in results) / sum(r.seconds for r in results),
        "wall": max(r.seconds for r in results),
        "members_cpu": sum(r.cpu for r in results),
        **servers,
    }


def median_known(values: Iterable[float]) -> float:
    """The median of the values that are numbers (a run where a member got nothing has none)."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--tricks", type=int, default=5000, help="distinct counters")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2000, help="messages a transaction")
    parser.add_argument("--workloads", default="aligned,shared")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")

    postgres = make_postgres(fsync=True)
    broker = make_kafka()
    try:
        upstream = dict(postgres.create_database().env)
        total = populate(upstream, args.events, args.tricks)
        kafka = broker.config()
        topic = broker.create_topic(partitions=PARTITIONS)
        relay = Relay(
            "DogSchool", kafka_config=kafka, topic=topic, env=upstream, partitions=PARTITIONS
        )
        assert relay.publish_available() == total
        relay.close()
        targets = partition_ends(upstream, PARTITIONS)
        print(f"upstream log: {total} events on a {PARTITIONS}-partition topic")
        figures: dict[tuple[str, int], list[dict[str, float]]] = {}
        # Local servers' pids (containers and external servers have none here: 0 s).
        servers = {
            "postgres": getattr(postgres, "pid", None),
            "kafka": getattr(broker, "pid", None),
        }
        for run in range(1, args.runs + 1):
            for name in args.workloads.split(","):
                app, prefetch = WORKLOADS[name]
                for members in (1, 2):
                    env = workload_env(postgres, upstream, app, members)
                    before = cpu_of(servers)
                    results = run_group(
                        members, env, topic, kafka, f"scale-{name}-{members}-{run}",
                        args.batch_size, targets, app, prefetch,
                    )  # fmt: skip
                    after = cpu_of(servers)
                    check(app, env, upstream)
                    got = summary(results, total, {k: after[k] - before[k] for k in after})
                    figures.setdefault((name, members), []).append(got)
                    print(
                        f"run {run} {name:7} {members} member(s): {got['rate']:,.0f} events/s "
                        f"(steady, after {got['joining']:.1f} s of joining: "
                        f"{got['steady']:,.0f}; members that got nothing: {got['idle']:.0f}), "
                        f"{got['reruns']:.0f} of {got['batches']:.0f} batches re-run, "
                        f"{got['collisions']:.0f} collisions -> resync, "
                        f"{got['in_sink']:.0%} of member time in the sink; "
                        f"CPU s in {got['wall']:.1f} s: members {got['members_cpu']:.1f}, "
                        f"Postgres {got['postgres']:.1f}, Kafka {got['kafka']:.1f} "
                        f"(load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
        print(f"MEDIANS of {args.runs} runs, {total} events, batch size {args.batch_size}:")
        for name in args.workloads.split(","):
            one = statistics.median(f["rate"] for f in figures[(name, 1)])
            two = statistics.median(f["rate"] for f in figures[(name, 2)])
            steady1 = median_known(f["steady"] for f in figures[(name, 1)])
            steady2 = median_known(f["steady"] for f in figures[(name, 2)])
            reruns = statistics.median(f["reruns"] for f in figures[(name, 2)])
            batches = statistics.median(f["batches"] for f in figures[(name, 2)])
            print(
                f"{name:7} 2 members: {two:,.0f} events/s; baseline 1 member: {one:,.0f} "
                f"events/s; ratio {two / one:.2f}x; {reruns:.0f} of {batches:.0f} batches re-run; "
                f"steady state (group joined): {steady2:,.0f} vs {steady1:,.0f}, "
                f"{steady2 / steady1:.2f}x"
            )
        print(f"load average at end: {os.getloadavg()}")
    finally:
        broker.close()
        postgres.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    start = time.perf_counter()
    code = main()
    print(f"bench took {time.perf_counter() - start:.0f} s")
    sys.exit(code)
