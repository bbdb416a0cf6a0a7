"""One dead letter, everything about it, for a person deciding what to do (``esbridge dlq show``).

Kafka Connect's error context is what operators miss most when a message is
parked: not only the error, but the traceback, the attempts, the headers, where
the message sat in Kafka and what it carried. The payload is decoded as the
follower would decode it (its cipher and compressor settings), so its state is
read as JSON; a message that cannot be decoded (why it was parked, perhaps) is
shown as raw bytes, with the decoding error.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from eventsourcing.persistence import StoredEvent

from esbridge.deadletters.store import DeadLetter
from esbridge.processing.steps import UpstreamDecoder, originator_id


def letter_details(letter: DeadLetter, decoder: UpstreamDecoder | None) -> dict[str, Any]:
    """A JSON-friendly view of ``letter``: its summary, the error context and the payload."""
    details = letter.summary()
    details.update(
        traceback=letter.traceback,
        tracking_name=letter.tracking_name,
        originator_version=letter.originator_version,
        kafka_topic=letter.kafka_topic,
        kafka_partition=letter.kafka_partition,
        kafka_offset=letter.kafka_offset,
        headers={name: _text(value) for name, value in letter.headers},
        payload=decoded_payload(letter, decoder),
    )
    if letter.discarded_at is not None:
        details["discarded"] = {
            "at": letter.discarded_at.isoformat(),
            "by": letter.discarded_by,
            "reason": letter.discard_reason,
        }
    return details


def decoded_payload(letter: DeadLetter, decoder: UpstreamDecoder | None) -> dict[str, Any]:
    """The event the message carries (topic, class, state), or its raw bytes when undecodable."""
    raw = letter.value or b""
    error = "not an esbridge event message (no event topic or version)"
    if decoder is not None and letter.event_topic and letter.originator_version is not None:
        try:
            event = decoder.decode(
                StoredEvent(
                    originator_id=originator_id(letter.key),
                    originator_version=letter.originator_version,
                    topic=letter.event_topic,
                    state=raw,
                )
            )
        except Exception as e:  # why it was parked, often: shown, not raised
            error = f"{type(e).__name__}: {e}"
        else:
            cls = type(event)
            return {
                "event_topic": letter.event_topic,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "state": json.loads(json.dumps(vars(event), default=str)),
            }
    return {
        "event_topic": letter.event_topic,
        "decode_error": error,
        "raw_base64": base64.b64encode(raw).decode(),
        "raw_text": raw.decode("utf-8", "replace")[:2000],
    }


def _text(value: bytes) -> str:
    """A header value as text when it is text (esbridge's headers are), else base64."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode()
