"""Deprecated import path: use :mod:`esbridge.deadletters.store`.

Kept for one release so that code written against the flat layout keeps
working; importing it warns.
"""

import warnings

from esbridge.deadletters.store import *  # noqa: F403

warnings.warn(
    "esbridge.deadletter is deprecated and will be removed in the next release; "
    "import from esbridge.deadletters.store instead",
    DeprecationWarning,
    stacklevel=2,
)
