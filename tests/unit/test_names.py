"""The names processes share never change by accident: each is a contract (esbridge.names)."""

from __future__ import annotations

from esbridge import names


def test_tracking_names() -> None:
    assert names.tracking_names("Orders", 1) == ["Orders"]
    assert names.tracking_names("Orders", 0) == ["Orders"]
    assert names.tracking_names("Orders", 3) == ["Orders#0/3", "Orders#1/3", "Orders#2/3"]
    assert names.tracking_name("Orders", 2, 3) == "Orders#2/3"
    assert names.tracking_name("Orders", 0, 1) == "Orders"


def test_relay_names() -> None:
    # One rule for `esbridge relay` and `esbridge run`: derived from the topic (version 2).
    assert names.default_relay_id("Shop", "esbridge.shop") == "esbridge.relay.shop"
    assert names.default_relay_id("Shop", "x-shop") == "x-relay.shop"
    assert names.default_relay_id("DogSchool", "dogschool") == "relay.dogschool"
    assert names.default_relay_id("Shop", "orders-v2") == "orders-v2.relay.shop"
    assert names.default_position_topic("t") == "t.esbridge-relay-position"
    assert names.lease_name("r") == "esbridge.relay:r"
    assert names.POSITION_GROUP_PREFIX == "esbridge-position-"


def test_system_names() -> None:
    topics = names.SystemTopics()
    assert topics.topic("Orders") == "esbridge.orders"
    assert topics.group("Orders", "Payments") == "esbridge.payments.orders"
    assert topics.relay_id("Orders") == "esbridge.relay.orders"
    assert names.SystemTopics("x-").topic("A") == "x-a"
    for prefix in ("esbridge.", "x-", ""):
        system = names.SystemTopics(prefix)
        assert system.relay_id("Orders") == f"{prefix}relay.orders"
        assert system.relay_id("Orders") == names.default_relay_id("Orders", system.topic("Orders"))


def test_modes_and_tables() -> None:
    assert names.MODES == ("payloads", "prompts")
    assert names.DEAD_LETTER_TABLE == "esbridge_dead_letters"
    assert names.NAMES_VERSION == 2
