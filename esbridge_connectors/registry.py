"""Analytics topics in the Schema Registry wire format (Avro or JSON Schema).

Kafka Connect sinks, ksqlDB, Flink, ClickHouse and Spark read Kafka through a
Confluent-compatible Schema Registry: each value starts with a magic byte and
the id of its schema. This module publishes an application's events that way,
with ``confluent_kafka.schema_registry``'s own serializers (``AvroSerializer``
over fastavro, ``JSONSerializer``), so the bytes are exactly what those tools
expect. The CloudEvents attributes travel as ``ce_*`` headers (the CloudEvents
Kafka binary mode, as :mod:`esbridge_connectors.analytics` writes it) and the
value is the event's data: the same plain-JSON values, described by a schema
generated from the event class.

* **One schema per event type**, from the class: the JSON Schema of
  :func:`~esbridge_connectors.schemas.event_data_schema`, and for Avro a record
  derived from that JSON Schema (:func:`avro_schema`), so both formats carry
  the same values (UUIDs, datetimes and decimals as strings).
* **Subjects** are named by a Confluent subject-name strategy, topic-record
  name by default (``{topic}-{module.Class.Event}``): one topic carries many
  event types.
* **Registered before publishing.** :class:`SchemaRegistryEncoder` sets each
  subject's compatibility mode and registers every schema when it is built,
  before any relay (or replay) opens a Kafka transaction; encoding then only
  reads the ids it cached. A registry that is down at start fails there
  (:class:`~esbridge.errors.SchemaRegistryUnavailableError`), before anything
  is published; one that goes down later does not stop the relay.
* **Evolution**: adding a field that may be ``None`` (``X | None``) to an event class
  registers a new, compatible version; an incompatible change is refused by
  the registry and raises :class:`~esbridge.errors.SchemaIncompatibleError`
  at start, before anything is published.

:class:`SchemaRegistryReader` is the consumer side: it turns such a message
back into the CloudEvent (attributes from the headers, data deserialized with
the writer's schema fetched by id).
:mod:`esbridge_connectors.registry_follower` is the consumer side for esbridge
followers: the domain events back, exactly once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka.schema_registry import (
    Schema,
    SchemaRegistryClient,
    SchemaRegistryError,
    topic_record_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError
from eventsourcing.persistence import Mapper, Notification
from eventsourcing.utils import get_topic

from esbridge import wire
from esbridge.errors import (
    MessageFormatError,
    SchemaIncompatibleError,
    SchemaNotRegisteredError,
    SchemaRegistryUnavailableError,
)
from esbridge_connectors.analytics import BINARY, CloudEventsEncoder, binary_headers
from esbridge_connectors.schemas import (
    DEFAULT_TYPES,
    JsonTypes,
    SchemaGenerationError,
    event_data_schema,
    schema_file_stem,
)

Format = Literal["avro", "json"]
AVRO: Format = "avro"
JSON_SCHEMA: Format = "json"
#: The ``content-type`` header of each format's messages (the value is registry-framed).
CONTENT_TYPES: dict[str, str] = {AVRO: "application/avro", JSON_SCHEMA: "application/json"}
COMPATIBILITY_MODES = (
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
    "NONE",
)
#: ``(SerializationContext, record name) -> subject``, as confluent_kafka's strategies.
SubjectNameStrategy = Callable[[SerializationContext, str | None], str | None]

JSON_SCHEMA_DRAFT7 = "http://json-schema.org/draft-07/schema#"
_AVRO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_AVRO_SCALARS = {"string": "string", "integer": "long", "number": "double", "boolean": "boolean"}


# -- schemas ------------------------------------------------------------------------------------


def record_name(event_class: type) -> str:
    """The schema's name: the event's topic with ``:`` as ``.`` (``shop.domain.Order.Placed``).

    The Avro record's full name and the JSON Schema's ``title``, so the
    topic-record subject of an event type is the same in both formats.
    """
    name = schema_file_stem(get_topic(event_class))
    if not all(_AVRO_NAME.match(part) for part in name.split(".")):
        raise SchemaGenerationError(
            f"event type {name!r} is not a valid Avro full name (dotted identifiers): "
            "rename the module or class"
        )
    return name


def registry_json_schema(event_class: type, *, types: JsonTypes = DEFAULT_TYPES) -> dict[str, Any]:
    """The JSON Schema registered for an event type: its data schema, titled by its record name.

    Fields that may be ``None`` are optional: events recorded before such a
    field was added to the class do not have it, and adding one must be a
    compatible change. Written in draft-07, the dialect that Confluent-compatible
    registries check compatibility in (Apicurio cannot in 2020-12) and that
    Kafka Connect's JSON Schema converter reads; tuples become draft-07's
    array form of ``items``.
    """
    data = _draft7(event_data_schema(event_class, types=types, strict=True))
    data["required"] = [f for f in data["required"] if not _nullable_json(data["properties"][f])]
    return {"$schema": JSON_SCHEMA_DRAFT7, "title": record_name(event_class), **data}


def _draft7(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_draft7(item) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    result = {key: _draft7(value) for key, value in schema.items()}
    if "prefixItems" in result:
        result["items"] = result.pop("prefixItems")
        result["additionalItems"] = False
    return result


def _nullable_json(schema: Mapping[str, Any]) -> bool:
    if not schema or schema.get("type") == "null":
        return True
    return any(_nullable_json(member) for member in schema.get("anyOf", ()))


def avro_schema(event_class: type, *, types: JsonTypes = DEFAULT_TYPES) -> dict[str, Any]:
    """The Avro record of an event type, derived from its JSON Schema (same values).

    Strings stay strings (UUIDs, datetimes, decimals: no logical types, so an
    Avro reader sees what a JSON reader sees), integers are ``long``, numbers
    ``double``, enums of names Avro ``enum``, optional fields unions with
    ``null`` (default ``null``: adding one is a compatible change), nested
    dataclasses records named after their path, mappings Avro ``map``.
    Values of any type (``Any``, unresolved annotations) have no Avro form:
    :class:`~esbridge_connectors.schemas.SchemaGenerationError` names the field.
    """
    name = record_name(event_class)
    namespace, _, short = name.rpartition(".")
    schema = registry_json_schema(event_class, types=types)
    return _avro_record(schema, short, namespace, name)


def _avro_record(schema: Mapping[str, Any], name: str, namespace: str, path: str) -> dict[str, Any]:
    required = set(schema.get("required", ()))
    fields = []
    for field, sub in schema.get("properties", {}).items():
        avro = _avro(sub, f"{path}.{field}", f"{name}_{field}", namespace)
        entry: dict[str, Any] = {"name": field, "type": avro}
        may_be_null = avro == "null" or (isinstance(avro, list) and "null" in avro)
        if field not in required or may_be_null:  # null first: the default must be its type
            entry["type"] = _nullable(avro)
            entry["default"] = None
        fields.append(entry)
    record: dict[str, Any] = {"type": "record", "name": name, "fields": fields}
    if namespace:
        record["namespace"] = namespace
    return record


def _nullable(avro: Any) -> list[Any]:
    members = avro if isinstance(avro, list) else [avro]
    return ["null", *[m for m in members if m != "null"]]


def _avro(schema: Mapping[str, Any], path: str, name: str, namespace: str) -> Any:
    if "anyOf" in schema:
        members: list[Any] = []
        for i, sub in enumerate(schema["anyOf"]):
            avro = _avro(sub, path, f"{name}_{i}", namespace)
            for member in avro if isinstance(avro, list) else [avro]:
                if member not in members:
                    members.append(member)
        return members if len(members) > 1 else members[0]
    if "const" in schema:
        return _avro_of_values([schema["const"]], path)
    if "enum" in schema:
        values = schema["enum"]
        if all(isinstance(v, str) and _AVRO_NAME.match(v) for v in values):
            return {"type": "enum", "name": name, "namespace": namespace, "symbols": list(values)}
        return _avro_of_values(values, path)
    kind = schema.get("type")
    if kind in _AVRO_SCALARS:
        return _AVRO_SCALARS[kind]
    if kind == "null":
        return "null"
    if kind == "array":
        if isinstance(schema.get("items"), list):  # a tuple: an array of any of its item types
            item = _avro({"anyOf": schema["items"]}, path, f"{name}_item", namespace)
        elif "items" in schema:
            item = _avro(schema["items"], f"{path}[]", f"{name}_item", namespace)
        else:
            raise _untyped(path, "a list without an item type")
        return {"type": "array", "items": item}
    if kind == "object":
        if "properties" in schema:
            return _avro_record(schema, name, namespace, path)
        values = schema.get("additionalProperties")
        if isinstance(values, Mapping) and values:
            return {"type": "map", "values": _avro(values, f"{path}{{}}", name, namespace)}
        raise _untyped(path, "a mapping without a value type")
    raise _untyped(path, "a value of any type")


def _avro_of_values(values: Sequence[Any], path: str) -> Any:
    kinds: list[str] = []
    for value in values:
        if value is None:
            kind = "null"
        elif isinstance(value, bool):
            kind = "boolean"
        elif isinstance(value, int):
            kind = "long"
        elif isinstance(value, float):
            kind = "double"
        elif isinstance(value, str):
            kind = "string"
        else:
            raise _untyped(path, f"a literal {value!r}")
        if kind not in kinds:
            kinds.append(kind)
    return kinds if len(kinds) > 1 else kinds[0]


def _untyped(path: str, what: str) -> SchemaGenerationError:
    return SchemaGenerationError(
        f"field {path} is {what}: Avro needs a type; annotate the field with one "
        "(or publish this event type in the JSON Schema format)"
    )


# -- the producer side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredEventType:
    """An event type's subject, the id of its schema, and the serializer that frames values."""

    event_type: str
    subject: str
    schema_id: int
    serializer: Callable[[Any, SerializationContext], bytes | None]


class SchemaRegistryEncoder:
    """The relay's ``encoder`` for an analytics topic in the Schema Registry wire format.

    ``registry`` is a :class:`confluent_kafka.schema_registry.SchemaRegistryClient`
    (or its settings: ``{"url": ...}``); ``topic`` the Kafka topic the relay
    publishes to (subjects are named after it); ``event_classes`` every event
    type the application records (see
    :func:`~esbridge_connectors.schemas.discover_event_classes`). Building the
    encoder sets each subject's ``compatibility`` and registers its schema (all
    registry calls happen here, before a relay opens a Kafka transaction);
    :meth:`encode` only serializes with the cached ids.

    In the JSON format, ``validate`` (the default, as ``JSONSerializer``'s)
    checks every value against its schema before it is published; the values
    are generated from the same classes as the schema, so ``validate=False``
    is safe and several times cheaper.

    Raises :class:`~esbridge.errors.SchemaRegistryUnavailableError` when the
    registry cannot be reached and :class:`~esbridge.errors.SchemaIncompatibleError`
    when it refuses a schema: in both cases before anything was published.
    """

    def __init__(
        self,
        app_name: str,
        mapper: Mapper[Any],
        registry: SchemaRegistryClient | Mapping[str, Any],
        *,
        topic: str,
        event_classes: Iterable[type],
        format: Format = AVRO,
        compatibility: str = "BACKWARD",
        subject_name_strategy: SubjectNameStrategy = topic_record_subject_name_strategy,
        types: JsonTypes = DEFAULT_TYPES,
        validate: bool = True,
    ) -> None:
        if format not in CONTENT_TYPES:
            raise ValueError(f"format must be {AVRO!r} or {JSON_SCHEMA!r}, not {format!r}")
        if compatibility not in COMPATIBILITY_MODES:
            raise ValueError(f"compatibility must be one of {COMPATIBILITY_MODES}")
        self.client = _client(registry)
        self.topic = topic
        self.format = format
        self.compatibility = compatibility
        self.cloudevents = CloudEventsEncoder(app_name, mapper, mode=BINARY, types=types)
        self._context = SerializationContext(topic, MessageField.VALUE)
        self._content_type = (wire.H_CONTENT_TYPE, CONTENT_TYPES[format].encode())
        self._strategy = subject_name_strategy
        self._types = types
        self._validate = validate
        self.registered: dict[str, RegisteredEventType] = {}
        for cls in event_classes:
            registered = self._register(cls)
            self.registered[registered.event_type] = registered

    def _register(self, cls: type) -> RegisteredEventType:
        event_type = get_topic(cls)
        name = record_name(cls)
        subject = self._strategy(self._context, name)
        if not subject:
            raise ValueError(f"the subject name strategy gave no subject for {event_type}")
        if self.format == AVRO:
            schema = Schema(_dumps(avro_schema(cls, types=self._types)), "AVRO")
        else:
            schema = Schema(_dumps(registry_json_schema(cls, types=self._types)), "JSON")
        try:
            self.client.set_compatibility(subject, self.compatibility)
            schema_id = self.client.register_schema(subject, schema)
        except SchemaRegistryError as e:
            if e.http_status_code == 409:
                raise SchemaIncompatibleError(
                    f"the Schema Registry refused the new schema of {event_type} under subject "
                    f"{subject!r} ({self.compatibility} compatibility): {e.error_message}. "
                    "Nothing was published. Make the change compatible (add new fields typed "
                    "`X | None`; never remove or retype one) or publish to a new topic",
                    subject=subject,
                ) from e
            if e.http_status_code >= 500 or e.http_status_code < 0:
                raise self._unavailable(e) from e
            raise SchemaIncompatibleError(
                f"the Schema Registry refused the schema of {event_type} under subject "
                f"{subject!r}: {e.error_message} (HTTP {e.http_status_code}, code "
                f"{e.error_code}). Nothing was published",
                subject=subject,
            ) from e
        except Exception as e:  # httpx's connection errors, timeouts
            raise self._unavailable(e) from e
        # The serializer finds the id in the client's cache (filled by register_schema
        # above) on its first call, and in its own afterwards: no registry call from encode().
        serializer: Any
        conf = {"auto.register.schemas": True, "subject.name.strategy": self._strategy}
        if self.format == AVRO:
            serializer = AvroSerializer(self.client, schema, conf=conf)
        else:
            serializer = JSONSerializer(
                schema, self.client, conf={**conf, "validate": self._validate}
            )
        return RegisteredEventType(event_type, subject, schema_id, serializer)

    def _unavailable(self, cause: BaseException) -> SchemaRegistryUnavailableError:
        url = self.client._rest_client.base_urls[0] if _has_urls(self.client) else "?"
        return SchemaRegistryUnavailableError(
            f"cannot register the schemas of topic {self.topic!r} with the Schema Registry at "
            f"{url} ({type(cause).__name__}: {cause}). Nothing was published: check that the "
            "registry runs and its url, then start the relay again"
        )

    def encode(self, notification: Notification) -> tuple[bytes, wire.Headers]:
        """Registry-framed value and CloudEvents headers of one notification (no registry call)."""
        registered = self.registered.get(notification.topic)
        if registered is None:
            raise SchemaNotRegisteredError(
                f"event type {notification.topic} (notification {notification.id}) has no "
                f"registered schema for topic {self.topic!r}: add its class to the encoder's "
                "event_classes and start the relay again"
            )
        event = self.cloudevents.cloudevent(notification)
        data = event.pop("data")
        try:
            value = registered.serializer(data, self._context)
        except SerializationError as e:
            raise MessageFormatError(
                f"event {notification.topic} (notification {notification.id}) does not fit "
                f"its registered schema (subject {registered.subject!r}): {e}"
            ) from e
        if value is None:  # pragma: no cover - data is never None
            raise MessageFormatError(f"notification {notification.id} serialized to nothing")
        headers = binary_headers(event)
        headers[0] = self._content_type
        return value, headers

    __call__ = encode


def _client(registry: SchemaRegistryClient | Mapping[str, Any]) -> SchemaRegistryClient:
    if isinstance(registry, SchemaRegistryClient):
        return registry
    return SchemaRegistryClient(dict(registry))


def _has_urls(client: SchemaRegistryClient) -> bool:
    return bool(getattr(getattr(client, "_rest_client", None), "base_urls", None))


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# -- the consumer side ----------------------------------------------------------------------------


class SchemaRegistryReader:
    """Reads analytics messages in the Schema Registry wire format back into CloudEvents.

    The value's schema id says which schema wrote it; the deserializers of
    ``confluent_kafka.schema_registry`` fetch it from the registry once and
    cache it. The format is told by the ``content-type`` header.
    """

    def __init__(self, registry: SchemaRegistryClient | Mapping[str, Any]) -> None:
        self.client = _client(registry)
        self._avro = AvroDeserializer(self.client)
        self._json = JSONDeserializer(None, schema_registry_client=self.client)

    def data(self, topic: str, value: bytes, content_type: str) -> Any:
        """The event's data from a registry-framed value."""
        context = SerializationContext(topic, MessageField.VALUE)
        try:
            if content_type == CONTENT_TYPES[AVRO]:
                return self._avro(value, context)
            if content_type == CONTENT_TYPES[JSON_SCHEMA]:
                return self._json(value, context)
        except (SerializationError, SchemaRegistryError) as e:
            raise MessageFormatError(f"cannot read a Schema Registry message: {e}") from e
        raise MessageFormatError(
            f"content-type {content_type!r} is not a Schema Registry format "
            f"({', '.join(CONTENT_TYPES.values())})"
        )

    def cloudevent(
        self, topic: str, value: bytes, headers: Sequence[tuple[str, bytes | None]] | None
    ) -> dict[str, Any]:
        """The CloudEvent of one message: ``ce_*`` headers as attributes, the value as data."""
        found = wire.headers_dict(headers)
        if "ce_specversion" not in found:
            raise MessageFormatError("not a CloudEvents message: no ce_specversion header")
        content_type = found.get(wire.H_CONTENT_TYPE, "")
        event: dict[str, Any] = {
            name[3:]: text for name, text in found.items() if name.startswith("ce_")
        }
        for name in ("esbnid", "esbversion"):
            if name in event:
                event[name] = int(event[name])
        event["datacontenttype"] = content_type
        event["data"] = self.data(topic, value, content_type)
        return event
