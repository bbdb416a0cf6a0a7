"""The options every ``esbridge`` command shares: where user code is imported from,
where metrics are served. (The commands themselves run against real servers in
tests/integration; this is the parsing and the import path alone.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from esbridge.cli import build_parser
from esbridge.cli.common import load_class
from esbridge.cli.relay import application_name
from esbridge.cli.run import worker_command
from esbridge.errors import ConfigurationError

#: A command line of each command that imports the user's code.
IMPORTING = {
    "relay": ["relay", "shop:Ledger"],
    "consume": ["consume", "shop:Mirror", "--upstream", "Ledger", "--topic", "t"],
    "dlq list": ["dlq", "list", "shop:Mirror"],
    "dlq replay": ["dlq", "replay", "shop:Mirror"],
    "dlq retry": ["dlq", "retry", "shop:Mirror"],
    "replay": ["replay", "Ledger", "--topic", "t", "--from", "1"],
    "run": ["run", "shop:system"],
    "status": ["status", "shop:system"],
}

#: The long-running commands, which serve metrics.
SERVING = ("relay", "consume", "run")


@pytest.fixture
def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project directory with a module ``shop`` (sys.path restored after)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "shop", raising=False)
    (tmp_path / "shop.py").write_text(
        "from eventsourcing.application import Application\n\n\n"
        "class Ledger(Application):\n    name = 'Ledger'\n"
    )
    return tmp_path


@pytest.mark.parametrize("command", sorted(IMPORTING))
def test_every_command_that_imports_user_code_takes_app_dir(command: str) -> None:
    args = build_parser().parse_args(IMPORTING[command])
    assert args.app_dir == "."
    args = build_parser().parse_args([*IMPORTING[command], "--app-dir", "/srv/app"])
    assert args.app_dir == "/srv/app"


@pytest.mark.parametrize("command", SERVING)
def test_every_long_running_command_takes_a_metrics_address(command: str) -> None:
    argv = IMPORTING[command]
    args = build_parser().parse_args([*argv, "--metrics-port", "9108"])
    assert (args.metrics_port, args.metrics_addr) == (9108, "127.0.0.1")  # loopback by default
    args = build_parser().parse_args([*argv, "--metrics-addr", "10.1.2.3"])
    assert args.metrics_addr == "10.1.2.3"


def test_run_passes_the_metrics_address_on_to_its_workers() -> None:
    args = build_parser().parse_args(
        ["run", "shop:system", "--metrics-port", "9200", "--metrics-addr", "10.1.2.3"]
    )
    command = worker_command(args, "Orders", 1)
    at = command.index("--metrics-port")
    assert command[at : at + 4] == ["--metrics-port", "9200", "--metrics-addr", "10.1.2.3"]


def test_classes_are_imported_from_the_app_dir(shop: Path) -> None:
    assert application_name("shop:Ledger", str(shop)) == "Ledger"
    assert load_class("shop:Ledger", str(shop)).__name__ == "Ledger"


def test_a_class_that_cannot_be_imported_names_app_dir(shop: Path) -> None:
    with pytest.raises(ConfigurationError, match="--app-dir"):
        load_class("nosuchmodule:Ledger", str(shop))
    with pytest.raises(ConfigurationError, match="--app-dir"):
        application_name("nosuchmodule:Ledger", str(shop))
