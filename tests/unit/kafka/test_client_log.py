"""librdkafka's lines through :class:`ClientLog`: repeats counted, transient ones at DEBUG,
the hint before the first failed connection."""

from __future__ import annotations

import logging

import pytest

from esbridge.kafka.client_log import ClientLog

REFUSED = (
    "[thrd:127.0.0.1:9/bootstrap]: 127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: "
    "Connection refused (after {ms}ms in state CONNECT)"
)
HINT = (
    "cannot reach the Kafka broker at 127.0.0.1:9 (Connection refused): check "
    "KAFKA_BOOTSTRAP_SERVERS (bootstrap.servers) and that the broker runs"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client_log(clock: Clock) -> ClientLog:
    return ClientLog(logging.getLogger("test.librdkafka"), repeat_interval=30, clock=clock)


def librdkafka_line(
    log: ClientLog, level: int, facility: str, message: str, client: int = 1
) -> None:
    """As confluent-kafka hands a line over."""
    log.log(level, "%s [%s] %s", facility, f"rdkafka#producer-{client}", message)


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records]


def test_a_refused_connection_is_said_once_with_the_hint_first(
    client_log: ClientLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "test.librdkafka")
    for i in range(100):  # what a few seconds of reconnecting gave, from two clients
        librdkafka_line(client_log, logging.ERROR, "FAIL", REFUSED.format(ms=i % 3), i % 2)
        client_log.error("ERROR %s", REFUSED.format(ms=0).split("]: ", 1)[1])  # the error_cb
        clock.now += 0.05
    assert messages(caplog) == [
        (logging.WARNING, HINT),
        (logging.ERROR, "FAIL [rdkafka#producer-0] " + REFUSED.format(ms=0)),
    ]


def test_a_repeat_is_logged_again_with_its_count_once_the_interval_passed(
    client_log: ClientLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "test.librdkafka")
    for _ in range(10):
        client_log.error("ERROR %s", "1/1 brokers are down")
        clock.now += 4
    assert messages(caplog) == [
        (logging.ERROR, "ERROR 1/1 brokers are down"),
        (logging.ERROR, "ERROR 1/1 brokers are down (repeated 8 times in 32 s)"),
    ]


def test_the_coordinator_loading_is_said_at_debug_only(
    client_log: ClientLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "test.librdkafka")
    line = (
        "[thrd:main]: Failed to acquire transactional PID from broker TxnCoordinator/1: "
        "Broker: Coordinator load in progress: retrying"
    )
    librdkafka_line(client_log, logging.WARNING, "GETPID", line)
    assert [level for level, _ in messages(caplog)] == [logging.DEBUG]


def test_other_lines_pass_through_and_debug_lines_are_never_collapsed(
    client_log: ClientLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "test.librdkafka")
    librdkafka_line(client_log, logging.WARNING, "CONFWARN", "[thrd:app]: a warning")
    librdkafka_line(client_log, logging.WARNING, "CONFWARN", "[thrd:app]: another warning")
    for _ in range(3):
        librdkafka_line(client_log, logging.DEBUG, "PROTOCOL", "[thrd:main]: a debug line")
    assert [level for level, _ in messages(caplog)] == [logging.WARNING] * 2 + [logging.DEBUG] * 3


def test_a_broker_behind_tls_is_named_with_its_scheme(
    client_log: ClientLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "test.librdkafka")
    line = (
        "[thrd:sasl_ssl://kafka.example:9093/bootstrap]: sasl_ssl://kafka.example:9093/bootstrap: "
        "Failed to resolve 'kafka.example:9093': Name or service not known (after 5ms in state "
        "CONNECT)"
    )
    librdkafka_line(client_log, logging.ERROR, "FAIL", line)
    assert messages(caplog)[0][1].startswith(
        "cannot reach the Kafka broker at sasl_ssl://kafka.example:9093 (Name or service not "
        "known): check KAFKA_BOOTSTRAP_SERVERS"
    )
