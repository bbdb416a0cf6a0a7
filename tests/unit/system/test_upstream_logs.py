"""Which leaders' logs a follower reads over HTTP: ``{LEADER}_LOG_URL`` and ``--upstream-url``."""

from __future__ import annotations

import pytest

from esbridge.cli import build_parser
from esbridge.cli.run import worker_command
from esbridge.errors import ConfigurationError
from esbridge.system.upstream_logs import LogService, log_services, parse_upstream_urls
from examples.orders.system import system

ENV = {
    "ORDERS_LOG_URL": "https://orders-log:8443",
    "ORDERS_LOG_TOKEN": "secret-token-0123456789",
    "ORDERS_LOG_CA_FILE": "/etc/ca.pem",
    "PAYMENTS_LOG_TOKEN": "a token without a URL: the database is read",
}


def test_log_services_come_from_the_leaders_prefixed_variables() -> None:
    services = log_services(["Orders", "Payments", "Reservations"], ENV)
    assert services == {
        "Orders": LogService("https://orders-log:8443", "secret-token-0123456789", "/etc/ca.pem")
    }
    assert "secret" not in repr(services)  # reprs end up in logs


def test_upstream_urls_of_the_command_line_become_the_variables() -> None:
    assert parse_upstream_urls(["Orders=http://a:1", "Payments=http://b:2/x"], system) == {
        "ORDERS_LOG_URL": "http://a:1",
        "PAYMENTS_LOG_URL": "http://b:2/x",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("orders=http://a:1", r"'orders' is not a leader of the system \(its leaders are"),
        ("Shipping=http://a:1", "'Shipping' is not a leader"),
        ("http://a:1", "give LEADER=URL"),
        ("Orders=", "give LEADER=URL"),
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
