"""Constructing eventsourcing applications without leaking what a failed construction opened.

The runner's workers, the status command's read-only applications and
``esbridge dlq`` all construct applications through :func:`construct_or_close`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, TypeVar

from eventsourcing.application import Application

TApplication = TypeVar("TApplication", bound=Application[Any])


def construct_or_close(cls: type[TApplication], env: Mapping[str, str]) -> TApplication:
    """``cls(env=env)``, closing what a construction that failed half-way had opened.

    An application opens its connection pool before it creates its tables; when
    the creation fails (a collision with another process, Postgres going away)
    the half-built application is never returned, so nobody would close that
    pool and its connections would stay open until the garbage collector
    finds it, which may be never while the pool's threads run. Retried
    constructions then pile up connections until Postgres refuses new ones.
    """
    app = cls.__new__(cls)
    try:
        app.__init__(env=dict(env))  # type: ignore[misc]
    except BaseException:
        factory = getattr(app, "factory", None)
        if factory is not None:
            with contextlib.suppress(Exception):
                factory.close()
        raise
    return app
