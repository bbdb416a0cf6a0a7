"""PostgreSQL from its server binaries, in a temporary directory (no Docker needed)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from esbridge.errors import HarnessError
from esbridge.testing.processes import (
    as_user,
    children_of,
    die_with_parent,
    give_to,
    pid_alive,
    run_tool,
    server_user,
    spawning,
    tail,
    wait_pid_gone,
)
from esbridge.testing.servers import PostgresServer, free_port, port_is_open

MISSING_POSTGRES = """\
esbridge test harness: no PostgreSQL server binaries (initdb, pg_ctl) were found.
Provide a PostgreSQL server in one of three ways:
  1. install the server binaries (Debian/Ubuntu: apt-get install postgresql; `make test` does
     this itself when it runs as root), or put their directory in ESBRIDGE_PG_BIN;
  2. run a Docker engine (or podman's Docker API): the testcontainers backend is then used;
  3. name an existing server: ESBRIDGE_POSTGRES_DSN='host=... port=... user=... password=...'
     (the user must be allowed to CREATE DATABASE).
"""


def find_pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None."""
    candidates = []
    if os.environ.get("ESBRIDGE_PG_BIN"):
        candidates.append(os.environ["ESBRIDGE_PG_BIN"])
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(str(Path(which).resolve().parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for c in candidates:
        p = Path(c)
        if (p / "initdb").exists() and (p / "postgres").exists():
            return p
    return None


class LocalPostgresServer(PostgresServer):
    """A PostgreSQL cluster of its own: ``initdb`` once, then ``postgres`` as a child process.

    It listens on 127.0.0.1 only, on ``port`` or a free port chosen once, so a
    restart keeps the address and the data.
    """

    backend = "local"

    def __init__(
        self, fsync: bool = False, max_connections: int = 300, port: int | None = None
    ) -> None:
        pg_bin = find_pg_bin()
        if pg_bin is None:
            raise HarnessError(MISSING_POSTGRES)
        self.pg_bin = pg_bin
        self.port = port or free_port()
        self.os_user = server_user()
        self.base = Path(tempfile.mkdtemp(prefix="esbridge-pg-"))
        os.chmod(self.base, 0o755)
        self.data = self.base / "data"
        self.logfile = self.base / "postgres.log"
        self.fsync = fsync
        self.max_connections = max_connections
        self.startup_seconds = 0.0
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self._initdb()
        except BaseException:  # failed or interrupted (Ctrl-C): leave no directory behind
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    def _run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_tool(as_user(cmd, self.os_user), timeout, cwd=self.base)

    def _initdb(self) -> None:
        pwfile = self.base / "pw"
        pwfile.write_text(self.password + "\n")
        give_to(self.base, self.os_user)
        result = self._run(
            str(self.pg_bin / "initdb"),
            "-D", str(self.data),
            "-U", self.user,
            "--pwfile", str(pwfile),
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )  # fmt: skip
        if result.returncode != 0:
            raise HarnessError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write(
                "\n# esbridge test harness\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.base}'\n"
                f"max_connections = {self.max_connections}\n"
                f"fsync = {'on' if self.fsync else 'off'}\n"
                "shared_buffers = 128MB\n"
                "log_min_messages = warning\n"
                "log_line_prefix = '%m [%p] '\n"
            )

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs (None when stopped)."""
        pid = self._postmaster_pid()
        return pid if pid is not None and pid_alive(pid) else None

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self, timeout: float = 60.0) -> None:
        pid = self._postmaster_pid()
        if pid is not None and pid_alive(pid) and port_is_open(self.host, self.port):
            return
        t0 = time.monotonic()
        # The postmaster runs as a direct child (not daemonised by pg_ctl) with a
        # parent-death signal, so a test run killed with SIGKILL leaves no server behind.
        with self.logfile.open("ab") as log, spawning():
            self.process = subprocess.Popen(
                [str(self.pg_bin / "postgres"), "-D", str(self.data)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.base,
                user=self.os_user,
                group=self._os_group(),
                extra_groups=[] if self.os_user else None,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not self._accepts_connections():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                raise HarnessError(
                    f"PostgreSQL (local) did not start on {self.host}:{self.port} within "
                    f"{timeout:.0f} s (exit code {self.process.returncode})\n"
                    f"--- tail of {self.logfile} ---\n{tail(self.logfile)}"
                )
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - t0

    def _os_group(self) -> int | None:
        return pwd.getpwnam(self.os_user).pw_gid if self.os_user else None

    def _accepts_connections(self) -> bool:
        if not port_is_open(self.host, self.port):
            return False
        try:
            self.connect(connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop(self, kill: bool = False) -> None:
        pid = self._postmaster_pid()
        if pid is None and self.process is not None and self.process.poll() is None:
            pid = self.process.pid  # stopped so early that it wrote no postmaster.pid yet
        if pid is None or not pid_alive(pid):
            return
        if kill:
            # A crash of the whole server: the postmaster and every backend at once.
            procs = [pid, *children_of(pid)]
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            for p in procs:
                if p == pid:
                    self._wait_exit(p, 10)
                else:
                    wait_pid_gone(p, 10)
            # The dead postmaster can linger as a zombie when the machine's init does not
            # reap orphans; PostgreSQL would take the zombie's PID for a live postmaster.
            (self.data / "postmaster.pid").unlink(missing_ok=True)
            (self.base / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)
            return
        os.kill(pid, signal.SIGINT)  # "fast" shutdown: roll back sessions, checkpoint, exit
        if not self._wait_exit(pid, 30):
            os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 10)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        """Wait for the postmaster to exit, reaping it when it is our child."""
        if self.process is not None and self.process.pid == pid:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        return wait_pid_gone(pid, timeout)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
