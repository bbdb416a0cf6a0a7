"""The relay lease's pure parts (the lease itself is tested on Postgres in
tests/integration/test_relay_standby.py)."""

from __future__ import annotations

import time

from esbridge.relay_lease import _sleep_unless, lease_key


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
