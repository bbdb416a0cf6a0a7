"""The tree explains itself: docs/code-layout.md names every package, every module says why."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "code-layout.md"
PACKAGES = [ROOT / "esbridge", ROOT / "esbridge_connectors"]


def test_code_layout_names_every_package() -> None:
    named = set(re.findall(r"`((?:esbridge|esbridge_connectors)(?:/\w+)*/)`", PAGE.read_text()))
    named.discard("esbridge/")  # the tree itself
    packages = {
        str(p.parent.relative_to(ROOT)) + "/"
        for root in PACKAGES
        for p in root.rglob("__init__.py")
        if p.parent != ROOT / "esbridge"
    }
    assert sorted(packages - named) == [], "packages missing from docs/code-layout.md"
    assert sorted(named - packages) == [], "docs/code-layout.md names packages that do not exist"


def test_every_module_has_a_docstring() -> None:
    missing = [
        str(p.relative_to(ROOT))
        for root in PACKAGES
        for p in root.rglob("*.py")
        if ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert missing == [], "modules without a docstring (say what the module is for, and why)"
