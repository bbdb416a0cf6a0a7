"""Kafka refused the client: wrong credentials, an untrusted certificate, a missing ACL.

None of these is fixed by retrying, so esbridge stops at once with an error
that names what to change (:class:`~esbridge.errors.KafkaAuthenticationError`,
:class:`~esbridge.errors.KafkaTLSError`,
:class:`~esbridge.errors.KafkaAuthorizationError`) instead of waiting for a
broker that "does not answer" or retrying a transaction for ever.

librdkafka reports a failed login or TLS handshake only through the client's
``error_cb`` (the request that needed it just times out), so
:func:`error_callback` is every esbridge client's ``error_cb``
(:func:`esbridge.runtime.logs.kafka_client_config`): it raises from the ``poll()``
that serves it. Missing ACLs come back as error codes of requests, turned
into errors here by :func:`authorization_error`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaError

from esbridge.errors import (
    ConfigurationError,
    KafkaAuthenticationError,
    KafkaAuthorizationError,
    KafkaTLSError,
)

#: Error codes of a missing ACL, and the resource type each is about.
AUTHORIZATION_CODES: dict[int, str] = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "topic",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "group",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "transactional_id",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "cluster",
}

#: ``kafka-acls.sh`` option naming each resource type.
_ACL_OPTION = {
    "topic": "--topic",
    "group": "--group",
    "transactional_id": "--transactional-id",
    "cluster": "--cluster",
}

SECURITY_DOC = "docs/security.md"


def is_authorization_failure(error: KafkaError | None) -> bool:
    return error is not None and error.code() in AUTHORIZATION_CODES


def principal_of(config: Mapping[str, Any]) -> str:
    """The principal ACLs name for ``config``: ``User:<sasl.username>`` when it logs in so."""
    user = config.get("sasl.username")
    return f"User:{user}" if user else "<the client's principal>"


def authorization_error(
    config: Mapping[str, Any],
    resource_type: str,
    resource_name: str,
    operation: str,
    *,
    prefixed: bool = False,
    needed_for: str = "",
    cause: KafkaError | None = None,
) -> KafkaAuthorizationError:
    """The error for a missing ACL, with the ``kafka-acls.sh`` command that adds it.

    ``needed_for`` says what the component wanted to do (for the message).
    """
    principal = principal_of(config)
    kind = resource_type.replace("_", " ")
    what = f"{kind}s starting with {resource_name!r}" if prefixed else f"{kind} {resource_name!r}"
    option = _ACL_OPTION[resource_type]
    target = option if resource_type == "cluster" else f"{option} '{resource_name}'"
    if prefixed:
        target += " --resource-pattern-type prefixed"
    reason = f" ({cause.str()})" if cause is not None else ""
    purpose = f" to {needed_for}" if needed_for else ""
    return KafkaAuthorizationError(
        f"Kafka refused {principal} {operation} on {what}{purpose}{reason}. Add the ACL: "
        f"kafka-acls.sh --bootstrap-server {config.get('bootstrap.servers')} --add "
        f"--allow-principal '{principal}' --operation {operation} {target} "
        f"(the minimal ACLs of each component: {SECURITY_DOC})",
        resource_type=resource_type,
        resource_name=resource_name,
        operation=operation,
        prefixed=prefixed,
    )


def security_error(config: Mapping[str, Any], error: KafkaError) -> ConfigurationError | None:
    """The error for a failed SASL login or TLS verification reported by librdkafka, or None.

    Only failures no retry can fix: a handshake cut by a restarting broker is not one.
    """
    text = error.str()
    servers = config.get("bootstrap.servers")
    if error.code() == KafkaError._AUTHENTICATION:
        mechanism = config.get("sasl.mechanism") or config.get("sasl.mechanisms") or "GSSAPI"
        return KafkaAuthenticationError(
            f"the Kafka broker at {servers!r} refused the SASL login of user "
            f"{config.get('sasl.username')!r} ({mechanism}): {text}. Check sasl.username, "
            "sasl.password and sasl.mechanism (KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD, "
            "KAFKA_SASL_MECHANISM), and that the user exists on the broker"
        )
    if error.code() == KafkaError._SSL and "certificate" in text:
        return KafkaTLSError(
            f"the TLS handshake with the Kafka broker at {servers!r} failed: {text}. Check "
            "that ssl.ca.location (KAFKA_SSL_CA_LOCATION) names the CA that signed the "
            "broker's certificate, and that the certificate is for the address in "
            "bootstrap.servers"
        )
    return None


def error_callback(
    config: Mapping[str, Any], logger: logging.Logger | logging.LoggerAdapter[Any]
) -> Callable[..., None]:
    """An ``error_cb``: raises a login or TLS failure, logs any other error.

    Raised inside the callback, the error comes out of the ``poll()``,
    ``consume()`` or ``flush()`` call that served it. Other errors are logged
    as librdkafka logs them without an ``error_cb``.
    """

    def on_error(error: KafkaError) -> None:
        failure = security_error(config, error)
        if failure is not None:
            raise failure
        logger.error("ERROR %s", error.str())

    return on_error


def raise_if_unauthorized(
    config: Mapping[str, Any],
    error: KafkaError | None,
    resource_name: str,
    operation: str,
    *,
    prefixed: bool = False,
    needed_for: str = "",
) -> None:
    """Raise :class:`KafkaAuthorizationError` when ``error`` is a missing ACL.

    The error's code gives the resource type; ``resource_name`` and
    ``operation`` say what the caller was doing with it (a cluster refusal
    names the cluster whatever ``resource_name`` is).
    """
    if error is None or not is_authorization_failure(error):
        return
    resource_type = AUTHORIZATION_CODES[error.code()]
    raise authorization_error(
        config,
        resource_type,
        "kafka-cluster" if resource_type == "cluster" else resource_name,
        operation,
        prefixed=prefixed,
        needed_for=needed_for,
        cause=error,
    )
