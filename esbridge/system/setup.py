"""Setting a system up: its applications constructed, their tables and its topics created.

Everything here runs before any relay or consumer starts, so that whatever is
wrong with the configuration (a missing table, an application that cannot be
constructed, a topic with another partition count) is a clear
:class:`~esbridge.errors.ConfigurationError` at start-up, and so that worker
processes of one system that start at the same moment do not trip over each
other creating the same tables (Postgres's catalog races are retried).
Used by :class:`~esbridge.system.runner.KafkaRunner`, ``esbridge run --setup`` and
``esbridge consume``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic
from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, ProcessRecorder
from eventsourcing.system import System
from eventsourcing.utils import Environment

from esbridge.deadletters.store import DeadLetterStore
from esbridge.errors import ConfigurationError
from esbridge.eventlog.notification_log import check_readable
from esbridge.kafka.topics import ensure_topic, kafka_admin, wait_for_broker
from esbridge.names import DEAD_LETTER_TABLE
from esbridge.runtime.persistence import require_postgres
from esbridge.runtime.postgres_privileges import (
    FOLLOWER_TABLE_PRIVILEGES,
    check_table_privileges,
    current_role,
    with_advice,
)
from esbridge.runtime.postgres_retry import (
    TRANSIENT_ERRORS,
    connection_diagnosis,
    retry_unreachable,
)
from esbridge.runtime.signals import waiting_for
from esbridge.system.applications import construct_or_close

logger = logging.getLogger("esbridge.system_setup")


def system_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The environment the applications see: ``os.environ`` updated with ``env``."""
    values = dict(os.environ)
    values.update(env or {})
    return values


#: Seconds a runner waits for an unreachable Postgres while it constructs its applications.
STARTUP_CONNECT_TIMEOUT = 60.0


def construct_app(system: System, name: str, env: Mapping[str, str]) -> Application[Any]:
    """The application ``name`` constructed as the library would, with its tables checked.

    Leaders are not wrapped in the library's ``Leader`` class (nothing
    in-process is prompted: the relay follows the log). With table creation
    switched off (``CREATE_TABLE=n``), a missing table is a clear error here.
    While Postgres is unreachable (restarting) this waits, up to
    :data:`STARTUP_CONNECT_TIMEOUT` seconds.
    """
    return retry_unreachable(
        f"constructing application {name}",
        lambda: _construct_app(system, name, env),
        timeout=STARTUP_CONNECT_TIMEOUT,
        diagnose=connection_diagnosis(name, env),
    )


def _construct_app(system: System, name: str, env: Mapping[str, str]) -> Application[Any]:
    return prepared_app(system.get_app_cls(name), name, env, system.follows.get(name, []))


def prepared_app(
    cls: type[Application[Any]], name: str, env: Mapping[str, str], leaders: Sequence[str]
) -> Application[Any]:
    """:func:`new_app`, its tables checked; a follower of ``leaders`` gets its dead-letter
    table and its privileges checked (each problem a :class:`ConfigurationError`)."""
    app = new_app(cls, name, env)
    try:
        check_tables(name, app, leaders)
        if leaders:
            create_dead_letter_table(name, app)
            check_follower_privileges(name, app)
    except BaseException:
        app.close()  # construct_app may retry: leave no pool open behind
        raise
    return app


#: Messages of Postgres errors raised when processes create tables at the same moment
#: (``CREATE ... IF NOT EXISTS`` is not safe against concurrent creators; the library
#: records its schema migrations as tracking of ``__migration__``, and one creator loses).
CATALOG_RACES = (
    "concurrently updated",
    "pg_type_typname_nsp_index",
    "already exists",
    "tracking for __migration__",
)


def new_app(cls: type[Application[Any]], name: str, env: Mapping[str, str]) -> Application[Any]:
    """``cls(env=env)``, retried when it collided with another process creating tables.

    Worker processes of one system start together and each application
    creates its tables (and eventsourcing's shared types) on construction; a
    collision in Postgres's catalog is not a configuration error, and one
    retry finds what the other process made.
    """
    attempts = 5
    for attempt in range(attempts):
        try:
            return construct_or_close(cls, env)
        except TRANSIENT_ERRORS:
            raise  # Postgres unreachable: construct_app waits for it
        except Exception as e:
            if attempt + 1 < attempts and any(race in str(e) for race in CATALOG_RACES):
                logger.info("constructing %s collided with another process: %s", name, e)
                time.sleep(0.1 * (attempt + 1))
                continue
            text = f"cannot construct application {name!r}: {type(e).__name__}: {e}"
            raise ConfigurationError(with_advice(text, e, postgres_user(name, env))) from e
    raise AssertionError("unreachable")  # pragma: no cover


def postgres_user(name: str, env: Mapping[str, str]) -> str | None:
    """The Postgres role application ``name`` connects as (``{NAME}_POSTGRES_USER`` first)."""
    return Environment(name, env).get("POSTGRES_USER")


def create_dead_letter_table(name: str, app: Application[Any]) -> None:
    """Create the follower's dead-letter table now, before any consumer thread starts.

    Several consumers (threads here, or processes sharing the database) that
    create it at the same moment collide in Postgres's catalog
    (``CREATE TABLE IF NOT EXISTS`` is not safe against concurrent creators):
    one retry after such a collision finds the table made by the other.
    """
    datastore = getattr(app.recorder, "datastore", None)
    if datastore is None or not hasattr(datastore, "transaction"):
        return  # not Postgres: the consumer adapter refuses it with a clear error
    store = DeadLetterStore(datastore)
    for attempt in range(3):
        try:
            store.create_table()
            return
        except IntegrityError:
            if attempt == 2:
                raise
            time.sleep(0.1)
        except TRANSIENT_ERRORS:
            raise
        except Exception as e:
            text = (
                f"cannot create the dead-letter table of application {name!r}: "
                f"{type(e).__name__}: {e}"
            )
            raise ConfigurationError(with_advice(text, e, current_role(datastore))) from e


def check_follower_privileges(name: str, app: Application[Any]) -> None:
    """Raise :class:`ConfigurationError` naming each GRANT the follower ``name`` lacks.

    Checked at start so that a missing privilege (UPDATE on its tracking
    table, say, when an administrator created the tables and set
    ``CREATE_TABLE=n``) stops the process before it consumes anything,
    rather than failing its first batch.
    """
    recorder = app.recorder
    datastore = getattr(recorder, "datastore", None)
    if datastore is None or not hasattr(datastore, "transaction"):
        return
    schema = datastore.schema or "public"
    tables = [
        getattr(recorder, "events_table_name", None),
        getattr(recorder, "tracking_table_name", None),
        DEAD_LETTER_TABLE,
    ]
    wanted = {f"{schema}.{t}": FOLLOWER_TABLE_PRIVILEGES for t in tables if t}
    check_table_privileges(f"application {name!r} cannot record its events", datastore, wanted)


def check_tables(name: str, app: Application[Any], leaders: Sequence[str]) -> None:
    """Raise :class:`ConfigurationError` unless the application's tables can be read."""
    try:
        check_readable(name, app.recorder)
        if leaders and isinstance(app.recorder, ProcessRecorder):
            app.recorder.max_tracking_id(leaders[0])
    except (ConfigurationError, *TRANSIENT_ERRORS):
        raise
    except Exception as e:
        raise ConfigurationError(
            f"application {name!r} cannot read its tracking table: {type(e).__name__}: {e}. "
            "Create its tables (unset CREATE_TABLE=n once, or run 'esbridge run ... --setup')."
        ) from e


def setup_system(
    system: System, env: Mapping[str, str] | None = None, apps: Sequence[str] | None = None
) -> None:
    """Create every application's tables (constructing each once), without running anything.

    Start-up order then does not matter: a follower that reads an upstream
    log finds its table even if the upstream process has not started yet.
    ``apps``: only these applications' (each service with its own database
    sets up its own).
    """
    full_env = system_env(env)
    names = list(system.nodes) if apps is None else list(apps)
    for name in names:
        require_postgres(name, full_env)  # in memory, nothing would be set up
    for name in names:
        construct_app(system, name, full_env).close()


def ensure_topics(kafka_config: Mapping[str, Any], partitions: Mapping[str, int]) -> None:
    """Create missing topics (``{topic: partition count}``); refuse existing ones with
    another partition count."""
    with kafka_admin(kafka_config) as admin, waiting_for(f"topics {', '.join(partitions)}"):
        wait_for_broker(admin, str(kafka_config.get("bootstrap.servers")), timeout=30.0)
        # Create before asking for a topic's metadata: a broker with
        # auto.create.topics.enable=true creates a missing topic with its default
        # partition count as soon as an admin client asks about it by name.
        wanted = [
            NewTopic(t, num_partitions=n, replication_factor=-1) for t, n in partitions.items()
        ]
        if wanted:
            for topic, future in admin.create_topics(wanted, operation_timeout=30).items():
                try:
                    future.result(30)
                except KafkaException as e:
                    if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise ConfigurationError(f"cannot create topic {topic!r}: {e}") from e
        for topic, count in partitions.items():
            ensure_topic(admin, topic, count)
