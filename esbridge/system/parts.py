"""Building the relay and the consumer adapters of a system, from the runner's settings.

:class:`~esbridge.system.runner.KafkaRunner` decides *what* runs in this process;
this module decides *how each part is configured*, so that every process
of one system derives the same names and settings from the same ``System``.
The runner hands over a frozen :class:`PartSettings` (not itself), so this
module depends on nothing of the runner and the runner imports it plainly:

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
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.application import Application
from eventsourcing.system import ProcessApplication, System

from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.errors import ConfigurationError
from esbridge.eventlog.remote import RemoteLogSettings
from esbridge.names import SystemTopics
from esbridge.relay.relay import Relay

#: Session timeout for consumers of supervised workers (librdkafka's default is 45 s):
#: a worker that dies and is *not* restarted gives its partitions to the others this soon.
WORKER_SESSION_TIMEOUT_MS = "10000"


@dataclass(frozen=True)
class PartSettings:
    """Everything the relays and consumers of one runner are built from.

    The runner's settings after it resolved them (env with the system's
    defaults, Kafka config from the environment, modes and partition counts
    per leader), frozen: every part of a runner is built from the same values.
    """

    system: System
    #: The environment of the applications (the runner's ``full_env``).
    env: Mapping[str, str]
    kafka_config: Mapping[str, Any]
    names: SystemTopics
    #: Relay mode of every leader.
    relay_modes: Mapping[str, str]
    #: Partition count by leader; ``"*"`` for leaders not named.
    partitions: Mapping[str, int]
    exactly_once: bool
    worker_id: str | None
    relay_options: Mapping[str, Any]
    consumer_options: Mapping[str, Any]
    #: Leaders whose logs are read over HTTP (``[{LEADER}_]UPSTREAM_LOG_URL``), not from
    #: their databases.
    log_services: Mapping[str, RemoteLogSettings] = field(default_factory=dict)

    def partitions_of(self, leader: str) -> int:
        """The partition count of ``leader``'s topic."""
        return self.partitions.get(leader, self.partitions["*"])


def make_relay(settings: PartSettings, leader: str) -> Relay:
    """The relay that publishes ``leader``'s notification log."""
    return Relay(
        leader,
        kafka_config=dict(settings.kafka_config),
        topic=settings.names.topic(leader),
        mode=settings.relay_modes[leader],
        env=settings.env,
        relay_id=settings.names.relay_id(leader),
        exactly_once=settings.exactly_once,
        partitions=settings.partitions_of(leader),
        **{
            **_causal(settings.system.get_app_cls(leader), RELAY_CAUSAL, "causal_dependencies"),
            **dict(settings.relay_options),
        },
    )


def make_consumer(
    settings: PartSettings, app: Application[Any], leader: str, follower: str
) -> ConsumerAdapter:
    """The consumer adapter that feeds ``leader``'s topic into ``app`` (``follower``, run here)."""
    if not isinstance(app, ProcessApplication):
        raise ConfigurationError(
            f"application {follower!r} follows {leader!r} in the system but is a "
            f"{type(app).__name__}, not an eventsourcing ProcessApplication: it has no policy "
            "and no tracking records to consume into"
        )
    group = settings.names.group(leader, follower)
    service = settings.log_services.get(leader)
    upstream_log: dict[str, Any] = (
        {"upstream_env": settings.env}
        if service is None
        else {
            "upstream_url": service.url,
            "upstream_token": service.token,
            "upstream_cafile": service.cafile,
        }
    )
    return ConsumerAdapter(
        app,
        upstream=leader,
        topic=settings.names.topic(leader),
        kafka_config=consumer_config(settings.kafka_config, group, settings.worker_id),
        group_id=group,
        mode=settings.relay_modes[leader],
        **upstream_log,
        # The leader's class-level env supplies its cipher/compressor defaults for decoding.
        upstream_class=settings.system.get_app_cls(leader),
        partitions=settings.partitions_of(leader),
        **{
            **_causal(type(app), CONSUMER_CAUSAL, "causal_dependencies"),
            **settings.consumer_options,
        },
    )


#: An upstream application class attribute: True makes its relay give each message its
#: causal dependencies (``esb_deps``; docs/partitioning.md). Default False.
RELAY_CAUSAL = "publish_causal_dependencies"
#: A follower application class attribute: False makes its consumers process each
#: partition on its own, ignoring ``esb_deps``. Default True.
CONSUMER_CAUSAL = "wait_for_causal_dependencies"


def _causal(cls: type, attribute: str, option: str) -> dict[str, Any]:
    """``{option: cls.attribute}`` when the application class sets it (a bool), else ``{}``."""
    value = getattr(cls, attribute, None)
    if value is None:
        return {}
    if not isinstance(value, bool):
        raise ConfigurationError(f"{cls.__name__}.{attribute} must be True or False, not {value!r}")
    return {option: value}


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
