"""Every command that imports an application or a system by path says what the path names
when it is something else: an aggregate, a System, an application where a system is needed.

Before, ``esbridge consume pkg.mod:Invoice`` (an aggregate) ended in a TypeError.
These errors come before any server is contacted (none is configured here).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from esbridge.cli.common import application_name, load_application
from esbridge.cli.run import ESBRIDGE_COMMAND
from esbridge.errors import ConfigurationError
from tests.support.relay_support import ROOT

DOG = "examples.dogschool.domainmodel:Dog"
SYSTEM = "examples.dogschool.system:system"
AGGREGATE = f"{DOG} is an aggregate, not an application: name the Application subclass"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["consume", DOG, "--upstream", "DogSchool", "--topic", "t"], AGGREGATE),
        (
            ["consume", "examples.dogschool.application:Counters", "--upstream", "DogSchool",
             "--topic", "t", "--upstream-class", DOG],
            AGGREGATE,
        ),
        (["relay", DOG], AGGREGATE),
        (["replay", DOG, "--topic", "t"], AGGREGATE),
        (["dlq", "list", DOG], AGGREGATE),
        (["consume", SYSTEM, "--upstream", "DogSchool", "--topic", "t"], "is a System, not an"),
        (
            ["run", "examples.dogschool.domainmodel:Dog"],
            "is an aggregate, not an eventsourcing.system.System: name the System object",
        ),
        (
            ["status", "examples.dogschool.application:DogSchool"],
            "is an application class, not an eventsourcing.system.System",
        ),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else None,
)  # fmt: skip
def test_a_path_naming_something_else_is_a_configuration_error(
    command: list[str], message: str
) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    done = subprocess.run(
        [*ESBRIDGE_COMMAND, *command], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_an_application_is_named_by_its_class_or_its_name() -> None:
    assert application_name("examples.dogschool.application:DogSchool") == "DogSchool"
    assert application_name("examples.dogschool.application.DogSchool") == "DogSchool"
    assert application_name("DogSchool") == "DogSchool"
    assert load_application("examples.dogschool.application:Counters").name == "Counters"
    with pytest.raises(ConfigurationError, match="is a function, not an application"):
        load_application("os.path:join")
