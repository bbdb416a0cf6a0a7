"""What an import path given by the user names, said plainly when it is not what a command needs.

Why: ``esbridge consume pkg.mod:Invoice``, with ``Invoice`` an aggregate of
the application rather than the application, ended in a ``TypeError`` from
deep inside the library, and a ``System`` named where an application was
expected failed as obscurely. Every command that imports an application class
or a system by path checks what it got here, and the error says what the path
names and what to give instead.
"""

from __future__ import annotations

import inspect
from typing import Any

from eventsourcing.application import Application
from eventsourcing.domain import BaseAggregate
from eventsourcing.system import System

from esbridge.errors import ConfigurationError


def kind_of(obj: object) -> str:
    """What ``obj`` is, for an error message: "an aggregate", "a System", "a module", ..."""
    if inspect.isclass(obj):
        if issubclass(obj, Application):
            return "an application class"
        if issubclass(obj, BaseAggregate):
            return "an aggregate"
        return f"a class ({obj.__module__}.{obj.__qualname__})"
    if isinstance(obj, System):
        return "a System"
    if isinstance(obj, Application):
        return "an application object"
    if inspect.ismodule(obj):
        return "a module"
    if callable(obj):
        return "a function"
    return f"a {type(obj).__name__}"


def application_class(obj: Any, path: str) -> type[Application[Any]]:
    """``obj``, imported from ``path``, when it is an ``Application`` subclass.

    Raises :class:`ConfigurationError` saying what ``path`` names instead
    ("pkg.mod:Invoice is an aggregate, not an application: name the
    Application subclass").
    """
    if inspect.isclass(obj) and issubclass(obj, Application):
        return obj
    raise ConfigurationError(
        f"{path} is {kind_of(obj)}, not an application: name the Application subclass "
        "(package.module:Class)"
    )
