"""``JsonTypes.from_json``: plain JSON back into the annotated Python values ``to_json`` wrote."""

from __future__ import annotations

import dataclasses
import enum
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID, uuid4

import pytest

from esbridge_connectors.schemas import JsonTypes, PlainJsonError


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float
    label: str | None = None


class Money:
    def __init__(self, amount: Decimal, currency: str) -> None:
        self.amount, self.currency = amount, currency

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (other.amount, other.currency) == (
            self.amount,
            self.currency,
        )

    __hash__ = None  # type: ignore[assignment]


VALUES: list[tuple[Any, Any]] = [
    (uuid4(), UUID),
    (datetime(2026, 12, 7, 1, 2, 3, 456789, tzinfo=UTC), datetime),
    (datetime(2026, 12, 7, 1, 2, 3), datetime),
    (date(2026, 2, 28), date),
    (time(12, 30, 1), time),
    (Decimal("12.50"), Decimal),
    (b"\x00\xffbytes", bytes),
    (Colour.BLUE, Colour),
    (Point(1, 2.5, None), Point),
    (Point(3, 4.0, "p"), Point | None),
    (None, Point | None),
    ((1, "a"), tuple[int, str]),
    ((1, 2, 3), tuple[int, ...]),
    ({1, 2, 3}, set[int]),
    (frozenset({"a"}), frozenset[str]),
    ([Decimal("1"), Decimal("2.0")], list[Decimal]),
    ({"a": Decimal("1.1")}, dict[str, Decimal]),
    ({"k": [Colour.RED]}, dict[str, list[Colour]]),
    (7, int | str),
    ("seven", int | str),
    (2.0, float),
    ("x", Literal["x", "y"]),
    ({"any": [1, "two"]}, Any),
]


@pytest.mark.parametrize(("value", "annotation"), VALUES)
def test_from_json_inverts_to_json(value: Any, annotation: Any) -> None:
    types = JsonTypes()
    back = types.from_json(types.to_json(value), annotation)
    assert back == value
    assert type(back) is type(value)


def test_an_integer_is_a_float_where_a_float_is_annotated() -> None:
    assert JsonTypes().from_json(3, float) == 3.0
    assert type(JsonTypes().from_json(3, float)) is float


@pytest.mark.parametrize(
    ("value", "annotation", "message"),
    [
        ("3", int, "expected int"),
        (True, int, "expected int"),
        (1, str, "expected str"),
        ([1, 2], tuple[int, int, int], "3 items"),
        ("x", list[int], "an array"),
        ({"x": "1", "y": 2.0}, Point, r"value\.x: expected int"),
        (3.5, int | str, "fits none"),
        (None, int, "expected int"),
    ],
)
def test_a_value_that_does_not_fit_says_where(value: Any, annotation: Any, message: str) -> None:
    with pytest.raises(PlainJsonError, match=message):
        JsonTypes().from_json(value, annotation)


def test_a_registered_type_needs_its_decode() -> None:
    types = JsonTypes()
    types.register(Money, {"type": "string"}, lambda m: f"{m.amount} {m.currency}")
    with pytest.raises(PlainJsonError, match="registered without a decode"):
        types.from_json("1.50 EUR", Money)
    types.register(
        Money,
        {"type": "string"},
        lambda m: f"{m.amount} {m.currency}",
        lambda text: Money(Decimal(text.split()[0]), text.split()[1]),
    )
    money = Money(Decimal("1.50"), "EUR")
    assert types.from_json(types.to_json(money), Money) == money
