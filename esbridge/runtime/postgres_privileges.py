"""Which Postgres privilege a role lacks, said as the statement that grants it.

Why: Postgres names the object it refused ("permission denied for schema
public", "must be owner of table mirror_events") but not the privilege that
was missing nor the role, and a follower that lacks, say, UPDATE on its
tracking table would learn it only at its first batch, deep in a consumer
thread. :func:`privilege_advice` turns a refusal into the ``GRANT`` (or
``ALTER ... OWNER``) to run; :func:`check_table_privileges` asks Postgres at
start-up (``has_table_privilege``) for every privilege a process will need,
so that a missing one stops it before it consumes anything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from esbridge.errors import ConfigurationError

#: Privileges a follower needs on each of its tables: SELECT and INSERT to
#: record, UPDATE for the single-row tracking upsert, the dead-letter status
#: and the recorder's ``LOCK TABLE ... IN EXCLUSIVE MODE`` of its events table.
FOLLOWER_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE")

_CONNECT = re.compile(r'permission denied for database "?([^"\s]+)"?')
_SCHEMA = re.compile(r'permission denied for schema "?([^"\s]+)"?')
_OWNER = re.compile(r'must be owner of (table|relation|index|sequence) "?([^"\s]+)"?')
_SHARED = re.compile(r'must be owner of (function|type) "?([^"\s]+)"?')
_TABLE = re.compile(r'permission denied for (table|relation) "?([^"\s]+)"?')
_SEQUENCE = re.compile(r'permission denied for sequence "?([^"\s]+)"?')


def quote(name: str) -> str:
    """``name`` as a SQL identifier in an advice (quoted only where it must be)."""
    return (
        name if re.fullmatch(r"[a-z_][a-z0-9_$.]*", name) else '"' + name.replace('"', '""') + '"'
    )


def privilege_advice(
    message: str, role: str | None, table_privileges: str = "SELECT, INSERT, UPDATE"
) -> str | None:
    """The statement that mends the refusal in Postgres's ``message``, or None if it is none.

    ``table_privileges``: what the caller was doing needs on a table it was
    refused (Postgres does not say which privilege was missing).
    """
    who = quote(role) if role else "<role>"
    if match := _CONNECT.search(message):
        return (
            f"role {who} lacks the CONNECT privilege on database {match[1]}: "
            f"GRANT CONNECT ON DATABASE {quote(match[1])} TO {who}"
        )
    if match := _SCHEMA.search(message):
        schema = quote(match[1])
        return (
            f"role {who} may not create tables in schema {match[1]} (CREATE privilege): "
            f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {who}, or create the tables once "
            "with a role that may and set CREATE_TABLE=n for this one"
        )
    if match := _OWNER.search(message):
        table = quote(match[2])
        return (
            f"role {who} does not own {match[1]} {match[2]}, and creating tables at start "
            f"(CREATE_TABLE, default y) requires owning them: ALTER TABLE {table} OWNER TO "
            f"{who}, or set CREATE_TABLE=n for this role (it then needs only "
            f"{', '.join(FOLLOWER_TABLE_PRIVILEGES)} on its tables)"
        )
    if match := _SHARED.search(message):
        return (
            f"role {who} does not own {match[1]} {match[2]}, which the eventsourcing library "
            "creates anew in the schema whenever an application creates its tables "
            "(CREATE_TABLE, default y): create the tables with the role that owns it and set "
            "CREATE_TABLE=n for this role, or give this role its own schema (POSTGRES_SCHEMA)"
        )
    if match := _TABLE.search(message):
        return (
            f"role {who} lacks {table_privileges} on table {match[2]}: "
            f"GRANT {table_privileges} ON TABLE {quote(match[2])} TO {who}"
        )
    if match := _SEQUENCE.search(message):
        return (
            f"role {who} lacks USAGE on sequence {match[1]}: "
            f"GRANT USAGE ON SEQUENCE {quote(match[1])} TO {who}"
        )
    return None


def current_role(datastore: Any) -> str | None:
    """The role the library's ``PostgresDatastore`` connects as (None when it cannot be asked)."""
    try:
        with datastore.transaction(commit=False) as cursor:
            cursor.execute("SELECT current_user AS role")
            return str(cursor.fetchone()["role"])
    except Exception:  # only to word an error message
        return None


def with_advice(
    text: str,
    error: BaseException,
    role: str | None,
    table_privileges: str = "SELECT, INSERT, UPDATE",
) -> str:
    """``text``, followed by :func:`privilege_advice` for ``error`` when it is a refusal."""
    advice = privilege_advice(str(error), role, table_privileges)
    return f"{text}. {advice}" if advice else text


def missing_privileges(cursor: Any, wanted: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """``(table, privilege)`` pairs of ``wanted`` that the current role lacks.

    ``cursor`` gives dict rows (the library's cursors do). ``wanted`` maps
    qualified table names (``schema.table``) to privileges.
    A table's serial column's sequence needs USAGE when INSERT is wanted
    (``bigserial`` ids are drawn from it); it is reported as
    ``(sequence, "USAGE")``. Tables that do not exist are skipped: their
    absence is reported where they are read.
    """
    missing: list[tuple[str, str]] = []
    for table, privileges in wanted.items():
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL AS present", (table,))
        if not cursor.fetchone()["present"]:
            continue
        for privilege in privileges:
            cursor.execute("SELECT has_table_privilege(%s, %s) AS ok", (table, privilege))
            if not cursor.fetchone()["ok"]:
                missing.append((table, privilege))
        if "INSERT" in privileges:
            cursor.execute(
                "SELECT s.relname AS seq, n.nspname AS nsp, "
                "has_sequence_privilege(s.oid, 'USAGE') AS ok "
                "FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
                "JOIN pg_namespace n ON n.oid = s.relnamespace "
                "WHERE d.refobjid = to_regclass(%s) AND d.deptype IN ('a', 'i')",
                (table,),
            )
            for seq in cursor.fetchall():
                if not seq["ok"]:
                    missing.append((f"{seq['nsp']}.{seq['seq']}", "USAGE"))
    return missing


def grant_statements(missing: Sequence[tuple[str, str]], role: str | None) -> list[str]:
    """One ``GRANT`` per object for ``(object, privilege)`` pairs (:func:`missing_privileges`)."""
    who = quote(role) if role else "<role>"
    grouped: dict[tuple[str, str], list[str]] = {}
    for obj, privilege in missing:
        kind = "SEQUENCE" if privilege == "USAGE" else "TABLE"
        grouped.setdefault((kind, obj), []).append(privilege)
    return [
        f"GRANT {', '.join(privileges)} ON {kind} {quote(obj)} TO {who}"
        for (kind, obj), privileges in grouped.items()
    ]


def check_table_privileges(what: str, datastore: Any, wanted: Mapping[str, Sequence[str]]) -> None:
    """Raise :class:`ConfigurationError` listing the GRANTs ``what`` needs and lacks.

    ``datastore`` is the library's ``PostgresDatastore`` the process will use
    (its role, ``current_user``, is the one checked); its cursors give dict rows.
    """
    with datastore.transaction(commit=False) as cursor:
        missing = missing_privileges(cursor, wanted)
    role = current_role(datastore)
    if missing:
        lacks = ", ".join(f"{privilege} on {obj}" for obj, privilege in missing)
        raise ConfigurationError(
            f"{what}: role {quote(role or '<role>')} lacks {lacks}. Run, as the "
            f"tables' owner: {'; '.join(grant_statements(missing, role))}"
        )
