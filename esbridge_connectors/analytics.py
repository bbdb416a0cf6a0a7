"""Analytics feeds: events as CloudEvents with plain-JSON data.

The relay's default payload is the stored event's bytes, readable only with
the upstream application's mapper (its transcodings, maybe compression or a
cipher). Analytics pipelines written in other languages need plain JSON with
a published schema instead, so this module re-encodes each notification as a
`CloudEvents 1.0 <https://cloudevents.io>`_ event:

* ``id`` = ``{app}:{nid}`` (as the ``ce_id`` header of :mod:`esbridge.wire`),
  ``source`` = ``esbridge://{app}``, ``type`` = the event's topic,
  ``subject`` = the aggregate id, ``time`` = the event's timestamp;
* extension attributes ``esbapp``, ``esbnid`` (notification id: an analytics
  consumer deduplicates on it) and ``esbversion`` (aggregate version);
* for a traced event (docs/tracing.md), the CloudEvents distributed-tracing
  extension: ``traceparent`` (and ``tracestate``) of the span that saved it;
* ``data`` = every attribute of the event as plain JSON (UUIDs, datetimes and
  decimals as strings; see :class:`~esbridge_connectors.schemas.JsonTypes`),
  described by the schema of :func:`~esbridge_connectors.schemas.event_data_schema`.

Two Kafka encodings (the CloudEvents Kafka protocol binding):

* ``structured``: the value is the whole CloudEvent as a JSON object, header
  ``content-type: application/cloudevents+json; charset=UTF-8``;
* ``binary``: the value is the data alone (``application/json``), the
  attributes are ``ce_*`` headers.

:class:`CloudEventsEncoder` is the relay's ``encoder`` hook (an
:data:`esbridge.wire.encoding.Encoder`): it turns a notification into (value
bytes, headers). Select the format per relay topic by giving one to that
topic's relay, ``Relay(app, topic=..., encoder=CloudEventsEncoder(app, mapper))``,
and the same one to a replay of that topic. :class:`AnalyticsPayloadEncoder` is
the same as a drop-in :class:`~esbridge.wire.encoding.PayloadEncoder` (same
``message()``) for code that builds encoders itself. Keys, partitions and the
``esb_*`` headers stay those of the relay, so esbridge tooling (replay, lag,
deduplication on ``esb_nid``) works on analytics topics too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from eventsourcing.persistence import Mapper, Notification
from eventsourcing.utils import get_topic

from esbridge import wire
from esbridge.errors import MessageFormatError
from esbridge.wire.encoding import PayloadEncoder
from esbridge_connectors.schemas import (
    DEFAULT_TYPES,
    ENVELOPE_FIELDS,
    JsonTypes,
    schema_file_stem,
)

Mode = Literal["structured", "binary"]
STRUCTURED: Mode = "structured"
BINARY: Mode = "binary"
CLOUDEVENTS_JSON = "application/cloudevents+json; charset=UTF-8"
JSON = "application/json"
EXTENSIONS = ("esbapp", "esbnid", "esbversion")
_CE_HEADER_ATTRIBUTES = ("id", "source", "type", "subject", "time", *EXTENSIONS)


class CloudEventsEncoder:
    """Encode an application's notifications as CloudEvents with plain-JSON data.

    ``mapper`` is the upstream application's mapper (it decodes the stored
    state: transcodings, compression, cipher). ``types`` says how values become
    plain JSON; give the same registry to the schema generator. With
    ``dataschema_base`` (a URI), each event carries ``dataschema`` =
    ``{base}/{type}.data.json``, where you publish the generated schemas.
    """

    def __init__(
        self,
        app_name: str,
        mapper: Mapper[Any],
        *,
        mode: Mode = STRUCTURED,
        types: JsonTypes = DEFAULT_TYPES,
        dataschema_base: str | None = None,
    ) -> None:
        if mode not in (STRUCTURED, BINARY):
            raise ValueError(f"mode must be {STRUCTURED!r} or {BINARY!r}, not {mode!r}")
        self.app_name = app_name
        self.mapper = mapper
        self.mode = mode
        self.types = types
        self.dataschema_base = dataschema_base.rstrip("/") if dataschema_base else None

    #: The relay gives :meth:`encode` the event's trace context (``trace=``).
    accepts_trace = True

    def cloudevent(
        self, notification: Notification, trace: tuple[bytes, bytes | None] | None = None
    ) -> dict[str, Any]:
        """The CloudEvent of one notification, as a JSON-ready dict (structured form).

        ``trace``: (traceparent, tracestate) header values of a traced event,
        added as the distributed-tracing extension's attributes.
        """
        event = self.mapper.to_domain_event(notification)
        state = vars(event)
        first = {name: state[name] for name in ENVELOPE_FIELDS if name in state}
        data = self.types.to_json(first | state)
        timestamp = getattr(event, "timestamp", None)
        attributes: dict[str, Any] = {
            "specversion": "1.0",
            "id": f"{self.app_name}:{notification.id}",
            "source": wire.ce_source(self.app_name),
            "type": notification.topic,
            "subject": str(notification.originator_id),
            "time": timestamp.isoformat() if isinstance(timestamp, datetime) else "",
            "datacontenttype": JSON,
            "esbapp": self.app_name,
            "esbnid": notification.id,
            "esbversion": notification.originator_version,
        }
        if not attributes["time"]:
            raise MessageFormatError(
                f"event {notification.topic} (notification {notification.id}) has no "
                "'timestamp' datetime: a CloudEvent needs a time"
            )
        if self.dataschema_base:
            stem = schema_file_stem(get_topic(type(event)))
            attributes["dataschema"] = f"{self.dataschema_base}/{stem}.data.json"
        if trace is not None:
            attributes["traceparent"] = trace[0].decode()
            if trace[1]:
                attributes["tracestate"] = trace[1].decode()
        attributes["data"] = data
        return attributes

    def encode(
        self, notification: Notification, trace: tuple[bytes, bytes | None] | None = None
    ) -> tuple[bytes, wire.Headers]:
        """Value bytes and CloudEvents headers of one notification, in this encoder's mode."""
        event = self.cloudevent(notification, trace)
        if self.mode == STRUCTURED:
            return _dumps(event), [(wire.H_CONTENT_TYPE, CLOUDEVENTS_JSON.encode())]
        return _dumps(event.pop("data")), binary_headers(event)

    __call__ = encode


class AnalyticsPayloadEncoder(PayloadEncoder):
    """A relay's :class:`PayloadEncoder` whose values are CloudEvents with plain-JSON data.

    Same key (aggregate id), partition and ``esb_*`` headers as the default
    encoder; the value and ``content-type`` (and in binary mode the ``ce_*``
    headers, with the extension attributes) come from :class:`CloudEventsEncoder`.
    ``mapper`` is the upstream application's mapper
    (:func:`esbridge_connectors.upstream.application_mapper`).
    """

    def __init__(
        self,
        app: str,
        num_partitions: int,
        mapper: Mapper[Any],
        *,
        mode: Mode = STRUCTURED,
        types: JsonTypes = DEFAULT_TYPES,
        dataschema_base: str | None = None,
    ) -> None:
        self.cloudevents = CloudEventsEncoder(
            app, mapper, mode=mode, types=types, dataschema_base=dataschema_base
        )
        content_type = CLOUDEVENTS_JSON if mode == STRUCTURED else JSON
        super().__init__(app, num_partitions, content_type, encoder=self.cloudevents)
        self._decode_time = True  # ce_time: the CloudEvent's own time (set by the encoder)


def binary_headers(attributes: Mapping[str, Any]) -> wire.Headers:
    """``ce_*`` headers (and ``content-type``) of a CloudEvent in Kafka binary mode."""
    headers: wire.Headers = [(wire.H_CONTENT_TYPE, JSON.encode())]
    for name, value in attributes.items():
        if name in ("datacontenttype", "data"):
            continue
        headers.append((f"ce_{name}", str(value).encode()))
    return headers


def _dumps(value: Any) -> bytes:
    try:
        return json.dumps(
            value, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode()
    except ValueError as e:  # NaN or infinity: not JSON
        raise MessageFormatError(f"event data is not valid JSON: {e}") from None


def read_cloudevent(
    value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None
) -> dict[str, Any]:
    """The CloudEvent of an analytics message, whichever mode it was written in.

    A reference reader for Python consumers (and the tests): structured mode
    is recognised by its ``content-type``; otherwise the ``ce_*`` headers are
    the attributes and the value is the data. Extension attributes that are
    integers in structured mode (``esbnid``, ``esbversion``) are integers here too.
    """
    found = wire.headers_dict(headers)
    content_type = found.get(wire.H_CONTENT_TYPE, "")
    try:
        if content_type.startswith("application/cloudevents+json"):
            event = json.loads(value or b"")
            if not isinstance(event, dict):
                raise MessageFormatError("a structured CloudEvent must be a JSON object")
            return event
        event = {"specversion": found["ce_specversion"]}
        for name, text in found.items():
            if name.startswith("ce_") and name != "ce_specversion":
                event[name[3:]] = text
        for name in ("esbnid", "esbversion"):
            if name in event:
                event[name] = int(event[name])
        event["datacontenttype"] = content_type
        event["data"] = json.loads(value or b"null")
        return event
    except (KeyError, ValueError) as e:
        raise MessageFormatError(f"not a CloudEvents message: {e!r}") from None
