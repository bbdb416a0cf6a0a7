"""The error hierarchy: one tree under EsbridgeError, structured attributes, the old name kept."""

from __future__ import annotations

import pickle

import pytest

import esbridge
from esbridge import errors
from esbridge.errors import (
    BrokerUnavailable,
    BrokerUnavailableError,
    ConfigurationError,
    ConsumerError,
    EsbridgeError,
    GapNotReconciledError,
    MessageFormatError,
    PostgresUnavailableError,
    RelayError,
    RelayFencedError,
    RelayPositionError,
    RelayStandbyError,
    ServerUnavailableError,
)


def test_every_class_is_an_esbridge_error_named_error() -> None:
    classes = [
        value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException) and value.__name__ == name
    ]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, EsbridgeError), cls
        assert cls.__name__.endswith("Error"), cls


def test_broker_unavailable_is_a_server_unavailable_and_still_a_configuration_error() -> None:
    error = BrokerUnavailableError("no broker at 'k:9092'", bootstrap_servers="k:9092", waited=3.0)
    assert isinstance(error, ServerUnavailableError)
    assert isinstance(error, ConfigurationError)
    assert error.bootstrap_servers == "k:9092"
    assert error.waited == 3.0
    assert str(error) == "no broker at 'k:9092'"
    assert issubclass(PostgresUnavailableError, ServerUnavailableError)
    assert not issubclass(PostgresUnavailableError, ConfigurationError)


def test_old_name_broker_unavailable_is_the_same_class_and_still_exported() -> None:
    assert BrokerUnavailable is BrokerUnavailableError
    assert esbridge.BrokerUnavailable is BrokerUnavailableError
    assert "BrokerUnavailable" in esbridge.__all__
    with pytest.raises(BrokerUnavailable):
        raise BrokerUnavailableError("down")


def test_attributes_are_optional_so_message_only_raise_sites_keep_working() -> None:
    for cls in (
        BrokerUnavailableError,
        PostgresUnavailableError,
        MessageFormatError,
        RelayError,
        RelayFencedError,
        RelayPositionError,
        RelayStandbyError,
        GapNotReconciledError,
    ):
        error = cls("what happened; what to do")
        assert str(error) == "what happened; what to do"
        assert error.args == ("what happened; what to do",)


def test_gap_not_reconciled_says_which_partition_and_which_ids() -> None:
    error = GapNotReconciledError(
        "partition 2 of 'orders' held", topic="orders", partition=2, position=41, held_nid=45
    )
    assert isinstance(error, ConsumerError)
    assert (error.topic, error.partition, error.position, error.held_nid) == ("orders", 2, 41, 45)
    assert str(error) == "partition 2 of 'orders' held"


def test_message_and_position_errors_say_where_the_message_is() -> None:
    for cls in (MessageFormatError, RelayPositionError):
        error = cls("bad", topic="t", partition=1, offset=7)
        assert (error.topic, error.partition, error.offset) == ("t", 1, 7)
    assert issubclass(RelayPositionError, ConfigurationError)


def test_relay_errors_carry_the_notification_and_ids() -> None:
    assert RelayError("too large", nid=12).nid == 12
    fenced = RelayFencedError("fenced", transactional_id="esbridge-relay.app.t", nid=3)
    assert isinstance(fenced, RelayError)
    assert (fenced.transactional_id, fenced.nid) == ("esbridge-relay.app.t", 3)
    assert RelayStandbyError("standing by", relay_id="r1").relay_id == "r1"
    assert PostgresUnavailableError("down", operation="read", waited=1.5).operation == "read"


def test_attributes_survive_pickling() -> None:
    """Errors cross process boundaries (multiprocessing workers): attributes must come along."""
    error = GapNotReconciledError("held", topic="t", partition=0, position=1, held_nid=3)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is GapNotReconciledError
    assert str(copy) == "held"
    assert (copy.topic, copy.partition, copy.position, copy.held_nid) == ("t", 0, 1, 3)
