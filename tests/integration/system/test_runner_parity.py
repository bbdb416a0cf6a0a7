"""``KafkaRunner`` side by side with the library's runners: one test body, runner by runner.

Each test runs under the library's ``SingleThreadedRunner`` and
``MultiThreadedRunner`` and under ``KafkaRunner`` (the session's real Kafka,
a topic prefix of its own per test). Every runner stores in the test's real
Postgres database: the behaviours here (what was written before start, what
a new runner finds, where ``env=`` sends an application) depend on storage
that outlives the runner. Where ``KafkaRunner`` cannot behave as the library's
runners do, the test asserts each runner's outcome, and docs/systems.md
("Differences from the library's runners") says why.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from types import EllipsisType
from typing import Any

import pytest
from eventsourcing.system import (
    EventProcessingError,
    MultiThreadedRunner,
    Runner,
    RunnerAlreadyStartedError,
    SingleThreadedRunner,
    System,
)
from eventsourcing.utils import get_topic

from esbridge.errors import ConfigurationError, SystemConfigurationError
from esbridge.system.runner import KafkaRunner
from examples.dogschool.application import Counters, DogSchool
from examples.dogschool.domainmodel import Dog
from examples.dogschool.system import system as dogschool_system
from tests.support.consumer_apps import DogMirror, Fragile, Mirror
from tests.support.relay_support import wait_for

KINDS = ("single", "multi", "kafka")

#: Seconds a follower has to catch up (Kafka's relay and consumer are asynchronous).
SETTLE = 60.0


class RegisteredOnly(Mirror):
    """A mirror that follows only its leader's ``Dog.Registered`` events (the library's
    ``topics``): it mirrors every dog, never a trick."""

    topics = (get_topic(Dog.Registered),)


class Runners:
    """Makes the runners of one kind for a test, on the test's database; stops them after."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, env: dict[str, str]) -> None:
        self.kind = kind
        self.request = request
        self.env = env
        self.prefix = f"parity.{uuid.uuid4().hex[:8]}."  # every KafkaRunner of the test
        self.made: list[Runner[Any]] = []

    def make(
        self,
        system: System = dogschool_system,
        env: Mapping[str, str] | EllipsisType | None = ...,
        **kafka_options: Any,
    ) -> Runner[Any]:
        """A runner of this kind for ``system`` (``env``: the test database's by default)."""
        given = self.env if isinstance(env, EllipsisType) else env
        runner: Runner[Any]
        if self.kind == "kafka":
            runner = KafkaRunner(
                system,
                env=given,
                kafka_config=self.request.getfixturevalue("kafka_config"),
                topic_prefix=self.prefix,
                **kafka_options,
            )
        else:
            runner_cls = SingleThreadedRunner if self.kind == "single" else MultiThreadedRunner
            runner = runner_cls(system, env=dict(given) if given is not None else None)
        self.made.append(runner)
        return runner

    def stop_all(self) -> None:
        for runner in self.made:
            # A failure the test asserted on is raised again by the library's runners.
            with contextlib.suppress(Exception):
                runner.stop()


@pytest.fixture(params=KINDS)
def runners(request: pytest.FixtureRequest, postgres_db: Any) -> Iterator[Runners]:
    made = Runners(request.param, request, dict(postgres_db.env))
    yield made
    made.stop_all()


def eventually(condition: Callable[[], Any], what: str) -> None:
    wait_for(condition, SETTLE, what)


def test_get_before_start_then_write_then_start(runners: Runners) -> None:
    """The applications exist from construction: code writes to a leader, then starts."""
    runner = runners.make()
    school = runner.get(DogSchool)
    counters = runner.get(Counters)
    billy = school.register_dog("Billy")
    school.add_trick(billy, "roll over")
    assert not runner.is_started
    with runner as entered:
        assert entered is runner and runner.is_started
        assert runner.get(DogSchool) is school  # the same object, started
        school.add_trick(billy, "fetch ball")  # the library's runners catch up on this one
        eventually(
            lambda: (counters.get_count("roll over"), counters.get_count("fetch ball")) == (1, 1),
            "both tricks counted",
        )


#: Whether a runner processes, at start, what its leaders recorded before: KafkaRunner's
#: relay publishes the log from its position; the library's followers pull only when
#: their leader records its next event.
CATCHES_UP_AT_START = {"single": False, "multi": False, "kafka": True}


def test_catching_up_at_start(runners: Runners) -> None:
    runner = runners.make()
    school = runner.get(DogSchool)
    school.add_trick(school.register_dog("Billy"), "roll over")
    runner.start()
    counters = runner.get(Counters)
    if CATCHES_UP_AT_START[runners.kind]:
        eventually(lambda: counters.get_count("roll over") == 1, "counted at start")
    else:
        time.sleep(1.0)  # the multi-threaded runner's threads had the time to process
        assert counters.get_count("roll over") == 0
        school.register_dog("Milly")  # any new event of the leader: the follower catches up
        eventually(lambda: counters.get_count("roll over") == 1, "counted on the next event")


def test_with_block_starts_and_stops(runners: Runners) -> None:
    runner = runners.make()
    with runner as entered:
        assert entered is runner and runner.is_started
        school = runner.get(DogSchool)
        school.register_dog("Billy")
    # Stopped: the applications are closed and gone (a KeyError, as the library raises).
    with pytest.raises(KeyError, match="DogSchool"):
        runner.get(DogSchool)
    with pytest.raises(Exception, match="closed"):
        school.register_dog("Milly")


def test_starting_twice_and_restarting(runners: Runners) -> None:
    """A runner starts once; a new runner on the same database resumes without reprocessing."""
    runner = runners.make()
    runner.start()
    with pytest.raises(RunnerAlreadyStartedError) as twice:
        runner.start()
    if runners.kind == "kafka":
        assert "a runner starts once. Construct a new KafkaRunner" in str(twice.value)
    school = runner.get(DogSchool)
    billy = school.register_dog("Billy")
    school.add_trick(billy, "roll over")
    eventually(lambda: runner.get(Counters).get_count("roll over") == 1, "counted")
    runner.stop()
    assert runner.is_started  # as the library's: started once, for good
    with pytest.raises(RunnerAlreadyStartedError) as again:
        runner.start()
    if runners.kind == "kafka":
        assert "started already and then stopped" in str(again.value)

    with runners.make() as restarted:
        restarted.get(DogSchool).add_trick(billy, "fetch ball")
        counters = restarted.get(Counters)
        eventually(lambda: counters.get_count("fetch ball") == 1, "counted after the restart")
        assert counters.get_count("roll over") == 1  # not counted a second time


def test_topics_filter_of_a_follower(runners: Runners) -> None:
    """A follower's ``topics`` keeps the other events of its leaders from its policy."""
    system = System(pipes=[[DogSchool, RegisteredOnly]])
    with runners.make(system) as runner:
        school = runner.get(DogSchool)
        mirror = runner.get(RegisteredOnly)
        billy = school.register_dog("Billy")
        school.add_trick(billy, "roll over")
        milly = school.register_dog("Milly")  # after the trick: mirrored once the trick is past
        eventually(lambda: DogMirror.create_id(milly) in mirror.repository, "mirrored")
        assert mirror.tricks(billy) == []
        assert mirror.tricks(milly) == []


def test_env_argument_over_the_process_environment(
    runners: Runners, postgres_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``env=`` is given to every application over ``os.environ`` (which it leaves as it is),
    and the library's per-application prefixes choose an application's own settings."""
    env = runners.env
    for key, value in env.items():  # the process points at a database that does not exist
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("POSTGRES_DBNAME", "no_such_database")
    counters_db = postgres_server.create_database().env["POSTGRES_DBNAME"]
    given = {"POSTGRES_DBNAME": env["POSTGRES_DBNAME"], "COUNTERS_POSTGRES_DBNAME": counters_db}
    with runners.make(env=given) as runner:
        assert runner.env == given
        school = runner.get(DogSchool)
        school.add_trick(school.register_dog("Billy"), "roll over")
        counters = runner.get(Counters)
        eventually(lambda: counters.get_count("roll over") == 1, "counted")
    assert os.environ["POSTGRES_DBNAME"] == "no_such_database"
    assert "COUNTERS_POSTGRES_DBNAME" not in os.environ
    # The count is in the Counters' own database, not in the DogSchool's.
    for dbname, count in ((counters_db, 1), (env["POSTGRES_DBNAME"], 0)):
        reader = Counters(env={**env, "POSTGRES_DBNAME": dbname})
        try:
            assert reader.get_count("roll over") == count, dbname
        finally:
            reader.close()

    # Without env=, the process environment is what the applications get.
    monkeypatch.setenv("POSTGRES_DBNAME", env["POSTGRES_DBNAME"])
    with runners.make(env=None) as runner:
        assert runner.env is None
        assert runner.get(DogSchool).register_dog("Milly")


def test_a_failing_policy(runners: Runners) -> None:
    """What each runner does when a follower's policy raises.

    The single-threaded runner raises the policy's exception from the leader's
    command; the multi-threaded runner's follower thread dies, and
    ``watch_for_errors()`` stops the runner and raises ``EventProcessingError``.
    ``KafkaRunner``'s consumer retries the event, then parks it in the follower's
    dead-letter table and goes on with other aggregates: nothing failed, so
    ``watch_for_errors()`` returns False; the parked message is in ``statuses()``.
    """
    system = System(pipes=[[DogSchool, Fragile]])
    Fragile.healed = False
    runner = runners.make(system, consumer_options={"retries": 1, "retry_backoff": 0.05})
    runner.start()
    school = runner.get(DogSchool)
    rex = school.register_dog("Rex")
    if runners.kind == "single":
        with pytest.raises(ValueError, match="cannot learn poison"):
            school.add_trick(rex, "poison")
        return
    school.add_trick(rex, "poison")
    if runners.kind == "multi":
        assert isinstance(runner, MultiThreadedRunner)
        with pytest.raises(EventProcessingError, match="cannot learn poison") as raised:
            runner.watch_for_errors(timeout=SETTLE)
        assert isinstance(raised.value.__cause__, ValueError)
        return
    assert isinstance(runner, KafkaRunner)
    milly = school.register_dog("Milly")
    mirror = runner.get(Fragile)
    eventually(lambda: DogMirror.create_id(milly) in mirror.repository, "others go on")
    assert runner.watch_for_errors(timeout=0.5) is False
    (edge,) = runner.statuses()
    assert edge.parked == {"DogSchool": {"policy_error": 1}}
    runner.stop()


def test_watch_for_errors_without_errors(runners: Runners) -> None:
    """``watch_for_errors(timeout)`` returns False when nothing failed within ``timeout``.

    The single-threaded runner has no threads to watch, and no ``watch_for_errors``.
    """
    runner = runners.make()
    assert hasattr(runner, "watch_for_errors") is (runners.kind != "single")
    if runners.kind == "single":
        return
    with runner:
        runner.get(DogSchool).register_dog("Billy")
        started = time.monotonic()
        assert runner.watch_for_errors(timeout=0.5) is False  # type: ignore[attr-defined]
        assert time.monotonic() - started >= 0.5
        assert runner.is_started


def test_kafka_runner_watch_for_errors_stops_and_raises_a_failure(
    postgres_db: Any, kafka_config: dict[str, Any], create_topic: Any
) -> None:
    """A relay or consumer that died: ``watch_for_errors`` stops the runner and raises, as
    the library's raises a dead follower thread's error (KafkaRunner only: the library has
    no relay)."""
    prefix = f"parity.{uuid.uuid4().hex[:8]}."
    create_topic(partitions=2, name=f"{prefix}dogschool")  # the runner expects 1
    runner = KafkaRunner(
        dogschool_system,
        env=postgres_db.env,
        kafka_config=kafka_config,
        topic_prefix=prefix,
        create_topics=False,
    )
    runner.start()
    # The relay or the consumer of the topic, whichever checks the partitions first.
    failed = r"(relay of|consumer) DogSchool( -> Counters)?: ConfigurationError: .*partitions"
    with pytest.raises(SystemConfigurationError, match=failed):
        runner.watch_for_errors(timeout=SETTLE)
    assert runner.components == [] and runner.apps == {}  # stopped, closed


def test_kafka_runner_stopped_before_it_started_refuses_to_start(
    postgres_db: Any, kafka_config: dict[str, Any]
) -> None:
    """The library's runners fail with a KeyError here; KafkaRunner says what to do."""
    runner = KafkaRunner(
        dogschool_system,
        env=postgres_db.env,
        kafka_config=kafka_config,
        topic_prefix=f"parity.{uuid.uuid4().hex[:8]}.",
    )
    runner.stop()
    with pytest.raises(ConfigurationError, match=r"stopped before it started.*new KafkaRunner"):
        runner.start()
