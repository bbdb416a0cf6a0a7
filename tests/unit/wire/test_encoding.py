"""Notifications to Kafka messages (esbridge.wire.encoding), as docs/message-format.md says.

Notifications are built directly (eventsourcing.persistence.Notification), so
each test states the stored event and the exact message it becomes.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from eventsourcing.persistence import Notification

from esbridge import wire
from esbridge.errors import MessageFormatError
from esbridge.kafka.partitioning import partition_for_key
from esbridge.wire import PayloadHeaders
from esbridge.wire.encoding import (
    CONTENT_TYPE_BINARY,
    CONTENT_TYPE_JSON,
    PayloadEncoder,
    RowError,
    causal_deps,
    content_type_for,
    event_time,
    merge_headers,
)

TIME = b"2026-11-23T16:04:00.123456+00:00"
STATE = b'{"timestamp":{"_type_":"datetime_iso","_data_":"' + TIME + b'"},"trick":"roll over"}'
TOPIC = "myproject.domain:Dog.TrickAdded"
PARTITIONS = 3


def aggregate_ids(partition: int, count: int) -> list[uuid.UUID]:
    """``count`` aggregate ids whose messages go to ``partition`` (of PARTITIONS)."""
    found: list[uuid.UUID] = []
    i = 0
    while len(found) < count:
        candidate = uuid.UUID(int=i * 7919 + 1)
        if partition_for_key(str(candidate).encode(), PARTITIONS) == partition:
            found.append(candidate)
        i += 1
    return found


def notification(
    nid: int, originator_id: uuid.UUID, version: int = 1, state: Any = STATE, topic: str = TOPIC
) -> Notification:
    return Notification(
        originator_id=originator_id,
        originator_version=version,
        topic=topic,
        state=state,
        id=nid,
    )


def expected_headers(
    n: Notification, prev: int, time: bytes = TIME, content_type: str = CONTENT_TYPE_JSON
) -> list[tuple[str, bytes]]:
    return PayloadHeaders(
        app="DogSchool",
        nid=n.id,
        prev_nid=prev,
        topic=n.topic,
        originator_version=n.originator_version,
        content_type=content_type,
        time=time.decode(),
        originator_id=str(n.originator_id),
    ).encode()


# -- message --------------------------------------------------------------------------


def test_message_key_value_headers_and_partition() -> None:
    encoder = PayloadEncoder("DogSchool", PARTITIONS)
    aggregate = uuid.UUID("5f0c3ad1-9d5e-4a7c-8d2b-0f8e6c1b2a3d")
    n = notification(42, aggregate, version=3)
    last = [0] * PARTITIONS
    key, value, headers, partition = encoder.message(n, last)
    assert key == b"5f0c3ad1-9d5e-4a7c-8d2b-0f8e6c1b2a3d"
    assert value == STATE
    assert partition == partition_for_key(key, PARTITIONS)
    assert headers == [
        ("esb_format", b"1"),
        ("esb_kind", b"payload"),
        ("esb_app", b"DogSchool"),
        ("esb_nid", b"42"),
        ("esb_prev_nid", b"0"),
        ("esb_topic", TOPIC.encode()),
        ("esb_version", b"3"),
        ("content-type", b"application/json"),
        ("ce_specversion", b"1.0"),
        ("ce_id", b"DogSchool:42"),
        ("ce_source", b"esbridge://DogSchool"),
        ("ce_type", TOPIC.encode()),
        ("ce_time", TIME),
        ("ce_subject", key),
    ]
    assert headers == expected_headers(n, prev=0)
    assert last[partition] == 42
    assert sum(last) == 42  # no other partition moved


def test_prev_nid_chains_per_partition() -> None:
    encoder = PayloadEncoder("DogSchool", PARTITIONS)
    a0, b0 = aggregate_ids(0, 2)
    (a1,) = aggregate_ids(1, 1)
    last = [0] * PARTITIONS
    sent = []
    for n in [
        notification(5, a0),
        notification(6, a1),
        notification(9, b0),  # ids need not be contiguous
        notification(10, a0, version=2),
        notification(11, a1, version=2),
    ]:
        _, _, headers, partition = encoder.message(n, last)
        sent.append((n.id, partition, dict(headers)["esb_prev_nid"]))
    assert sent == [(5, 0, b"0"), (6, 1, b"0"), (9, 0, b"5"), (10, 0, b"9"), (11, 1, b"6")]
    assert last == [10, 11, 0]


def test_message_starts_from_the_given_chain() -> None:
    encoder = PayloadEncoder("DogSchool", PARTITIONS)
    (a2,) = aggregate_ids(2, 1)
    last = [0, 0, 77]
    n = notification(80, a2)
    assert encoder.message(n, last)[2] == expected_headers(n, prev=77)
    assert last == [0, 0, 80]


def test_single_partition() -> None:
    encoder = PayloadEncoder("DogSchool", 1)
    last = [0]
    for nid in (1, 2, 3):
        _, _, headers, partition = encoder.message(notification(nid, uuid.uuid4()), last)
        assert partition == 0
        assert dict(headers)["esb_prev_nid"] == str(nid - 1).encode()


def test_ce_time_falls_back_to_the_publish_time() -> None:
    encoder = PayloadEncoder("DogSchool", PARTITIONS)
    encoder.publish_time = b"2026-12-06T00:00:00+00:00"
    n = notification(1, uuid.uuid4(), state=b'{"trick":"sit"}')
    _, _, headers, _ = encoder.message(n, [0] * PARTITIONS)
    assert dict(headers)["ce_time"] == b"2026-12-06T00:00:00+00:00"


def test_non_json_content_type_never_reads_the_event_time() -> None:
    encoder = PayloadEncoder("DogSchool", PARTITIONS, content_type=CONTENT_TYPE_BINARY)
    encoder.publish_time = b"2026-12-06T00:00:00+00:00"
    n = notification(1, uuid.uuid4())  # the state would have a readable time
    last = [0] * PARTITIONS
    _, value, headers, _ = encoder.message(n, last)
    assert value == STATE
    assert headers == expected_headers(
        n, prev=0, time=b"2026-12-06T00:00:00+00:00", content_type=CONTENT_TYPE_BINARY
    )


def test_set_publish_time_is_rfc3339_utc() -> None:
    encoder = PayloadEncoder("DogSchool", PARTITIONS)
    encoder.publish_time = b""
    encoder.set_publish_time()
    assert encoder.publish_time.endswith(b"+00:00")
    assert encoder.publish_time[4:5] == b"-" and encoder.publish_time[10:11] == b"T"


@pytest.mark.parametrize(("state", "topic"), [(None, TOPIC), (STATE, "")])
def test_message_refuses_an_unreadable_event(state: Any, topic: str) -> None:
    encoder = PayloadEncoder("DogSchool", PARTITIONS)
    last = [0] * PARTITIONS
    with pytest.raises(ValueError, match=r"^the stored event has no state or no topic$"):
        encoder.message(notification(1, uuid.uuid4(), state=state, topic=topic), last)
    assert last == [0] * PARTITIONS  # the chain did not move


# -- encoder hook and merge_headers ---------------------------------------------------


def test_encoder_hook_replaces_the_value_and_adds_headers() -> None:
    def hook(n: Notification) -> tuple[bytes, list[tuple[str, bytes]]]:
        return b"avro:" + str(n.id).encode(), [
            ("content-type", b"application/avro"),
            ("ce_time", b"2000-01-01T00:00:00+00:00"),
            ("esb_nid", b"999"),  # ignored: esb_* headers are the relay's own
            ("esb_extra", b"x"),  # ignored too
            ("x-schema", b"7"),
        ]

    encoder = PayloadEncoder("DogSchool", PARTITIONS, encoder=hook)
    n = notification(42, uuid.uuid4())
    _, value, headers, _ = encoder.message(n, [0] * PARTITIONS)
    assert value == b"avro:42"
    standard = dict(expected_headers(n, prev=0))
    standard["content-type"] = b"application/avro"
    standard["ce_time"] = b"2000-01-01T00:00:00+00:00"
    assert headers == [*standard.items(), ("x-schema", b"7")]


def test_merge_headers_rules() -> None:
    headers = [("esb_nid", b"1"), ("content-type", b"application/json"), ("ce_time", b"t")]
    assert merge_headers(headers, []) == headers
    assert merge_headers(headers, [("ce_time", b"u")]) == [
        ("esb_nid", b"1"),
        ("content-type", b"application/json"),
        ("ce_time", b"u"),
    ]
    # esb_* can be neither replaced nor added; new names are appended in their order.
    assert merge_headers(
        headers, [("esb_nid", b"2"), ("esb_new", b"n"), ("b", b"1"), ("a", b"2")]
    ) == [
        *headers,
        ("b", b"1"),
        ("a", b"2"),
    ]
    # A standard header named twice: the last value replaces it, in its place.
    assert merge_headers(headers, [("ce_time", b"u"), ("ce_time", b"v")]) == [
        ("esb_nid", b"1"),
        ("content-type", b"application/json"),
        ("ce_time", b"v"),
    ]
    assert headers == [("esb_nid", b"1"), ("content-type", b"application/json"), ("ce_time", b"t")]


# -- produce_rows: the same messages as message() ---------------------------------------


def rows_of(notifications: list[Notification]) -> list[tuple[int, bytes, int, bytes, bytes]]:
    return [
        (n.id, str(n.originator_id).encode(), n.originator_version, n.topic.encode(), n.state)
        for n in notifications
    ]


def test_produce_rows_produces_what_message_builds() -> None:
    a0, b0 = aggregate_ids(0, 2)
    (a1,) = aggregate_ids(1, 1)
    notifications = [
        notification(3, a0),
        notification(4, a1, state=b'{"no":"time"}'),
        notification(8, b0, version=5),
        notification(9, a0, version=2),
    ]
    encoder = PayloadEncoder("DogSchool", PARTITIONS)
    last_ints = [0, 0, 2]
    expected = [encoder.message(n, last_ints) for n in notifications]

    produced: list[tuple[Any, ...]] = []

    def produce(topic: str, value: bytes, key: bytes, partition: int, *, headers: Any) -> None:
        produced.append((topic, key, value, list(headers.items()), partition))

    last = [b"0", b"0", b"2"]
    encoder.produce_rows(rows_of(notifications), produce, "dogschool", last, wait=lambda: None)
    assert produced == [("dogschool", *message) for message in expected]
    assert last == [str(i).encode() for i in last_ints] == [b"9", b"4", b"2"]


TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_traced_notifications_get_w3c_headers_last_in_both_paths() -> None:
    (a0,) = aggregate_ids(0, 1)
    notifications = [
        notification(3, a0),
        notification(4, a0, version=2),
        notification(5, a0, version=3),
    ]
    traces = {3: (TRACEPARENT, None), 5: (TRACEPARENT, b"vendor=x")}
    encoder = PayloadEncoder("DogSchool", PARTITIONS)
    last_ints = [0, 0, 0]
    expected = [encoder.message(n, last_ints, traces.get(n.id)) for n in notifications]
    assert [
        [h for h in m[2] if not h[0].startswith(("esb_", "ce_", "content"))] for m in expected
    ] == [
        [("traceparent", TRACEPARENT)],
        [],
        [("traceparent", TRACEPARENT), ("tracestate", b"vendor=x")],
    ]
    assert [len(m[2]) for m in expected] == [15, 14, 16]  # the standard 14 first, untouched

    produced: list[tuple[Any, ...]] = []

    def produce(topic: str, value: bytes, key: bytes, partition: int, *, headers: Any) -> None:
        produced.append((topic, key, value, list(headers.items()), partition))

    encoder.produce_rows(
        rows_of(notifications), produce, "t", [b"0"] * 3, wait=lambda: None, traces=traces
    )
    assert produced == [("t", *message) for message in expected]


def test_produce_rows_waits_while_the_queue_is_full() -> None:
    encoder = PayloadEncoder("DogSchool", 1)
    attempts: list[int] = []
    waits: list[int] = []

    def produce(topic: str, value: bytes, key: bytes, partition: int, *, headers: Any) -> None:
        attempts.append(int(headers["esb_nid"]))
        if len(attempts) < 3:
            raise BufferError("queue full")

    last = [b"0"]
    rows = rows_of([notification(1, uuid.uuid4())])
    encoder.produce_rows(rows, produce, "t", last, wait=lambda: waits.append(1))
    assert attempts == [1, 1, 1]
    assert len(waits) == 2
    assert last == [b"1"]


def test_produce_rows_names_the_failing_notification() -> None:
    encoder = PayloadEncoder("DogSchool", 1)
    produced: list[int] = []
    refused = RuntimeError("too large")

    def produce(topic: str, value: bytes, key: bytes, partition: int, *, headers: Any) -> None:
        if headers["esb_nid"] == b"2":
            raise refused
        produced.append(int(headers["esb_nid"]))

    last = [b"0"]
    rows = rows_of([notification(nid, uuid.uuid4()) for nid in (1, 2, 3)])
    with pytest.raises(RowError, match=r"^notification 2: RuntimeError: too large$") as info:
        encoder.produce_rows(rows, produce, "t", last, wait=lambda: None)
    assert (info.value.nid, info.value.cause) == (2, refused)
    assert info.value.__cause__ is refused
    assert produced == [1]
    assert last == [b"1"]  # the chain stops at the last message produced


def test_produce_rows_refuses_an_unreadable_row() -> None:
    encoder = PayloadEncoder("DogSchool", 1)
    rows: list[Any] = [(7, b"k", 1, b"", STATE)]
    with pytest.raises(
        RowError, match=r"^notification 7: ValueError: the stored event has no state or no topic$"
    ):
        encoder.produce_rows(rows, lambda *a, **k: None, "t", [b"0"], wait=lambda: None)


# -- event_time and content_type_for ----------------------------------------------------


def test_event_time() -> None:
    assert event_time(STATE) == TIME
    assert event_time(b'{"trick":"sit"}') is None
    assert event_time(b"") is None
    assert event_time(b"\x00\x01binary") is None
    # The mark with an implausible value first: the regex finds the real one after it.
    odd = b'{"timestamp":{"_type_":"datetime_iso","_data_":"x"},' + STATE[1:]
    assert event_time(odd) == TIME
    too_long = b'{"timestamp":{"_type_":"datetime_iso","_data_":"' + b"9" * 41 + b'"}}'
    assert event_time(too_long) is None


def test_content_type_for() -> None:
    assert content_type_for({}) == CONTENT_TYPE_JSON == "application/json"
    assert content_type_for({"COMPRESSOR_TOPIC": ""}) == CONTENT_TYPE_JSON
    assert content_type_for({"COMPRESSOR_TOPIC": "eventsourcing.compressor:ZlibCompressor"}) == (
        CONTENT_TYPE_BINARY
    )
    assert content_type_for({"CIPHER_TOPIC": "eventsourcing.cipher:AESCipher"}) == (
        "application/octet-stream"
    )


# -- causal dependencies (esb_deps) ------------------------------------------------------


def test_causal_deps_name_only_partitions_written_since_the_previous_message() -> None:
    # Partition 0 last published 5; partition 1 published 7 since, partition 2 nothing.
    assert causal_deps([5, 7, 3], prev=5) == [(1, 7)]
    assert causal_deps([0, 0, 0], prev=0) == []  # the first message of the log
    assert causal_deps([0, 2, 4], prev=0) == [(1, 2), (2, 4)]  # a partition's first


def test_deps_header_round_trips_and_refuses_unknown_versions() -> None:
    value = wire.encode_deps([(0, 12), (3, 40)])
    assert value == b"1;0=12,3=40"
    assert wire.decode_deps(value) == [(0, 12), (3, 40)]
    assert wire.decode_deps(b"1;") == []
    with pytest.raises(MessageFormatError, match=r"version '2'.*upgrade the consumer"):
        wire.decode_deps(b"2;0=12")
    with pytest.raises(MessageFormatError, match="malformed esb_deps"):
        wire.decode_deps(b"1;0=x")


def test_causal_messages_carry_the_log_order_across_partitions() -> None:
    """Both paths (hook and fast loop) give the same esb_deps, last, only when needed."""
    a0, b0 = aggregate_ids(0, 2)
    (a1,) = aggregate_ids(1, 1)
    notifications = [
        notification(3, a0),
        notification(4, a1),
        notification(8, b0, version=5),
        notification(9, a0, version=2),
        notification(10, a1, version=2),
    ]
    encoder = PayloadEncoder("DogSchool", PARTITIONS, causal=True)
    last_ints = [0, 0, 2]
    expected = [encoder.message(n, last_ints) for n in notifications]
    deps = [dict(headers).get(wire.H_DEPS) for _, _, headers, _ in expected]
    assert deps == [b"1;2=2", b"1;0=3,2=2", b"1;1=4", None, b"1;0=9"]
    assert [headers[-1][0] for _, _, headers, _ in expected].count(wire.H_DEPS) == 4  # last
    produced: list[tuple[Any, ...]] = []

    def produce(topic: str, value: bytes, key: bytes, partition: int, *, headers: Any) -> None:
        produced.append((key, value, list(headers.items()), partition))

    last = [b"0", b"0", b"2"]
    encoder.produce_rows(rows_of(notifications), produce, "dogschool", last, wait=lambda: None)
    assert produced == [tuple(message) for message in expected]
    plain = PayloadEncoder("DogSchool", PARTITIONS).message(notifications[1], [3, 0, 2])[2]
    assert wire.H_DEPS not in dict(plain)  # off by default: format v1 as before
