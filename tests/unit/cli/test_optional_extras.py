"""What the core does without its optional parts: the ``connectors`` and ``containers``
extras, and the demo (example code, present only in a source checkout). Each missing
part fails with an error that says what to install or where to run from."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from esbridge.cli import build_parser
from esbridge.cli.demo import demo_module
from esbridge.errors import ConfigurationError, HarnessError
from esbridge.testing.dev_servers import check_options
from esbridge.testing.engine import ContainerEngine, containers_extra_missing

ROOT = Path(__file__).resolve().parents[3]


def test_replay_without_the_connectors_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "esbridge_connectors.replay", None)  # not importable
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    args = build_parser().parse_args(["replay", "Ledger", "--topic", "t"])
    with pytest.raises(ConfigurationError, match=r"pip install 'esbridge\[connectors\]'"):
        args.func(args)


def test_containers_backend_without_its_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "testcontainers", None)
    reason = containers_extra_missing()
    assert reason is not None and "pip install 'esbridge[containers]'" in reason
    with pytest.raises(HarnessError, match=r"pip install 'esbridge\[containers\]'"):
        ContainerEngine()


def test_dev_servers_in_containers_without_the_extra_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "testcontainers", None)
    fix = r"pip install 'esbridge\[containers\]', or use --backend local"
    with pytest.raises(HarnessError, match=fix):
        check_options("containers", None, None, keep=False)
    check_options("local", None, None, keep=False)  # the local backend needs no extra


def test_demo_outside_a_source_checkout_says_where_to_run_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"source checkout.*--app-dir"):
        demo_module(str(tmp_path))


def test_demo_is_found_in_the_source_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = demo_module(None)
    assert Path(module.__file__).resolve() == ROOT / "examples" / "orders" / "demo.py"
    assert module.SOURCE_ROOT == ROOT
