"""`orch-migrate db check`: does the schema hold what its recorded revision says it holds?

A schema step is complete or not started; this is how an operator sees that it is so, and what
to run when it is not (an upgrade interrupted during its concurrent index builds records 0001
while 0002's tables are there; a database edited by hand may miss what 0002 recorded).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, inspect

from prompt_tool.db.dialect import has_added_checks, invalid_indexes
from prompt_tool.db.revisions import (
    BASELINE,
    EXPAND,
    EXPAND_CHECKS,
    EXPAND_COLUMNS,
    EXPAND_INDEXES,
    EXPAND_TABLES,
    LEGACY_TABLES,
    QUARANTINE,
    QUARANTINE_TABLE,
)

__all__ = ["SchemaObjects", "drift", "expand_objects_present"]


@dataclass(frozen=True, slots=True)
class SchemaObjects:
    """Which of revision 0002's objects a database holds, and which of them are broken."""

    present: list[str]
    missing: list[str]
    invalid: list[str]
    legacy_missing: list[str]
    # Revision 0003's one table (the backfill quarantine): whether it is here.
    quarantine: bool = False


def expand_objects_present(connection: Connection) -> SchemaObjects:
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    wanted: list[tuple[str, bool]] = [(f"table {t}", t in tables) for t in EXPAND_TABLES]
    for table, columns in EXPAND_COLUMNS.items():
        have = {c["name"] for c in inspector.get_columns(table)} if table in tables else set()
        wanted += [(f"column {table}.{c}", c in have) for c in columns]
    indexed = {
        index["name"]
        for table in {spec[1] for spec in EXPAND_INDEXES}
        if table in tables
        for index in inspector.get_indexes(table)
    }
    wanted += [(f"index {spec[0]}", spec[0] in indexed) for spec in EXPAND_INDEXES]
    if has_added_checks(connection):
        for name, table in EXPAND_CHECKS:
            checks = (
                {c["name"] for c in inspector.get_check_constraints(table)}
                if table in tables
                else set()
            )
            wanted.append((f"constraint {name}", name in checks))
    broken = invalid_indexes(connection)
    return SchemaObjects(
        present=[name for name, here in wanted if here],
        missing=[name for name, here in wanted if not here],
        invalid=[f"index {spec[0]}" for spec in EXPAND_INDEXES if spec[0] in broken],
        legacy_missing=[t for t in LEGACY_TABLES if t not in tables],
        quarantine=QUARANTINE_TABLE in tables,
    )


def drift(connection: Connection, revision: str | None) -> list[str]:
    """Every difference between ``revision`` and the schema, each with what to run."""
    objects = expand_objects_present(connection)
    problems = []
    if objects.legacy_missing and revision is not None:
        problems.append(
            f"legacy tables missing at {revision}: {', '.join(objects.legacy_missing)}; "
            "restore the database from a backup"
        )
    if revision in (None, BASELINE) and objects.present:
        problems.append(
            f"{len(objects.present)} of 0002's objects are here at {revision or 'no revision'} "
            f"(e.g. {objects.present[0]}): an upgrade was interrupted; run `orch-migrate db "
            "upgrade` to finish it (every step of 0002 tolerates its own leftovers)"
        )
    if revision in (EXPAND, QUARANTINE) and objects.missing:
        problems.append(
            f"{len(objects.missing)} of 0002's objects are missing at {revision} (e.g. "
            f"{objects.missing[0]}); put them back: `orch-migrate db stamp 0001` then "
            "`orch-migrate db upgrade` (it only adds what is missing)"
        )
    if objects.invalid:
        problems.append(
            f"invalid indexes (an interrupted concurrent build): {', '.join(objects.invalid)}; "
            "`orch-migrate db upgrade` drops and rebuilds them"
            + (" (after `orch-migrate db stamp 0001`)" if revision in (EXPAND, QUARANTINE) else "")
        )
    problems += _quarantine_drift(objects, revision)
    return problems


def _quarantine_drift(objects: SchemaObjects, revision: str | None) -> list[str]:
    """Revision 0003's table against the revision recorded."""
    if revision == QUARANTINE and not objects.quarantine:
        return [
            f"table {QUARANTINE_TABLE} is missing at {QUARANTINE}; put it back: `orch-migrate db "
            f"stamp {EXPAND}` then `orch-migrate db upgrade` (it only adds what is missing)"
        ]
    if revision in (None, BASELINE, EXPAND) and objects.quarantine:
        return [
            f"table {QUARANTINE_TABLE} (of {QUARANTINE}) is here at {revision or 'no revision'}: "
            f"an upgrade was interrupted; run `orch-migrate db upgrade` to finish it"
        ]
    return []
