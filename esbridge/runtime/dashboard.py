"""The Grafana dashboard shipped with esbridge, and the metric names its queries read.

Why a file in the package: an operator gets the dashboard of the version
installed (``esbridge dashboard > esbridge.json``, then Grafana's *Import*),
whose queries name the metrics that version exports. Why a PromQL reader
here: a test scrapes real relays and consumers and checks every metric and
selector label the dashboard queries against what they export, so a renamed
metric breaks a test, not a dashboard in production.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

#: The dashboard file, in this package.
DASHBOARD_FILE = "dashboards/esbridge.json"


def dashboard_text() -> str:
    """The dashboard as shipped: Grafana JSON, ready to import."""
    return (resources.files("esbridge.runtime") / DASHBOARD_FILE).read_text(encoding="utf-8")


def dashboard() -> dict[str, Any]:
    """The dashboard, parsed."""
    loaded: dict[str, Any] = json.loads(dashboard_text())
    return loaded


def expressions(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of every panel, rows included."""
    for panel in board.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                if target.get("expr"):
                    yield inner.get("title", ""), target["expr"]


@dataclass(frozen=True)
class Selector:
    """A metric read by a PromQL expression and the label names its ``{...}`` matches on."""

    metric: str
    labels: frozenset[str]


# One token of PromQL, enough to tell metric names from everything else: strings,
# label matchers in braces, range/subquery brackets, names, and the rest one char at a time.
_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<braces>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[^}"'])*\})
  | (?P<brackets>\[[^\]]*\])
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<number>[0-9][0-9A-Za-z.]*)  # numbers and durations (5m, 1h30m)
  | (?P<other>\S)
    """,
    re.VERBOSE,
)
_MATCHER = re.compile(
    r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*("(?:\\.|[^"\\])*"|'[^']*')"""
)
#: Words that are PromQL syntax, not metric names.
_KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
        "atan2",
        "inf",
        "nan",
    ]
)
#: Keywords followed by a list of label names in parentheses.
_LABEL_LISTS = frozenset(["by", "without", "on", "ignoring", "group_left", "group_right"])


def selectors(expr: str) -> list[Selector]:
    """The metrics an expression reads, with the labels each selector matches on.

    A name followed by ``(`` is a function or an aggregation; names in
    ``by (...)`` and the like are labels; a ``{...}`` after a name holds that
    metric's matchers, one without a name (``{__name__="x"}``) names the
    metric itself. Raises ``ValueError`` on braces it cannot read.
    """
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "name" and text.lower() in _LABEL_LISTS:
            i = _skip_label_list(tokens, i + 1)
            continue
        aggregation = following[0] == "name" and following[1].lower() in ("by", "without")
        if (
            kind == "name"
            and text.lower() not in _KEYWORDS
            and following[1] != "("
            and not aggregation
        ):
            labels = _matchers(following[1]) if following[0] == "braces" else {}
            labels.pop("__name__", None)
            found.append(Selector(text, frozenset(labels)))
            i += 2 if following[0] == "braces" else 1
            continue
        if kind == "braces":  # a selector without a name before its braces
            labels = _matchers(text)
            name = labels.pop("__name__", None)
            if name is None:
                raise ValueError(f"a selector without a metric name in {expr!r}")
            found.append(Selector(name, frozenset(labels)))
        i += 1
    return found


def grouping_labels(expr: str) -> set[str]:
    """The label names of every ``by (...)``, ``on (...)`` and the like in ``expr``."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    labels: set[str] = set()
    for i, (kind, text) in enumerate(tokens):
        if kind == "name" and text.lower() in _LABEL_LISTS:
            end = _skip_label_list(tokens, i + 1)
            labels.update(t for k, t in tokens[i + 1 : end] if k == "name")
    return labels


def _skip_label_list(tokens: list[tuple[str | None, str]], i: int) -> int:
    """The index after the ``(a, b)`` starting at ``i`` (``i`` itself when none does)."""
    if i < len(tokens) and tokens[i][1] == "(":
        while i < len(tokens) and tokens[i][1] != ")":
            i += 1
        i += 1
    return i


def _matchers(braces: str) -> dict[str, str | None]:
    """``{a="x", b=~"y"}`` → ``{"a": None, "b": None}``; ``__name__`` keeps its value."""
    inner = braces.strip()[1:-1].strip().rstrip(",")
    result: dict[str, str | None] = {}
    position = 0
    while position < len(inner):
        match = _MATCHER.match(inner, position)
        if match is None:
            raise ValueError(f"cannot read the label matchers {braces!r}")
        name, value = match.group(1), match.group(2)[1:-1]
        result[name] = value if name == "__name__" else None
        position = match.end()
        rest = inner[position:].lstrip()
        position = len(inner) - len(rest)
        if rest.startswith(","):
            position += 1
    return result


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*(\w+)\s*\)\s*$")


def variable_selectors(board: dict[str, Any]) -> list[Selector]:
    """The metric and label each ``label_values(metric, label)`` variable lists values of.

    Raises ``ValueError`` for a query variable of another form (it would go unchecked).
    """
    found = []
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        match = _LABEL_VALUES.match(text)
        if match is None:
            raise ValueError(f"variable {variable.get('name')!r}: cannot read {text!r}")
        found.append(Selector(match.group(1), frozenset({match.group(2)})))
    return found
