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
    SystemConfigurationError,
    SystemRunnerError,
)
from esbridge.system import runner


def test_every_class_is_an_esbridge_error_named_error() -> None:
    classes = [
        value
        for name, value in vars(errors).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__name__ == name
        and not name.startswith("_")
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


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as e:
        return e


def test_system_runner_error_is_an_exception_group_keeping_each_traceback() -> None:
    consumer = _raised(ConsumerError("Kafka consumer failed"))
    relay = _raised(RelayError("too large", nid=4))
    message = (
        "consumer A -> B: ConsumerError: Kafka consumer failed; relay of A: RelayError: too large"
    )
    names = ["consumer A -> B", "relay of A"]
    group = SystemRunnerError(message, [consumer, relay], components=names)
    assert isinstance(group, EsbridgeError)
    assert isinstance(group, ExceptionGroup)
    assert str(group) == message
    assert group.exceptions == (consumer, relay)
    assert consumer.__traceback__ is not None
    assert group.components == ("consumer A -> B", "relay of A")
    with pytest.raises(SystemRunnerError) as rest:
        try:
            raise group
        except* RelayError as relays:  # handled: the consumer's error goes on up
            assert type(relays) is SystemRunnerError
            assert relays.exceptions == (relay,)
            assert relays.components == ("relay of A",)
    assert rest.value.exceptions == (consumer,)
    assert rest.value.components == ("consumer A -> B",)


def test_system_configuration_error_is_a_configuration_error_not_a_runtime_failure() -> None:
    group = SystemConfigurationError(
        "relay of A: ConfigurationError: bad",
        [ConfigurationError("bad")],
        components=["relay of A"],
    )
    assert isinstance(group, ConfigurationError)
    assert isinstance(group, ExceptionGroup)
    # esbridge run exits 1 on a SystemRunnerError (restart) but 2 on a configuration error.
    assert not isinstance(group, SystemRunnerError)
    matched, rest = group.split(ConfigurationError)
    assert type(matched) is SystemConfigurationError and rest is None


def test_system_runner_error_from_a_message_alone_and_pickled() -> None:
    error = SystemRunnerError("a worker process exited with status 1")
    assert str(error) == "a worker process exited with status 1"
    assert [str(e) for e in error.exceptions] == ["a worker process exited with status 1"]
    assert esbridge.SystemRunnerError is SystemRunnerError
    assert runner.SystemRunnerError is SystemRunnerError  # the import path shown before
    copy = pickle.loads(pickle.dumps(SystemRunnerError("m", [ValueError("v")], components=["c"])))
    assert type(copy) is SystemRunnerError
    assert (str(copy), copy.components, str(copy.exceptions[0])) == ("m", ("c",), "v")
