"""Stopping a long-running command on SIGTERM or SIGINT, without deadlocking it.

Why not call ``stop()`` in the signal handler: Python runs a handler in the
main thread between two bytecodes, possibly while that thread is inside
``threading.Event.wait()``, ``set()`` or ``clear()`` and holds the event's
(non-reentrant) lock. A ``stop()`` that sets that same event then waits for a
lock its own thread holds, for ever: ``esbridge relay`` was seen ignoring a
SIGINT that way. The handler installed here only puts the signal in a
``queue.SimpleQueue`` (whose ``put`` is documented as safe in signal
handlers), and a helper thread calls ``stop``.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(stop: Callable[[str], object]) -> None:
    """On SIGTERM or SIGINT, call ``stop(signal name)`` from a helper thread.

    Call it from the main thread (Python installs handlers only there).
    """
    requests: queue.SimpleQueue[int] = queue.SimpleQueue()

    def forward() -> None:
        while True:
            stop(signal.Signals(requests.get()).name)

    threading.Thread(target=forward, name="esbridge-stop-signals", daemon=True).start()

    def handler(signum: int, frame: FrameType | None) -> None:
        requests.put(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
