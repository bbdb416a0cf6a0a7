"""Run the examples in README.md and docs/*.md, so the docs never rot.

Every ```python block of one file runs in order in one namespace (like a
doctest session). The environment gives each file a fresh database
(``POSTGRES_*``, ``PERSISTENCE_MODULE``) and the session's broker
(``KAFKA_BOOTSTRAP_SERVERS``), and the session's Schema Registry
(``SCHEMA_REGISTRY_URL``) to the files that name that variable. A block right
after ``<!-- not-run -->`` is skipped (use it only for shell-like fragments that cannot run here).

A ```python (or ```java) block right after ``<!-- file: PATH -->`` shows the
file PATH of this repository whole: it must be equal to that file, which the
test suite runs on its own (a module, a pytest test, a Java program), so it is
not run here.

The ```sh blocks right after ``<!-- shell -->`` of one file run in order as one
bash script (``set -euo pipefail``), with esbridge's ``esbridge`` and ``python``
first on ``PATH``, in a directory that holds the files of the file's
``<!-- file: PATH -->`` blocks (by their base name) and ``dev.env``, written as
``esbridge dev-servers --env-file dev.env`` writes it, for a fresh database and
the session's broker. A ```text block right after ``<!-- output -->``, after
a shell block, is what that block prints on stdout, line by line: ``...``
stands for any text, and runs of spaces or of dashes for runs of any length
(column widths vary).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from esbridge.testing.dev_servers import write_env_file

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- (?:not-run|file: \S+) -->\s*)?```python\n(.*?)```", re.S)
FILE_BLOCK = re.compile(r"<!-- file: (\S+) -->\s*```(?:python|java)\n(.*?)```", re.S)
SHELL_BLOCK = re.compile(
    r"<!-- shell -->\s*```sh\n(.*?)```(?:\s*<!-- output -->\s*```text\n(.*?)```)?", re.S
)
#: The env file the shell blocks load, as ``esbridge dev-servers --env-file dev.env`` writes it.
DEV_ENV = "dev.env"
#: Printed between two shell blocks, to tell their outputs apart.
BLOCK_MARK = "@@esbridge-docs-block@@"


def python_blocks(path: Path) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(path.read_text()) if not m.group(1)]


def file_blocks(path: Path) -> list[tuple[str, str]]:
    """``(repository path, text)`` of each block that shows a file of this repository."""
    return [(m.group(1), m.group(2)) for m in FILE_BLOCK.finditer(path.read_text())]


def shell_blocks(path: Path) -> list[tuple[str, str | None]]:
    """``(script, expected stdout or None)`` of each shell block, in order."""
    return [(m.group(1), m.group(2)) for m in SHELL_BLOCK.finditer(path.read_text())]


def line_pattern(line: str) -> str:
    """A regular expression for an expected output line: ``...`` is any text, and a run of
    spaces (or of two or more dashes) a run of any length."""
    parts = []
    for token in re.split(r"(\.\.\.| +|-{2,})", line.rstrip()):
        if token == "...":
            parts.append(".*")
        elif token.startswith(" "):
            parts.append(" +")
        elif token.startswith("--"):
            parts.append("-+")
        else:
            parts.append(re.escape(token))
    return "".join(parts)


def output_matches(expected: str, actual: str) -> bool:
    """``actual`` is ``expected``, line by line (see :func:`line_pattern`)."""
    expected_lines = expected.rstrip("\n").splitlines()
    actual_lines = actual.strip("\n").splitlines()
    return len(expected_lines) == len(actual_lines) and all(
        re.fullmatch(line_pattern(want), got.rstrip())
        for want, got in zip(expected_lines, actual_lines, strict=True)
    )


DOCS_WITH_CODE = [p for p in DOCS if p.exists() and python_blocks(p)]
DOCS_WITH_FILES = [p for p in DOCS if p.exists() and file_blocks(p)]
DOCS_WITH_SHELL = [p for p in DOCS if p.exists() and shell_blocks(p)]


@pytest.mark.parametrize("path", DOCS_WITH_CODE, ids=[p.name for p in DOCS_WITH_CODE])
def test_doc_examples_run(path, postgres_db, kafka_broker, monkeypatch, tmp_path, request):
    for key, value in postgres_db.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_broker.bootstrap_servers)
    if "SCHEMA_REGISTRY_URL" in path.read_text():  # only those docs start the registry
        registry = request.getfixturevalue("schema_registry")
        if registry.can_control:
            registry.start()  # a fault test may have left it stopped
        monkeypatch.setenv("SCHEMA_REGISTRY_URL", registry.url)
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


@pytest.mark.parametrize("path", DOCS_WITH_FILES, ids=[p.name for p in DOCS_WITH_FILES])
def test_doc_files_are_the_files_the_suite_runs(path):
    for name, text in file_blocks(path):
        assert text == (ROOT / name).read_text(), f"{path.name} shows {name} otherwise than it is"


@pytest.mark.parametrize("path", DOCS_WITH_SHELL, ids=[p.name for p in DOCS_WITH_SHELL])
def test_doc_shell_sessions_run(path, postgres_db, kafka_broker, tmp_path):
    for name, text in file_blocks(path):
        (tmp_path / Path(name).name).write_text(text)
    env = {**postgres_db.env, "KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers}
    write_env_file(tmp_path / DEV_ENV, env)
    blocks = shell_blocks(path)
    script = "set -euo pipefail\n" + "".join(f"echo {BLOCK_MARK}\n{code}" for code, _ in blocks)
    # Files, not pipes: the script's background jobs would hold a pipe open after it ended.
    stdout_file, stderr_file = tmp_path / "stdout", tmp_path / "stderr"
    with stdout_file.open("wb") as out, stderr_file.open("wb") as err:
        process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, background jobs included
        )
        try:
            process.wait(timeout=300)
        finally:
            # Every process the script started, should any remain (a failed block).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    stdout = stdout_file.read_text()
    log = f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr_file.read_text()[-5000:]}"
    assert process.returncode == 0, log
    outputs = stdout.split(f"{BLOCK_MARK}\n")[1:]
    assert len(outputs) == len(blocks), log
    for (code, expected), output in zip(blocks, outputs, strict=True):
        if expected is not None:
            assert output_matches(expected, output), f"{code}\nprinted:\n{output}\n{log}"
