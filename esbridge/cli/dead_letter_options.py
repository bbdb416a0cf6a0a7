"""The dead-letter policy options of ``esbridge consume`` and ``esbridge run``.

One set of flags for both commands (and for the workers ``run`` starts), so
that a consumer run alone and one run in a system treat poison the same way.
Without any of these flags the consumer keeps its default policy (or
``consume --retries``).
"""

from __future__ import annotations

import argparse
from typing import Any

from esbridge.deadletters.policy import ON_EXHAUSTED, DeadLetterPolicy
from esbridge.errors import ConfigurationError

#: (flag, policy field, type, help)
_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    (
        "--max-attempts",
        "max_attempts",
        int,
        "tries of a failing message in all, the first one included (default 4)",
    ),
    (
        "--backoff",
        "backoff",
        float,
        "seconds before the first retry, doubled before each next one (default 0.2)",
    ),
    ("--backoff-cap", "backoff_cap", float, "longest wait between two tries (default 10)"),
    (
        "--jitter",
        "jitter",
        float,
        "fraction of each wait drawn at random, 0 to 1 (default 0.1)",
    ),
)


def add_dead_letter_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--max-attempts``, ``--backoff``, ``--backoff-cap``, ``--jitter``, ``--on-poison``."""
    group = parser.add_argument_group(
        "poison messages", "what a consumer does with a message whose processing keeps failing"
    )
    for flag, _field, kind, helptext in _FLAGS:
        group.add_argument(flag, type=kind, default=None, help=helptext)
    group.add_argument(
        "--on-poison",
        choices=list(ON_EXHAUSTED),
        default=None,
        help="once the tries are exhausted: park it and hold its key's later messages "
        "(default), skip it (recorded in the dead-letter table, its key goes on), or stop "
        "the consumer",
    )


def policy_from_args(args: argparse.Namespace) -> DeadLetterPolicy | None:
    """The policy the flags give (None when none was given)."""
    given: dict[str, Any] = {name: getattr(args, name) for _flag, name, _kind, _help in _FLAGS}
    given["on_exhausted"] = args.on_poison
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    if getattr(args, "retries", None) is not None:
        raise ConfigurationError(
            "--retries is the former form of --max-attempts (tries in all = retries + 1): "
            "give one or the other"
        )
    return DeadLetterPolicy(**given)


def dead_letter_argv(args: argparse.Namespace) -> list[str]:
    """The flags given, as a worker's command line repeats them."""
    argv: list[str] = []
    for flag, name, _kind, _help in _FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv += [flag, str(value)]
    if args.on_poison is not None:
        argv += ["--on-poison", args.on_poison]
    return argv
