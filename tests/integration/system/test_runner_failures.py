"""A relay or consumer thread that died is raised by ``KafkaRunner``, never passed over.

The mistake made here: the leader's topic exists with 2 partitions, the runner
expects 1 and may not create topics, so its relay and consumer threads fail
on their configuration right after ``start()``. A test that only stops the
runner (or leaves its ``with`` block) must not pass: ``stop()`` and
``__exit__`` raise the failure, after stopping and closing everything; an
exception already leaving the ``with`` block is kept, the failure added as a note.
"""

from __future__ import annotations

import traceback
import uuid
from typing import Any

import pytest

from esbridge.errors import ConfigurationError, SystemConfigurationError
from esbridge.system.runner import KafkaRunner
from examples.dogschool.application import DogSchool
from examples.dogschool.system import system as dogschool_system
from tests.support.relay_support import wait_for

FAILURE = "relay of DogSchool: ConfigurationError"


@pytest.fixture
def runner(postgres_db: Any, kafka_config: dict[str, Any], create_topic: Any) -> KafkaRunner:
    prefix = f"t.{uuid.uuid4().hex[:8]}."
    create_topic(partitions=2, name=f"{prefix}dogschool")
    return KafkaRunner(
        dogschool_system,
        env=postgres_db.env,
        kafka_config=kafka_config,
        topic_prefix=prefix,
        create_topics=False,  # so that start() does not refuse the topic itself
    )


def wait_for_failure(runner: KafkaRunner) -> None:
    wait_for(lambda: any(FAILURE in f for f in runner.failures()), 60, "the relay failed")


def test_stop_raises_a_failure_after_stopping_everything(runner: KafkaRunner) -> None:
    runner.start()
    wait_for_failure(runner)
    threads = [r.thread for r in runner.components]
    school = runner.get(DogSchool)
    with pytest.raises(SystemConfigurationError) as failed:
        runner.stop()
    assert FAILURE in str(failed.value) and "partitions" in str(failed.value)
    # The relay's own exception, with its traceback from the relay thread.
    relay_error = failed.value.exceptions[failed.value.components.index("relay of DogSchool")]
    frames = traceback.extract_tb(relay_error.__traceback__)
    assert any("esbridge/relay/" in frame.filename for frame in frames), frames
    # Everything was stopped and closed before the failure was raised.
    assert not any(thread.is_alive() for thread in threads)
    assert runner.components == [] and runner.apps == {}
    with pytest.raises(Exception, match="closed"):
        school.register_dog("Fido")  # its connection pool is closed
    runner.stop()  # a failure is raised once
    with pytest.raises(ConfigurationError, match="'DogSchool' is closed: this runner was stopped"):
        runner.get(DogSchool)


def test_leaving_the_with_block_raises_a_failure(runner: KafkaRunner) -> None:
    with pytest.raises(SystemConfigurationError, match=FAILURE), runner:
        wait_for_failure(runner)
    assert runner.components == [] and runner.apps == {}


def test_an_exception_leaving_the_with_block_is_kept(runner: KafkaRunner) -> None:
    with pytest.raises(AssertionError, match="counted nothing") as raised, runner:
        wait_for_failure(runner)
        raise AssertionError("counted nothing")
    notes = getattr(raised.value, "__notes__", [])
    assert any(note.startswith("KafkaRunner: SystemConfigurationError") for note in notes)
    assert any(FAILURE in note for note in notes), notes
    assert runner.components == [] and runner.apps == {}


def test_a_failure_raised_by_wait_idle_is_not_raised_again(runner: KafkaRunner) -> None:
    with pytest.raises(SystemConfigurationError, match=FAILURE) as raised, runner:
        wait_for_failure(runner)
        runner.wait_idle(timeout=5)
    # The exception is wait_idle's own: __exit__ neither raised another nor added a note.
    assert raised.value.__context__ is None
    assert not getattr(raised.value, "__notes__", None)
