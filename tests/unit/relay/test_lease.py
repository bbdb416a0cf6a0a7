"""The relay lease's pure parts (the lease itself is tested on Postgres in
tests/integration/relay/test_relay_standby.py)."""

from __future__ import annotations

import time

import pytest

from esbridge.cli.relay import parse_tuning
from esbridge.errors import ConfigurationError
from esbridge.relay.lease import _sleep_unless, check_expiry, lease_key


def test_lease_keys_never_change():
    """Relays of two esbridge versions must take the same lock during a rolling upgrade:
    a changed key would let an old and a new relay publish at once (fencing each other)."""
    assert lease_key("esbridge-relay.dogschool.dogschool") == 214521648700803883
    assert lease_key("") == 7285235975643220260
    assert lease_key("a") != lease_key("b")
    assert all(-(2**63) <= lease_key(f"relay-{i}") < 2**63 for i in range(100))


def test_backoff_ends_when_stopped():
    started = time.monotonic()
    _sleep_unless(lambda: time.monotonic() - started > 0.2, 5.0)
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    _sleep_unless(lambda: False, 0.3)
    assert 0.3 <= time.monotonic() - started < 1.0


def test_an_expiry_the_checks_could_miss_is_refused():
    check_expiry(2.0, 4.5)
    check_expiry(2.0, None)  # never expires
    with pytest.raises(ConfigurationError, match=r"lease_expiry \(4.0 s\) must be more than"):
        check_expiry(2.0, 4.0)


def test_relay_settings_from_the_command_line():
    assert parse_tuning(["lease_expiry=none", "lease-check=0.5", "standby=no"]) == {
        "lease_expiry": None,
        "lease_check": 0.5,
        "standby": False,
    }
    with pytest.raises(ConfigurationError, match="expected NAME=VALUE"):
        parse_tuning(["lease_expiri=5"])
