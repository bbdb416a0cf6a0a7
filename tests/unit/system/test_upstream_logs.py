"""Which leaders' logs a follower reads over HTTP: ``[{LEADER}_]UPSTREAM_LOG_URL``."""

from __future__ import annotations

import pytest

from esbridge.cli import build_parser
from esbridge.cli.run import worker_command
from esbridge.errors import ConfigurationError
from esbridge.eventlog.remote import RemoteLogSettings
from esbridge.system.upstream_logs import log_services, parse_upstream_urls
from examples.orders.system import system

ENV = {
    "ORDERS_UPSTREAM_LOG_URL": "https://orders-log:8443",
    "ORDERS_UPSTREAM_LOG_TOKEN": "secret-token-0123456789",
    "ORDERS_UPSTREAM_LOG_CA_FILE": "/etc/ca.pem",
    "PAYMENTS_UPSTREAM_LOG_TOKEN": "a token without a URL: the database is read",
}


def test_log_services_come_from_the_leaders_prefixed_variables() -> None:
    services = log_services(["Orders", "Payments", "Reservations"], ENV)
    assert services == {
        "Orders": RemoteLogSettings(
            "https://orders-log:8443", "secret-token-0123456789", "/etc/ca.pem"
        )
    }
    assert "secret" not in repr(services)  # reprs end up in logs


def test_the_plain_variables_give_every_leader_the_prefixed_ones_win() -> None:
    env = {
        **ENV,
        "UPSTREAM_LOG_URL": "https://logs:8443",
        "UPSTREAM_LOG_TOKEN": "shared-token-0123456789",
    }
    assert log_services(["Orders", "Payments", "Reservations"], env) == {
        "Orders": RemoteLogSettings(
            "https://orders-log:8443", "secret-token-0123456789", "/etc/ca.pem"
        ),
        "Payments": RemoteLogSettings("https://logs:8443", ENV["PAYMENTS_UPSTREAM_LOG_TOKEN"]),
        "Reservations": RemoteLogSettings("https://logs:8443", "shared-token-0123456789"),
    }


def test_upstream_urls_of_the_command_line_become_the_variables() -> None:
    values = ["Orders=http://a:1", "Payments=http://b:2/x", "https://all:3/?a=b"]
    assert parse_upstream_urls(values, system) == {
        "ORDERS_UPSTREAM_LOG_URL": "http://a:1",
        "PAYMENTS_UPSTREAM_LOG_URL": "http://b:2/x",
        "UPSTREAM_LOG_URL": "https://all:3/?a=b",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("orders=http://a:1", r"'orders' is not a leader of the system \(its leaders are"),
        ("Shipping=http://a:1", "'Shipping' is not a leader"),
        ("Orders=", "give URL \\(every leader\\) or LEADER=URL"),
        ("orders-log:8443", "give URL"),
    ],
)
def test_a_wrong_upstream_url_option_is_refused(value: str, expected: str) -> None:
    with pytest.raises(ConfigurationError, match=expected):
        parse_upstream_urls([value], system)


def test_workers_get_the_upstream_urls() -> None:
    args = build_parser().parse_args(
        ["run", "examples.orders.system:system", "--upstream-url", "Orders=http://a:1"]
    )
    command = worker_command(args, "Payments", 0)
    assert command[command.index("--upstream-url") + 1] == "Orders=http://a:1"
