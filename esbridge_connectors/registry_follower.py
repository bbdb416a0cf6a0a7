"""An esbridge follower of a Schema Registry topic: Avro or JSON Schema values, exactly once.

A relay with :class:`~esbridge_connectors.registry.SchemaRegistryEncoder`
publishes each event's *data* (plain-JSON values, framed for the registry)
instead of the stored event, but keeps every ``esb_*`` header of the message
format: the notification id, the previous id on the partition, the event
type and the aggregate's version. So the consumer adapter's ordering (chains,
duplicates, gaps filled from the upstream log), its tracking records and its
parking work unchanged; only the value needs another decoder.

:class:`RegistryStepFactory` is that decoder, given to the
:class:`~esbridge.consumer.adapter.ConsumerAdapter` as its ``steps``: the
writer's schema is found by the id in the value (fetched once from the
registry, then cached), the data deserialized with it, and the domain event
rebuilt from the data with the event class's annotations
(:meth:`~esbridge_connectors.schemas.JsonTypes.from_json`, the inverse of
what the encoder wrote). Notifications read from the upstream log (to fill a
gap) are decoded with the upstream application's mapper as usual.

Rebuilding from data is exact for the types the analytics format writes
(UUIDs, datetimes, dates, decimals, enums, dataclasses, collections, and
registered types that give a ``decode``); a field added to the class since a
message was written is absent from the event, as from a stored event of then.
A registry that cannot be reached is not the message's fault: the consumer stops with
:class:`~esbridge.errors.SchemaRegistryUnavailableError` and nothing is parked
or recorded; started again, it resumes from its tracking records.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any, cast

from confluent_kafka import Message
from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Notification, find_id_convertor
from eventsourcing.system import Follower
from eventsourcing.utils import resolve_topic

from esbridge import wire
from esbridge.errors import MessageFormatError, SchemaRegistryUnavailableError
from esbridge.processing.steps import Source, StepFactory, UpstreamDecoder, originator_id
from esbridge_connectors.analytics import BINARY, CloudEventsEncoder
from esbridge_connectors.registry import CONTENT_TYPES, SchemaRegistryReader
from esbridge_connectors.schemas import DEFAULT_TYPES, JsonTypes, field_annotations

_ENVELOPE = ("originator_id", "originator_version")
_REGISTRY_TYPES = frozenset(CONTENT_TYPES.values())


def event_from_data(
    event_class: type,
    data: Mapping[str, Any],
    *,
    aggregate_id: Any,
    version: int,
    types: JsonTypes = DEFAULT_TYPES,
) -> DomainEventProtocol[Any]:
    """The domain event of ``event_class`` whose plain-JSON data is ``data``.

    As the library's mapper builds an event (no ``__init__``), with the
    values converted by the class's annotations; the aggregate id (converted
    as the mapper converts it) and version come from the message's key and
    ``esb_version`` header. A field missing from ``data`` (added to the class
    after the message was written) is missing from the event too, as it is
    from an event the library's mapper reads from before the field existed:
    the class's default applies (a class attribute, or the default of the
    ``@event`` method's argument when the event is applied).
    """
    hints = field_annotations(event_class)
    state: dict[str, Any] = {}
    for name, value in data.items():
        if name not in _ENVELOPE:
            state[name] = types.from_json(value, hints.get(name, Any))
    convert = find_id_convertor(event_class, cast(Hashable, type(aggregate_id)))
    state["originator_id"] = convert(aggregate_id)
    state["originator_version"] = version
    event: DomainEventProtocol[Any] = object.__new__(event_class)
    object.__setattr__(event, "__dict__", state)
    return event


class RegistryStepFactory(StepFactory):
    """The ``steps`` of a consumer of a Schema Registry topic (see the module docstring).

    ``registry``: a :class:`confluent_kafka.schema_registry.SchemaRegistryClient`
    or its settings (``{"url": ...}``); ``types``: the same
    :class:`~esbridge_connectors.schemas.JsonTypes` as the publishing encoder's,
    with a ``decode`` for each type registered there. Build it for a process
    application with :meth:`of_follower`.
    """

    def __init__(
        self,
        follower_name: str,
        decoder: UpstreamDecoder,
        registry: SchemaRegistryClient | Mapping[str, Any],
        *,
        topics: Iterable[str] = (),
        types: JsonTypes = DEFAULT_TYPES,
    ) -> None:
        super().__init__(follower_name, decoder, topics)
        self.reader = SchemaRegistryReader(registry)
        self.types = types
        self._cloudevents = CloudEventsEncoder(
            decoder.upstream_name, decoder.mapper, mode=BINARY, types=types
        )

    @classmethod
    def of_follower(
        cls,
        follower: Follower[Any],
        upstream_name: str,
        registry: SchemaRegistryClient | Mapping[str, Any],
        *,
        upstream_class: type | None = None,
        types: JsonTypes = DEFAULT_TYPES,
    ) -> RegistryStepFactory:
        """The steps of ``follower`` (a process application) reading ``upstream_name``'s topic."""
        decoder = UpstreamDecoder.for_follower(follower, upstream_name, upstream_class)
        return cls(follower.name, decoder, registry, topics=follower.topics or (), types=types)

    def decode(self, source: Source) -> DomainEventProtocol[Any]:
        content_type = _registry_content_type(source.headers, source.value)
        if content_type is None:  # a notification from the upstream log, or a stored event
            return super().decode(source)
        assert source.event_topic is not None and source.originator_version is not None
        event_class = resolve_topic(source.event_topic)
        data = self._data(source.kafka_topic or "", source.value or b"", content_type)
        if not isinstance(data, Mapping):
            raise MessageFormatError(f"the data of {source.event_topic} is not an object")
        return event_from_data(
            event_class,
            data,
            aggregate_id=originator_id(source.key),
            version=source.originator_version,
            types=self.types,
        )

    def same_event(
        self, notification: Notification, message: Message, payload: wire.PayloadHeaders
    ) -> bool:
        """The log's event and the message's: same aggregate, version, type and data."""
        value = message.value() or b""
        headers: Any = message.headers()  # consumed header values are bytes
        content_type = _registry_content_type(headers, value)
        if content_type is None:
            return super().same_event(notification, message, payload)
        if (
            str(notification.originator_id) != payload.originator_id
            or notification.originator_version != payload.originator_version
            or notification.topic != payload.topic
        ):
            return False
        try:
            data = self._data(message.topic() or "", value, content_type)
        except MessageFormatError:
            return False
        expected = self._cloudevents.cloudevent(notification)["data"]
        return _set(data) == _set(expected)

    def _data(self, topic: str, value: bytes, content_type: str) -> Any:
        """The deserialized data; a registry out of reach raises SchemaRegistryUnavailableError.

        The writer's schema is fetched first (cached by the client), so that
        an error of the registry and an error of the message are told apart.
        """
        schema_id = int.from_bytes(value[1:5], "big")
        try:
            self.reader.client.get_schema(schema_id)
        except SchemaRegistryError as e:
            if 0 <= e.http_status_code < 500:
                raise MessageFormatError(
                    f"the Schema Registry has no schema {schema_id} ({e.error_message}): the "
                    "message was written with another registry, or the registry lost it"
                ) from e
            raise self._unavailable(e) from e
        except Exception as e:  # the client's connection errors, timeouts
            raise self._unavailable(e) from e
        return self.reader.data(topic, value, content_type)

    def _unavailable(self, cause: BaseException) -> SchemaRegistryUnavailableError:
        return SchemaRegistryUnavailableError(
            f"cannot fetch a writer's schema from the Schema Registry ({type(cause).__name__}: "
            f"{cause}). Nothing was recorded or parked: check that the registry runs, then "
            "start the consumer again (it resumes from its tracking records)"
        )


def _registry_content_type(
    headers: Iterable[tuple[str, bytes | None]] | None, value: bytes | None
) -> str | None:
    """The message's content type when its value is registry-framed (magic byte 0), else None.

    ``application/json`` is also the default format's type for JSON stored
    events; those start with ``{``, never with the magic byte.
    """
    if not value or value[0] != 0:
        return None
    for name, found in headers or ():
        if name == wire.H_CONTENT_TYPE and found is not None:
            text = found.decode("utf-8", "replace")
            return text if text in _REGISTRY_TYPES else None
    return None


def _set(data: Any) -> Any:
    """``data`` without null fields: an optional field is absent or null, alike."""
    if isinstance(data, Mapping):
        return {k: v for k, v in data.items() if v is not None}
    return data
