"""How many partitions each leader's topic has, for ``esbridge status``: asked, not assumed.

A follower's tracking names depend on the partition count
(:func:`~esbridge.names.tracking_names`), so a status computed with a wrong
count reads positions of partitions that do not exist and reports them as
healthy. The topic's metadata in Kafka is the truth: it is read first, and a
login, certificate or ACL that Kafka refuses stops the command at once with
the same error as every other command (:mod:`esbridge.kafka.access`). When no
broker answers, the followers' tracking records say which count they
consumed with (:func:`tracked_partitions`); so they do when no Kafka is
configured at all (a status taken from the databases alone).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from eventsourcing.persistence import ProcessRecorder
from psycopg.sql import SQL, Identifier

from esbridge.errors import BrokerUnavailableError, ConfigurationError
from esbridge.kafka.topics import kafka_admin, partition_count

#: Seconds ``esbridge status`` waits for a broker before it falls back to tracking records.
KAFKA_TIMEOUT = 10.0


@dataclass
class TopicPartitions:
    """Partition counts by topic (None: to be read from the tracking records), and why."""

    counts: dict[str, int | None] = field(default_factory=dict)
    #: Why Kafka could not be read (None: it was, or none is configured).
    kafka_error: str | None = None
    #: What the user should know (said on stderr): topics missing, Kafka unreadable.
    notes: list[str] = field(default_factory=list)


def read_topic_partitions(
    kafka_config: Mapping[str, Any], topics: list[str], timeout: float = KAFKA_TIMEOUT
) -> TopicPartitions:
    """The partition count of each of ``topics`` from Kafka's metadata.

    Without ``bootstrap.servers`` every count is None (from the tracking
    records). A broker that does not answer within ``timeout`` seconds gives
    None counts and ``kafka_error``; a refused login, certificate or ACL
    raises (:class:`~esbridge.errors.KafkaAuthenticationError` and its kin).
    """
    result = TopicPartitions({topic: None for topic in topics})
    servers = kafka_config.get("bootstrap.servers")
    if not servers or not topics:
        return result
    try:
        found = _ask_kafka(kafka_config, topics, timeout)
    except BrokerUnavailableError as e:
        result.kafka_error = str(e)
        result.notes.append(
            f"cannot read Kafka ({e}): partition counts taken from the followers' tracking records"
        )
        return result
    for topic, count in found.items():
        result.counts[topic] = count
        if count is None:
            result.notes.append(
                f"topic {topic!r} does not exist (no relay published it yet): its partition "
                "count is taken from the followers' tracking records"
            )
    return result


def _ask_kafka(
    kafka_config: Mapping[str, Any], topics: list[str], timeout: float
) -> dict[str, int | None]:
    servers = kafka_config.get("bootstrap.servers")
    started = time.monotonic()
    with kafka_admin(kafka_config) as admin:
        while True:
            try:
                return {
                    topic: partition_count(admin, topic, timeout=2.0, config=kafka_config)
                    for topic in topics
                }
            except KafkaException as e:
                admin.poll(0)  # its error_cb raises a refused login or certificate
                waited = time.monotonic() - started
                if waited >= timeout:
                    raise BrokerUnavailableError(
                        f"no Kafka broker answered at {servers!r} within {timeout:.0f} s ({e}); "
                        "check bootstrap.servers (KAFKA_BOOTSTRAP_SERVERS) and that the broker "
                        "runs",
                        bootstrap_servers=str(servers),
                        waited=waited,
                    ) from e
                time.sleep(0.5)


def check_given_count(topic: str, actual: int, given: int | None, source: str) -> None:
    """Refuse a ``--partitions`` that disagrees with the count the topic really has."""
    if given is not None and given != actual:
        raise ConfigurationError(
            f"--partitions {given} disagrees with {source}: topic {topic!r} has {actual} "
            f"partition{'' if actual == 1 else 's'}. esbridge status reads the count itself: "
            f"leave out --partitions, or give --partitions {actual}"
        )


def tracked_partitions(recorder: ProcessRecorder, leader: str) -> int | None:
    """The partition count the follower consumed ``leader`` with, from its tracking names.

    ``{leader}#{p}/{N}`` names give ``N`` (the highest, if the topic was ever
    recreated with another count); the plain ``{leader}`` name gives 1; no
    name (nothing processed yet) gives None.
    """
    datastore = getattr(recorder, "datastore", None)
    table = getattr(recorder, "tracking_table_name", None)
    if datastore is None or table is None:
        return None
    query = SQL(
        "SELECT DISTINCT application_name AS name FROM {0}.{1} "
        "WHERE application_name = %s OR starts_with(application_name, %s)"
    ).format(Identifier(datastore.schema or "public"), Identifier(table))
    with datastore.transaction(commit=False) as curs:
        curs.execute(query, (leader, f"{leader}#"))
        names = [row["name"] for row in curs.fetchall()]
    counts = set()
    for name in names:
        if name == leader:
            counts.add(1)
            continue
        _, _, count = name[len(leader) + 1 :].partition("/")
        if count.isdigit():
            counts.add(int(count))
    return max(counts) if counts else None
