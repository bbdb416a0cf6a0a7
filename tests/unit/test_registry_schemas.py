"""The Avro and JSON schemas registered for event types, and that values fit them.

Every shape the plain-JSON encoder writes (tuples, literals, enums of names
and of numbers, optional nested dataclasses, mappings) must be writable by
fastavro under the generated Avro schema and read back unchanged; a field of
any type has no Avro form and says which field it is.
"""

from __future__ import annotations

import enum
import io
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import fastavro
import jsonschema
import pytest
from eventsourcing.domain import Aggregate, event

from esbridge_connectors.registry import avro_schema, record_name, registry_json_schema
from esbridge_connectors.schemas import DEFAULT_TYPES, SchemaGenerationError


class Level(enum.Enum):
    LOW = 1
    HIGH = 2


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Point:
    x: int
    label: str | None


class Shape(Aggregate):
    @event("Drawn")
    def __init__(
        self,
        corner: tuple[int, str],
        kind: Literal["box", "disc"],
        level: Level,
        colour: Colour,
        origin: Point | None,
        points: list[Point],
        weights: dict[str, float],
        price: Decimal,
        at: datetime,
        note: str | None,
    ) -> None:
        pass

    @event("Tagged")
    def tag(self, extra: Any) -> None:
        pass


def drawn_event() -> Any:
    shape = Shape(
        (1, "a"),
        "box",
        Level.HIGH,
        Colour.BLUE,
        Point(3, None),
        [Point(1, "p"), Point(2, None)],
        {"w": 0.5},
        Decimal("1.10"),
        datetime(2026, 12, 6, 12, 0),
        None,
    )
    return shape.collect_events()[0]


def test_every_shape_round_trips_through_the_avro_schema_and_fits_the_json_one():
    data = DEFAULT_TYPES.to_json(vars(drawn_event()))
    parsed = fastavro.parse_schema(avro_schema(Shape.Drawn))
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, parsed, data)
    buffer.seek(0)
    back = fastavro.schemaless_reader(buffer, parsed)
    assert back == {**data, "corner": [1, "a"]}
    jsonschema.Draft7Validator(registry_json_schema(Shape.Drawn)).validate(data)


def test_names_types_and_optional_fields():
    schema = avro_schema(Shape.Drawn)
    assert f"{schema['namespace']}.{schema['name']}" == record_name(Shape.Drawn)
    assert record_name(Shape.Drawn) == f"{__name__}.Shape.Drawn"
    fields = {f["name"]: f for f in schema["fields"]}
    assert fields["level"]["type"] == "long"  # enum of numbers: its values
    assert fields["colour"]["type"]["symbols"] == ["red", "blue"]
    assert fields["kind"]["type"]["symbols"] == ["box", "disc"]  # a Literal of names too
    assert fields["price"]["type"] == "string"
    assert fields["weights"]["type"] == {"type": "map", "values": "double"}
    assert fields["note"] == {"name": "note", "type": ["null", "string"], "default": None}
    assert fields["origin"]["type"][0] == "null"
    assert fields["origin"]["default"] is None
    json_schema = registry_json_schema(Shape.Drawn)
    assert json_schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert json_schema["title"] == record_name(Shape.Drawn)
    assert "note" not in json_schema["required"]
    assert "origin" not in json_schema["required"]
    assert "price" in json_schema["required"]
    assert json_schema["properties"]["corner"]["additionalItems"] is False
    # an event recorded before `note` existed fits both schemas
    older = {k: v for k, v in DEFAULT_TYPES.to_json(vars(drawn_event())).items() if k != "note"}
    jsonschema.Draft7Validator(json_schema).validate(older)
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), older)


def test_a_field_of_any_type_has_no_avro_form():
    with pytest.raises(SchemaGenerationError, match=r"Tagged\.extra.*annotate the field"):
        avro_schema(Shape.Tagged)
    assert registry_json_schema(Shape.Tagged)["properties"]["extra"] == {}


def test_unique_record_names_for_nested_records():
    schema = avro_schema(Shape.Drawn)
    fields = {f["name"]: f for f in schema["fields"]}
    origin = next(t for t in fields["origin"]["type"] if isinstance(t, dict))
    item = fields["points"]["type"]["items"]
    assert (origin["name"], item["name"]) == ("Drawn_origin_0", "Drawn_points_item")
