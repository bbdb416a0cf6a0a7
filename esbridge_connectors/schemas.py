"""JSON Schema per event type, generated from the event classes themselves.

Analytics consumers (Spark, Flink, dbt loaders, Go or Java services) read
events as plain JSON and need a contract that does not require Python. The
event classes are dataclasses with type annotations, so the contract is
derived from them: one schema per event type, regenerated whenever the
classes change, so it cannot drift from the code.

:class:`JsonTypes` is the single place that says how a Python value becomes
plain JSON *and* which JSON Schema describes it. The analytics encoder
(:mod:`esbridge_connectors.analytics`) uses the same registry, so every
message it writes validates against the schema generated here (a test checks
every message of a real topic).

Command line::

    python -m esbridge_connectors.schemas dogschool.domain --out schemas/
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import enum
import importlib
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import eventsourcing.domain
from eventsourcing.domain import CanInitAggregate, DomainEvent, Snapshot
from eventsourcing.utils import get_topic, resolve_topic

from esbridge.errors import EsbridgeError

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
DECIMAL_PATTERN = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$"
# ISO 8601 as Python's isoformat() writes it: RFC 3339 ("format": "date-time") only when the
# value has a timezone, so naive values are allowed by a pattern instead of the format.
DATETIME_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T"
    r"[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})?$"
)
TIME_PATTERN = r"^[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})?$"
ENVELOPE_FIELDS = ("originator_id", "originator_version", "timestamp")


class PlainJsonError(EsbridgeError):
    """A value has no plain-JSON form: register its type with ``JsonTypes.register``."""


class SchemaGenerationError(EsbridgeError):
    """An event class cannot be described by a JSON Schema (see the message for the field)."""


@dataclasses.dataclass(frozen=True)
class JsonType:
    """How values of one Python type are written as plain JSON, and their schema."""

    schema: Mapping[str, Any]
    encode: Callable[[Any], Any]
    #: The inverse of ``encode``, for consumers that rebuild events from plain JSON.
    decode: Callable[[Any], Any] | None = None


def _iso(value: date | time) -> str:
    return value.isoformat()


def _base64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _from_base64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


DEFAULT_JSON_TYPES: dict[type, JsonType] = {
    UUID: JsonType({"type": "string", "format": "uuid"}, str, UUID),
    datetime: JsonType(
        {
            "type": "string",
            "pattern": DATETIME_PATTERN,
            "description": "ISO 8601 date-time (RFC 3339 when it has an offset)",
        },
        _iso,
        datetime.fromisoformat,
    ),
    date: JsonType({"type": "string", "format": "date"}, _iso, date.fromisoformat),
    time: JsonType(
        {"type": "string", "pattern": TIME_PATTERN, "description": "ISO 8601 time"},
        _iso,
        time.fromisoformat,
    ),
    Decimal: JsonType({"type": "string", "pattern": DECIMAL_PATTERN}, str, Decimal),
    bytes: JsonType({"type": "string", "contentEncoding": "base64"}, _base64, _from_base64),
}
_SCALARS: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}
_SEQUENCES = {list, tuple, set, frozenset}
_ORIGINS_ARRAY = {
    list,
    set,
    frozenset,
    tuple,
    Sequence,
    typing.Sequence,
    Iterable,
    typing.MutableSequence,
    typing.AbstractSet,
    typing.MutableSet,
}
_ORIGINS_OBJECT = {dict, Mapping, typing.MutableMapping}


class JsonTypes:
    """Registry of plain-JSON encodings and their schemas, keyed by Python type.

    Defaults: UUIDs, datetimes, dates, times and decimals as strings, bytes as
    base64; enums as their values; dataclasses as objects; lists, tuples and
    sets as arrays; mappings with string-like keys as objects. Register your own
    value types (those your application registers transcodings for)::

        types = JsonTypes()
        types.register(Money, {"type": "string"}, lambda m: f"{m.amount} {m.currency}")
    """

    def __init__(self) -> None:
        self._types: dict[type, JsonType] = dict(DEFAULT_JSON_TYPES)

    def register(
        self,
        cls: type,
        schema: Mapping[str, Any],
        encode: Callable[[Any], Any],
        decode: Callable[[Any], Any] | None = None,
    ) -> None:
        """Write ``cls`` values (and subclasses) as ``encode(value)``, described by ``schema``.

        ``decode`` (plain JSON -> a ``cls`` value) lets an esbridge follower
        rebuild events of a Schema Registry topic (:meth:`from_json`).
        """
        self._types[cls] = JsonType(dict(schema), encode, decode)

    def _lookup(self, cls: type) -> JsonType | None:
        for base in cls.__mro__:
            found = self._types.get(base)
            if found is not None:
                return found
        return None

    # -- values -------------------------------------------------------------------------------

    def to_json(self, value: Any) -> Any:
        """``value`` as plain JSON data (dicts, lists, strings, numbers, booleans, None)."""
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int | float) and not isinstance(value, enum.Enum):
            return value
        registered = self._lookup(type(value))
        if registered is not None:
            return registered.encode(value)
        if isinstance(value, enum.Enum):
            return self.to_json(value.value)
        if isinstance(value, Mapping):
            return {self._key(k): self.to_json(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.to_json(v) for v in value]
        if isinstance(value, set | frozenset):
            items = [self.to_json(v) for v in value]
            return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: self.to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        raise PlainJsonError(
            f"cannot write a value of type {type(value).__module__}.{type(value).__qualname__} "
            "as plain JSON: register it with JsonTypes.register(cls, schema, encode)"
        )

    def from_json(self, value: Any, annotation: Any) -> Any:
        """The Python value annotated ``annotation`` that :meth:`to_json` wrote as ``value``.

        The inverse of :meth:`to_json`, directed by the annotation (plain JSON
        does not say that a string is a UUID): for a follower that rebuilds
        events from an analytics topic. Raises :class:`PlainJsonError` when
        ``value`` does not fit ``annotation``, or a registered type has no
        ``decode``.
        """
        return self._value(value, annotation, "value")

    def _value(self, value: Any, tp: Any, path: str) -> Any:
        if tp is Any or tp is object or isinstance(tp, str | typing.ForwardRef | typing.TypeVar):
            return value
        if tp is None or tp is type(None):
            return self._fits(value, value is None, "null", path)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Annotated or origin is typing.ClassVar:
            return self._value(value, args[0], path) if args else value
        if origin is typing.Union or origin is types.UnionType:
            if value is None and type(None) in args:
                return None
            for member in args:
                try:
                    return self._value(value, member, path)
                except (PlainJsonError, ValueError, TypeError):
                    continue
            raise PlainJsonError(f"{path}: {value!r} fits none of {tp}")
        if origin is typing.Literal:
            return self._fits(value, value in [self.to_json(a) for a in args], str(tp), path)
        if origin in _ORIGINS_ARRAY or tp in _SEQUENCES:
            return self._sequence(value, origin or tp, args, path)
        if origin in _ORIGINS_OBJECT or tp is dict:
            self._fits(value, isinstance(value, dict), "an object", path)
            key_tp, value_tp = args if len(args) == 2 else (str, Any)
            return {
                self._value(k, key_tp, path): self._value(v, value_tp, f"{path}.{k}")
                for k, v in value.items()
            }
        if origin is not None:
            return self._value(value, origin, path)
        return self._instance(value, tp, path)

    def _sequence(self, value: Any, origin: Any, args: tuple[Any, ...], path: str) -> Any:
        self._fits(value, isinstance(value, list), "an array", path)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            self._fits(value, len(value) == len(args), f"{len(args)} items", path)
            return tuple(
                self._value(v, a, f"{path}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        items = [self._value(v, args[0] if args else Any, f"{path}[]") for v in value]
        if origin in (set, typing.AbstractSet, typing.MutableSet):
            return set(items)
        if origin is frozenset:
            return frozenset(items)
        return tuple(items) if origin is tuple else items

    def _instance(self, value: Any, cls: Any, path: str) -> Any:
        if cls is bool or cls is str:
            return self._fits(value, isinstance(value, cls), cls.__name__, path)
        if cls is int:
            return self._fits(
                value, isinstance(value, int) and not isinstance(value, bool), "int", path
            )
        if cls is float:
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            return float(self._fits(value, is_number, "a number", path))
        registered = self._lookup(cls) if isinstance(cls, type) else None
        if registered is not None:
            if registered.decode is None:
                raise PlainJsonError(
                    f"{path}: type {cls.__module__}.{cls.__qualname__} is registered without a "
                    "decode: register it with JsonTypes.register(cls, schema, encode, decode)"
                )
            return registered.decode(value)
        if isinstance(cls, type) and issubclass(cls, enum.Enum):
            return cls(value)
        if dataclasses.is_dataclass(cls) and isinstance(cls, type):
            self._fits(value, isinstance(value, dict), "an object", path)
            hints = field_annotations(cls)
            fields = {
                name: self._value(v, hints.get(name, Any), f"{path}.{name}")
                for name, v in value.items()
            }
            return cls(**fields)
        if _is_typeddict(cls):
            self._fits(value, isinstance(value, dict), "an object", path)
            hints = field_annotations(cls)
            return {k: self._value(v, hints.get(k, Any), f"{path}.{k}") for k, v in value.items()}
        raise PlainJsonError(
            f"{path}: cannot rebuild a value of type {cls!r} from plain JSON: register it with "
            "JsonTypes.register(cls, schema, encode, decode)"
        )

    @staticmethod
    def _fits(value: Any, fits: bool, what: str, path: str) -> Any:
        if not fits:
            raise PlainJsonError(f"{path}: expected {what}, got {value!r}")
        return value

    def _key(self, key: Any) -> str:
        encoded = self.to_json(key)
        if not isinstance(encoded, str):
            raise PlainJsonError(
                f"mapping key {key!r} is not a string in plain JSON: use string-like keys"
            )
        return encoded

    # -- schemas ------------------------------------------------------------------------------

    def schema_for(self, annotation: Any, *, strict: bool = True) -> dict[str, Any]:
        """The JSON Schema of values annotated with ``annotation``."""
        return self._schema(annotation, strict, ())

    def _schema(self, tp: Any, strict: bool, seen: tuple[type, ...]) -> dict[str, Any]:
        if tp is Any or tp is object or tp is inspect.Parameter.empty:
            return {}
        if tp is None or tp is type(None):
            return {"type": "null"}
        if isinstance(tp, typing.TypeVar):
            if tp.__bound__ is not None:
                return self._schema(tp.__bound__, strict, seen)
            if tp.__constraints__:
                return self._union(tp.__constraints__, strict, seen)
            return {}
        if isinstance(tp, str | typing.ForwardRef):
            name = tp if isinstance(tp, str) else tp.__forward_arg__
            return {"description": f"unresolved annotation {name!r}: any JSON value"}
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            return self._schema(args[0], strict, seen)
        if origin is typing.Union or origin is types.UnionType:
            return self._union(args, strict, seen)
        if origin is typing.Literal:
            return {"enum": [self.to_json(a) for a in args]}
        if origin is typing.ClassVar:
            return self._schema(args[0], strict, seen) if args else {}
        if origin in _ORIGINS_ARRAY:
            return self._array(origin, args, strict, seen)
        if origin in _ORIGINS_OBJECT:
            value_schema = self._schema(args[1], strict, seen) if len(args) == 2 else {}
            return {"type": "object", "additionalProperties": value_schema}
        if origin is not None:
            return self._schema(origin, strict, seen)
        if not isinstance(tp, type):
            raise SchemaGenerationError(f"cannot describe annotation {tp!r} with a JSON Schema")
        return self._class_schema(tp, strict, seen)

    def _union(
        self, members: Iterable[Any], strict: bool, seen: tuple[type, ...]
    ) -> dict[str, Any]:
        schemas: list[dict[str, Any]] = []
        for member in members:
            schema = self._schema(member, strict, seen)
            if schema == {}:
                return {}
            if schema not in schemas:
                schemas.append(schema)
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}

    def _array(
        self, origin: Any, args: tuple[Any, ...], strict: bool, seen: tuple[type, ...]
    ) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "array"}
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            schema["prefixItems"] = [self._schema(a, strict, seen) for a in args]
            schema["minItems"] = schema["maxItems"] = len(args)
            return schema
        if args:
            schema["items"] = self._schema(args[0], strict, seen)
        if origin in (set, frozenset, typing.AbstractSet, typing.MutableSet):
            schema["uniqueItems"] = True
        return schema

    def _class_schema(self, cls: type, strict: bool, seen: tuple[type, ...]) -> dict[str, Any]:
        if cls in _SCALARS:
            return {"type": _SCALARS[cls]}
        registered = self._lookup(cls)
        if registered is not None:
            return dict(registered.schema)
        if issubclass(cls, enum.Enum):
            return {"enum": [self.to_json(member.value) for member in cls]}
        if cls in _SEQUENCES:
            return self._array(cls, (), strict, seen)
        if cls is dict:
            return {"type": "object"}
        if cls in seen:
            return {"description": f"recursive reference to {cls.__qualname__}"}
        if dataclasses.is_dataclass(cls) or _is_typeddict(cls):
            return self.object_schema(cls, strict=strict, _seen=(*seen, cls))
        raise SchemaGenerationError(
            f"type {cls.__module__}.{cls.__qualname__} has no plain-JSON form: register it "
            "with JsonTypes.register(cls, schema, encode)"
        )

    def object_schema(
        self, cls: type, *, strict: bool = True, _seen: tuple[type, ...] = ()
    ) -> dict[str, Any]:
        """The schema of a dataclass or TypedDict (every field required: all are written)."""
        hints = field_annotations(cls)
        properties = {name: self._schema(tp, strict, _seen or (cls,)) for name, tp in hints.items()}
        required = list(hints)
        if _is_typeddict(cls):
            required = [n for n in hints if n in getattr(cls, "__required_keys__", hints)]
        schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
        if strict:
            schema["additionalProperties"] = False
        return schema


def _is_typeddict(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, dict) and hasattr(cls, "__required_keys__")


def field_annotations(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, in declaration order, without class variables.

    Unresolvable forward references are kept as strings (described as "any
    JSON value") instead of failing: the schema is still useful, and the
    description says which annotation could not be resolved.
    """
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:
        hints = {}
        for klass in reversed(cls.__mro__):
            hints.update(getattr(klass, "__annotations__", {}))
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
    else:
        names = [n for n, tp in hints.items() if typing.get_origin(tp) is not typing.ClassVar]
    return {name: hints.get(name, Any) for name in names}


DEFAULT_TYPES = JsonTypes()


# -- event types --------------------------------------------------------------------------------


def event_data_schema(
    event_class: type, *, types: JsonTypes = DEFAULT_TYPES, strict: bool = True
) -> dict[str, Any]:
    """The schema of an event's ``data``: every attribute of the event, as plain JSON.

    ``originator_id`` is the aggregate id (a UUID string unless the aggregate
    uses string ids), ``originator_version`` its version, ``timestamp`` the
    event time; the other properties are the event class's own fields.
    """
    schema = types.object_schema(event_class, strict=strict)
    id_type = getattr(event_class, "originator_id_type", None)
    if "originator_id" in schema["properties"]:
        schema["properties"]["originator_id"] = (
            types.schema_for(id_type) if id_type is not None else {"type": "string"}
        )
    return schema


def cloudevent_schema(
    event_class: type, *, types: JsonTypes = DEFAULT_TYPES, strict: bool = True
) -> dict[str, Any]:
    """The schema of a structured-mode CloudEvent carrying an event of ``event_class``.

    The data schema is under ``$defs/data`` (binary-mode consumers validate the
    message value against it alone: it is also written as ``<type>.data.json``).
    """
    topic = get_topic(event_class)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": topic,
        "description": _doc(event_class),
        "type": "object",
        "properties": {
            "specversion": {"const": "1.0"},
            "id": {"type": "string", "minLength": 1},
            "source": {"type": "string", "pattern": "^esbridge://"},
            "type": {"const": topic},
            "subject": {"type": "string"},
            "time": {"type": "string", "format": "date-time"},
            "datacontenttype": {"const": "application/json"},
            "dataschema": {"type": "string", "format": "uri"},
            "esbapp": {"type": "string"},
            "esbnid": {"type": "integer", "minimum": 1},
            "esbversion": {"type": "integer"},
            "data": {"$ref": "#/$defs/data"},
        },
        "required": [
            "specversion",
            "id",
            "source",
            "type",
            "subject",
            "time",
            "datacontenttype",
            "esbapp",
            "esbnid",
            "esbversion",
            "data",
        ],
        "additionalProperties": not strict,
        "$defs": {"data": event_data_schema(event_class, types=types, strict=strict)},
    }


def _doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if not doc.strip() or doc.startswith(cls.__name__ + "("):  # dataclass's generated doc
        return f"Event {cls.__qualname__}"
    return doc.strip().splitlines()[0]


def schema_file_stem(topic: str) -> str:
    """File name (without ``.json``) of an event type's schema: the topic with ``:`` as ``.``."""
    return topic.replace(":", ".")


def discover_event_classes(targets: Iterable[Any], *, include_bases: bool = False) -> list[type]:
    """Event classes found in ``targets`` (modules, aggregate or event classes, or topics).

    A topic string is a module name (``dogschool.domain``) or ``module:Qual.Name``.
    Modules contribute every event class nested in the classes defined in
    them; a class contributes itself (if an event class) and its nested event
    classes. Snapshots are skipped: they are not in the notification log.
    Base classes of other found event classes (the ``Event`` and ``Created``
    classes eventsourcing generates for each aggregate, your own abstract
    bases) are skipped too unless ``include_bases``: they are not recorded.
    """
    found: dict[str, type] = {}
    for target in targets:
        if isinstance(target, str):
            target = resolve_topic(target) if ":" in target else importlib.import_module(target)
        if isinstance(target, types.ModuleType):
            for value in list(vars(target).values()):
                if isinstance(value, type) and value.__module__ == target.__name__:
                    _collect(value, found)
        elif isinstance(target, type):
            _collect(target, found)
        else:
            raise SchemaGenerationError(
                f"cannot find event classes in {target!r}: give modules, classes or topics"
            )
    classes = list(found.values())
    if include_bases:
        return classes
    return [c for c in classes if not any(o is not c and issubclass(o, c) for o in classes)]


def _collect(cls: type, found: dict[str, type]) -> None:
    if issubclass(cls, DomainEvent) and not issubclass(cls, Snapshot):
        found.setdefault(get_topic(cls), cls)
    unused = _unused_created_classes(cls)
    for value in list(vars(cls).values()):
        if (
            isinstance(value, type)
            and value not in unused
            and value.__qualname__.startswith(cls.__qualname__ + ".")
            and value.__module__ == cls.__module__
        ):
            _collect(value, found)


def _unused_created_classes(aggregate_class: type) -> set[type]:
    """ "Created" classes eventsourcing defined for an aggregate that its ``__init__`` never uses.

    (An ``@event("Registered")`` on ``__init__`` leaves a generated ``Created``
    class beside ``Registered``.) Reads the library's registry of created-event
    classes; if that private detail changes, nothing is skipped.
    """
    registry = getattr(eventsourcing.domain, "_created_event_classes", None)
    if not isinstance(registry, dict) or aggregate_class not in registry:
        return set()
    used = set(registry[aggregate_class])
    return {
        value
        for value in vars(aggregate_class).values()
        if isinstance(value, type)
        and issubclass(value, CanInitAggregate)
        and used
        and value not in used
    }


def write_schemas(
    event_classes: Iterable[type],
    directory: str | Path,
    *,
    types: JsonTypes = DEFAULT_TYPES,
    strict: bool = True,
) -> dict[str, dict[str, str]]:
    """Write ``<type>.json`` (CloudEvent) and ``<type>.data.json`` per event type.

    Also writes ``index.json``: event type (the CloudEvents ``type``) ->
    ``{"cloudevent": file, "data": file}``, so a consumer in any language
    finds the schema of a message from its ``type`` attribute or ``ce_type``
    header. Returns the index.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, dict[str, str]] = {}
    for cls in event_classes:
        topic = get_topic(cls)
        stem = schema_file_stem(topic)
        envelope = cloudevent_schema(cls, types=types, strict=strict)
        data = {
            "$schema": JSON_SCHEMA_DIALECT,
            "title": f"{topic} (data)",
            **envelope["$defs"]["data"],
        }
        _write_json(out / f"{stem}.json", envelope)
        _write_json(out / f"{stem}.data.json", data)
        index[topic] = {"cloudevent": f"{stem}.json", "data": f"{stem}.data.json"}
    _write_json(out / "index.json", dict(sorted(index.items())))
    return index


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m esbridge_connectors.schemas TARGET... --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m esbridge_connectors.schemas",
        description="Write a JSON Schema per event type (CloudEvent envelope and data).",
    )
    parser.add_argument(
        "targets", nargs="+", help="modules or topics (module:Class) holding event classes"
    )
    parser.add_argument("--out", required=True, help="directory to write the schemas to")
    parser.add_argument(
        "--lenient",
        action="store_true",
        help="allow properties the classes do not declare (additionalProperties)",
    )
    args = parser.parse_args(argv)
    classes = discover_event_classes(args.targets)
    if not classes:
        print(f"no event classes found in {args.targets}", file=sys.stderr)
        return 1
    index = write_schemas(classes, args.out, strict=not args.lenient)
    for topic in index:
        print(topic)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
