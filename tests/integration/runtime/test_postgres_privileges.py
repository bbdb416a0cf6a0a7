"""Roles with too few Postgres privileges: each is told at start which privilege it lacks
and the GRANT that gives it, and the documented minimal grants (docs/security.md) suffice.

Real PostgreSQL with least-privilege roles made in each test (CREATE ROLE, REVOKE), real
Kafka; the ``esbridge`` console script where the exit status and stderr matter.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from eventsourcing.system import System
from psycopg.sql import SQL, Identifier

from esbridge.cli import main
from esbridge.consumer.adapter import ConsumerAdapter
from esbridge.errors import ConfigurationError
from esbridge.relay.relay import Relay
from esbridge.system.setup import construct_app, setup_system
from examples.dogschool.application import DogSchool
from tests.support.consumer_apps import Mirror, populate
from tests.support.relay_support import ESBRIDGE, ROOT, subprocess_env

SYSTEM = System(pipes=[[DogSchool, Mirror]])
SYSTEM_PATH = "tests.integration.runtime.test_postgres_privileges:SYSTEM"
PASSWORD = "pw-of-a-test-role"

MakeRole = Callable[..., dict[str, str]]


@pytest.fixture
def make_role(postgres_db: Any) -> Iterator[MakeRole]:
    """Factory: a new login role with ``grants`` run for it; returns its environment.

    ``{role}`` in a grant is the role's name. Dropped (with its privileges) after the test.
    """
    made: list[str] = []

    def make(*grants: str, **settings: str) -> dict[str, str]:
        role = f"esb_{uuid.uuid4().hex[:10]}"
        made.append(role)
        admin(postgres_db, f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
        for grant in grants:
            admin(postgres_db, grant.format(role=role))
        return {**postgres_db.env, "POSTGRES_USER": role, "POSTGRES_PASSWORD": PASSWORD, **settings}

    yield make
    for role in made:
        admin(postgres_db, "DROP OWNED BY {0}", role)
        admin(postgres_db, "DROP ROLE {0}", role)


def admin(postgres_db: Any, statement: str, *names: str) -> None:
    """Run ``statement`` as the database's owner (``names``: identifiers for ``{0}``...)."""
    with psycopg.connect(postgres_db.dsn, autocommit=True) as conn:
        conn.execute(SQL(statement).format(*(Identifier(n) for n in names)))  # type: ignore[arg-type]


def esbridge(env: dict[str, str], *argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [ESBRIDGE, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return done, time.monotonic() - started


def refused(done: subprocess.CompletedProcess[str], message: str) -> bool:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert message in done.stderr, done.stderr[-3000:]
    return True


def test_a_role_without_connect_is_told_at_once(
    postgres_db: Any, kafka_broker: Any, create_topic: Any, make_role: MakeRole
) -> None:
    """Not 50 s of silence and "couldn't get a connection after 30.00 sec"."""
    setup_system(SYSTEM, postgres_db.env)
    topic = create_topic(partitions=1)
    admin(postgres_db, "REVOKE CONNECT ON DATABASE {0} FROM PUBLIC", postgres_db.dbname)
    env = make_role()
    role, db = env["POSTGRES_USER"], postgres_db.dbname
    env = {**subprocess_env(postgres_db, kafka_broker), **env}
    message = (
        f"role {role} lacks the CONNECT privilege on database {db}: "
        f"GRANT CONNECT ON DATABASE {db} TO {role}"
    )
    for command in [
        ["relay", "examples.dogschool.application:DogSchool", "--topic", topic],
        ["consume", "tests.support.consumer_apps:Mirror", "--upstream", "DogSchool",
         "--topic", topic],
        ["status", SYSTEM_PATH],
    ]:  # fmt: skip
        done, seconds = esbridge(env, *command)
        assert refused(done, message) and seconds < 15, (command, seconds)


def test_a_follower_missing_a_privilege_is_told_the_grant(
    postgres_db: Any, make_role: MakeRole
) -> None:
    setup_system(SYSTEM, postgres_db.env)  # every table made by the database's owner

    def refusal(env: dict[str, str]) -> str:
        with pytest.raises(ConfigurationError) as raised:
            construct_app(SYSTEM, "Mirror", env).close()
        return str(raised.value)

    # Creating tables at start (CREATE_TABLE, default y) needs CREATE on the schema ...
    env = make_role()
    role = env["POSTGRES_USER"]
    assert refusal(env).endswith(
        f"permission denied for schema public. role {role} may not create tables in schema "
        f"public (CREATE privilege): GRANT USAGE, CREATE ON SCHEMA public TO {role}, or create "
        "the tables once with a role that may and set CREATE_TABLE=n for this one"
    )
    # ... and owning the tables, when they exist already.
    admin(postgres_db, "GRANT CREATE ON SCHEMA public TO {0}", role)
    assert f"ALTER TABLE mirror_events OWNER TO {role}, or set CREATE_TABLE=n" in refusal(env)
    # Without creating tables, SELECT, INSERT and UPDATE on each: a missing one is named.
    env = make_role(
        "GRANT SELECT, INSERT, UPDATE ON mirror_events, esbridge_dead_letters TO {role}",
        "GRANT SELECT, INSERT ON mirror_tracking TO {role}",
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
        CREATE_TABLE="n",
    )
    role = env["POSTGRES_USER"]
    assert refusal(env) == (
        f"application 'Mirror' cannot record its events: role {role} lacks UPDATE on "
        f"public.mirror_tracking. Run, as the tables' owner: GRANT UPDATE ON TABLE "
        f"public.mirror_tracking TO {role}"
    )
    admin(postgres_db, "REVOKE USAGE ON SEQUENCE mirror_events_notification_id_seq FROM {0}", role)
    assert refusal(env).endswith(
        f"GRANT USAGE ON SEQUENCE public.mirror_events_notification_id_seq TO {role}; "
        f"GRANT UPDATE ON TABLE public.mirror_tracking TO {role}"
    )


def test_documented_minimal_grants_suffice_and_the_dead_letter_table_need_not_be_owned(
    postgres_db: Any, kafka_broker: Any, create_topic: Any, make_role: MakeRole
) -> None:
    """The tables made by their owner (``esbridge run --setup``); a relay that may only
    read its log; a follower with CREATE_TABLE=n and grants on its own tables but not on
    the dead-letter table (which it need not own), told the GRANTs it lacks; then the relay
    publishes and the follower processes every event."""
    setup_system(SYSTEM, postgres_db.env)
    school = DogSchool(env=postgres_db.env)
    populate(school, 5, 2)
    school.close()
    topic = create_topic(partitions=1)
    relay_env = make_role("GRANT SELECT ON dogschool_events TO {role}")
    follower_env = make_role(
        "GRANT SELECT, INSERT, UPDATE ON mirror_events, mirror_tracking TO {role}",
        "GRANT USAGE ON SEQUENCE mirror_events_notification_id_seq TO {role}",
        CREATE_TABLE="n",
    )
    follower_role = follower_env["POSTGRES_USER"]

    done, _ = esbridge(
        {**subprocess_env(postgres_db, kafka_broker), **follower_env},
        "consume", "tests.support.consumer_apps:Mirror", "--upstream", "DogSchool",
        "--topic", topic,
    )  # fmt: skip
    assert refused(
        done,
        f"application 'Mirror' cannot record its events: role {follower_role} lacks SELECT on "
        "public.esbridge_dead_letters, INSERT on public.esbridge_dead_letters, UPDATE on "
        "public.esbridge_dead_letters, USAGE on public.esbridge_dead_letters_id_seq. Run, as "
        "the tables' owner: GRANT SELECT, INSERT, UPDATE ON TABLE public.esbridge_dead_letters "
        f"TO {follower_role}; GRANT USAGE ON SEQUENCE public.esbridge_dead_letters_id_seq TO "
        f"{follower_role}",
    )
    admin(postgres_db, "GRANT SELECT, INSERT, UPDATE ON esbridge_dead_letters TO {0}",
          follower_role)  # fmt: skip
    admin(postgres_db, "GRANT USAGE ON SEQUENCE esbridge_dead_letters_id_seq TO {0}",
          follower_role)  # fmt: skip

    kafka_config = {"bootstrap.servers": kafka_broker.bootstrap_servers}
    relay = Relay("DogSchool", kafka_config=kafka_config, topic=topic, env=relay_env)
    try:
        assert relay.publish_available() == 15
    finally:
        relay.close()
    mirror = construct_app(SYSTEM, "Mirror", follower_env)

    def consumer_of_mirror() -> ConsumerAdapter:
        """A consumer that reconciles gaps: it reads the upstream log as the follower's role."""
        return ConsumerAdapter(
            mirror,  # type: ignore[arg-type]
            upstream="DogSchool",
            topic=topic,
            kafka_config={**kafka_config, "session.timeout.ms": 6000},
            group_id=f"{topic}.g",
            upstream_env=follower_env,
        )

    consumer = consumer_of_mirror()
    with pytest.raises(ConfigurationError) as raised:
        consumer.process_available(timeout=1)
    consumer.close()
    assert str(raised.value).endswith(
        f"permission denied for table dogschool_events. role {follower_role} lacks SELECT on "
        f"table dogschool_events: GRANT SELECT ON TABLE dogschool_events TO {follower_role}"
    )
    admin(postgres_db, "GRANT SELECT ON dogschool_events TO {0}", follower_role)
    consumer = consumer_of_mirror()
    try:
        deadline = time.monotonic() + 60
        while consumer.status().processed < 15 and time.monotonic() < deadline:
            consumer.process_available(timeout=1)
        assert consumer.status().processed == 15
        assert mirror.recorder.max_tracking_id("DogSchool") == 15
    finally:
        consumer.close()
        mirror.close()


def test_status_never_shows_an_unreadable_dead_letter_table_as_empty(
    postgres_db: Any, make_role: MakeRole, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    setup_system(SYSTEM, postgres_db.env)
    env = make_role("GRANT SELECT ON dogschool_events, mirror_events, mirror_tracking TO {role}")
    role = env["POSTGRES_USER"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    message = (
        "esbridge status: cannot read Mirror's dead-letter table esbridge_dead_letters: "
        "permission denied for table esbridge_dead_letters. "
        f"role {role} lacks SELECT on table esbridge_dead_letters: "
        f"GRANT SELECT ON TABLE esbridge_dead_letters TO {role}\n"
    )
    assert main(["status", SYSTEM_PATH]) == 0  # nothing lags: caught up
    out, err = capsys.readouterr()
    assert out.splitlines()[2].split() == [
        "DogSchool", "->", "Mirror", "0", "0", "0", "0.0", "-", "unreadable", "none",
    ]  # fmt: skip
    assert err == message
    assert main(["status", SYSTEM_PATH, "--fail-on-lag"]) == 1
    assert capsys.readouterr().err == message
    # A role that may read it sees the count, and the health check passes.
    admin(postgres_db, "GRANT SELECT ON esbridge_dead_letters TO {0}", role)
    assert main(["status", SYSTEM_PATH, "--fail-on-lag", "--json"]) == 0
    out, err = capsys.readouterr()
    row = json.loads(out)
    assert (row["dlq"], row["dlq_error"], err) == (0, None, "")
