"""Exception classes.

Every error esbridge raises on purpose is an :class:`EsbridgeError`, and each
says in its message what the user can do about it. Catch the specific class
where you can recover; catch :class:`EsbridgeError` to log and stop.
"""

from __future__ import annotations


class EsbridgeError(Exception):
    """Base class of every error that esbridge raises on purpose."""


class ConfigurationError(EsbridgeError):
    """The configuration is wrong: nothing was published or consumed.

    Raised before any work starts (unknown application, missing table,
    topic with another partition count, unsupported setting).
    """


class BrokerUnavailable(ConfigurationError):
    """No Kafka broker answered within the time allowed (``connect_timeout``).

    A configuration error because, after that long, the usual cause is a wrong
    ``bootstrap.servers`` (``KAFKA_BOOTSTRAP_SERVERS``) or a broker that was
    never started; the message names the servers tried.
    """


class MessageFormatError(EsbridgeError):
    """A Kafka message is not in esbridge's message format (or another version).

    The message is never dropped silently: a consumer parks it in the
    dead-letter store with this error as the reason.
    """


class RelayError(EsbridgeError):
    """A relay stopped: it cannot publish a notification (the message names it).

    Raised for a message larger than the broker accepts or a stored event
    that cannot be read. Nothing after that notification was published; fix
    the cause and restart the relay, it resumes at that notification.
    """


class RelayPositionError(ConfigurationError):
    """The relay's position topic holds, for this relay, a message that is not a position.

    The message names the topic, partition and offset. Only esbridge relays
    may write to a position topic: stop whatever else writes there, then
    either write the relay's last valid position (an earlier offset with the
    same key) to the topic again, or give the relay a new position topic and
    relay id (it then publishes the log from the start).
    """


class RelayFencedError(RelayError):
    """Another relay with the same ``transactional.id`` took over: this one stopped."""


class RelayStandbyError(EsbridgeError):
    """A relay did not get its lease in time: another relay with its relay id publishes.

    Raised by :meth:`~esbridge.relay.Relay.prepare` and
    :meth:`~esbridge.relay.Relay.publish_available` when their timeout ends
    first; :meth:`~esbridge.relay.Relay.run` waits for as long as it takes.
    """


class HarnessError(EsbridgeError):
    """The test harness could not provide a server (missing tool or server failed to start)."""


class ConsumerError(EsbridgeError):
    """A consumer adapter stopped: it cannot go on without losing or reordering events."""


class GapNotReconciledError(ConsumerError):
    """A partition was held behind missing notifications for longer than allowed.

    Raised when a message arrives after a gap (its ``esb_prev_nid`` is past the
    consumer's position) and the upstream notification log cannot be read to
    fill the gap. Give the consumer read access to the upstream database
    (``upstream_env`` / ``--upstream-log``) or republish the missing range.
    """


class PostgresUnavailableError(EsbridgeError):
    """Postgres stayed unreachable for longer than allowed (or the process was stopped meanwhile).

    Raised only where a timeout was asked for (``connect_timeout``); by default
    relays and consumers wait for the database, logging each retry. Check the
    ``POSTGRES_*`` settings (host, port) and that the server runs.
    """


class KafkaAuthorizationError(ConfigurationError):
    """Kafka refused an operation: the client's principal lacks an ACL.

    ``resource_type`` (``topic``, ``group``, ``transactional_id``,
    ``cluster``), ``resource_name`` and ``operation`` (``WRITE``, ``READ``,
    ``DESCRIBE``, ...) say which; ``prefixed`` is true when the name is a
    prefix (the relay's position readers use groups ``esbridge-position-*``).
    The message gives the ``kafka-acls.sh`` command that adds the ACL; the
    minimal ACLs of each component are in docs/security.md.
    """

    def __init__(
        self,
        message: str,
        *,
        resource_type: str,
        resource_name: str,
        operation: str,
        prefixed: bool = False,
    ) -> None:
        super().__init__(message)
        self.resource_type = resource_type
        self.resource_name = resource_name
        self.operation = operation
        self.prefixed = prefixed


class KafkaAuthenticationError(ConfigurationError):
    """The broker refused the client's SASL credentials (user name, password, mechanism)."""


class KafkaTLSError(ConfigurationError):
    """The TLS handshake with the broker failed: its certificate was not verified.

    Usually ``ssl.ca.location`` does not name the CA that signed the
    broker's certificate (or the certificate is not for the broker's address).
    """
