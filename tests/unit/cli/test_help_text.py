"""``esbridge ... --help`` is plain text: the reST markup of its docstrings is gone."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from esbridge.cli import build_parser
from esbridge.cli.common import plain_text

MARKUP = ("``", ":mod:", ":class:", ":func:", ":attr:", ":meth:", ":data:", "::\n")


def every_parser(
    parser: argparse.ArgumentParser, name: str = "esbridge"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The command's parser and every subcommand's, nested ones (``dlq retry``) included."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from every_parser(sub, f"{name} {sub_name}")


PARSERS = dict(every_parser(build_parser()))


def test_every_subcommand_is_checked() -> None:
    assert {"esbridge relay", "esbridge consume", "esbridge run", "esbridge dlq retry"} <= set(
        PARSERS
    )


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_shows_no_rest_markup(name: str) -> None:
    text = PARSERS[name].format_help()
    assert not [m for m in MARKUP if m in text], text


def test_the_markup_becomes_what_it_means() -> None:
    text = (
        "Runs an ``eventsourcing`` System (see :mod:`esbridge.system.runner`), raising\n"
        ":class:`~esbridge.errors.ConfigurationError`; :func:`the runner <esbridge.run>`,\n"
        "`the docs <https://example.org>`_. Example::\n\n    esbridge run x:y\n"
    )
    assert plain_text(text) == (
        "Runs an eventsourcing System (see esbridge.system.runner), raising\n"
        "ConfigurationError; the runner,\n"
        "the docs (https://example.org). Example:\n\n    esbridge run x:y\n"
    )
