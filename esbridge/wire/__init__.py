"""The Kafka message format, version 1: a public contract.

Analytics pipelines and consumers that know nothing of esbridge read these
messages, so everything here is documented in ``docs/message-format.md`` and
tested from the outside with a plain Kafka consumer. Change it only by adding
a new version.

Payload messages (one per notification of an application's notification log):

* key: the aggregate (originator) id as its canonical UUID string, UTF-8.
* value: the stored event's ``state`` bytes exactly as the application stored
  them (its transcoder, compressor and cipher applied), so a consumer decodes
  them with the upstream application's own mapper.
* headers (all values UTF-8 strings):

  ============================  ===============================================
  ``esb_format``                ``"1"``, this format's version
  ``esb_kind``                  ``"payload"``
  ``esb_app``                   upstream application name
  ``esb_nid``                   notification id in the upstream log
  ``esb_prev_nid``              notification id of the previous message that
                                the relay published to the same partition
                                (``"0"`` for the first)
  ``esb_topic``                 the event's topic (``module:QualName``)
  ``esb_version``               originator version
  ``content-type``              ``application/json`` for the library's default
                                JSON transcoder without compression or cipher,
                                else ``application/octet-stream``
  ``ce_specversion``            ``"1.0"`` (CloudEvents Kafka binary mode)
  ``ce_id``                     ``"{app}:{nid}"``, unique per app and notification
  ``ce_source``                 ``"esbridge://{app}"``
  ``ce_type``                   the event's topic
  ``ce_time``                   RFC 3339 time of the event when the relay can
                                decode it, else the time it was published
  ``ce_subject``                the aggregate id
  ``esb_deps``                  only from a relay with causal dependencies on,
                                and only when the message has some:
                                ``"1;P=N,P=N"``, encoding version 1, then for
                                other partitions ``P`` the notification id ``N``
                                a consumer must have processed on ``P`` first
                                (:func:`encode_deps`, docs/partitioning.md)
  ============================  ===============================================

Prompt messages (prompt mode) are tiny JSON objects on a prompt topic:
key = the application name; value = ``{"app": ..., "max_nid": N}``; headers
``esb_format``, ``esb_kind="prompt"``, ``esb_app``, ``esb_nid`` (= N).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from esbridge.errors import MessageFormatError

FORMAT_VERSION = "1"

H_FORMAT = "esb_format"
H_KIND = "esb_kind"
H_APP = "esb_app"
H_NID = "esb_nid"
H_PREV_NID = "esb_prev_nid"
H_TOPIC = "esb_topic"
H_VERSION = "esb_version"
H_CONTENT_TYPE = "content-type"
CE_SPECVERSION = "ce_specversion"
CE_ID = "ce_id"
CE_SOURCE = "ce_source"
CE_TYPE = "ce_type"
CE_TIME = "ce_time"
CE_SUBJECT = "ce_subject"
H_DEPS = "esb_deps"
#: The version of the ``esb_deps`` value's encoding (its prefix, before ``;``).
DEPS_VERSION = "1"
#: W3C trace context, after the headers above, on messages of traced events only.
H_TRACEPARENT = "traceparent"
H_TRACESTATE = "tracestate"

KIND_PAYLOAD = "payload"
KIND_PROMPT = "prompt"

Headers = list[tuple[str, bytes]]


def ce_source(app: str) -> str:
    """The CloudEvents ``source`` of an application's events."""
    return f"esbridge://{app}"


@dataclass(frozen=True)
class PayloadHeaders:
    """The decoded esbridge headers of one payload message."""

    app: str
    nid: int
    prev_nid: int
    topic: str
    originator_version: int
    content_type: str
    time: str
    originator_id: str
    #: The ``esb_deps`` value (causal dependencies, :func:`decode_deps`); "" when none.
    deps: str = ""

    def encode(self) -> Headers:
        """Headers in the order they are published."""
        items = [
            (H_FORMAT, FORMAT_VERSION),
            (H_KIND, KIND_PAYLOAD),
            (H_APP, self.app),
            (H_NID, str(self.nid)),
            (H_PREV_NID, str(self.prev_nid)),
            (H_TOPIC, self.topic),
            (H_VERSION, str(self.originator_version)),
            (H_CONTENT_TYPE, self.content_type),
            (CE_SPECVERSION, "1.0"),
            (CE_ID, f"{self.app}:{self.nid}"),
            (CE_SOURCE, ce_source(self.app)),
            (CE_TYPE, self.topic),
            (CE_TIME, self.time),
            (CE_SUBJECT, self.originator_id),
        ]
        if self.deps:
            items.append((H_DEPS, self.deps))
        return [(k, v.encode()) for k, v in items]


@dataclass(frozen=True)
class Prompt:
    """ "Application ``app`` has notifications up to id ``max_nid``"."""

    app: str
    max_nid: int

    def encode(self) -> tuple[bytes, bytes, Headers]:
        """Key, value and headers of the prompt message."""
        value = json.dumps({"app": self.app, "max_nid": self.max_nid}).encode()
        headers = [
            (H_FORMAT, FORMAT_VERSION.encode()),
            (H_KIND, KIND_PROMPT.encode()),
            (H_APP, self.app.encode()),
            (H_NID, str(self.max_nid).encode()),
        ]
        return self.app.encode(), value, headers


def headers_dict(headers: Sequence[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """Kafka headers as a dict of strings (the last value of a repeated header wins)."""
    result: dict[str, str] = {}
    for key, value in headers or ():
        result[key] = value.decode("utf-8", "replace") if value is not None else ""
    return result


def message_kind(headers: dict[str, str]) -> str:
    """``payload`` or ``prompt``; raises :class:`MessageFormatError` for other messages."""
    version = headers.get(H_FORMAT)
    if version is None:
        raise MessageFormatError(
            "message has no 'esb_format' header: it was not published by an esbridge relay"
        )
    if version != FORMAT_VERSION:
        raise MessageFormatError(
            f"message format version {version!r} is not supported by this esbridge "
            f"(supports {FORMAT_VERSION!r}): upgrade the consumer"
        )
    kind = headers.get(H_KIND, "")
    if kind not in (KIND_PAYLOAD, KIND_PROMPT):
        raise MessageFormatError(f"unknown esbridge message kind {kind!r}")
    return kind


def decode_payload_headers(headers: dict[str, str], key: bytes | None) -> PayloadHeaders:
    """Parse a payload message's headers; raises :class:`MessageFormatError` when malformed."""
    try:
        return PayloadHeaders(
            app=headers[H_APP],
            nid=int(headers[H_NID]),
            prev_nid=int(headers[H_PREV_NID]),
            topic=headers[H_TOPIC],
            originator_version=int(headers[H_VERSION]),
            content_type=headers.get(H_CONTENT_TYPE, "application/octet-stream"),
            time=headers.get(CE_TIME, ""),
            originator_id=(key or b"").decode("utf-8", "replace"),
            deps=headers.get(H_DEPS, ""),
        )
    except KeyError as e:
        raise MessageFormatError(f"payload message lacks header {e.args[0]!r}") from None
    except ValueError as e:
        raise MessageFormatError(f"payload message has a malformed header: {e}") from None


_FORMAT_VERSION_B = FORMAT_VERSION.encode()
_KIND_PAYLOAD_B = KIND_PAYLOAD.encode()
_new = object.__new__


def decode_payload(
    headers: Sequence[tuple[str, bytes | None]] | None, key: bytes | None
) -> PayloadHeaders | None:
    """A message's payload headers, or ``None`` for a prompt: a consumer's hot path.

    The same result and the same :class:`MessageFormatError` as
    :func:`message_kind` then :func:`decode_payload_headers`, in one pass that
    decodes only the headers it needs. Anything unusual (a missing, ``None``,
    non-UTF-8 or non-ASCII value, a prompt, another version) takes the general
    path, which gives the exact answer or error.
    """
    try:
        h = dict(headers or ())
        if h[H_FORMAT] == _FORMAT_VERSION_B and h[H_KIND] == _KIND_PAYLOAD_B:
            content_type = h.get(H_CONTENT_TYPE, b"application/octet-stream")
            # PayloadHeaders(...) without the frozen dataclass's slow __init__ (one
            # object.__setattr__ per field): the same object, equal and hashed alike.
            payload: PayloadHeaders = _new(PayloadHeaders)
            payload.__dict__.update(
                app=h[H_APP].decode(),  # type: ignore[union-attr]
                nid=int(h[H_NID]),  # type: ignore[arg-type]
                prev_nid=int(h[H_PREV_NID]),  # type: ignore[arg-type]
                topic=h[H_TOPIC].decode(),  # type: ignore[union-attr]
                originator_version=int(h[H_VERSION]),  # type: ignore[arg-type]
                content_type=content_type.decode(),  # type: ignore[union-attr]
                time=h.get(CE_TIME, b"").decode(),  # type: ignore[union-attr]
                originator_id=(key or b"").decode(),
                deps=h.get(H_DEPS, b"").decode(),  # type: ignore[union-attr]
            )
            return payload
    except Exception:  # the general path below gives the exact answer or error
        pass
    decoded = headers_dict(headers)
    if message_kind(decoded) == KIND_PROMPT:
        return None
    return decode_payload_headers(decoded, key)


def encode_deps(deps: Sequence[tuple[int, int]]) -> bytes:
    """The ``esb_deps`` value of ``(partition, notification id)`` pairs: ``b"1;0=12,3=40"``.

    A message on partition ``p`` with ``esb_deps`` ``1;q=n`` must not be
    processed before notification ``n`` of partition ``q`` is. The relay names
    only the partitions that received messages since ``p``'s previous message
    (the others are implied: that message waited for them), so the header
    stays short and is absent from most messages when few partitions are busy.
    """
    return (DEPS_VERSION + ";" + ",".join(f"{p}={n}" for p, n in deps)).encode()


def decode_deps(value: bytes | str | None) -> list[tuple[int, int]]:
    """The ``(partition, notification id)`` pairs of an ``esb_deps`` value.

    Raises :class:`MessageFormatError` for an encoding version this esbridge
    does not know (the consumer must not guess what it would have to wait
    for) or a malformed value.
    """
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else (value or "")
    version, sep, body = text.partition(";")
    if version != DEPS_VERSION or not sep:
        raise MessageFormatError(
            f"esb_deps header {text!r} has encoding version {version!r}; this esbridge "
            f"reads version {DEPS_VERSION!r}: upgrade the consumer"
        )
    try:
        pairs = []
        for item in filter(None, body.split(",")):
            partition, _, nid = item.partition("=")
            pairs.append((int(partition), int(nid)))
        return pairs
    except ValueError:
        raise MessageFormatError(f"malformed esb_deps header {text!r}") from None


def decode_prompt(value: bytes | None) -> Prompt:
    """Parse a prompt message's value; raises :class:`MessageFormatError` when malformed."""
    try:
        data = json.loads(value or b"")
        return Prompt(app=str(data["app"]), max_nid=int(data["max_nid"]))
    except (ValueError, KeyError, TypeError) as e:
        raise MessageFormatError(f"malformed prompt message {value!r}: {e}") from None
