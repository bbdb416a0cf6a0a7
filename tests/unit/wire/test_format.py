"""The message format's headers and prompts (esbridge.wire), decoded from plain values.

The values written here are the ones docs/message-format.md documents; the
integration test ``test_relay_format.py`` checks the same page with real Kafka.
"""

from __future__ import annotations

import json

import pytest

from esbridge import wire
from esbridge.errors import EsbridgeError, MessageFormatError
from esbridge.wire import (
    PayloadHeaders,
    Prompt,
    decode_payload,
    decode_payload_headers,
    decode_prompt,
    headers_dict,
    message_kind,
)

AGGREGATE = "5f0c3ad1-9d5e-4a7c-8d2b-0f8e6c1b2a3d"

PAYLOAD = PayloadHeaders(
    app="DogSchool",
    nid=42,
    prev_nid=17,
    topic="myproject.domain:Dog.TrickAdded",
    originator_version=3,
    content_type="application/json",
    time="2026-11-23T16:04:00.123456+00:00",
    originator_id=AGGREGATE,
)

ENCODED = [
    ("esb_format", b"1"),
    ("esb_kind", b"payload"),
    ("esb_app", b"DogSchool"),
    ("esb_nid", b"42"),
    ("esb_prev_nid", b"17"),
    ("esb_topic", b"myproject.domain:Dog.TrickAdded"),
    ("esb_version", b"3"),
    ("content-type", b"application/json"),
    ("ce_specversion", b"1.0"),
    ("ce_id", b"DogSchool:42"),
    ("ce_source", b"esbridge://DogSchool"),
    ("ce_type", b"myproject.domain:Dog.TrickAdded"),
    ("ce_time", b"2026-11-23T16:04:00.123456+00:00"),
    ("ce_subject", AGGREGATE.encode()),
]


def without(name: str) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in ENCODED if k != name]


def replaced(name: str, value: bytes | None) -> list[tuple[str, bytes | None]]:
    return [(k, value if k == name else v) for k, v in ENCODED]


# -- payload headers ------------------------------------------------------------------


def test_payload_headers_encode_as_documented() -> None:
    assert PAYLOAD.encode() == ENCODED


def test_payload_headers_round_trip() -> None:
    key = AGGREGATE.encode()
    assert decode_payload(PAYLOAD.encode(), key) == PAYLOAD
    assert decode_payload_headers(headers_dict(PAYLOAD.encode()), key) == PAYLOAD


def test_fast_path_object_behaves_like_the_dataclass() -> None:
    decoded = decode_payload(ENCODED, AGGREGATE.encode())
    assert type(decoded) is PayloadHeaders
    assert decoded == PAYLOAD
    assert hash(decoded) == hash(PAYLOAD)
    assert repr(decoded) == repr(PAYLOAD)
    with pytest.raises(AttributeError):
        decoded.nid = 1  # type: ignore[misc]


def test_payload_first_on_its_partition_and_non_json() -> None:
    first = PayloadHeaders(
        app="A",
        nid=1,
        prev_nid=0,
        topic="m:E",
        originator_version=1,
        content_type="application/octet-stream",
        time="2026-01-01T00:00:00+00:00",
        originator_id=AGGREGATE,
    )
    encoded = dict(first.encode())
    assert encoded["esb_prev_nid"] == b"0"
    assert encoded["content-type"] == b"application/octet-stream"
    assert encoded["ce_id"] == b"A:1"
    assert decode_payload(first.encode(), AGGREGATE.encode()) == first


def test_optional_payload_headers_have_defaults() -> None:
    headers = [(k, v) for k, v in ENCODED if k not in ("content-type", "ce_time")]
    expected = PayloadHeaders(
        app="DogSchool",
        nid=42,
        prev_nid=17,
        topic="myproject.domain:Dog.TrickAdded",
        originator_version=3,
        content_type="application/octet-stream",
        time="",
        originator_id=AGGREGATE,
    )
    assert decode_payload(headers, AGGREGATE.encode()) == expected
    assert decode_payload_headers(headers_dict(headers), AGGREGATE.encode()) == expected


def test_missing_key_gives_an_empty_originator_id() -> None:
    decoded = decode_payload(ENCODED, None)
    assert decoded is not None
    assert decoded.originator_id == ""


def test_unusual_values_take_the_general_path() -> None:
    # A header value that is None, and a key that is not UTF-8: decoded leniently.
    decoded = decode_payload(replaced("ce_time", None), b"\xff" + AGGREGATE.encode())
    assert decoded is not None
    assert decoded.time == ""
    assert decoded.originator_id == "\ufffd" + AGGREGATE
    # A repeated header: the last value wins, on both paths.
    decoded = decode_payload([*ENCODED, ("esb_app", b"Other")], AGGREGATE.encode())
    assert decoded is not None
    assert decoded.app == "Other"


@pytest.mark.parametrize(
    "header", ["esb_app", "esb_nid", "esb_prev_nid", "esb_topic", "esb_version"]
)
def test_payload_lacking_a_required_header(header: str) -> None:
    message = f"^payload message lacks header '{header}'$"
    with pytest.raises(MessageFormatError, match=message):
        decode_payload(without(header), AGGREGATE.encode())
    with pytest.raises(MessageFormatError, match=message):
        decode_payload_headers(headers_dict(without(header)), AGGREGATE.encode())


@pytest.mark.parametrize("header", ["esb_nid", "esb_prev_nid", "esb_version"])
def test_payload_with_a_malformed_number(header: str) -> None:
    message = (
        r"^payload message has a malformed header: "
        r"invalid literal for int\(\) with base 10: 'x1'$"
    )
    with pytest.raises(MessageFormatError, match=message):
        decode_payload(replaced(header, b"x1"), AGGREGATE.encode())


def test_message_format_error_is_an_esbridge_error() -> None:
    assert issubclass(MessageFormatError, EsbridgeError)


# -- message kind ---------------------------------------------------------------------


def test_message_kind() -> None:
    assert message_kind({"esb_format": "1", "esb_kind": "payload"}) == "payload"
    assert message_kind({"esb_format": "1", "esb_kind": "prompt"}) == "prompt"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            {},
            "^message has no 'esb_format' header: it was not published by an esbridge relay$",
        ),
        (
            {"esb_kind": "payload"},
            "^message has no 'esb_format' header: it was not published by an esbridge relay$",
        ),
        (
            {"esb_format": "2", "esb_kind": "payload"},
            r"^message format version '2' is not supported by this esbridge "
            r"\(supports '1'\): upgrade the consumer$",
        ),
        ({"esb_format": "1"}, "^unknown esbridge message kind ''$"),
        ({"esb_format": "1", "esb_kind": "snapshot"}, "^unknown esbridge message kind 'snapshot'$"),
    ],
)
def test_message_kind_refuses_other_messages(headers: dict[str, str], message: str) -> None:
    with pytest.raises(MessageFormatError, match=message):
        message_kind(headers)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (None, "^message has no 'esb_format' header"),
        ([], "^message has no 'esb_format' header"),
        ([("other", b"x")], "^message has no 'esb_format' header"),
        (replaced("esb_format", b"2"), "^message format version '2' is not supported"),
        (replaced("esb_format", None), "^message format version '' is not supported"),
        (replaced("esb_kind", b"snapshot"), "^unknown esbridge message kind 'snapshot'$"),
        (without("esb_kind"), "^unknown esbridge message kind ''$"),
    ],
)
def test_decode_payload_refuses_foreign_messages(
    headers: list[tuple[str, bytes | None]] | None, message: str
) -> None:
    with pytest.raises(MessageFormatError, match=message):
        decode_payload(headers, b"k")


def test_decode_payload_returns_none_for_a_prompt() -> None:
    _, _, headers = Prompt(app="DogSchool", max_nid=42).encode()
    assert decode_payload(headers, b"DogSchool") is None


# -- prompts --------------------------------------------------------------------------


def test_prompt_encodes_as_documented() -> None:
    key, value, headers = Prompt(app="DogSchool", max_nid=42).encode()
    assert key == b"DogSchool"
    assert json.loads(value) == {"app": "DogSchool", "max_nid": 42}
    assert headers == [
        ("esb_format", b"1"),
        ("esb_kind", b"prompt"),
        ("esb_app", b"DogSchool"),
        ("esb_nid", b"42"),
    ]
    assert message_kind(headers_dict(headers)) == "prompt"


def test_prompt_round_trip() -> None:
    prompt = Prompt(app="DogSchool", max_nid=42)
    assert decode_prompt(prompt.encode()[1]) == prompt
    assert decode_prompt(b'{"app": "A", "max_nid": "7", "extra": true}') == Prompt("A", 7)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, r"^malformed prompt message None: Expecting value: line 1 column 1 \(char 0\)$"),
        (b"", r"^malformed prompt message b'': Expecting value"),
        (b"not json", r"^malformed prompt message b'not json': Expecting value"),
        (b'{"app": "A"}', r"""^malformed prompt message b'{"app": "A"}': 'max_nid'$"""),
        (b'{"max_nid": 1}', r"""^malformed prompt message b'{"max_nid": 1}': 'app'$"""),
        (
            b'{"app": "A", "max_nid": "x"}',
            r"^malformed prompt message .*: invalid literal for int\(\) with base 10: 'x'$",
        ),
        (
            b'{"app": "A", "max_nid": null}',
            r"^malformed prompt message .*: int\(\) argument must be",
        ),
        (b"[1, 2]", r"^malformed prompt message b'\[1, 2\]': list indices must be"),
    ],
)
def test_decode_prompt_refuses_malformed_values(value: bytes | None, message: str) -> None:
    with pytest.raises(MessageFormatError, match=message):
        decode_prompt(value)


# -- headers_dict and constants -------------------------------------------------------


def test_headers_dict() -> None:
    assert headers_dict(None) == {}
    assert headers_dict([]) == {}
    assert headers_dict([("a", b"1"), ("b", None), ("c", b"\xffx"), ("a", b"2")]) == {
        "a": "2",
        "b": "",
        "c": "\ufffdx",
    }


def test_format_constants() -> None:
    assert wire.FORMAT_VERSION == "1"
    assert (wire.KIND_PAYLOAD, wire.KIND_PROMPT) == ("payload", "prompt")
    assert wire.ce_source("DogSchool") == "esbridge://DogSchool"
