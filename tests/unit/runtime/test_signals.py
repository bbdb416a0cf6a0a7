"""SIGTERM/SIGINT stop a command even when they arrive while its main thread holds an Event's lock.

Each scenario runs in a subprocess (a deadlocked handler would hang pytest itself): the main
thread holds the lock of the very ``threading.Event`` the stop sets, as it does inside
``Event.wait()``/``clear()``, when the signal arrives.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCENARIO = """
import os, signal, threading, time
from esbridge.runtime.signals import stop_on_signals

stopped = threading.Event()
if {naive}:
    signal.signal(signal.SIGINT, lambda signum, frame: stopped.set())
else:
    stop_on_signals(lambda name: stopped.set())
with stopped._cond:  # what Event.wait() and Event.clear() hold for a moment
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # the handler has run by now (between two bytecodes of this thread)
assert stopped.wait(5), "stop was not called"
print("stopped")
"""


def run_scenario(naive: bool, timeout: float = 15) -> subprocess.CompletedProcess[str] | None:
    code = textwrap.dedent(SCENARIO.format(naive=naive))
    try:
        return subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None  # deadlocked


def test_a_stop_signal_arriving_while_the_event_lock_is_held_still_stops() -> None:
    result = run_scenario(naive=False)
    assert result is not None, "the command deadlocked on the signal"
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stopped"


def test_a_handler_that_sets_the_event_itself_deadlocks_there() -> None:
    """The hazard the module avoids (this is what `esbridge relay` did)."""
    assert run_scenario(naive=True, timeout=5) is None
