"""Deprecated import path: use :mod:`esbridge.kafka.topics`.

Kept for one release so that code written against the flat layout keeps
working; importing it warns.
"""

import warnings

from esbridge.kafka.topics import *  # noqa: F403

warnings.warn(
    "esbridge.topics is deprecated and will be removed in the next release; "
    "import from esbridge.kafka.topics instead",
    DeprecationWarning,
    stacklevel=2,
)
