"""Run the Python examples in README.md and docs/*.md, so the docs never rot.

Every ```python block of one file runs in order in one namespace (like a
doctest session). The environment gives each file a fresh database
(``POSTGRES_*``, ``PERSISTENCE_MODULE``) and the session's broker
(``KAFKA_BOOTSTRAP_SERVERS``). A block right after ``<!-- not-run -->`` is
skipped (use it only for shell-like fragments that cannot run here).
"""

from __future__ import annotations

import gc
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- not-run -->\s*)?```python\n(.*?)```", re.S)


def python_blocks(path: Path) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(path.read_text()) if not m.group(1)]


DOCS_WITH_CODE = [p for p in DOCS if p.exists() and python_blocks(p)]


@pytest.mark.parametrize("path", DOCS_WITH_CODE, ids=[p.name for p in DOCS_WITH_CODE])
def test_doc_examples_run(path, postgres_db, kafka_broker, monkeypatch, tmp_path):
    for key, value in postgres_db.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_broker.bootstrap_servers)
    monkeypatch.chdir(tmp_path)
    # A real module, so that eventsourcing can resolve the topics of classes defined here.
    module = types.ModuleType(f"esbridge_doc_{path.stem.lower().replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        for i, block in enumerate(python_blocks(path)):
            code = compile(block, f"{path.name}[block {i + 1}]", "exec")
            exec(code, module.__dict__)
    finally:
        # The examples' functions keep their namespace alive, and with it any Kafka client
        # they made (an AdminClient cannot be closed): those would go on trying to reach
        # the broker after the harness stops it, filling the log with "Connect failed".
        module.__dict__.clear()
        gc.collect()
