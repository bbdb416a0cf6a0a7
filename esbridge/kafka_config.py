"""librdkafka settings from the environment and from properties files.

esbridge passes Kafka settings straight through to librdkafka, so every
client option works without esbridge knowing it. Two sources, merged in this
order (later wins):

1. a Java-style properties file (``bootstrap.servers=...`` lines, ``#``
   comments), as ``--kafka-config FILE`` on the command line;
2. environment variables ``KAFKA_<NAME>``: the name is lower-cased and ``_``
   becomes ``.`` (``KAFKA_BOOTSTRAP_SERVERS`` -> ``bootstrap.servers``,
   ``KAFKA_SASL_MECHANISM`` -> ``sasl.mechanism``); write ``__`` for a
   literal ``_``.

Variables that the Kafka server scripts use (``KAFKA_HOME``, ``KAFKA_OPTS``,
...) are not client settings and are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from esbridge.errors import ConfigurationError

#: Environment variables named like client settings that belong to the Kafka
#: server distribution's scripts, not to librdkafka.
NOT_CLIENT_SETTINGS = frozenset(
    {
        "HOME",
        "OPTS",
        "HEAP_OPTS",
        "JVM_PERFORMANCE_OPTS",
        "LOG4J_OPTS",
        "JMX_OPTS",
        "GC_LOG_OPTS",
        "DEBUG",
        "CLUSTER_ID",
        "VERSION",
    }
)


def env_name_to_setting(name: str) -> str:
    """``BOOTSTRAP_SERVERS`` -> ``bootstrap.servers`` (``__`` stands for ``_``)."""
    return "_".join(part.replace("_", ".") for part in name.lower().split("__"))


def kafka_config_from_env(
    env: Mapping[str, str] | None = None, prefix: str = "KAFKA_"
) -> dict[str, str]:
    """librdkafka settings from ``{prefix}*`` environment variables."""
    env = os.environ if env is None else env
    config: dict[str, str] = {}
    for key, value in env.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if not name or name in NOT_CLIENT_SETTINGS:
            continue
        config[env_name_to_setting(name)] = value
    return config


def read_properties(path: str | Path) -> dict[str, str]:
    """Settings from a Java-style properties file (``key=value`` or ``key: value``)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigurationError(f"cannot read Kafka config file {str(path)!r}: {e}") from e
    config: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        separators = [i for i in (line.find("="), line.find(":")) if i > 0]
        if not separators:
            raise ConfigurationError(f"{path}:{number}: expected 'name=value', got {raw!r}")
        i = min(separators)
        config[line[:i].strip()] = line[i + 1 :].strip()
    return config


def load_kafka_config(
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    prefix: str = "KAFKA_",
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merged settings: properties ``file``, then ``{prefix}*`` variables, then ``overrides``.

    Raises :class:`ConfigurationError` when no ``bootstrap.servers`` results.
    """
    config: dict[str, Any] = {}
    if file is not None:
        config.update(read_properties(file))
    config.update(kafka_config_from_env(env, prefix))
    config.update(overrides or {})
    if not config.get("bootstrap.servers"):
        raise ConfigurationError(
            f"no Kafka brokers configured: set {prefix}BOOTSTRAP_SERVERS "
            "(for example 127.0.0.1:9092) or bootstrap.servers in the Kafka config file"
        )
    return config


def client_config(config: Mapping[str, Any], *drop: str) -> dict[str, Any]:
    """A copy of ``config`` without producer- or consumer-only keys named in ``drop``."""
    return {k: v for k, v in config.items() if k not in drop}
