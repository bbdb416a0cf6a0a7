"""The dead-letter policy: its backoff schedule, its validation, and how it is given."""

from __future__ import annotations

import random

import pytest

import esbridge
from esbridge.cli import build_parser
from esbridge.cli.dead_letter_options import policy_from_args
from esbridge.cli.run import worker_command
from esbridge.consumer.state import Tuning
from esbridge.deadletters.policy import DeadLetterPolicy
from esbridge.errors import ConfigurationError


def test_backoff_doubles_up_to_its_cap_without_jitter() -> None:
    policy = DeadLetterPolicy(max_attempts=6, backoff=0.5, backoff_cap=3.0, jitter=0.0)
    assert policy.delays() == [0.5, 1.0, 2.0, 3.0, 3.0]  # one wait fewer than the tries
    assert DeadLetterPolicy(max_attempts=1).delays() == []  # one try, no retry


def test_jitter_shortens_each_delay_by_at_most_its_fraction_reproducibly() -> None:
    policy = DeadLetterPolicy(max_attempts=8, backoff=0.1, backoff_cap=2.0, jitter=0.25)
    delays = policy.delays(random.Random(42))
    assert delays == policy.delays(random.Random(42))  # seeded: the same schedule
    draws = random.Random(42)
    nominal = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert delays == [n * (1 - 0.25 * draws.random()) for n in nominal]
    for delay, n in zip(delays, nominal, strict=True):
        assert 0.75 * n <= delay <= n
    assert delays != policy.delays(random.Random(43))


def test_the_former_retries_setting_makes_a_parking_policy() -> None:
    policy = DeadLetterPolicy.from_retries(2, 0.01)
    assert (policy.max_attempts, policy.backoff, policy.jitter) == (3, 0.01, 0.0)
    assert policy.on_exhausted == "park"
    assert Tuning().policy_for("F") == DeadLetterPolicy.from_retries(3, 0.2)  # the defaults


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be an integer >= 1"),
        ({"backoff": -1.0}, "cannot be negative"),
        ({"jitter": 1.5}, "jitter is the random fraction of each delay, between 0 and 1"),
        ({"on_exhausted": "drop"}, "on_exhausted must be one of ['park', 'skip', 'stop']"),
    ],
)
def test_a_policy_that_cannot_work_is_refused(settings: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DeadLetterPolicy(**settings)


def test_policy_is_exported_frozen_and_chosen_per_follower() -> None:
    assert esbridge.DeadLetterPolicy is DeadLetterPolicy
    assert "PoisonMessageError" in esbridge.__all__
    policy = DeadLetterPolicy(on_exhausted="skip")
    with pytest.raises(AttributeError):
        policy.max_attempts = 9  # type: ignore[misc]
    stop = DeadLetterPolicy(on_exhausted="stop")
    per_follower = {"Emails": stop, "*": policy}
    tuning = Tuning.checked({"dead_letter_policy": per_follower}, upstream_log=False)
    assert tuning.policy_for("Emails") is stop
    assert tuning.policy_for("Other") is policy
    only = Tuning.checked({"dead_letter_policy": {"Emails": stop}}, upstream_log=False)
    assert only.policy_for("Other").on_exhausted == "park"


def test_a_policy_with_the_former_retries_or_of_another_type_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="give either dead_letter_policy or retries"):
        Tuning.checked({"dead_letter_policy": DeadLetterPolicy(), "retries": 2}, upstream_log=False)
    with pytest.raises(ConfigurationError, match="dead_letter_policy must be a DeadLetterPolicy"):
        Tuning.checked({"dead_letter_policy": "skip"}, upstream_log=False)
    with pytest.raises(ConfigurationError, match="not dict"):
        Tuning.checked({"dead_letter_policy": {"F": {"max_attempts": 2}}}, upstream_log=False)


CONSUME = ["consume", "shop:Mirror", "--upstream", "Ledger", "--topic", "t"]


def test_cli_flags_make_the_policy_and_reach_the_workers() -> None:
    args = build_parser().parse_args(
        [*CONSUME, "--max-attempts", "2", "--backoff", "0.5", "--on-poison", "skip"]
    )
    assert policy_from_args(args) == DeadLetterPolicy(
        max_attempts=2, backoff=0.5, on_exhausted="skip"
    )
    assert policy_from_args(build_parser().parse_args(CONSUME)) is None
    run = build_parser().parse_args(
        ["run", "shop:system", "--workers", "2", "--on-poison", "stop", "--jitter", "0"]
    )
    assert worker_command(run, "Orders", 1)[-4:] == ["--jitter", "0.0", "--on-poison", "stop"]


def test_cli_refuses_retries_with_max_attempts_and_an_unknown_choice(capsys) -> None:
    args = build_parser().parse_args([*CONSUME, "--retries", "2", "--max-attempts", "3"])
    with pytest.raises(ConfigurationError, match="--retries is the former form of --max-attempts"):
        policy_from_args(args)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*CONSUME, "--on-poison", "drop"])
    assert exited.value.code == 2
    assert "invalid choice: 'drop'" in capsys.readouterr().err
