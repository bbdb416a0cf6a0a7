"""Pausing Python's cyclic garbage collector while a consumer processes a batch.

Why: CPython's cyclic collector scans the young objects every 700 net
allocations of container objects, promotes the survivors, and scans the whole
heap whenever the survivors grew by a quarter. A consumer's batch keeps
thousands of messages, steps, events and aggregate copies alive until it
commits, so the collector scans them again and again, promotes them, and runs
a full collection about once a batch: a fifth of a consumer's CPU time
(measured with ``bench/consume.py``) to find next to nothing, because
reference counting frees nearly all of those objects when the batch ends.
Pausing the collector for the batch and letting it run afterwards keeps
every reference cycle collectable, only later.

The collector is one per process, so pauses of several threads (the system
runner runs several consumers) nest with a counter: the collector runs again
when the last one ends. When pauses keep overlapping for longer than
:data:`MAX_PAUSE` seconds, the thread that ends one runs a collection itself,
so cyclic garbage stays bounded under constant load. A collector that the
application disabled (``gc.isenabled()`` is False when a pause starts) is left
alone. Opt out per consumer with ``ConsumerAdapter(pause_gc=False)``.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

MAX_PAUSE = 5.0
"""Seconds of back-to-back pauses after which an ending pause collects anyway."""

_lock = threading.Lock()
_depth = 0  # pauses in progress
_paused = False  # True when the collector is disabled by these pauses
_since = 0.0  # monotonic time of the last collection while paused (or the pause start)


@contextmanager
def gc_paused(enabled: bool = True) -> Iterator[None]:
    """Context manager: the cyclic garbage collector waits while the block runs.

    Does nothing when ``enabled`` is False.
    """
    if not enabled:
        yield
        return
    _enter()
    try:
        yield
    finally:
        _exit()


def _enter() -> None:
    global _depth, _paused, _since
    with _lock:
        if _depth == 0 and gc.isenabled():
            gc.disable()
            _paused = True
            _since = time.monotonic()
        _depth += 1


def _exit() -> None:
    global _depth, _paused
    with _lock:
        _depth -= 1
        if _paused and _depth == 0:
            _paused = False
            gc.enable()
            return
    checkpoint()


def checkpoint() -> None:
    """Collect now if a pause has kept the collector waiting for over :data:`MAX_PAUSE` s.

    For long waits inside a pause (retrying while Postgres restarts, backing
    off a failing policy) and for pauses of several threads that overlap.
    """
    global _since
    with _lock:
        if not _paused or time.monotonic() - _since <= MAX_PAUSE:
            return
        _since = time.monotonic()
    gc.collect()
    with _lock:
        _since = time.monotonic()  # the wait starts again when the collection is over


def paused() -> bool:
    """True while a pause has the collector disabled (for tests and diagnostics)."""
    return _paused
