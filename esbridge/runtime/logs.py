"""Structured logging for esbridge processes (text for people, JSON for log pipelines)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from esbridge.kafka.access import error_callback
from esbridge.kafka.client_log import ClientLog


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with the ``extra`` fields the components attach."""

    _standard = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._standard and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record, not as it was at set-up.

    ``sys.stderr`` can be replaced after logging is configured (pytest's output
    capture, a daemonising wrapper); a handler bound to the old stream would
    then write to a closed file.
    """

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        """Ignored: the stream is always the current ``sys.stderr``."""


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once for an esbridge process."""
    handler = StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


#: librdkafka's own log lines (connection failures, configuration warnings) as
#: records of this logger: timestamped, levelled and formatted (text or JSON)
#: like esbridge's own. Filter them with ``logging.getLogger("esbridge.librdkafka")``.
LIBRDKAFKA_LOGGER = logging.getLogger("esbridge.librdkafka")

#: What every esbridge client hands its lines to: repeats counted, transient
#: noise at DEBUG, a hint before the first failed connection (:mod:`esbridge.kafka.client_log`).
LIBRDKAFKA_LOG = ClientLog(LIBRDKAFKA_LOGGER)


def kafka_client_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` for a confluent-kafka client whose log lines go to :data:`LIBRDKAFKA_LOGGER`.

    Without a ``logger``, librdkafka writes to stderr in its own format
    (``%3|1796141123.934|FAIL|rdkafka#producer-1| ...``), which neither
    ``--log-level`` nor a JSON log pipeline understands. With one,
    confluent-kafka hands the lines over in the client's ``poll()``,
    ``consume()`` and ``flush()`` calls: a client that is not polled must be
    polled once before it is dropped (admin clients: :func:`esbridge.kafka.topics.kafka_admin`).
    A ``logger`` already in ``config`` is kept. librdkafka's ``debug`` setting
    asks for its debug lines, so it lowers this logger's level to DEBUG.
    Lines go through :data:`LIBRDKAFKA_LOG`, which collapses repeats (a
    broker that refuses connections is said once, with what to check).

    The ``error_cb`` (unless ``config`` has one) raises a refused SASL login
    or an unverified broker certificate from the call that serves it
    (:func:`esbridge.kafka.access.error_callback`): no retry fixes those.
    """
    conf = dict(config)
    conf.setdefault("logger", LIBRDKAFKA_LOG)
    conf.setdefault("error_cb", error_callback(config, LIBRDKAFKA_LOG))
    if conf.get("debug") and conf["logger"] is LIBRDKAFKA_LOG:
        LIBRDKAFKA_LOGGER.setLevel(logging.DEBUG)
    return conf
