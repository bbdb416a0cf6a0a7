"""Turning notifications into Kafka messages (message format v1, see :mod:`esbridge.wire`).

This is the relay's hot loop, so it avoids per-message Python work where it
can: constant headers are encoded once, the encoded event topic is cached,
and partitions are computed by librdkafka's own murmur2 (through ``ctypes``,
~0.7 µs instead of ~5.5 µs for the pure-Python one) when that symbol is
available and agrees with :func:`esbridge.partitioning.partition_for_key`.

The headers produced here are exactly :meth:`esbridge.wire.PayloadHeaders.encode`
(tests compare them), plus whatever an optional *encoder* hook adds.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import cache

from eventsourcing.persistence import Notification

from esbridge import wire
from esbridge.partitioning import partition_for_key

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_BINARY = "application/octet-stream"

#: An encoder hook: ``notification -> (value, extra headers)``. Extra headers
#: with the name of a standard one replace it, except the ``esb_*`` headers,
#: which are always the relay's own (consumers rely on them).
Encoder = Callable[[Notification], tuple[bytes, wire.Headers]]

# eventsourcing's JSONTranscoder writes the event's timestamp like this.
_TIMESTAMP = re.compile(rb'"timestamp":\{"_type_":"datetime_iso","_data_":"([^"]{10,40})"')


def content_type_for(env: Mapping[str, str]) -> str:
    """``application/json`` unless the application compresses or encrypts its events.

    From the application's resolved environment (``COMPRESSOR_TOPIC``,
    ``CIPHER_TOPIC``, with the application-name prefix winning, as
    eventsourcing reads them).
    """
    for name in ("COMPRESSOR_TOPIC", "CIPHER_TOPIC"):
        if env.get(name):
            return CONTENT_TYPE_BINARY
    return CONTENT_TYPE_JSON


def event_time(state: bytes) -> bytes | None:
    """The event's timestamp (RFC 3339) from JSON-transcoded state, else ``None``."""
    match = _TIMESTAMP.search(state)
    return match.group(1) if match else None


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat()


def _python_partitioner(num_partitions: int) -> Callable[[bytes], int]:
    return lambda key: partition_for_key(key, num_partitions)


@cache
def _librdkafka_murmur2() -> Callable[..., int] | None:
    """librdkafka's ``rd_kafka_msg_partitioner_murmur2`` through ctypes, if loadable."""
    try:
        import confluent_kafka

        here = os.path.dirname(confluent_kafka.__file__)
        candidates = glob.glob(os.path.join(here, "..", "confluent_kafka.libs", "librdkafka*.so*"))
        candidates += ["librdkafka.so.1"]
        for path in candidates:
            try:
                lib = ctypes.CDLL(path)
                function = lib.rd_kafka_msg_partitioner_murmur2
            except (OSError, AttributeError):
                continue
            function.restype = ctypes.c_int32
            function.argtypes = [
                ctypes.c_void_p,
                ctypes.c_char_p,
                ctypes.c_size_t,
                ctypes.c_int32,
                ctypes.c_void_p,
                ctypes.c_void_p,
            ]
            return function
    except Exception:  # pragma: no cover - any failure means: use the Python one
        return None
    return None


def key_partitioner(num_partitions: int) -> Callable[[bytes], int]:
    """A fast ``key -> partition`` equal to :func:`partition_for_key` for this count."""
    if num_partitions == 1:
        return lambda key: 0
    function = _librdkafka_murmur2()
    if function is None:
        return _python_partitioner(num_partitions)
    samples = [str(uuid.UUID(int=i * 7919)).encode() for i in range(64)] + [b"", b"a", b"abc"]
    if any(
        function(None, k, len(k), num_partitions, None, None)
        != partition_for_key(k, num_partitions)
        for k in samples
    ):
        return _python_partitioner(num_partitions)
    return lambda key: function(None, key, len(key), num_partitions, None, None)


class PayloadEncoder:
    """Builds (key, value, headers, partition) of payload messages for one application.

    Keeps the per-partition chain of ``esb_prev_nid``: :meth:`message` updates
    ``last_per_partition`` in the list it is given.
    """

    def __init__(
        self,
        app: str,
        num_partitions: int,
        content_type: str = CONTENT_TYPE_JSON,
        encoder: Encoder | None = None,
    ) -> None:
        self.app = app
        self.content_type = content_type
        self.encoder = encoder
        self.partition_of = key_partitioner(num_partitions)
        self._decode_time = content_type == CONTENT_TYPE_JSON
        self._format = (wire.H_FORMAT, wire.FORMAT_VERSION.encode())
        self._kind = (wire.H_KIND, wire.KIND_PAYLOAD.encode())
        self._app = (wire.H_APP, app.encode())
        self._content_type = (wire.H_CONTENT_TYPE, content_type.encode())
        self._specversion = (wire.CE_SPECVERSION, b"1.0")
        self._source = (wire.CE_SOURCE, wire.ce_source(app).encode())
        self._ce_id_prefix = f"{app}:".encode()
        self._topics: dict[str, tuple[tuple[str, bytes], tuple[str, bytes]]] = {}
        self.publish_time = now_rfc3339().encode()

    def set_publish_time(self) -> None:
        """The ``ce_time`` used for events whose own time cannot be read cheaply."""
        self.publish_time = now_rfc3339().encode()

    def _topic_headers(self, topic: str) -> tuple[tuple[str, bytes], tuple[str, bytes]]:
        pair = self._topics.get(topic)
        if pair is None:
            encoded = topic.encode()
            pair = ((wire.H_TOPIC, encoded), (wire.CE_TYPE, encoded))
            if len(self._topics) < 10000:
                self._topics[topic] = pair
        return pair

    def message(
        self, n: Notification, last_per_partition: list[int]
    ) -> tuple[bytes, bytes, wire.Headers, int]:
        """Key, value, headers and partition of notification ``n``.

        Raises :class:`ValueError` when the stored event cannot be read.
        """
        state = n.state
        if state is None or not n.topic:
            raise ValueError("the stored event has no state or no topic")
        key = str(n.originator_id).encode()
        partition = self.partition_of(key)
        prev = last_per_partition[partition]
        last_per_partition[partition] = n.id
        nid = str(n.id).encode()
        topic_h, type_h = self._topic_headers(n.topic)
        time = (self._decode_time and event_time(state)) or self.publish_time
        headers = [
            self._format,
            self._kind,
            self._app,
            (wire.H_NID, nid),
            (wire.H_PREV_NID, str(prev).encode()),
            topic_h,
            (wire.H_VERSION, str(n.originator_version).encode()),
            self._content_type,
            self._specversion,
            (wire.CE_ID, self._ce_id_prefix + nid),
            self._source,
            type_h,
            (wire.CE_TIME, time),
            (wire.CE_SUBJECT, key),
        ]
        value = state
        if self.encoder is not None:
            value, extra = self.encoder(n)
            headers = merge_headers(headers, extra)
        return key, value, headers, partition


def merge_headers(headers: wire.Headers, extra: wire.Headers) -> wire.Headers:
    """``headers`` with ``extra`` applied: same-named ones replaced (never ``esb_*``)."""
    replace = {k: v for k, v in extra if not k.startswith("esb_")}
    merged = [(k, replace.pop(k, v)) for k, v in headers]
    merged.extend((k, v) for k, v in extra if k in replace)
    return merged
