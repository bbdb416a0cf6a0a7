"""librdkafka's log lines, made readable: repeats counted, transient noise demoted, the hint first.

librdkafka logs every failed connection attempt, and reports it again through
the error callback: a wrong ``KAFKA_BOOTSTRAP_SERVERS`` gave about a hundred
identical ``Connect to ... failed: Connection refused`` lines per retry (503
lines in 33 s) before esbridge's own line said what to check. And every fresh
start of a transactional producer logged a WARNING that the broker's
transaction coordinator was still loading, which librdkafka retries by
itself and which needs nothing from the user.

:class:`ClientLog` sits between librdkafka (every esbridge client's
``logger`` and ``error_cb``, see :func:`esbridge.runtime.logs.kafka_client_config`)
and the ``esbridge.librdkafka`` logger. It is one object for the whole process,
so that the same failure seen by several clients is logged once:

* a line is logged the first time; identical ones (timings such as
  ``after 0ms`` aside, and whichever client saw them) are counted, and
  logged again with ``(repeated N times in T s)`` once :data:`REPEAT_INTERVAL`
  seconds have passed;
* lines about a transient state that librdkafka retries by itself
  (:data:`TRANSIENT`) are logged at DEBUG;
* the first failure to connect to a broker is preceded by one line saying what
  to check (``cannot reach the Kafka broker at HOST:PORT (...): check
  KAFKA_BOOTSTRAP_SERVERS ...``).

librdkafka's DEBUG lines (its ``debug`` setting) pass through unchanged.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

#: Seconds between two lines for the same repeated message.
REPEAT_INTERVAL = 30.0

#: Messages kept for counting repeats (the oldest is forgotten first).
MAX_REMEMBERED = 256

#: Fragments of messages about a state librdkafka waits out by itself.
TRANSIENT = (
    "Coordinator load in progress",
    "COORDINATOR_LOAD_IN_PROGRESS",
)

#: A failed connection to a broker: ``HOST:PORT/ID: Connect to ADDRESS failed: REASON``.
_CONNECT_FAILED = re.compile(
    r"(?P<broker>(?:\w+://)?[^\s/\[\]]+)/(?:bootstrap|\d+): "
    r"(?:Connect to \S+ failed|Failed to resolve '[^']*'): (?P<reason>[^(]+?)(?: \(after|$)"
)
_TIMING = re.compile(r"\b\d+ ?ms\b")


@dataclass
class _Seen:
    """A message logged before: when, and how many times it came again since."""

    logged_at: float
    repeats: int = 0


class ClientLog(logging.LoggerAdapter[logging.Logger]):
    """librdkafka's ``logger`` (and the ``error_cb``'s), in front of ``logger``.

    confluent-kafka calls ``log(level, "%s [%s] %s", facility, client, message)``
    from the thread that polls the client; the error callback calls ``error``.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        repeat_interval: float = REPEAT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(logger, {})
        self.repeat_interval = repeat_interval
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, _Seen] = OrderedDict()

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level <= logging.DEBUG:
            self.logger.log(level, msg, *args, **kwargs)
            return
        text = str(msg) % args if args else str(msg)
        # The client's name (rdkafka#producer-1) is no part of what happened.
        key = f"{level}:" + _TIMING.sub("N ms", args[2] if _is_librdkafka_line(msg, args) else text)
        if any(fragment in text for fragment in TRANSIENT):
            level = logging.DEBUG
        failed = _CONNECT_FAILED.search(text)
        if failed is not None:
            broker, reason = failed["broker"], failed["reason"].strip()
            self._once(
                logging.WARNING,
                f"cannot reach {broker}",
                f"cannot reach the Kafka broker at {broker} ({reason}): check "
                "KAFKA_BOOTSTRAP_SERVERS (bootstrap.servers) and that the broker runs",
            )
            # The log line and the error callback report the same failure: one key.
            key = f"connect to {broker} failed: {reason}"
        self._once(level, key, text)

    def _once(self, level: int, key: str, text: str) -> None:
        """Log ``text`` unless ``key`` was logged less than ``repeat_interval`` s ago."""
        now = self.clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                self._seen[key] = _Seen(now)
                while len(self._seen) > MAX_REMEMBERED:
                    self._seen.popitem(last=False)
                repeats = None
            elif now - seen.logged_at < self.repeat_interval:
                seen.repeats += 1
                return
            else:
                repeats, since = seen.repeats + 1, now - seen.logged_at
                seen.logged_at, seen.repeats = now, 0
                self._seen.move_to_end(key)
        if repeats is None:
            self.logger.log(level, "%s", text)
        else:
            self.logger.log(level, "%s (repeated %d times in %.0f s)", text, repeats, since)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs


def _is_librdkafka_line(msg: object, args: tuple[Any, ...]) -> bool:
    """Whether this is confluent-kafka's ``(facility, client name, message)`` call."""
    return msg == "%s [%s] %s" and len(args) == 3
