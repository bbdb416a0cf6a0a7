"""``--upstream-url`` and the ``UPSTREAM_LOG_*`` variables mean the same for every command
that reads an upstream log (consume, status, replay): one option, one resolution."""

from __future__ import annotations

import pytest

from esbridge.cli import build_parser
from esbridge.cli.upstream_log_options import upstream_log_settings
from esbridge.eventlog.remote import RemoteLogSettings, RemoteNotificationLog

READERS = {
    "consume": ["consume", "shop:Mirror", "--upstream", "Ledger", "--topic", "t"],
    "status": ["status", "shop:system"],
    "replay": ["replay", "Ledger", "--topic", "t"],
}
TOKEN = "a-secret-token-0123456789"


@pytest.fixture(autouse=True)
def no_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UPSTREAM_LOG_URL", "UPSTREAM_LOG_TOKEN", "UPSTREAM_LOG_CA_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("command", sorted(READERS))
def test_every_reader_resolves_the_option_and_variables_alike(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = build_parser()
    assert upstream_log_settings(parser.parse_args(READERS[command])) is None  # the database
    monkeypatch.setenv("UPSTREAM_LOG_URL", "http://from-env:8470")
    monkeypatch.setenv("UPSTREAM_LOG_TOKEN", TOKEN)
    monkeypatch.setenv("UPSTREAM_LOG_CA_FILE", "/etc/ca.pem")
    from_env = upstream_log_settings(parser.parse_args(READERS[command]))
    assert from_env == RemoteLogSettings("http://from-env:8470", TOKEN, "/etc/ca.pem")
    given = parser.parse_args([*READERS[command], "--upstream-url", "https://option:8443"])
    assert upstream_log_settings(given) == RemoteLogSettings(
        "https://option:8443", TOKEN, "/etc/ca.pem"
    )  # the option wins over the variable


def test_settings_build_the_log_of_any_application_and_never_show_the_token() -> None:
    settings = RemoteLogSettings("http://logs:8470/", TOKEN)
    log = settings.log("Orders", retries=1)
    assert isinstance(log, RemoteNotificationLog)
    assert (log.url, log.application, log.retries) == ("http://logs:8470", "Orders", 1)
    assert TOKEN not in repr(settings) and TOKEN not in repr(log)
