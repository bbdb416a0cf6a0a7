"""Adaptive batching of the payload relay: how long it lingers after a transaction."""

from __future__ import annotations

import pytest

from esbridge.errors import ConfigurationError
from esbridge.relay.relay import Relay
from esbridge.relay.tuning import RelayTuning, linger_after


def test_a_lone_event_is_followed_at_once_and_the_wait_grows_with_the_load():
    tuning = RelayTuning()  # linger 50 ms, whole from 500 notifications
    assert linger_after(0, tuning) == 0.0  # nothing published: the relay waits for events
    assert linger_after(1, tuning) == pytest.approx(0.0001)
    assert linger_after(10, tuning) == pytest.approx(0.001)  # ~1,000 events/s
    assert linger_after(250, tuning) == pytest.approx(0.025)
    assert linger_after(500, tuning) == linger_after(20_000, tuning) == 0.05
    assert linger_after(tuning.batch_size, tuning) == 0.0  # a backlog: no wait between batches


def test_linger_at_one_waits_the_whole_linger_after_every_transaction():
    tuning = RelayTuning(linger=0.2, linger_at=1)
    assert linger_after(1, tuning) == linger_after(499, tuning) == 0.2
    assert linger_after(3, RelayTuning(linger=0.0)) == 0.0


def test_linger_at_below_one_is_refused_naming_the_setting():
    with pytest.raises(ConfigurationError, match="linger_at must be at least 1"):
        Relay(
            "DogSchool",
            kafka_config={"bootstrap.servers": "127.0.0.1:1"},
            topic="dogschool",
            linger_at=0,
        )
