"""KAFKA_* variables and --kafka-config files: every name is a librdkafka setting, and no
secret value is ever shown (the names are checked by the installed librdkafka itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from esbridge.errors import ConfigurationError
from esbridge.kafka.config import (
    is_client_setting,
    kafka_config_from_env,
    load_kafka_config,
    setting_to_env_name,
    suggest_setting,
)
from esbridge.runtime.redaction import REDACTED, redact_config, redact_line

SECRET = "S3cr3t-value"


def test_librdkafka_is_asked_which_names_are_settings() -> None:
    known = ["bootstrap.servers", "sasl.password", "group.id", "message.timeout.ms"]
    assert all(is_client_setting(name) for name in known)
    assert not any(is_client_setting(n) for n in ["sasl.passwrod", "advertised.listeners"])
    assert suggest_setting("sasl.passwrod") == "sasl.password"  # two letters swapped
    assert suggest_setting("sasl.user.name") == "sasl.username"  # one character too many
    assert suggest_setting("advertised.listeners") is None
    assert setting_to_env_name("sasl.password") == "KAFKA_SASL_PASSWORD"
    assert setting_to_env_name("a_b.c") == "KAFKA_A__B_C"


def env_refusal(env: dict[str, str]) -> str:
    """The message of the error that ``env`` raises; it never shows a value."""
    with pytest.raises(ConfigurationError) as raised:
        kafka_config_from_env(env)
    message = str(raised.value)
    assert SECRET not in message and all(value not in message for value in env.values())
    return message


def test_a_misspelt_variable_is_named_with_the_setting_it_was_meant_to_be() -> None:
    message = env_refusal({"KAFKA_BOOTSTRAP_SERVERS": "b:9092", "KAFKA_SASL_PASSWROD": SECRET})
    assert message.startswith(
        "not a Kafka client setting: KAFKA_SASL_PASSWROD (sasl.passwrod) (did you mean "
        "KAFKA_SASL_PASSWORD, for sasl.password?). esbridge passes every KAFKA_* variable to "
        "librdkafka"
    ), message


def test_a_broker_setting_in_the_client_environment_is_refused() -> None:
    message = env_refusal(
        {"KAFKA_ADVERTISED_LISTENERS": "PLAINTEXT://kafka:9092", "KAFKA_NODE_ID": "71"}
    )
    assert message.startswith(
        "not a Kafka client setting: KAFKA_ADVERTISED_LISTENERS (advertised.listeners), "
        "KAFKA_NODE_ID (node.id). "
    ), message
    assert "belong in the broker's environment only" in message
    # The server scripts' own variables are not settings: still ignored, as before.
    env = {"KAFKA_HOME": "/opt/kafka", "KAFKA_HEAP_OPTS": "-Xmx1g", "KAFKA_GROUP_ID": "g"}
    assert kafka_config_from_env(env) == {"group.id": "g"}


def test_a_malformed_properties_line_never_shows_its_secret(tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text(f"bootstrap.servers=127.0.0.1:9092\nsasl.password {SECRET}\n")
    with pytest.raises(ConfigurationError) as raised:
        load_kafka_config(path, env={})
    assert str(raised.value) == f"{path}:2: expected 'name=value', got 'sasl.password ***'"
    path.write_text(f"bootstrap.servers=127.0.0.1:9092\nsasl.passwrod={SECRET}\n")
    with pytest.raises(ConfigurationError) as raised:
        load_kafka_config(path, env={})
    assert str(raised.value).startswith(
        f"{path}: not a Kafka client setting: 'sasl.passwrod' (did you mean 'sasl.password'?)"
    )
    assert SECRET not in str(raised.value)


def test_secret_values_are_redacted_by_their_names() -> None:
    config = {
        "bootstrap.servers": "b:9092",
        "sasl.password": SECRET,
        "ssl.key.password": SECRET,
        "sasl.oauthbearer.client.secret": SECRET,
        "sasl.oauthbearer.token.endpoint.url": "https://idp/token",
        "ssl.key.pem": SECRET,
        "sasl.jaas.config": SECRET,
    }
    assert redact_config(config) == {
        "bootstrap.servers": "b:9092",
        **{name: REDACTED for name in list(config)[1:]},
    }
    assert redact_line(f"sasl.password {SECRET}") == "sasl.password ***"
    assert redact_line(f"sasl.password{SECRET}") == "sasl.password ***"  # no separator at all
    assert redact_line(f"  ssl.key.password\t{SECRET}") == "ssl.key.password ***"
    assert redact_line("bootstrap.servers b:9092") == "bootstrap.servers b:9092"


def test_a_value_librdkafka_refuses_is_named_by_its_variable() -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "b:9092", "KAFKA_ENABLE_AUTO_COMMIT": "maybe"}
    with pytest.raises(ConfigurationError) as raised:
        kafka_config_from_env(env)
    assert str(raised.value) == (
        "librdkafka refuses KAFKA_ENABLE_AUTO_COMMIT: Expected bool value for "
        '"enable.auto.commit": true or false. Correct the value, or unset the variable'
    )


def test_the_settings_in_use_are_logged_without_their_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "b:9092", "KAFKA_SASL_PASSWORD": SECRET}
    with caplog.at_level("DEBUG", logger="esbridge.kafka_config"):
        load_kafka_config(env=env)
    assert caplog.messages == [
        "Kafka settings: {'bootstrap.servers': 'b:9092', 'sasl.password': '***'}"
    ]
