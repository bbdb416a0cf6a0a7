"""Choosing where the test servers come from.

``ESBRIDGE_TEST_BACKEND`` forces one backend for both servers: ``local``,
``containers`` or ``external``; ``auto`` (the default) picks, per server:

1. ``external`` when ``ESBRIDGE_POSTGRES_DSN`` / ``ESBRIDGE_KAFKA_BOOTSTRAP`` is set;
2. ``containers`` (testcontainers) when a Docker engine answers;
3. ``local`` processes otherwise.

``ESBRIDGE_TEST_POSTGRES_BACKEND`` and ``ESBRIDGE_TEST_KAFKA_BACKEND`` choose
for one server only.
"""

from __future__ import annotations

import os

from esbridge.errors import HarnessError
from esbridge.testing.containers import ContainerKafkaBroker, ContainerPostgresServer
from esbridge.testing.engine import docker_ping
from esbridge.testing.external import ExternalKafkaBroker, ExternalPostgresServer
from esbridge.testing.local_kafka import LocalKafkaBroker
from esbridge.testing.local_postgres import LocalPostgresServer
from esbridge.testing.servers import KafkaBroker, PostgresServer

BACKENDS = ("auto", "local", "containers", "external")


def docker_available() -> bool:
    """True when a Docker API (Docker engine or podman) answers a ping."""
    return docker_ping()


def chosen_backend(server: str) -> str:
    """The backend for ``server`` (``postgres`` or ``kafka``)."""
    value = (
        os.environ.get(f"ESBRIDGE_TEST_{server.upper()}_BACKEND")
        or os.environ.get("ESBRIDGE_TEST_BACKEND")
        or "auto"
    ).lower()
    if value not in BACKENDS:
        raise HarnessError(f"ESBRIDGE_TEST_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    if value != "auto":
        return value
    external_var = "ESBRIDGE_POSTGRES_DSN" if server == "postgres" else "ESBRIDGE_KAFKA_BOOTSTRAP"
    if os.environ.get(external_var):
        return "external"
    if docker_available():
        return "containers"
    return "local"


def make_postgres(backend: str | None = None, *, fsync: bool = False) -> PostgresServer:
    """A started :class:`PostgresServer` from the chosen backend."""
    backend = backend or chosen_backend("postgres")
    server: PostgresServer
    if backend == "external":
        dsn = os.environ.get("ESBRIDGE_POSTGRES_DSN")
        if not dsn:
            raise HarnessError("the external backend needs ESBRIDGE_POSTGRES_DSN")
        server = ExternalPostgresServer(dsn)
    elif backend == "containers":
        server = ContainerPostgresServer(fsync=fsync)
    else:
        server = LocalPostgresServer(fsync=fsync)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


def make_kafka(backend: str | None = None) -> KafkaBroker:
    """A started :class:`KafkaBroker` from the chosen backend."""
    backend = backend or chosen_backend("kafka")
    broker: KafkaBroker
    if backend == "external":
        bootstrap = os.environ.get("ESBRIDGE_KAFKA_BOOTSTRAP")
        if not bootstrap:
            raise HarnessError("the external backend needs ESBRIDGE_KAFKA_BOOTSTRAP")
        broker = ExternalKafkaBroker(bootstrap)
    elif backend == "containers":
        broker = ContainerKafkaBroker()
    else:
        broker = LocalKafkaBroker()
    try:
        broker.start()
    except BaseException:
        broker.close()
        raise
    return broker
