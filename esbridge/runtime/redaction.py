"""Keeping secrets out of messages, logs and status output.

Why one place: a Kafka or Postgres setting travels through error messages
("expected 'name=value', got ..."), logs and ``repr`` output, and each of
those may end up in a ticket or a log aggregator. Whatever shows a setting
passes it through :func:`redact_value` (or a whole mapping through
:func:`redact_config`, a raw line through :func:`redact_line`), so a value is
shown only when its name does not look like a secret's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: Words that mark a setting's value as secret wherever they appear in its name
#: (``sasl.password``, ``ssl.key.password``, ``sasl.oauthbearer.client.secret``,
#: ``ssl.key.pem``, ``sasl.jaas.config``, ...). Over-redacting a path is harmless.
SECRET_WORDS = ("password", "passwd", "secret", "token", "key", "credential", "jaas")

#: What is shown instead of a secret value.
REDACTED = "***"

_SECRET = re.compile("|".join(SECRET_WORDS), re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def is_secret_name(name: str) -> bool:
    """Whether the value of setting ``name`` must never be shown."""
    return _SECRET.search(name) is not None


def redact_value(name: str, value: Any) -> Any:
    """``value``, or :data:`REDACTED` when ``name`` is a secret's name."""
    return REDACTED if is_secret_name(name) and value not in (None, "") else value


def redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` whose secret values are replaced by :data:`REDACTED`."""
    return {name: redact_value(name, value) for name, value in config.items()}


def redact_line(line: str) -> str:
    """A raw settings line with everything after its first secret-looking name hidden.

    For lines that could not be parsed as ``name=value``: ``sasl.password S3cr3t``
    becomes ``sasl.password ***``; where the name ends is unknown
    (``sasl.passwordS3cr3t``), the line is cut after the secret word.
    """
    match = _SECRET.search(line)
    if match is None:
        return line
    parts = line.split(None, 1)
    if len(parts) == 2 and _NAME.fullmatch(parts[0]) and is_secret_name(parts[0]):
        return f"{parts[0]} {REDACTED}"
    return f"{line[: match.end()]} {REDACTED}"
