"""Stopping a long-running command on SIGTERM or SIGINT: gracefully once it runs, at once
while it waits to start.

Why not call ``stop()`` in the signal handler: Python runs a handler in the
main thread between two bytecodes, possibly while that thread is inside
``threading.Event.wait()``, ``set()`` or ``clear()`` and holds the event's
(non-reentrant) lock. A ``stop()`` that sets that same event then waits for a
lock its own thread holds, for ever: ``esbridge relay`` was seen ignoring a
SIGINT that way. And a Python handler runs only when the main thread comes
back to Python: a main thread blocked in librdkafka (``list_topics``,
``init_transactions``) or in a connection attempt would not see the signal for
seconds. So the handler installed here does nothing; the signal reaches a
helper thread through ``signal.set_wakeup_fd`` (written by the interpreter's
C-level handler the moment the signal arrives), and that thread calls ``stop``.

A signal that arrives while the command waits at start-up (for a broker, for
Postgres, for a topic or Kafka transactions: the places marked with
:func:`waiting_for`) is an interruption, not a stop: nothing runs yet that
could finish gracefully, and the wait may be in a call that cannot be cut
short. The helper logs ``interrupted while waiting for <what>``, calls
``stop`` (so that anything already running stops cleanly), and ends the
process :data:`INTERRUPT_GRACE` seconds later if it has not ended by itself,
with the shell's conventional status: 128 + the signal number (130 for
SIGINT, 143 for SIGTERM). :func:`interruption` tells the command's ``main``
which status to exit with when it ends by itself.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: Seconds an interrupted start-up has to end by itself before the process is ended.
INTERRUPT_GRACE = 1.0

log = logging.getLogger("esbridge")


@dataclass(frozen=True)
class Interruption:
    """A stop signal that arrived while the process was waiting for ``waiting_for``."""

    signal_name: str
    waiting_for: str

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + int(signal.Signals[self.signal_name])


_waits_lock = threading.Lock()
_waits: dict[int, str] = {}
_tokens = itertools.count()


@contextlib.contextmanager
def waiting_for(what: str) -> Iterator[None]:
    """Mark the block as a start-up wait for ``what`` (a noun: "the Kafka broker at ...").

    A stop signal received inside it interrupts the process (see the module's
    docstring). Blocks may nest and run in several threads: the most recent
    one names the wait.
    """
    token = next(_tokens)
    with _waits_lock:
        _waits[token] = what
    try:
        yield
    finally:
        with _waits_lock:
            del _waits[token]


def current_wait() -> str | None:
    """What the process waits for now (the most recent :func:`waiting_for`), or None."""
    with _waits_lock:
        return next(reversed(_waits.values()), None)


class _StopSignals:
    """The helper thread that turns the signals into stops or interruptions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stops: list[Callable[[str], object]] = []
        self.interruption: Interruption | None = None
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the interpreter's handler must never block
        self.read_fd = read_fd
        for sig in STOP_SIGNALS:
            signal.signal(sig, _ignore)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self.forward, name="esbridge-stop-signals", daemon=True).start()

    def forward(self) -> None:
        while True:
            signum = os.read(self.read_fd, 1)[0]
            if signum in STOP_SIGNALS:
                self.received(signal.Signals(signum).name)

    def received(self, name: str) -> None:
        with self.lock:
            stops = list(self.stops)
            earlier = self.interruption
            wait = current_wait()
            if wait is None and not stops:
                wait = "the command to start"  # nothing runs yet that could stop
            if earlier is None and wait is not None:
                self.interruption = Interruption(name, wait)
        if earlier is not None:  # a second signal while interrupted: no more waiting
            self.exit(earlier)
        if wait is None:  # running: a graceful stop
            for stop in stops:
                stop(name)
            return
        interruption = Interruption(name, wait)
        log.warning("interrupted while waiting for %s (%s)", wait, name)
        if not stops:
            self.exit(interruption)
        timer = threading.Timer(INTERRUPT_GRACE, self.exit, [interruption])
        timer.daemon = True
        timer.start()
        for stop in stops:
            stop(name)

    @staticmethod
    def exit(interruption: Interruption) -> None:
        """End the process now (whatever a thread is blocked in), its logs flushed."""
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(interruption.exit_code)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the helper thread does the work (see the module docstring)."""


_installed: _StopSignals | None = None
_install_lock = threading.Lock()


def catch_stop_signals() -> None:
    """Handle SIGTERM and SIGINT from now on (idempotent; call it from the main thread).

    Call it first thing in a long-running command, so that a signal during its
    start-up waits interrupts it. Until :func:`stop_on_signals` gives it
    something to stop, a signal ends the process at once.
    """
    global _installed
    with _install_lock:
        if _installed is None:
            _installed = _StopSignals()


def stop_on_signals(stop: Callable[[str], object]) -> None:
    """On SIGTERM or SIGINT, call ``stop(signal name)`` from a helper thread.

    Call it from the main thread (Python installs handlers only there).
    """
    catch_stop_signals()
    assert _installed is not None
    with _installed.lock:
        _installed.stops.append(stop)


def interruption() -> Interruption | None:
    """The signal that interrupted a start-up wait of this process, if one did."""
    return _installed.interruption if _installed is not None else None
