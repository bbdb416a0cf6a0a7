"""Servers that already run elsewhere, named by environment variables.

``ESBRIDGE_POSTGRES_DSN`` (libpq key=value or URL; the user must be allowed to
CREATE DATABASE) and ``ESBRIDGE_KAFKA_BOOTSTRAP`` (host:port). The harness
cannot stop or start them, so fault tests that need that fail with a message
saying so.
"""

from __future__ import annotations

import psycopg.conninfo

from esbridge.errors import HarnessError
from esbridge.testing.servers import KafkaBroker, PostgresServer

NO_CONTROL = (
    "the {what} is external ({where}): the harness cannot stop or start it. "
    "Run fault tests with the local or testcontainers backend (ESBRIDGE_TEST_BACKEND=local)."
)


class ExternalPostgresServer(PostgresServer):
    backend = "external"
    can_control = False

    def __init__(self, dsn: str) -> None:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        self.host = str(params.get("host", "127.0.0.1"))
        self.port = int(params.get("port") or 5432)
        self.user = str(params.get("user", "postgres"))
        self.password = str(params.get("password", ""))

    def start(self) -> None:
        try:
            self.connect().close()
        except Exception as e:
            raise HarnessError(f"external PostgreSQL at {self.host}:{self.port}: {e}") from e

    def stop(self, kill: bool = False) -> None:
        raise HarnessError(NO_CONTROL.format(what="PostgreSQL server", where=self.describe()))

    def restart(self, kill: bool = False) -> None:
        self.stop(kill)

    def close(self) -> None:
        pass


class ExternalKafkaBroker(KafkaBroker):
    backend = "external"
    can_control = False

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers

    def start(self) -> None:
        self.wait_ready(30)

    def stop(self, kill: bool = False) -> None:
        raise HarnessError(NO_CONTROL.format(what="Kafka broker", where=self.describe()))

    def restart(self, kill: bool = False) -> None:
        self.stop(kill)

    def close(self) -> None:
        pass
