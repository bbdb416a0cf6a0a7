"""Keeping worker processes running: ``esbridge run --workers N --supervise``.

A worker killed by ``kill -9`` (or one that exits with an error) is started
again after a short backoff; it resumes from its tracking records in
Postgres, so a restart costs time, never correctness. This is the smallest
thing that does the job on one machine; in production, systemd
(``Restart=always``) or Kubernetes (a Deployment's restart policy) do the
same and more — run one ``esbridge run ... --app NAME --worker-index I``
per unit or pod instead.

Only processes this supervisor started are ever signalled, by their PID.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger("esbridge.supervisor")

#: Exit status of ``esbridge`` for a configuration error: restarting cannot help.
CONFIGURATION_ERROR_EXIT = 2

#: Exit statuses of a worker that a signal interrupted while it waited to start
#: (:mod:`esbridge.runtime.signals`): 128 + SIGINT, 128 + SIGTERM.
INTERRUPTED_EXITS = frozenset(128 + int(s) for s in (signal.SIGINT, signal.SIGTERM))

MIN_BACKOFF = 0.2
MAX_BACKOFF = 10.0
STABLE_AFTER = 30.0  # a worker that ran this long gets the minimum backoff again


@dataclass
class Worker:
    """One supervised command and its current process."""

    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = MIN_BACKOFF
    next_start: float = 0.0
    exit_codes: list[int] = field(default_factory=list)
    #: Variables of this worker only, over the supervisor's environment.
    env: Mapping[str, str] | None = None


class Supervisor:
    """Starts one process per command and restarts those that die (if ``restart``).

    Without ``restart``, the first worker that exits stops the others and
    :meth:`run` returns its exit code: let the platform's supervisor decide.
    A worker whose *first* start ends with status 2 (a configuration error:
    unimportable class, missing table, ...) is not restarted: it would fail the
    same way; the supervisor stops the others and returns 2.

    ``env``: the environment of every worker (default: this process's);
    ``envs``: variables of some workers only, by name, over it (an
    application's own database settings, say).
    """

    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        *,
        restart: bool = True,
        env: Mapping[str, str] | None = None,
        envs: Mapping[str, Mapping[str, str]] | None = None,
        stop_timeout: float = 20.0,
    ) -> None:
        envs = envs or {}
        unknown = set(envs) - set(commands)
        if unknown:
            raise ValueError(f"envs= names workers that have no command: {sorted(unknown)}")
        self.workers = [
            Worker(name, list(cmd), env=envs.get(name)) for name, cmd in commands.items()
        ]
        self.restart = restart
        self.env = dict(env) if env is not None else None
        self.stop_timeout = stop_timeout
        self._stopping = threading.Event()
        self._stop_signal: str | None = None

    def start(self) -> None:
        for worker in self.workers:
            self._spawn(worker)

    def _spawn(self, worker: Worker) -> None:
        env = self.env
        if worker.env is not None:
            env = {**(os.environ if env is None else env), **worker.env}
        worker.process = subprocess.Popen(worker.command, env=env)
        worker.started_at = time.monotonic()
        logger.info("started %s (pid %d)", worker.name, worker.process.pid)

    def pids(self) -> dict[str, int]:
        """The PID of every running worker, by name."""
        return {
            w.name: w.process.pid
            for w in self.workers
            if w.process is not None and w.process.poll() is None
        }

    def poll(self) -> int | None:
        """Check the workers once: restart the dead (or return the exit code to stop with)."""
        now = time.monotonic()
        for worker in self.workers:
            process = worker.process
            if process is None:
                if now >= worker.next_start and not self._stopping.is_set():
                    self._spawn(worker)
                continue
            code = process.poll()
            if code is None:
                continue
            worker.exit_codes.append(code)
            worker.process = None
            if self._stopping.is_set():
                continue
            if code == CONFIGURATION_ERROR_EXIT and worker.restarts == 0:
                # Only at the first start: a worker that ran before and now fails to
                # start (say, the broker is slow to abort its predecessor's transaction)
                # is restarted like any other.
                logger.error(
                    "%s stopped on a configuration error (exit code %d; see its message above): "
                    "restarting would fail the same way, stopping the others",
                    worker.name,
                    code,
                )
                return code
            if not self.restart:
                logger.error("%s exited with code %s: stopping the others", worker.name, code)
                return code if code != 0 else 1
            ran = now - worker.started_at
            worker.backoff = (
                MIN_BACKOFF if ran > STABLE_AFTER else min(worker.backoff * 2, MAX_BACKOFF)
            )
            worker.next_start = now + worker.backoff
            worker.restarts += 1
            logger.warning(
                "%s (pid %d) exited with code %s after %.1f s: restarting in %.1f s",
                worker.name,
                process.pid,
                code,
                ran,
                worker.backoff,
            )
        return None

    def run(self, interval: float = 0.2) -> int:
        """Supervise until :meth:`request_stop` or, without restart, until a worker exits.

        Returns that worker's exit code; after :meth:`request_stop`, 0, or
        128 + the signal named there when a worker was interrupted while it
        waited to start (see :mod:`esbridge.runtime.signals`).
        """
        self.start()
        try:
            while not self._stopping.is_set():
                code = self.poll()
                if code is not None:
                    return code
                self._stopping.wait(interval)
        finally:
            self.stop()
        interrupted = [w.name for w in self.workers if set(w.exit_codes[-1:]) & INTERRUPTED_EXITS]
        if self._stop_signal is None or not interrupted:
            return 0
        logger.warning("%s interrupted while starting", ", ".join(interrupted))
        return 128 + int(signal.Signals[self._stop_signal])

    def request_stop(self, signal_name: str | None = None) -> None:
        """Make :meth:`run` stop the workers and return (thread-safe).

        ``signal_name``: the signal that asked for it (``"SIGINT"``), if one did.
        """
        self._stop_signal = signal_name
        self._stopping.set()

    def stop(self) -> None:
        """SIGTERM every worker, wait, then SIGKILL those still running.

        Each worker's exit code is appended to its ``exit_codes``: 0 when it
        stopped gracefully, ``-9`` when it had to be killed.
        """
        self._stopping.set()
        running = [(w, w.process) for w in self.workers if w.process is not None]
        for _worker, process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for worker, process in running:
            worker.process = None
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error(
                    "%s (pid %d) did not stop within %.0f s: killing it",
                    worker.name,
                    process.pid,
                    self.stop_timeout,
                )
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
            worker.exit_codes.append(process.returncode)
