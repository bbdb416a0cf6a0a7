"""Exception classes: one hierarchy under :class:`EsbridgeError`.

Every error esbridge raises on purpose is an :class:`EsbridgeError`, and each
says in its message what the user can do about it. Catch the specific class
where you can recover; catch :class:`EsbridgeError` to log and stop.

Like psycopg's errors carry ``sqlstate``, esbridge's carry what a program
needs to act without parsing the message: the topic, partition, offset or
notification id concerned, the servers tried. These attributes are keyword-only
and optional (``None`` when the raise site did not know them); ``str(error)``
is the message alone::

    EsbridgeError
    ├── ConfigurationError
    │   ├── BrokerUnavailableError        (also a ServerUnavailableError)
    │   ├── RelayPositionError            topic, partition, offset
    │   ├── KafkaAuthorizationError       resource_type, resource_name, operation, prefixed
    │   ├── KafkaAuthenticationError
    │   ├── KafkaTLSError
    │   ├── UpstreamMismatchError         upstream, topic, applications
    │   ├── ApplicationNotFoundError      application (also a KeyError)
    │   └── RelayIdConflictError          relay_id, topic, other_relay_ids
    ├── ServerUnavailableError            waited
    │   ├── BrokerUnavailableError        bootstrap_servers
    │   └── PostgresUnavailableError      operation
    ├── MessageFormatError                topic, partition, offset
    ├── RelayError                        nid
    │   └── RelayFencedError              transactional_id
    ├── RelayStandbyError                 relay_id
    ├── ConsumerError
    │   ├── GapNotReconciledError         topic, partition, position, held_nid
    │   └── PoisonMessageError            follower, upstream, key, nid, topic, partition, offset
    ├── HarnessError
    └── RemoteLogError                    url, status
        ├── RemoteLogUnreachableError     (also a ServerUnavailableError)
        ├── RemoteLogRefusedError         reason
        └── RemoteLogResponseError

The two errors of a system runner are exception groups (``ExceptionGroup``): each failed
relay or consumer's own exception (with its traceback) is in ``exceptions``,
and ``components`` names them, in the same order; ``except*`` picks them out.

``BrokerUnavailable`` is the former name of :class:`BrokerUnavailableError`,
kept as an alias for one release.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self


class EsbridgeError(Exception):
    """Base class of every error that esbridge raises on purpose."""


class ConfigurationError(EsbridgeError):
    """The configuration is wrong: nothing was published or consumed.

    Raised before any work starts (unknown application, missing table,
    topic with another partition count, unsupported setting).
    """


class ServerUnavailableError(EsbridgeError):
    """A server (Kafka broker, Postgres) stayed unreachable for longer than allowed.

    Raised only where a timeout was asked for, or when the process was
    stopped while waiting; ``waited`` is how long it waited, in seconds (when
    known). Catch this class to handle "a server is down" whichever it is.
    """

    def __init__(self, message: str, *, waited: float | None = None) -> None:
        super().__init__(message)
        self.waited = waited


class BrokerUnavailableError(ServerUnavailableError, ConfigurationError):
    """No Kafka broker answered within the time allowed (``connect_timeout``).

    A configuration error because, after that long, the usual cause is a wrong
    ``bootstrap.servers`` (``KAFKA_BOOTSTRAP_SERVERS``) or a broker that was
    never started; the message and ``bootstrap_servers`` name the servers tried.
    """

    def __init__(
        self,
        message: str,
        *,
        bootstrap_servers: str | None = None,
        waited: float | None = None,
    ) -> None:
        super().__init__(message, waited=waited)
        self.bootstrap_servers = bootstrap_servers


#: Former name of :class:`BrokerUnavailableError`, kept for one release so
#: that ``except BrokerUnavailable`` in existing code still catches it.
BrokerUnavailable = BrokerUnavailableError


class PostgresUnavailableError(ServerUnavailableError):
    """Postgres stayed unreachable for longer than allowed (or the process was stopped meanwhile).

    Raised only where a timeout was asked for (``connect_timeout``); by default
    relays and consumers wait for the database, logging each retry. Check the
    ``POSTGRES_*`` settings (host, port) and that the server runs.
    ``operation`` says what was being done (e.g. ``"read the notification log"``).
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str | None = None,
        waited: float | None = None,
    ) -> None:
        super().__init__(message, waited=waited)
        self.operation = operation


class MessageFormatError(EsbridgeError):
    """A Kafka message is not in esbridge's message format (or another version).

    The message is never dropped silently: a consumer parks it in the
    dead-letter store with this error as the reason. ``topic``, ``partition``
    and ``offset`` say where the message is, when the raise site knew it (the
    wire-format parsers see headers only and leave them ``None``).
    """

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset


class RelayError(EsbridgeError):
    """A relay stopped: it cannot publish a notification (the message names it).

    Raised for a message larger than the broker accepts or a stored event
    that cannot be read. Nothing after that notification was published; fix
    the cause and restart the relay, it resumes at that notification.
    ``nid`` is that notification's id, when known.
    """

    def __init__(self, message: str, *, nid: int | None = None) -> None:
        super().__init__(message)
        self.nid = nid


class RelayPositionError(ConfigurationError):
    """The relay's position topic holds, for this relay, a message that is not a position.

    The message (and ``topic``, ``partition``, ``offset``) say where. Only
    esbridge relays may write to a position topic: stop whatever else writes
    there, then either write the relay's last valid position (an earlier offset
    with the same key) to the topic again, or give the relay a new position
    topic and relay id (it then publishes the log from the start).
    """

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset


class RelayFencedError(RelayError):
    """Another relay with the same ``transactional.id`` took over: this one stopped.

    ``transactional_id`` is that id, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        transactional_id: str | None = None,
        nid: int | None = None,
    ) -> None:
        super().__init__(message, nid=nid)
        self.transactional_id = transactional_id


class RelayStandbyError(EsbridgeError):
    """A relay did not get its lease in time: another relay with its relay id publishes.

    Raised by :meth:`~esbridge.relay.Relay.prepare` and
    :meth:`~esbridge.relay.Relay.publish_available` when their timeout ends
    first; :meth:`~esbridge.relay.Relay.run` waits for as long as it takes.
    ``relay_id`` is the relay id whose lease another relay holds, when known.
    """

    def __init__(self, message: str, *, relay_id: str | None = None) -> None:
        super().__init__(message)
        self.relay_id = relay_id


class SchemaRegistryUnavailableError(ServerUnavailableError):
    """The Schema Registry could not be reached to register an analytics topic's schemas.

    Raised when a :class:`~esbridge_connectors.registry.SchemaRegistryEncoder`
    is built, before any relay publishes: nothing was published. Start the
    registry (or fix its ``url``) and start again.
    """


class SchemaIncompatibleError(ConfigurationError):
    """The Schema Registry refused an event type's schema (incompatible change, invalid schema).

    Raised when a :class:`~esbridge_connectors.registry.SchemaRegistryEncoder`
    registers its schemas, before anything is published. ``subject`` is the
    registry subject that refused it. Make the change compatible (new fields
    typed ``X | None``) or publish the new shape to a new topic.
    """

    def __init__(self, message: str, *, subject: str | None = None) -> None:
        super().__init__(message)
        self.subject = subject


class SchemaNotRegisteredError(MessageFormatError):
    """An event type has no registered schema: its class was not given to the registry encoder.

    The relay stops before the notification (nothing of its batch is
    committed); add the class to ``event_classes`` and start it again.
    """


class HarnessError(EsbridgeError):
    """The test harness could not provide a server (missing tool or server failed to start)."""


class RemoteLogError(EsbridgeError):
    """A remote notification log (``esbridge serve-log``) could not be read.

    ``url`` is the request's address (never its token) and ``status`` the HTTP
    status when the server answered.
    """

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class RemoteLogUnreachableError(RemoteLogError, ServerUnavailableError):
    """The log service did not answer (refused connection, timeout, 5xx) after the retries.

    Check the URL, that ``esbridge serve-log`` runs there, and the network.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        waited: float | None = None,
    ) -> None:
        RemoteLogError.__init__(self, message, url=url, status=status)
        self.waited = waited


class RemoteLogRefusedError(RemoteLogError, ConfigurationError):
    """The log service refused the request (401, 403, 400, 404): retrying cannot help.

    ``reason`` is the server's own explanation (its JSON ``error`` code and
    ``detail``): a missing or unknown token, a token not allowed for the
    application, a malformed parameter.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status)
        self.reason = reason


class RemoteLogResponseError(RemoteLogError):
    """The log service answered something that is not the documented wire format."""


class ConsumerError(EsbridgeError):
    """A consumer adapter stopped: it cannot go on without losing or reordering events."""


class GapNotReconciledError(ConsumerError):
    """A partition was held behind missing notifications for longer than allowed.

    Raised when a message arrives after a gap (its ``esb_prev_nid`` is past the
    consumer's position) and the upstream notification log cannot be read to
    fill the gap. Give the consumer read access to the upstream database
    (``upstream_env`` / ``--upstream-log``) or republish the missing range.

    ``topic`` and ``partition`` say which partition is held; ``position`` is
    the id of the last notification applied on it and ``held_nid`` the id of
    the first message held behind the gap, so the missing ids are those after
    ``position`` and before ``held_nid`` (that belong to the partition).
    """

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        position: int | None = None,
        held_nid: int | None = None,
    ) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.position = position
        self.held_nid = held_nid


class CausalDependencyTimeoutError(ConsumerError):
    """An event waited longer than ``causal_timeout`` for an event of another partition.

    The relay published it with causal dependencies (``esb_deps``): it may be
    processed only once ``waiting_for_nid`` of partition ``waiting_for`` is
    processed, and the follower's tracking record of that partition (read from
    Postgres: another member of the group may own it) stayed at ``position``.
    Usually the member owning that partition is down, stuck, or lags far
    behind: look at it. The event is not lost: the consumer stops without
    recording it, and processes it when restarted once the other partition
    has caught up. To process partitions independently instead, start the
    follower's consumer with ``causal_dependencies=False``.
    """

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        nid: int | None = None,
        waiting_for: int | None = None,
        waiting_for_nid: int | None = None,
        position: int | None = None,
    ) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.nid = nid
        self.waiting_for = waiting_for
        self.waiting_for_nid = waiting_for_nid
        self.position = position


class PoisonMessageError(ConsumerError):
    """A message kept failing and the follower's dead-letter policy says ``on_exhausted="stop"``.

    Nothing after the message was processed and its tracking position did not
    move: a restarted consumer tries it again. The policy's own exception is
    the ``__cause__``. Fix the cause (the policy's code, or the data it
    reads) and restart, or run the follower with ``on_exhausted="park"`` or
    ``"skip"`` to go on without it.

    ``key`` is the message's key (the upstream aggregate), ``nid`` its
    notification id, ``topic``/``partition``/``offset`` its Kafka coordinates
    (``None`` for events read from the upstream log).
    """

    def __init__(
        self,
        message: str,
        *,
        follower: str | None = None,
        upstream: str | None = None,
        key: str | None = None,
        nid: int | None = None,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.follower = follower
        self.upstream = upstream
        self.key = key
        self.nid = nid
        self.topic = topic
        self.partition = partition
        self.offset = offset


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


class UpstreamMismatchError(ConfigurationError):
    """A consumer's topic carries another application's messages than its configured upstream.

    Raised before anything is parked, when the first messages a consumer reads
    (with no tracking position yet) all come from other applications: a typo
    in the upstream's name, or the wrong topic. ``upstream`` is the configured
    name, ``topic`` the topic, ``applications`` the names in the messages'
    ``esb_app`` headers (most frequent first). Fix the configuration (the
    message names the option); nothing was recorded.
    """

    def __init__(
        self,
        message: str,
        *,
        upstream: str | None = None,
        topic: str | None = None,
        applications: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.upstream = upstream
        self.topic = topic
        self.applications = list(applications)


class ApplicationNotFoundError(ConfigurationError, KeyError):
    """``KafkaRunner.get()`` has no such application: not in the system, run elsewhere, or closed.

    Also a ``KeyError``, which is what the library's runners raise there, so
    code written for them (``except KeyError``) works unchanged; the message
    says which of the causes it is. ``application`` is the name asked for.
    """

    def __init__(self, message: str, *, application: str | None = None) -> None:
        super().__init__(message)
        self.application = application

    # KeyError's str() is the repr of its argument: keep the message as it is.
    __str__ = EsbridgeError.__str__


class RelayIdConflictError(ConfigurationError):
    """Another relay id already published to this relay's topic: starting would publish again.

    A relay keeps its position under its relay id; a relay with a new id
    starts from the log's beginning, so a second id on the same topic
    republishes the whole log into it. ``relay_id`` is the refused relay's
    id, ``topic`` its topic, ``other_relay_ids`` the ids whose positions the
    position topic holds for that topic. Pass the other id to continue it
    (``--relay-id``), or allow a second relay deliberately
    (``allow_other_relays=True``, ``--allow-other-relays``).
    """

    def __init__(
        self,
        message: str,
        *,
        relay_id: str | None = None,
        topic: str | None = None,
        other_relay_ids: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.relay_id = relay_id
        self.topic = topic
        self.other_relay_ids = list(other_relay_ids)


class _ComponentFailures(ExceptionGroup[Exception]):
    """The exceptions that several components (relays, consumers, workers) stopped with.

    An ``ExceptionGroup``, so each exception keeps its own traceback and
    ``except*`` can select them, yet ``str()`` is the message alone (naming
    each component and its error) as it was when this was a plain error.
    ``components`` names the component of each exception, in the same order.

    Without ``exceptions`` (a failure seen from outside, e.g. a worker
    process's exit status) the group holds one :class:`EsbridgeError` with
    the message, since an exception group cannot be empty.
    """

    def __new__(
        cls,
        message: str,
        exceptions: Sequence[Exception] = (),
        *,
        components: Sequence[str] = (),
    ) -> Self:
        return super().__new__(cls, message, list(exceptions) or [EsbridgeError(message)])

    def __init__(
        self,
        message: str,
        exceptions: Sequence[Exception] = (),
        *,
        components: Sequence[str] = (),
    ) -> None:
        super().__init__(message, list(exceptions) or [EsbridgeError(message)])
        self.components = tuple(components)

    def __str__(self) -> str:
        return self.message

    # typeshed overloads derive for BaseException groups too; these hold Exceptions only.
    def derive(self, excs: Sequence[Exception], /) -> Self:  # type: ignore[override]
        """A group of the same class holding ``excs`` (``except*`` and ``split`` call this)."""
        names = dict(zip(map(id, self.exceptions), self.components, strict=False))
        return type(self)(self.message, excs, components=[names.get(id(e), "") for e in excs])


class SystemRunnerError(EsbridgeError, _ComponentFailures):
    """Relays or consumers of a running system failed; the message names which and why.

    A runtime failure: a restart resumes where they stopped (``esbridge run``
    exits with status 1 so that a supervisor starts the worker again). Each
    component's own exception, traceback included, is in ``exceptions``.
    """


class SystemConfigurationError(ConfigurationError, _ComponentFailures):
    """Relays or consumers of a running system failed, one of them on its configuration.

    A :class:`ConfigurationError`, since restarting cannot help (``esbridge
    run`` exits with status 2); the message names every failed component and
    why, and ``exceptions`` holds their own exceptions.
    """
