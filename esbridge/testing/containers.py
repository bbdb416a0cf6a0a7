"""The testcontainers backend: PostgreSQL and Apache Kafka in containers.

Containers are created through the ``testcontainers`` package against
whatever Docker API answers (see :mod:`esbridge.testing.engine`): Docker
Desktop, a Linux Docker engine, or a podman service the harness starts itself
where no engine runs. The servers behave like the local backend's: a free
port chosen by the harness, listening on 127.0.0.1, data kept across
:meth:`stop`/:meth:`start` (the container is stopped and started again, never
re-created), and ``kill=True`` sends SIGKILL as a crash test wants.

Images default to the ones users pull (``postgres`` and ``apache/kafka``,
pinned) and are overridden by ``ESBRIDGE_POSTGRES_IMAGE`` /
``ESBRIDGE_KAFKA_IMAGE``. Where no registry can be reached, equivalent images
are built from this machine's files (:mod:`esbridge.testing.images`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from esbridge.errors import HarnessError
from esbridge.testing.engine import (
    ContainerEngine,
    acquire_engine,
    containers_required,
    record,
    unavailable_reason,
)
from esbridge.testing.local_kafka import SERVER_PROPERTIES, random_cluster_id
from esbridge.testing.servers import KafkaBroker, PostgresServer, free_port

DEFAULT_POSTGRES_IMAGE = "postgres:17.6"
DEFAULT_KAFKA_IMAGE = "apache/kafka:4.1.1"
LOG_LINES = 40


def properties_to_env(properties: str) -> dict[str, str]:
    """``server.properties`` lines as the ``KAFKA_*`` variables apache/kafka reads.

    The image maps ``KAFKA_FOO_BAR`` to ``foo.bar``, ``__`` to ``_`` and
    ``___`` to ``-``; this is the inverse.
    """
    env = {}
    for line in properties.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        name = key.replace("-", "___").replace("_", "__").replace(".", "_").upper()
        env[f"KAFKA_{name}"] = value
    return env


class _ServerContainer:
    """One container of a server: created once, then stopped and started in place."""

    def __init__(self, kind: str, image_env_var: str, default_image: str, port: int) -> None:
        self.kind = kind
        self.port = port
        try:
            self.engine: ContainerEngine = acquire_engine()
        except HarnessError as e:
            image = os.environ.get(image_env_var) or default_image
            raise HarnessError(f"cannot run the {kind} container (image {image}): {e}") from e
        try:
            self.image = self.engine.image_for(kind, image_env_var, default_image)
        except BaseException:
            self.engine.release()
            raise
        self.container: Any = None  # testcontainers.core.container.DockerContainer

    @property
    def host_network(self) -> bool:
        return self.engine.network == "host"

    def describe(self) -> str:
        return f"testcontainers backend ({self.engine.describe()}), image {self.image}"

    def logs(self) -> str:
        """The last lines of the container's log (for error messages)."""
        if self.container is None:
            return "(no container was created)"
        try:
            raw = self.container.get_wrapped_container().logs(tail=LOG_LINES)
            text = raw.decode(errors="replace").rstrip()
            return text or "(the container's log is empty)"
        except Exception as e:
            return f"(cannot read the container's log: {e})"

    def fail(self, what: str) -> HarnessError:
        return HarnessError(
            f"{self.kind} {what}\n  backend: {self.describe()}\n"
            f"--- last lines of the container's log ---\n{self.logs()}"
        )

    def run(self, env: dict[str, str], command: list[str]) -> None:
        """Create and start the container (the first :meth:`start`)."""
        # The optional extra esbridge[containers]; ContainerEngine checked it is installed.
        from testcontainers.core.container import DockerContainer

        container = DockerContainer(self.image).with_envs(**env).with_command(command)
        container.with_kwargs(labels={"esbridge.harness": self.kind})
        if self.host_network:
            container.with_kwargs(network_mode="host")
        else:  # bridge: publish the same port, on the loopback interface only
            container.ports[f"{self.port}/tcp"] = ("127.0.0.1", self.port)  # type: ignore[assignment]
        t0 = time.monotonic()
        try:
            container.start()
        except Exception as e:
            self.container = container if container._container is not None else None
            raise self.fail(f"container could not be created or started: {e}{self.hint(e)}") from e
        self.container = container
        record(f"{self.kind} container create+start", time.monotonic() - t0)

    def hint(self, error: Exception) -> str:
        import docker.errors  # the optional extra esbridge[containers], as above

        if isinstance(error, docker.errors.ImageNotFound | docker.errors.NotFound) or (
            "pull" in str(error).lower()
        ):
            return (
                f"\n  the image {self.image} is missing and could not be pulled: pull it, name "
                f"another with ESBRIDGE_{self.kind.upper()}_IMAGE, or build one from this "
                "machine's files with ESBRIDGE_CONTAINER_IMAGES=local"
            )
        return ""

    def status(self) -> str:
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        return str(wrapped.status)

    def start_again(self) -> None:
        if self.status() != "running":
            self.container.get_wrapped_container().start()

    def wait(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll ``ready`` until true; fail with the log if the container exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            status = self.status()
            if status not in ("running", "created"):
                code = self.container.get_wrapped_container().attrs["State"].get("ExitCode")
                raise self.fail(
                    f"container stopped ({status}, exit code {code}) before it was ready"
                )
            time.sleep(0.1)
        raise self.fail(f"container was not ready within {timeout:.0f} s")

    def stop(self, kill: bool) -> None:
        if self.container is None or self.status() != "running":
            return
        wrapped = self.container.get_wrapped_container()
        if kill:
            wrapped.kill()
        else:
            wrapped.stop(timeout=60)
        deadline = time.monotonic() + 60
        while self.status() == "running" and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        try:
            if self.container is not None:
                with contextlib.suppress(Exception):
                    self.container.stop()  # removes the container and its volumes
                self.container = None
        finally:
            self.engine.release()


class _ContainerServer:
    """Start, stop and close of a server living in one :class:`_ServerContainer`.

    Shared by the PostgreSQL and Kafka servers: the first start creates the
    container, later ones start the stopped container again in place.
    """

    box: _ServerContainer
    startup_seconds: float

    def _ready(self) -> bool:
        raise NotImplementedError

    def _up(self) -> bool:
        """True when a later start has nothing to do (the server already serves)."""
        return self._ready()

    def _create(self) -> None:
        """Create and start the container (the first start)."""
        raise NotImplementedError

    def _start(self, timeout: float) -> None:
        t0 = time.monotonic()
        first = self.box.container is None
        if first:
            self._create()
        else:
            if self._up():
                return
            self.box.start_again()
        self.box.wait(self._ready, timeout)
        self.startup_seconds = time.monotonic() - t0
        record(
            f"{self.box.kind} {'first start' if first else 'start again'} -> ready",
            self.startup_seconds,
        )

    def stop(self, kill: bool = False) -> None:
        self.box.stop(kill)

    def close(self) -> None:
        self.box.close()


class ContainerPostgresServer(_ContainerServer, PostgresServer):
    """PostgreSQL in a container (``postgres`` image interface), on 127.0.0.1:``port``.

    ``port`` defaults to a free port.
    """

    backend = "containers"

    def __init__(
        self, fsync: bool = False, max_connections: int = 300, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.fsync = fsync
        self.max_connections = max_connections
        self.box = _ServerContainer(
            "postgres", "ESBRIDGE_POSTGRES_IMAGE", DEFAULT_POSTGRES_IMAGE, self.port
        )
        self.startup_seconds = 0.0

    def _ready(self) -> bool:
        try:
            self.connect(connect_timeout=2).close()
            return True
        except Exception:
            return False

    def start(self, timeout: float = 90.0) -> None:
        self._start(timeout)

    def _create(self) -> None:
        listen = "127.0.0.1" if self.box.host_network else "*"
        self.box.run(
                {
                    "POSTGRES_USER": self.user,
                    "POSTGRES_PASSWORD": self.password,
                    "POSTGRES_DB": "postgres",
                    "PGPORT": str(self.port),
                    "TZ": "UTC",
                },
                [
                    "postgres",
                    "-c", f"port={self.port}",
                    "-c", f"listen_addresses={listen}",
                    "-c", f"max_connections={self.max_connections}",
                    "-c", f"fsync={'on' if self.fsync else 'off'}",
                    "-c", "shared_buffers=128MB",
                ],
            )  # fmt: skip

    def describe(self) -> str:
        return f"PostgreSQL on {self.host}:{self.port} ({self.box.describe()})"


class ContainerKafkaBroker(_ContainerServer, KafkaBroker):
    """Apache Kafka (KRaft, one node, transactions enabled) in a container (``apache/kafka``).

    It listens on 127.0.0.1:``port`` (default: a free port).
    """

    backend = "containers"

    def __init__(
        self, heap: str = "768m", internal_partitions: int = 4, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.controller_port = free_port()
        self.bootstrap_servers = f"127.0.0.1:{self.port}"
        self.heap = heap
        self.internal_partitions = internal_partitions
        self.box = _ServerContainer("kafka", "ESBRIDGE_KAFKA_IMAGE", DEFAULT_KAFKA_IMAGE, self.port)
        self.version = self.box.image.rpartition(":")[2].split("-")[0]
        self.startup_seconds = 0.0

    def _env(self) -> dict[str, str]:
        """The local backend's ``server.properties``, as apache/kafka's variables."""
        properties = SERVER_PROPERTIES.format(
            port=self.port,
            controller_port=self.controller_port,
            log_dir="/var/lib/kafka/data",
            internal_partitions=self.internal_partitions,
        )
        env = properties_to_env(properties)
        if not self.box.host_network:  # bridge: the published port reaches 0.0.0.0 inside
            env["KAFKA_LISTENERS"] = (
                f"PLAINTEXT://0.0.0.0:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            )
        env["KAFKA_HEAP_OPTS"] = f"-Xms{self.heap} -Xmx{self.heap}"
        env["CLUSTER_ID"] = random_cluster_id()
        return env

    def _ready(self) -> bool:
        from confluent_kafka.admin import AdminClient

        try:
            return bool(AdminClient(self.config(log_level=0)).list_topics(timeout=1).brokers)
        except Exception:
            return False

    def start(self, timeout: float = 120.0) -> None:
        self._start(timeout)

    def _up(self) -> bool:
        return self.box.status() == "running" and self._ready()

    def _create(self) -> None:
        self.box.run(self._env(), [])

    def describe(self) -> str:
        return f"Apache Kafka {self.version} on {self.bootstrap_servers} ({self.box.describe()})"


def require_container_engine() -> None:
    """In a pytest session: skip when no container engine can run here, or fail in CI.

    A developer laptop without Docker or podman skips container tests with the
    reason; CI (``CI`` or ``ESBRIDGE_REQUIRE_CONTAINERS`` set, or a root machine
    where provisioning installs podman) fails instead, so the tests are never
    silently left out there.
    """
    import pytest

    reason = unavailable_reason()
    if reason is None:
        return
    if containers_required():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
