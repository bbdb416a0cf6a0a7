"""docs/code-layout.md names every module, and only modules that exist, so it never rots."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "code-layout.md"


def test_code_layout_names_every_module() -> None:
    named = set(re.findall(r"`((?:esbridge|connectors)/[\w/]*?(?:\.py|/))`", PAGE.read_text()))
    modules = {
        str(p.relative_to(ROOT))
        for package in ("esbridge", "connectors")
        for p in (ROOT / package).rglob("*.py")
        if "cli" not in p.parts
    } | {"esbridge/cli/"}
    assert sorted(modules - named) == [], "modules missing from docs/code-layout.md"
    assert sorted(named - modules) == [], "docs/code-layout.md names modules that do not exist"
