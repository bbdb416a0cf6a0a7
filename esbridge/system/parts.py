"""Building the relay and the consumer adapters of a system, from the runner's settings.

:class:`~esbridge.system.runner.KafkaRunner` decides *what* runs in this process;
this module decides *how each part is configured*, so that every process
of one system derives the same names and settings from the same ``System``:

* a leader's relay publishes the leader's log to ``names.topic(leader)`` with
  the transactional id ``names.relay_id(leader)``: one relay per leader in the
  whole deployment (a restarted relay fences its zombie through that id);
* a follower consumes each leader's topic in the consumer group
  ``names.group(leader, follower)``: worker processes of one application
  share that group, so Kafka divides the topic's partitions between them.

Worker processes started for one application and worker index (``esbridge
run --app NAME --worker-index I``) join their groups as *static members*
(``group.instance.id``): a worker killed with ``kill -9`` and restarted takes
its partitions back at once, instead of after the session timeout, and a
second process started by mistake with the same index is fenced by the
broker rather than processing in parallel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from eventsourcing.system import ProcessApplication

from esbridge.errors import ConfigurationError

if TYPE_CHECKING:  # pragma: no cover
    from esbridge.consumer.adapter import ConsumerAdapter
    from esbridge.relay.relay import Relay
    from esbridge.system.runner import KafkaRunner

#: Session timeout for consumers of supervised workers (librdkafka's default is 45 s):
#: a worker that dies and is *not* restarted gives its partitions to the others this soon.
WORKER_SESSION_TIMEOUT_MS = "10000"


def make_relay(runner: KafkaRunner, leader: str) -> Relay:
    """The relay that publishes ``leader``'s notification log for ``runner``'s system."""
    from esbridge.relay.relay import Relay

    return Relay(
        leader,
        kafka_config=dict(runner.kafka_config),
        topic=runner.names.topic(leader),
        mode=runner.relay_modes[leader],
        env=runner.full_env,
        relay_id=runner.names.relay_id(leader),
        exactly_once=runner.exactly_once,
        partitions=runner.partitions_of(leader),
        **dict(runner.relay_options),
    )


def make_consumer(runner: KafkaRunner, leader: str, follower: str) -> ConsumerAdapter:
    """The consumer adapter that feeds ``leader``'s topic into ``follower`` (run here)."""
    from esbridge.consumer.adapter import ConsumerAdapter

    app = runner.apps[follower]
    if not isinstance(app, ProcessApplication):
        raise ConfigurationError(
            f"application {follower!r} follows {leader!r} in the system but is a "
            f"{type(app).__name__}, not an eventsourcing ProcessApplication: it has no policy "
            "and no tracking records to consume into"
        )
    group = runner.names.group(leader, follower)
    return ConsumerAdapter(
        app,
        upstream=leader,
        topic=runner.names.topic(leader),
        kafka_config=consumer_config(runner.kafka_config, group, runner.worker_id),
        group_id=group,
        mode=runner.relay_modes[leader],
        upstream_env=runner.full_env,
        # The leader's class-level env supplies its cipher/compressor defaults for decoding.
        upstream_class=runner.system.get_app_cls(leader),
        partitions=runner.partitions_of(leader),
        **runner.consumer_options,
    )


def consumer_config(
    kafka_config: Mapping[str, Any], group: str, worker_id: str | None
) -> dict[str, Any]:
    """The librdkafka settings of one consumer: static membership for identified workers.

    Settings the user gave (``group.instance.id``, ``session.timeout.ms``) are kept.
    """
    config = dict(kafka_config)
    if worker_id is not None:
        config.setdefault("group.instance.id", f"{group}.{worker_id}")
        config.setdefault("session.timeout.ms", WORKER_SESSION_TIMEOUT_MS)
    return config
