"""A fingerprint of every legacy table: proof that a schema change left the legacy data alone.

Each value is read as the database's own text form (``CAST(... AS TEXT)``), so the hash covers the
stored bytes: NULL differs from the empty string, CRLF from LF, JSON keeps its spelling. Rows are
streamed in primary-key order, so memory stays flat whatever the table size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import Connection, text

from prompt_tool.db.engine import connect, make_engine
from prompt_tool.db.legacy import LEGACY_COLUMNS
from prompt_tool.db.url import redact
from prompt_tool.errors import InvalidInputError

__all__ = [
    "LegacyFingerprint",
    "TableFingerprint",
    "changed_tables",
    "fingerprint_connection",
    "fingerprint_legacy_tables",
    "fingerprint_table",
    "load_fingerprint",
]

_STREAM_ROWS = 5_000


@dataclass(frozen=True, slots=True)
class TableFingerprint:
    table: str
    rows: int
    sha256: str


@dataclass(frozen=True, slots=True)
class LegacyFingerprint:
    database: str
    tables: list[TableFingerprint]
    # Filled when compared with a saved fingerprint: the tables whose rows differ.
    changed: list[str] | None = None

    def by_table(self) -> dict[str, TableFingerprint]:
        return {entry.table: entry for entry in self.tables}


def fingerprint_table(
    connection: Connection, table: str, *, up_to_id: int | None = None
) -> TableFingerprint:
    """Rows and sha256 of one legacy table (or of its rows with ``id <= up_to_id``)."""
    columns = LEGACY_COLUMNS[table]
    select_list = ", ".join(f'CAST("{column}" AS TEXT)' for column in columns)
    where = "" if up_to_id is None else f' WHERE "{table}"."id" <= :bound'
    # Qualified: a bare "id" would name the text-cast output column and sort as text. The
    # streaming options go on the statement: set on the connection they would stick to it.
    statement = text(f'SELECT {select_list} FROM "{table}"{where} ORDER BY "{table}"."id"')
    result = connection.execute(
        statement.execution_options(stream_results=True, yield_per=_STREAM_ROWS),
        {} if up_to_id is None else {"bound": up_to_id},
    )
    digest = hashlib.sha256()
    rows = 0
    for row in result:
        rows += 1
        # Length-prefixed, so no value can forge a boundary; NULL has its own marker.
        digest.update(
            "".join(
                "\x00N" if value is None else f"\x00{len(value)}:{value}" for value in row
            ).encode("utf-8", "surrogatepass")
        )
        digest.update(b"\x1e")
    return TableFingerprint(table=table, rows=rows, sha256=digest.hexdigest())


def fingerprint_connection(connection: Connection, database: str = "") -> LegacyFingerprint:
    return LegacyFingerprint(
        database=database,
        tables=[fingerprint_table(connection, table) for table in LEGACY_COLUMNS],
    )


def fingerprint_legacy_tables(url: str, against: Path | None = None) -> LegacyFingerprint:
    """Fingerprint every legacy table of the database at ``url``.

    With ``against`` (a saved fingerprint), ``changed`` lists the tables that differ from it.
    """
    saved = load_fingerprint(against) if against is not None else None
    engine = make_engine(url)
    try:
        with connect(engine) as connection:
            current = fingerprint_connection(connection, redact(url))
    finally:
        engine.dispose()
    if saved is None:
        return current
    return replace(current, changed=changed_tables(saved, current))


def load_fingerprint(path: Path) -> LegacyFingerprint:
    """Read a fingerprint saved with ``orch-migrate fingerprint --json``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LegacyFingerprint(
            database=str(data.get("database", "")),
            tables=[
                TableFingerprint(str(t["table"]), int(t["rows"]), str(t["sha256"]))
                for t in data["tables"]
            ],
        )
    except FileNotFoundError:
        raise InvalidInputError(f"no fingerprint file at {path}") from None
    except (ValueError, KeyError, TypeError):
        raise InvalidInputError(
            f"{path} is not a fingerprint; save one with `orch-migrate fingerprint --json > FILE`"
        ) from None


def changed_tables(before: LegacyFingerprint, after: LegacyFingerprint) -> list[str]:
    """The legacy tables whose rows differ between two fingerprints (empty: byte-identical)."""
    old = {t.table: (t.rows, t.sha256) for t in before.tables}
    new = {t.table: (t.rows, t.sha256) for t in after.tables}
    return [table for table in LEGACY_COLUMNS if old.get(table) != new.get(table)]
