"""Real servers for tests: the esbridge pytest plugin and its backends.

See :mod:`esbridge.testing.plugin` for the fixtures and
:mod:`esbridge.testing.backends` for where the servers come from.
"""

from esbridge.testing.backends import make_kafka, make_postgres
from esbridge.testing.schema_registry import make_schema_registry
from esbridge.testing.servers import KafkaBroker, PostgresDatabase, PostgresServer

__all__ = [
    "KafkaBroker",
    "PostgresDatabase",
    "PostgresServer",
    "make_kafka",
    "make_postgres",
    "make_schema_registry",
]
