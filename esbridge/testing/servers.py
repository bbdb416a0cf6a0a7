"""What a test server is, whatever backend provides it.

Fixtures hand tests a :class:`PostgresServer` and a :class:`KafkaBroker`. The
backends (local processes, testcontainers, external servers) implement these
two classes; tests use only what is defined here, so the same test runs on
every backend.
"""

from __future__ import annotations

import abc
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from esbridge.errors import HarnessError
from esbridge.kafka.topics import wait_for_leaders


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """True once ``host:port`` accepts TCP connections, False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def port_is_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def unique_name(prefix: str) -> str:
    """A name unique to this test run, safe as a database or topic name."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class PostgresDatabase:
    """Connection settings of one database on a :class:`PostgresServer`."""

    host: str
    port: int
    user: str
    password: str
    dbname: str
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        return (
            f"host={self.host} port={self.port} user={self.user} "
            f"password={self.password} dbname={self.dbname}"
        )

    @property
    def url(self) -> str:
        """A SQLAlchemy URL (psycopg 3 driver)."""
        return f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{self.dbname}"

    @property
    def env(self) -> dict[str, str]:
        """The environment that ``eventsourcing.postgres`` reads to use this database."""
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": self.password,
            "POSTGRES_DBNAME": self.dbname,
        }
        env.update(self.extra_env)
        return env


class PostgresServer(abc.ABC):
    """A PostgreSQL server for tests. Data survives :meth:`stop`/:meth:`start`."""

    backend: str = "abstract"
    host: str = "127.0.0.1"
    port: int = 0
    user: str = "esbridge"
    password: str = "esbridge"
    can_control = True  # False where the harness cannot stop/start the server

    @abc.abstractmethod
    def start(self) -> None:
        """Start (or start again) and wait until it accepts connections."""

    @abc.abstractmethod
    def stop(self, kill: bool = False) -> None:
        """Stop cleanly, or with ``kill=True`` crash it (SIGKILL) as a fault test wants."""

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    @abc.abstractmethod
    def close(self) -> None:
        """Stop for good and remove what the harness created."""

    def database(self, dbname: str = "postgres") -> PostgresDatabase:
        return PostgresDatabase(self.host, self.port, self.user, self.password, dbname)

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> Any:
        import psycopg

        return psycopg.connect(self.database(dbname).dsn, **kwargs)

    def create_database(self, dbname: str | None = None) -> PostgresDatabase:
        """Create a fresh database and return its settings."""
        dbname = dbname or unique_name("esb")
        with self.connect(autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        return self.database(dbname)

    def drop_database(self, dbname: str) -> None:
        with self.connect(autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    def describe(self) -> str:
        return f"PostgreSQL ({self.backend}) on {self.host}:{self.port}"


class KafkaBroker(abc.ABC):
    """An Apache Kafka broker (KRaft, transactions enabled) for tests.

    Data survives :meth:`stop`/:meth:`start`; the listener address stays the same.
    """

    backend: str = "abstract"
    bootstrap_servers: str = ""
    version: str = "unknown"
    can_control = True
    #: Replicas of each partition :meth:`create_topic` makes (3 on a cluster).
    replication_factor: int = 1

    @abc.abstractmethod
    def start(self) -> None:
        """Start (or start again) and wait until the broker serves metadata."""

    @abc.abstractmethod
    def stop(self, kill: bool = False) -> None:
        """Stop cleanly, or with ``kill=True`` crash it (SIGKILL)."""

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    @abc.abstractmethod
    def close(self) -> None:
        """Stop for good and remove what the harness created."""

    def config(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka settings to reach this broker."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        conf.update(overrides)
        return conf

    def create_topic(
        self, name: str | None = None, partitions: int = 1, config: dict[str, str] | None = None
    ) -> str:
        """Create a topic (unique name unless given) and wait until it is usable."""
        from confluent_kafka.admin import AdminClient, NewTopic

        name = name or unique_name("t")
        admin = AdminClient(self.config())
        futures = admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=partitions,
                    replication_factor=self.replication_factor,
                    config=config or {},
                )
            ]
        )
        futures[name].result(30)
        if wait_for_leaders(admin, name, 30, partitions):
            return name
        raise HarnessError(f"topic {name!r} did not get leaders within 30 s on {self.describe()}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the broker answers a metadata request."""
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        admin = AdminClient(self.config())
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    return
            except Exception as e:  # KafkaException while it boots
                last = e
            time.sleep(0.1)
        raise HarnessError(f"{self.describe()} did not answer metadata requests: {last}")

    def describe(self) -> str:
        return f"Apache Kafka {self.version} ({self.backend}) on {self.bootstrap_servers}"
