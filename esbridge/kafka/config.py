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
...) are not client settings and are ignored. Every other name must be a
setting librdkafka knows, asked of librdkafka itself (so a new librdkafka's
settings work at once): a misspelt ``KAFKA_SASL_PASSWROD`` or a broker's
``KAFKA_ADVERTISED_LISTENERS`` is a :class:`ConfigurationError` naming the
variable (with the setting it was probably meant to be), never its value,
and never the silently ignored setting it would otherwise be.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from esbridge.errors import ConfigurationError
from esbridge.runtime.redaction import redact_config, redact_line, redact_value

log = logging.getLogger("esbridge.kafka_config")

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
        "JMX_PORT",
        "JMX_HOSTNAME",
    }
)

#: A setting librdkafka knows, with a value it refuses: a probe client whose
#: configuration ends with it is never constructed (see :func:`is_client_setting`).
_PROBE_STOP = ("message.timeout.ms", "not-a-number")
_NO_SUCH_PROPERTY = "No such configuration property"
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789._"


def env_name_to_setting(name: str) -> str:
    """``BOOTSTRAP_SERVERS`` -> ``bootstrap.servers`` (``__`` stands for ``_``)."""
    return "_".join(part.replace("_", ".") for part in name.lower().split("__"))


def setting_to_env_name(setting: str, prefix: str = "KAFKA_") -> str:
    """``sasl.password`` -> ``KAFKA_SASL_PASSWORD`` (the inverse of :func:`env_name_to_setting`)."""
    return prefix + setting.upper().replace("_", "__").replace(".", "_")


def refusal(name: str, value: str) -> str | None:
    """What the installed librdkafka says against setting ``name`` to ``value`` (None: nothing).

    librdkafka checks each setting as it is set, before it creates a client;
    the probe's last setting has a value librdkafka refuses, so no client is
    ever created (no thread, no connection): about 10 microseconds a call. A
    secret ``value`` is redacted from the answer.
    """
    from confluent_kafka import KafkaException, Producer

    if name == _PROBE_STOP[0]:
        return None
    try:
        Producer({name: value, _PROBE_STOP[0]: _PROBE_STOP[1]})
    except KafkaException as e:
        text = str(e.args[0].str())
        if f'"{_PROBE_STOP[0]}"' in text:
            return None  # it got as far as the probe's stop: name and value were taken
        shown = redact_value(name, value)
        return text.replace(value, shown) if shown != value else text
    except Exception:  # confluent_kafka's own settings (callbacks): not librdkafka's to say
        return None
    return None  # pragma: no cover - the stop value always fails


def is_client_setting(name: str) -> bool:
    """Whether librdkafka knows setting ``name`` (asked of the installed librdkafka)."""
    return _NO_SUCH_PROPERTY not in (refusal(name, "") or "")


def _one_edit_away(name: str) -> Iterator[str]:
    """Names one typo from ``name``: a character dropped, swapped, replaced or added."""
    for i in range(len(name) + 1):
        head, tail = name[:i], name[i:]
        if tail:
            yield head + tail[1:]
        if len(tail) > 1:
            yield head + tail[1] + tail[0] + tail[2:]
        for c in _NAME_CHARS:
            if tail:
                yield head + c + tail[1:]
            yield head + c + tail


def suggest_setting(name: str) -> str | None:
    """The setting ``name`` was probably meant to be (one typo away), or None."""
    for candidate in dict.fromkeys(_one_edit_away(name)):
        if candidate != name and candidate and is_client_setting(candidate):
            return candidate
    return None


def check_env_values(env: Mapping[str, str], names: Mapping[str, str]) -> None:
    """Raise :class:`ConfigurationError` naming every variable whose value librdkafka refuses.

    ``names`` maps each variable to its setting; librdkafka's answer is shown
    with secret values redacted.
    """
    problems = [
        f"{var}: {problem}"
        for var, setting in sorted(names.items())
        if (problem := refusal(setting, env[var])) is not None
    ]
    if problems:
        raise ConfigurationError(
            f"librdkafka refuses {'; '.join(problems)}. Correct the value, or unset the variable"
        )


def check_env_settings(names: Mapping[str, str], prefix: str = "KAFKA_") -> None:
    """Raise :class:`ConfigurationError` naming every variable that is no librdkafka setting.

    ``names`` maps each variable to its setting. The message names the
    variables and the settings they stand for, never their values.
    """
    unknown = sorted(var for var, setting in names.items() if not is_client_setting(setting))
    if not unknown:
        return
    problems: list[str] = []
    for var in unknown:
        setting = names[var]
        guess = suggest_setting(setting)
        hint = (
            f" (did you mean {setting_to_env_name(guess, prefix)}, for {guess}?)" if guess else ""
        )
        problems.append(f"{var} ({setting}){hint}")
    raise ConfigurationError(
        f"not a Kafka client setting: {', '.join(problems)}. esbridge passes every {prefix}* "
        f"variable to librdkafka ({prefix}BOOTSTRAP_SERVERS is bootstrap.servers), which "
        "does not know this one: correct the name, or unset it in esbridge's environment "
        f"(Kafka broker settings such as {prefix}ADVERTISED_LISTENERS, which the apache/kafka "
        "image reads, belong in the broker's environment only)"
    )


def check_file_settings(path: str | Path, config: Mapping[str, str]) -> None:
    """Raise :class:`ConfigurationError` naming every setting of file ``path`` librdkafka lacks."""
    unknown = sorted(name for name in config if not is_client_setting(name))
    if not unknown:
        return
    problems = []
    for name in unknown:
        guess = suggest_setting(name)
        problems.append(f"{name!r}" + (f" (did you mean {guess!r}?)" if guess else ""))
    raise ConfigurationError(
        f"{path}: not a Kafka client setting: {', '.join(problems)}. Settings in a "
        "--kafka-config file are passed to librdkafka, which does not know these: correct "
        "or remove them"
    )


def kafka_config_from_env(
    env: Mapping[str, str] | None = None, prefix: str = "KAFKA_"
) -> dict[str, str]:
    """librdkafka settings from ``{prefix}*`` environment variables.

    Raises :class:`ConfigurationError` when a variable is not a librdkafka
    setting (see :func:`check_env_settings`).
    """
    env = os.environ if env is None else env
    config: dict[str, str] = {}
    names: dict[str, str] = {}
    for key, value in env.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if not name or name in NOT_CLIENT_SETTINGS:
            continue
        names[key] = env_name_to_setting(name)
        config[names[key]] = value
    check_env_settings(names, prefix)
    check_env_values(env, names)
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
            raise ConfigurationError(
                f"{path}:{number}: expected 'name=value', got {redact_line(raw)!r}"
            )
        i = min(separators)
        config[line[:i].strip()] = line[i + 1 :].strip()
    return config


def load_kafka_config(
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    prefix: str = "KAFKA_",
    overrides: Mapping[str, Any] | None = None,
    *,
    require_servers: bool = True,
) -> dict[str, Any]:
    """Merged settings: properties ``file``, then ``{prefix}*`` variables, then ``overrides``.

    Raises :class:`ConfigurationError` when no ``bootstrap.servers`` results,
    unless ``require_servers`` is false (a command that can do without Kafka).
    """
    config: dict[str, Any] = {}
    if file is not None:
        from_file = read_properties(file)
        check_file_settings(file, from_file)
        config.update(from_file)
    config.update(kafka_config_from_env(env, prefix))
    config.update(overrides or {})
    log.debug("Kafka settings: %s", redact_config(config))
    if require_servers and not config.get("bootstrap.servers"):
        raise ConfigurationError(
            f"no Kafka brokers configured: set {prefix}BOOTSTRAP_SERVERS "
            "(for example 127.0.0.1:9092) or bootstrap.servers in the Kafka config file"
        )
    return config


def client_config(config: Mapping[str, Any], *drop: str) -> dict[str, Any]:
    """A copy of ``config`` without producer- or consumer-only keys named in ``drop``."""
    return {k: v for k, v in config.items() if k not in drop}
