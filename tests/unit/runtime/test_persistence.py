"""Which settings store an application in Postgres, read as the eventsourcing library reads them."""

from __future__ import annotations

import pytest
from eventsourcing.postgres import PostgresFactory

from esbridge.errors import ConfigurationError
from esbridge.runtime.persistence import persistence_module, require_postgres


class OwnPostgresFactory(PostgresFactory):
    """A factory of one's own, built on the library's Postgres factory."""


OWN_FACTORY = f"{__name__}:OwnPostgresFactory"
POPO = "eventsourcing.popo"


@pytest.mark.parametrize(
    "env",
    [
        {"PERSISTENCE_MODULE": "eventsourcing.postgres"},
        {"SHOP_PERSISTENCE_MODULE": "eventsourcing.postgres"},
        {"SHOP_PERSISTENCE_MODULE": "eventsourcing.postgres", "PERSISTENCE_MODULE": "x.y"},
        {"INFRASTRUCTURE_FACTORY": "eventsourcing.postgres:Factory"},  # the library's legacy name
        {"PERSISTENCE_MODULE": OWN_FACTORY},
    ],
)
def test_postgres_settings_are_accepted(env: dict[str, str]) -> None:
    require_postgres("Shop", env)


@pytest.mark.parametrize(
    ("env", "stored"),
    [
        ({}, "would be stored in memory, not in PostgreSQL (PERSISTENCE_MODULE is not set"),
        ({"POSTGRES_DBNAME": "shop"}, "would be stored in memory"),  # Postgres settings alone
        (
            {"PERSISTENCE_MODULE": "eventsourcing.postgres", "SHOP_PERSISTENCE_MODULE": POPO},
            f"is not stored in PostgreSQL (PERSISTENCE_MODULE={POPO})",
        ),
        (
            {"PERSISTENCE_MODULE": "eventsourcing.sqlite"},
            "is not stored in PostgreSQL (PERSISTENCE_MODULE=eventsourcing.sqlite)",
        ),
        ({"ORDERS_PERSISTENCE_MODULE": "eventsourcing.postgres"}, "would be stored in memory"),
    ],
)  # fmt: skip
def test_other_storage_is_refused_naming_the_settings(env: dict[str, str], stored: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        require_postgres("Shop", env, advice="; and more")
    message = str(refused.value)
    assert message.startswith(f"application 'Shop' {stored}"), message
    assert (
        "Set PERSISTENCE_MODULE=eventsourcing.postgres and POSTGRES_DBNAME, POSTGRES_HOST, "
        "POSTGRES_PORT, POSTGRES_USER, POSTGRES_PASSWORD (or, for this application only, "
        "SHOP_PERSISTENCE_MODULE, SHOP_POSTGRES_*); and more"
    ) in message


def test_a_module_that_cannot_be_imported_is_named() -> None:
    with pytest.raises(ConfigurationError, match=r"PERSISTENCE_MODULE=no_such\.module cannot be"):
        require_postgres("Shop", {"PERSISTENCE_MODULE": "no_such.module"})


def test_the_persistence_module_is_resolved_as_the_library_does() -> None:
    assert persistence_module("Shop", {}) is None
    assert persistence_module("Shop", {"FACTORY_TOPIC": "a.b"}) == "a.b"
    assert persistence_module("Shop", {"PERSISTENCE_MODULE": "a", "SHOP_FACTORY_TOPIC": "b"}) == "a"
