"""Binary parameters for the library's insert of stored events (same statement, same values).

``eventsourcing``'s Postgres recorder inserts a batch's stored events with one
statement, ``INSERT ... SELECT ... FROM unnest(%s::stored_event_uuid[])``,
whose one parameter is an array of composite values. psycopg dumps that array
as text unless told otherwise, escaping every field of every row with regular
expressions: about 30 microseconds per event, a fifth of a consumer's CPU time
(``bench/consume.py``). In binary the same array takes about 4 microseconds a
row. Postgres receives the same typed values either way.

:func:`use_binary_stored_events` switches one cursor (the one about to run the
insert) to binary. It leaves the text path alone (returns False) unless every
originator id already has the column's type (``UUID`` objects for a ``uuid``
column, ``str`` for ``text``): in text mode Postgres also accepts, say, a
UUID-shaped ``str`` for a ``uuid`` column, which a binary dumper would refuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import StoredEvent
from psycopg.adapt import PyFormat
from psycopg.types.array import ListBinaryDumper

_ID_TYPES: dict[str, type] = {"uuid": UUID, "text": str}


def use_binary_stored_events(
    recorder: Any, curs: Any, stored_events: Sequence[StoredEvent]
) -> bool:
    """Make ``curs`` send ``recorder``'s stored-event array in binary; True when it did."""
    datastore = recorder.datastore
    python_type = datastore.psycopg_python_types.get(recorder.stored_event_type_name)
    id_type = _ID_TYPES.get(str(datastore.originator_id_type).lower())
    if python_type is None or id_type is None:
        return False
    for stored in stored_events:
        if (
            not isinstance(stored.originator_id, id_type)
            or type(stored.originator_version) is not int
            or type(stored.topic) is not str
            or not isinstance(stored.state, bytes)
        ):
            return False
    adapters = curs.adapters
    try:
        binary = adapters.get_dumper(python_type, PyFormat.BINARY)
    except psycopg.ProgrammingError:  # no binary dumper registered: keep the text path
        return False
    adapters.register_dumper(python_type, binary)
    adapters.register_dumper(list, ListBinaryDumper)
    return True
