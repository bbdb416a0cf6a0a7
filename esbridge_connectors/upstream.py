"""The upstream application's mapper, without running the application.

Projections and analytics encoders decode stored events exactly as the
upstream application does: its transcodings (``register_transcodings``), and
its compressor and cipher settings. Constructing the application itself
would open its database and maybe create tables; the mapper needs none of
that, so it is built from the same settings with in-memory persistence.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import InfrastructureFactory, JSONTranscoder, Mapper
from eventsourcing.utils import Environment


def application_mapper(
    app_class: type[Application[Any]], env: Mapping[str, str] | None = None
) -> Mapper[Any]:
    """The mapper that application class ``app_class`` would use with settings ``env``.

    Settings are merged as the library merges them (class ``env``, then
    ``os.environ``, then ``env``), so ``CIPHER_KEY``, ``COMPRESSOR_TOPIC`` and
    ``TRANSCODER_TOPIC`` apply, also with the application-name prefix.
    """
    values: dict[str, str] = dict(app_class.env)
    values.update(os.environ)
    values.update(env or {})
    values["PERSISTENCE_MODULE"] = "eventsourcing.popo"
    values.pop(f"{app_class.name.upper()}_PERSISTENCE_MODULE", None)
    factory = InfrastructureFactory.construct(Environment(app_class.name, values))
    transcoder = factory.transcoder()
    if isinstance(transcoder, JSONTranscoder):
        # register_transcodings is an instance method that uses no instance state.
        app_class.register_transcodings(object.__new__(app_class), transcoder)
    return factory.mapper(transcoder=transcoder)
