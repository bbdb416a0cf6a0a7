"""A consumer adapter through a 3-broker cluster whose brokers are killed -9 while it consumes.

The dog school's log (every trick unique) is published to a 3-partition
topic replicated 3 ways; a consumer adapter then feeds the mirror from it,
slowed a little per event so that the brokers die while it works: the
leader of the partition with the most left to consume, the consumer group's
coordinator, then again a leader, are crashed (SIGKILL) and started again,
one after the other. Afterwards every upstream
event must have had exactly one effect: each partition's tracking position
is that partition's last notification id, every mirror equals its dog (the
same tricks, in the same order), and the follower's log holds exactly one
event per upstream event.

The test prints, for each fault, how long consuming stopped (from the crash
until the follower's tracking positions moved again).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.names import tracking_names
from esbridge.relay.relay import Relay
from esbridge.testing.kafka_cluster import LocalKafkaCluster
from examples.dogschool.application import DogSchool
from examples.dogschool.domainmodel import Dog
from tests.support.consumer_apps import (
    Mirror,
    count_notifications,
    partition_targets,
    verify_logs,
)
from tests.support.failover import Fault, Progress, crash_and_restart, roles
from tests.support.relay_support import publish_and_close

PARTITIONS = 3
DOGS = 300
TRICKS = 50  # per dog: 15,300 upstream events
CHUNK = 200  # aggregates per save()
DELAY = 0.003  # seconds per trick while the brokers are killed (about 300 events/s)


class SlowMirror(Mirror):
    """A mirror that takes ``delay`` seconds per trick: the brokers die while it works.

    Set to 0 once the faults are over, so that the rest is consumed at full speed.
    """

    delay = DELAY

    def check(self, domain_event: Any) -> None:
        time.sleep(self.delay)


def write_school(school: DogSchool) -> int:
    """``DOGS`` dogs with ``TRICKS`` unique tricks each, saved ``CHUNK`` at a time; the count."""
    dogs = [Dog(f"dog-{i}") for i in range(DOGS)]
    sequence = 0
    for start in range(0, DOGS, CHUNK):
        school.save(*dogs[start : start + CHUNK])
    for _ in range(TRICKS):
        for start in range(0, DOGS, CHUNK):
            batch = dogs[start : start + CHUNK]
            for dog in batch:
                sequence += 1
                dog.add_trick(trick=f"t{sequence}")
            school.save(*batch)
    return DOGS * (1 + TRICKS)


@pytest.mark.slow
def test_consumer_exactly_once_while_leaders_and_group_coordinator_are_killed(
    postgres_db: Any, kafka_cluster: LocalKafkaCluster, capsys: Any
) -> None:
    cluster = kafka_cluster
    school = DogSchool(env=postgres_db.env)
    mirror = SlowMirror(env=postgres_db.env)
    total = write_school(school)
    topic = cluster.create_topic(partitions=PARTITIONS)
    relay = Relay("DogSchool", kafka_config=cluster.config(), topic=topic, env=school.env)
    assert publish_and_close(relay) == total
    group = f"{topic}.mirror"
    consumer = ConsumerAdapter(
        mirror,
        upstream="DogSchool",
        topic=topic,
        kafka_config=cluster.config(),
        group_id=group,
    )
    names = tracking_names("DogSchool", PARTITIONS)
    targets = partition_targets(school, PARTITIONS)

    def tracked() -> list[int]:
        return [mirror.recorder.max_tracking_id(name) or 0 for name in names]

    thread = threading.Thread(target=consumer.run, daemon=True)
    progress = Progress(tracked)
    faults: list[Fault] = []
    t0 = time.monotonic()
    try:
        thread.start()
        progress.start()
        progress.wait_past(0, 60, "the consumer's first batch")
        # A partition's consumption stops when its leader dies (the one with the most
        # left to consume is chosen); all of it when the group's coordinator dies.
        for fault_kind in ("leader", "group coordinator", "leader"):
            left = [target - at for target, at in zip(targets, tracked(), strict=True)]
            watch = left.index(max(left)) if fault_kind == "leader" else None
            assert max(left) > 0, f"nothing left to consume before the {fault_kind} was killed"
            if watch is None:
                kind, node_id = fault_kind, cluster.group_coordinator(group)
            else:
                kind, node_id = f"leader of partition {watch}", cluster.leader(topic, watch)
            led = roles(cluster, node_id, topic, PARTITIONS, group=group)
            fault = Fault(kind, node_id, "kill -9", watch=watch, roles=led)
            faults.append(crash_and_restart(cluster, fault, progress))
            assert thread.is_alive(), consumer.status()
        SlowMirror.delay = 0.0
        progress.watch = None
        progress.wait_past(sum(targets) - 1, 120, "the consumer catching up")
    finally:
        SlowMirror.delay = DELAY
        consumer.stop()
        thread.join(30)
        progress.stop()
    assert not thread.is_alive()
    seconds = time.monotonic() - t0
    assert [mirror.recorder.max_tracking_id(name) for name in names] == targets
    assert verify_logs(school, mirror) == DOGS
    assert count_notifications(mirror) == count_notifications(school) == total
    with capsys.disabled():
        print(
            f"\nconsumer failover: {total} upstream events, each applied once, in "
            f"{seconds:.0f} s with {len(faults)} broker kills"
        )
        for fault in faults:
            print("  " + fault.line())
    school.close()
    mirror.close()
