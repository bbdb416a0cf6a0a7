"""A PostgreSQL and a Kafka broker to try esbridge by hand (``esbridge dev-servers``).

Trying the CLI needs the same two servers the test suite needs, so this
reuses the test harness's backends rather than asking a new user to install
and configure them: local processes by default (the PostgreSQL server
binaries, Java and the Kafka jars), or containers. Both listen on 127.0.0.1
only, with the harness's fixed development credentials, and everything they
create lives in temporary directories that :meth:`DevServers.close` removes.

What users need from them is environment variables, so this module also
renders those as ``export`` lines and writes them to an env file. An env
file is only ever overwritten or removed when this module wrote it (it
starts with :data:`ENV_FILE_HEADER`): a user's own ``.env`` given by mistake
is refused, not replaced.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from esbridge.errors import ConfigurationError, HarnessError
from esbridge.testing.containers import ContainerKafkaBroker, ContainerPostgresServer
from esbridge.testing.engine import containers_extra_missing
from esbridge.testing.local_kafka import LocalKafkaBroker
from esbridge.testing.local_postgres import LocalPostgresServer
from esbridge.testing.processes import tail
from esbridge.testing.servers import (
    KafkaBroker,
    PostgresDatabase,
    PostgresServer,
    free_port,
    port_is_open,
)

#: Where the servers can come from (the harness's backends that it can start itself).
DEV_BACKENDS = ("local", "containers")

#: The database the dev servers create for the user's applications.
DEV_DATABASE = "esbridge"

#: The first line of every env file written here: only such a file is overwritten or removed.
ENV_FILE_HEADER = "# written by esbridge dev-servers, removed when it stops\n"


@dataclass
class DevServers:
    """A started PostgreSQL (with the database :data:`DEV_DATABASE`) and Kafka broker."""

    postgres: PostgresServer
    kafka: KafkaBroker
    database: PostgresDatabase

    @property
    def env(self) -> dict[str, str]:
        """The variables that point ``esbridge`` and ``eventsourcing`` at these servers."""
        return {**self.database.env, "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers}

    def describe(self) -> list[str]:
        """One line per server: what, where, and for a local process its id and files."""
        lines = []
        for server, what in (
            (self.postgres, f", database {self.database.dbname}"),
            (self.kafka, ""),
        ):
            line = server.describe() + what
            local = _as_local(server)
            if local is not None:
                line += f", pid {local.pid}, files in {local.base}"
            lines.append(line)
        return lines

    def stopped(self) -> str | None:
        """Which server no longer accepts connections, with its last log lines; None if none.

        A TCP connection is the one check that means the same on every backend.
        """
        kafka_host, _, kafka_port = self.kafka.bootstrap_servers.rpartition(":")
        for server, up in (
            (self.postgres, port_is_open(self.postgres.host, self.postgres.port)),
            (self.kafka, port_is_open(kafka_host, int(kafka_port))),
        ):
            if not up:
                local = _as_local(server)
                message = f"{server.describe()} stopped accepting connections"
                if local is not None:
                    message += f"\n--- tail of {local.logfile} ---\n{tail(local.logfile, 20)}"
                return message
        return None

    def close(self, keep: bool = False) -> list[str]:
        """Stop both servers; remove their files unless ``keep``. Returns the kept directories."""
        return close_servers([self.kafka, self.postgres], keep)


LocalServer = LocalPostgresServer | LocalKafkaBroker


def _as_local(server: PostgresServer | KafkaBroker) -> LocalServer | None:
    """``server`` if it runs as a local process (it has a process id, files and a log)."""
    return server if isinstance(server, LocalServer) else None


def close_servers(servers: list[PostgresServer | KafkaBroker], keep: bool) -> list[str]:
    """Stop every server (all of them, even when one fails); remove their files unless ``keep``.

    Returns the directories kept. The first failure is raised once all were tried.
    """
    kept: list[str] = []
    error: BaseException | None = None
    for server in servers:
        try:
            local = _as_local(server)
            if keep and local is not None:
                local.stop()
                kept.append(str(local.base))
            else:
                server.close()
        except Exception as e:
            error = error or e
    if error is not None:
        raise error
    return kept


def check_options(
    backend: str, postgres_port: int | None, kafka_port: int | None, keep: bool
) -> None:
    """Refuse, before anything starts, what cannot work: each message says what to change."""
    if backend not in DEV_BACKENDS:
        raise ConfigurationError(f"backend {backend!r} is not one of {', '.join(DEV_BACKENDS)}")
    if backend == "containers":
        if keep:
            raise ConfigurationError(
                "--keep keeps the files of local servers; containers are always removed: "
                "leave out --keep, or use --backend local"
            )
        if containers_extra_missing() is not None:
            raise HarnessError(
                "esbridge dev-servers --backend containers needs the optional 'containers' "
                "extra (testcontainers): pip install 'esbridge[containers]', or use "
                "--backend local"
            )
    for option, port in (("--postgres-port", postgres_port), ("--kafka-port", kafka_port)):
        if port is None:
            continue
        if not 0 < port < 65536:
            raise ConfigurationError(f"{option} {port} is not a TCP port (1-65535)")
        if port_is_open("127.0.0.1", port):
            raise ConfigurationError(
                f"port {port} on 127.0.0.1 ({option}) is already in use: choose another "
                f"port, or leave out {option} for a free one"
            )
    if postgres_port is not None and postgres_port == kafka_port:
        raise ConfigurationError("--postgres-port and --kafka-port must differ")


def start_dev_servers(
    backend: str = "local", postgres_port: int | None = None, kafka_port: int | None = None
) -> DevServers:
    """Start PostgreSQL, create :data:`DEV_DATABASE`, then start Kafka.

    Servers are started one after the other in the calling thread: a local
    server dies with the thread that started it (the harness's parent-death
    signal), so it must be the thread that lives as long as the servers.
    Whatever started is stopped and removed again if a later step fails or
    is interrupted.
    """
    started: list[PostgresServer | KafkaBroker] = []
    try:
        postgres: PostgresServer = (
            ContainerPostgresServer(port=postgres_port)
            if backend == "containers"
            else LocalPostgresServer(port=postgres_port)
        )
        started.append(postgres)
        postgres.start()
        database = postgres.create_database(DEV_DATABASE)
        kafka: KafkaBroker = (
            ContainerKafkaBroker(port=kafka_port)
            if backend == "containers"
            else LocalKafkaBroker(ports=(kafka_port, free_port()) if kafka_port else None)
        )
        started.append(kafka)
        kafka.start()
    except BaseException:
        close_servers(list(reversed(started)), keep=False)
        raise
    return DevServers(postgres, kafka, database)


def export_lines(env: dict[str, str]) -> str:
    """``export NAME=value`` lines, quoted for a POSIX shell."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


def check_env_file(path: Path) -> None:
    """Refuse an env file path that holds a file this module did not write."""
    if path.is_dir():
        raise ConfigurationError(f"--env-file {path} is a directory: give a file name")
    if path.exists() and not _written_here(path):
        raise ConfigurationError(
            f"--env-file {path} exists and was not written by esbridge dev-servers: it is "
            "left as it is. Give another file name, or remove that file first"
        )


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """Write the ``export`` lines to ``path``, readable by its owner only (it holds a password)."""
    check_env_file(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(ENV_FILE_HEADER + export_lines(env))


def remove_env_file(path: Path) -> None:
    """Remove the env file if it is still the one written here (its servers are gone)."""
    if path.is_file() and _written_here(path):
        path.unlink()


def _written_here(path: Path) -> bool:
    try:
        with path.open() as f:
            return f.readline() == ENV_FILE_HEADER
    except (OSError, UnicodeDecodeError):
        return False
