"""Helpers for server processes the harness starts itself.

Servers refuse to run as root (PostgreSQL) or should not (anything else), so
when the harness runs as root it runs them as an unprivileged system user.
Only processes the harness started are ever signalled, by their PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from esbridge.errors import HarnessError

SERVER_USER_CANDIDATES = ("postgres", "esbridge")


def server_user() -> str | None:
    """The user to run servers as: ``None`` when not root, else an unprivileged user."""
    if os.geteuid() != 0:
        return None
    for name in SERVER_USER_CANDIDATES:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    useradd = shutil.which("useradd")
    if useradd is None:
        raise HarnessError(
            "running as root, and there is no unprivileged user to run PostgreSQL as: "
            "create one (useradd --system esbridge) or run the tests as a normal user"
        )
    subprocess.run([useradd, "--system", "--no-create-home", "esbridge"], check=True)
    return "esbridge"


def as_user(cmd: Sequence[str], user: str | None) -> list[str]:
    """``cmd`` run as ``user`` (unchanged when ``user`` is None)."""
    if user is None:
        return list(cmd)
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", user, "--", *cmd]


def give_to(path: Path, user: str | None) -> None:
    """Make ``path`` (recursively) owned by ``user``."""
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL if the test process dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass
    os.setpgrp()


_spawning = 0
_held: list[BaseException] = []


@contextlib.contextmanager
def spawning() -> Iterator[None]:
    """Mark the creation of a child process: :func:`interrupt` waits until it is over.

    A signal handler that raises (Ctrl-C) can fire inside ``subprocess.Popen``
    after the child started but before ``Popen`` returned it: nobody then
    holds the child, and it outlives the clean-up. Held until the block
    ends, the exception is raised once the caller has the ``Popen`` object
    (assign it inside the block) and can stop the child.
    """
    global _spawning
    _spawning += 1
    try:
        yield
    finally:
        _spawning -= 1
    if not _spawning and _held:
        error = _held[0]
        _held.clear()
        raise error


def interrupt(error: BaseException) -> None:
    """From a signal handler: raise ``error`` now, or when the child being created is held."""
    if _spawning:
        _held.append(error)
    else:
        raise error


def run_tool(cmd: Sequence[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` of a set-up tool (``initdb``, Kafka's storage format), output captured.

    Unlike ``subprocess.run``, an interruption can never leave the tool
    running: it is created under :func:`spawning`, dies with this process
    (:func:`die_with_parent`), and is killed when waiting for it is
    interrupted.
    """
    with spawning():
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,
            **kwargs,
        )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def children_of(pid: int) -> list[int]:
    """PIDs of the direct children of ``pid`` (from /proc)."""
    result = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name can contain spaces: the ppid follows the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            result.append(int(entry.name))
    return result


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a server's log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
