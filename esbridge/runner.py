"""Deprecated import path: use :mod:`esbridge.system.runner`.

Kept for one release so that code written against the flat layout keeps
working; importing it warns.
"""

import warnings

from esbridge.system.runner import *  # noqa: F403

warnings.warn(
    "esbridge.runner is deprecated and will be removed in the next release; "
    "import from esbridge.system.runner instead",
    DeprecationWarning,
    stacklevel=2,
)
