"""What every ``esbridge`` subcommand module shares when it registers itself."""

from __future__ import annotations

import argparse
from typing import Any


def add_command(subparsers: Any, name: str, help: str, doc: str | None) -> argparse.ArgumentParser:
    """Add subcommand ``name``: ``help`` in the command list, the module's ``doc`` as ``--help``.

    The module docstring is shown as written (its line breaks and examples kept).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser
