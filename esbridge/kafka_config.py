"""Deprecated import path: use :mod:`esbridge.kafka.config`.

Kept for one release so that code written against the flat layout keeps
working; importing it warns.
"""

import warnings

from esbridge.kafka.config import *  # noqa: F403

warnings.warn(
    "esbridge.kafka_config is deprecated and will be removed in the next release; "
    "import from esbridge.kafka.config instead",
    DeprecationWarning,
    stacklevel=2,
)
