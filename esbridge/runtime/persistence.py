"""Refusing storage other than PostgreSQL at start, with the settings to give instead.

The ``eventsourcing`` library stores an application in memory when
``PERSISTENCE_MODULE`` is not set (its default is ``eventsourcing.popo``).
For esbridge that default is never what the user meant, and nothing fails
with it: a relay reads an empty log that no other process writes to and
publishes nothing, a consumer has no Postgres transaction to record its
tracking positions in, ``esbridge status`` reads lag 0, and a test's
``wait_idle()`` returns at once. So every entry point (``KafkaRunner``,
``Relay``, ``ConsumerAdapter``, ``edge_statuses``, and with them the CLI
commands) asks :func:`require_postgres` or :func:`require_postgres_app`
before it starts anything, and the user gets one error naming what to set.

The persistence module is resolved as the library resolves it (the
application's prefixed ``{NAME}_PERSISTENCE_MODULE`` first, then the plain
name and the library's legacy names); a module of one's own counts as Postgres
when its infrastructure factory is a subclass of the library's Postgres factory.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import GenericAlias, ModuleType
from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import InfrastructureFactory
from eventsourcing.postgres import BasePostgresFactory, PostgresRecorder
from eventsourcing.utils import Environment, resolve_topic

from esbridge.errors import ConfigurationError

#: The value of ``PERSISTENCE_MODULE`` that esbridge needs.
POSTGRES_PERSISTENCE = "eventsourcing.postgres"

#: The library's default when no persistence module is set: in memory.
DEFAULT_PERSISTENCE = "eventsourcing.popo"

#: The settings ``eventsourcing.postgres`` connects with.
POSTGRES_SETTINGS = (
    "POSTGRES_DBNAME",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
)

#: The names the library reads the persistence module from, in its order (two are legacy).
PERSISTENCE_KEYS = ("PERSISTENCE_MODULE", "INFRASTRUCTURE_FACTORY", "FACTORY_TOPIC")


def persistence_module(name: str, env: Mapping[str, str]) -> str | None:
    """The persistence module (or factory topic) application ``name`` gets from ``env``.

    ``None`` when none is set: the library then stores the application in memory.
    """
    environment = Environment(name, dict(env))
    for key in PERSISTENCE_KEYS:
        value = environment.get(key)
        if value:
            return value
    return None


def is_postgres(topic: str) -> bool:
    """True if the persistence module or factory ``topic`` stores in PostgreSQL.

    Raises :class:`ConfigurationError` when ``topic`` cannot be imported.
    """
    try:
        found: Any = resolve_topic(topic)
    except Exception as e:
        raise ConfigurationError(
            f"PERSISTENCE_MODULE={topic} cannot be imported ({type(e).__name__}: {e}): "
            f"set PERSISTENCE_MODULE={POSTGRES_PERSISTENCE}"
        ) from e
    if isinstance(found, ModuleType):
        return any(_is_postgres_factory(member) for member in _factories(found))
    return _is_postgres_factory(found)


def _factories(module: ModuleType) -> list[type]:
    """The infrastructure factory classes of ``module``, as the library looks them up."""
    return [
        member
        for member in vars(module).values()
        if isinstance(member, type)
        and not isinstance(member, GenericAlias)
        and issubclass(member, InfrastructureFactory)
        and not getattr(member, "__parameters__", None)
    ]


def _is_postgres_factory(candidate: Any) -> bool:
    return isinstance(candidate, type) and issubclass(candidate, BasePostgresFactory)


def require_postgres(name: str, env: Mapping[str, str], *, advice: str = "") -> None:
    """Raise :class:`ConfigurationError` unless ``env`` stores application ``name`` in Postgres.

    ``env`` is the environment the caller reads or constructs the application
    with. ``advice`` is appended to the message: where the caller takes its
    settings from (``KafkaRunner``'s ``env=``, say).
    """
    topic = persistence_module(name, env)
    if topic is not None and is_postgres(topic):
        return
    raise not_postgres(name, topic, advice)


def require_postgres_app(app: Application[Any], *, advice: str = "") -> None:
    """Raise :class:`ConfigurationError` unless the constructed ``app`` records in Postgres.

    For an application object handed over by the caller: its recorder is what
    counts (its class may have chosen its own), its settings name the cause.
    """
    if isinstance(app.recorder, PostgresRecorder):
        return
    raise not_postgres(app.name, persistence_module(app.name, app.env), advice)


def not_postgres(name: str, topic: str | None, advice: str = "") -> ConfigurationError:
    """The error for application ``name`` stored with persistence module ``topic``."""
    if topic is None:
        stored = (
            f"would be stored in memory, not in PostgreSQL (PERSISTENCE_MODULE is not set, "
            f"so the eventsourcing library uses {DEFAULT_PERSISTENCE})"
        )
    else:
        stored = f"is not stored in PostgreSQL (PERSISTENCE_MODULE={topic})"
    prefixed = ", ".join(f"{name.upper()}_{key}" for key in ("PERSISTENCE_MODULE", "POSTGRES_*"))
    message = (
        f"application {name!r} {stored}. esbridge publishes, consumes and reads lag only "
        "from PostgreSQL: otherwise nothing would be published or consumed, and every lag "
        f"would read 0. Set PERSISTENCE_MODULE={POSTGRES_PERSISTENCE} and "
        f"{', '.join(POSTGRES_SETTINGS)} (or, for this application only, {prefixed})"
    )
    return ConfigurationError(f"{message}{advice}")
