"""Kafka topics a relay publishes to: check them, create them when asked.

The relay chooses partitions itself (``partition_for_key``), so a topic whose
partition count differs from the one the relay was configured with would
send an aggregate's events to another partition than consumers expect: it is
refused before anything is published.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient, ClusterMetadata, ConfigResource, NewTopic

from esbridge.errors import BrokerUnavailableError, ConfigurationError
from esbridge.kafka.access import authorization_error, raise_if_unauthorized
from esbridge.runtime.logs import kafka_client_config
from esbridge.runtime.signals import waiting_for

log = logging.getLogger("esbridge.topics")


#: Producer and consumer settings an admin client would warn about (CONFWARN) and ignore.
NOT_ADMIN_PREFIXES = (
    "transactional.",
    "enable.idempotence",
    "isolation.",
    "group.",
    "auto.",
    "enable.auto.",
    "enable.partition.eof",
    "fetch.",
    "queued.",
)
NOT_ADMIN_SETTINGS = frozenset(
    {
        "linger.ms",
        "batch.size",
        "compression.type",
        "acks",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "partition.assignment.strategy",
        "max.poll.interval.ms",
        "max.partition.fetch.bytes",
        "check.crcs",
    }
)


@contextlib.contextmanager
def kafka_admin(config: Mapping[str, Any]) -> Iterator[AdminClient]:
    """An admin client for ``config`` (producer and consumer settings are left out).

    For a ``with`` block, whose end logs librdkafka's lines: an admin client
    hands them over only when polled (:func:`esbridge.runtime.logs.kafka_client_config`);
    unpolled, they would be lost.
    """
    keep = {
        k: v
        for k, v in config.items()
        if not k.startswith(NOT_ADMIN_PREFIXES) and k not in NOT_ADMIN_SETTINGS
    }
    # A metadata request for a missing topic must not create it with the
    # broker's default partition count (librdkafka producers allow that).
    keep["allow.auto.create.topics"] = False
    admin = AdminClient(kafka_client_config(keep))
    try:
        yield admin
    finally:
        with contextlib.suppress(KafkaException):  # never hides what ended the block
            admin.poll(0)


#: Seconds of one metadata request while waiting for a broker: its log lines
#: (the first says what to check) are handed over between two requests.
LOG_SLICE = 1.0


def list_topics_logged(
    client: Any, topic: str | None = None, timeout: float = 5.0
) -> ClusterMetadata:
    """``client.list_topics(topic, timeout)``, handing over librdkafka's lines every second.

    librdkafka's log lines come out only when the client is polled
    (:func:`esbridge.runtime.logs.kafka_client_config`): a single request
    that waits 5 s for an unreachable broker would keep the line that says
    what is wrong back until then. Raises the last request's ``KafkaException``
    when ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            return client.list_topics(topic, timeout=max(0.01, min(LOG_SLICE, remaining)))
        except KafkaException:
            client.poll(0)  # its error_cb raises a refused login or certificate
            if remaining <= LOG_SLICE:
                raise


def wait_for_broker(
    admin: AdminClient, servers: str, timeout: float | None, stop: Any = None
) -> None:
    """Block until a broker answers; retry with backoff, logging why.

    ``timeout=None`` waits for ever (until ``stop()`` returns true).
    Raises :class:`BrokerUnavailableError` when ``timeout`` seconds pass.
    A start-up wait: SIGINT or SIGTERM end an ``esbridge`` command waiting here
    at once (:func:`esbridge.runtime.signals.waiting_for`).
    """
    with waiting_for(f"the Kafka broker at {servers}"):
        _wait_for_broker(admin, servers, timeout, stop)


def _wait_for_broker(admin: AdminClient, servers: str, timeout: float | None, stop: Any) -> None:
    start = time.monotonic()
    delay = 0.5
    while True:
        try:
            list_topics_logged(admin, timeout=min(5.0, timeout or 5.0))
            return
        except KafkaException as e:
            waited = time.monotonic() - start
            if timeout is not None and waited >= timeout:
                raise BrokerUnavailableError(
                    f"no Kafka broker answered at {servers!r} within {timeout:.0f} s ({e}); "
                    "check bootstrap.servers (KAFKA_BOOTSTRAP_SERVERS) and that the broker runs",
                    bootstrap_servers=servers,
                    waited=waited,
                ) from e
            log.warning(
                "Kafka broker at %s unreachable (%s); retrying in %.1f s", servers, e, delay
            )
            if stop is not None and stop():
                raise BrokerUnavailableError(
                    f"stopped while waiting for the broker at {servers!r}",
                    bootstrap_servers=servers,
                    waited=waited,
                ) from e
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def partition_count(
    admin: AdminClient,
    topic: str,
    timeout: float = 10.0,
    config: Mapping[str, Any] | None = None,
) -> int | None:
    """Number of partitions of ``topic``, or ``None`` when it does not exist.

    Raises :class:`~esbridge.errors.KafkaAuthorizationError` when the
    client may not DESCRIBE it (``config``, the client's settings, names the
    principal in the message).
    """
    metadata = admin.list_topics(topic, timeout=timeout)
    info = metadata.topics.get(topic)
    if info is None:
        return None
    raise_if_unauthorized(config or {}, info.error, topic, "DESCRIBE", needed_for="see it")
    if info.error is not None:
        if info.error.code() in (
            KafkaError.UNKNOWN_TOPIC_OR_PART,
            KafkaError._UNKNOWN_TOPIC,
            KafkaError.LEADER_NOT_AVAILABLE,
        ):
            return None if not info.partitions else len(info.partitions)
        raise KafkaException(info.error)
    return len(info.partitions)


def ensure_topic(
    admin: AdminClient,
    topic: str,
    partitions: int | None = None,
    replication_factor: int | None = None,
    config: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    client: Mapping[str, Any] | None = None,
) -> int:
    """Check ``topic`` (creating it if missing and ``partitions`` is given); its partition count.

    Raises :class:`ConfigurationError` when the topic exists with another
    partition count than ``partitions``, or is missing and ``partitions`` is
    ``None``; :class:`~esbridge.errors.KafkaAuthorizationError` when the
    client (settings ``client``) may not see or create it.
    """
    existing = partition_count(admin, topic, config=client)
    if existing is not None:
        if partitions is not None and existing != partitions:
            raise ConfigurationError(
                f"topic {topic!r} has {existing} partitions, but {partitions} were configured: "
                "an aggregate's events would go to another partition than consumers expect. "
                f"Configure {existing} partitions, or publish to a new topic"
            )
        return existing
    if partitions is None:
        raise ConfigurationError(
            f"topic {topic!r} does not exist: create it, or give the partition count "
            "(--partitions N) so that the relay creates it"
        )
    new = NewTopic(
        topic,
        num_partitions=partitions,
        replication_factor=replication_factor or -1,
        config=dict(config or {}),
    )
    futures = admin.create_topics([new], operation_timeout=timeout)
    try:
        futures[topic].result(timeout)
        log.info("created topic %s (%d partitions)", topic, partitions)
    except KafkaException as e:
        raise_if_unauthorized(
            client or {}, e.args[0], topic, "CREATE", needed_for="create it (or create it first)"
        )
        if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise ConfigurationError(f"cannot create topic {topic!r}: {e}") from e
    if wait_for_leaders(admin, topic, timeout):
        return ensure_topic(admin, topic, partitions, client=client)
    raise ConfigurationError(f"topic {topic!r} was created but has no leaders after {timeout} s")


def check_topic_access(
    admin: AdminClient,
    client: Mapping[str, Any],
    wanted: Mapping[str, tuple[str, str]],
    timeout: float = 10.0,
) -> None:
    """Fail now, not at the first batch, when the client may not use a topic as it will.

    ``wanted``: topic -> (operations separated by ``+``, what they are for).
    Asks the broker which operations the client's principal is allowed
    (``describe_topics`` with authorised operations) and raises
    :class:`~esbridge.errors.KafkaAuthorizationError` for the first one
    missing. A broker that does not say (older, or another implementation)
    is not checked: the request that needs the ACL fails later instead.
    """
    futures = admin.describe_topics(
        TopicCollection(list(wanted)), request_timeout=timeout, include_authorized_operations=True
    )
    for topic, (operations, purpose) in wanted.items():
        try:
            allowed = futures[topic].result(timeout).authorized_operations
        except KafkaException as e:
            raise_if_unauthorized(client, e.args[0], topic, "DESCRIBE", needed_for=purpose)
            log.debug("cannot ask which operations are allowed on %s: %s", topic, e)
            continue
        if not allowed:
            continue
        names = {operation.name for operation in allowed}
        for operation in operations.split("+"):
            if operation not in names and "ALL" not in names:
                raise authorization_error(client, "topic", topic, operation, needed_for=purpose)


def wait_for_leaders(
    admin: AdminClient, topic: str, timeout: float, partitions: int | None = None
) -> bool:
    """True once every partition of ``topic`` has a leader, False after ``timeout`` s.

    A topic just created is not usable until metadata shows a leader for each
    partition; with ``partitions`` given, also until it shows that many.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metadata = admin.list_topics(topic, timeout=10)
        info = metadata.topics.get(topic)
        if (
            info is not None
            and info.error is None
            and len(info.partitions) >= 1
            and len(info.partitions) == (partitions or len(info.partitions))
            and all(p.leader >= 0 for p in info.partitions.values())
        ):
            return True
        time.sleep(0.05)
    return False


def topic_setting(admin: AdminClient, topic: str, name: str, timeout: float = 10.0) -> str | None:
    """The value of topic config ``name`` (for example ``max.message.bytes``)."""
    resource = ConfigResource("topic", topic)
    futures = admin.describe_configs([resource], request_timeout=timeout)
    entries = futures[resource].result(timeout)
    entry = entries.get(name)
    return None if entry is None else entry.value
