"""A fingerprint of every legacy table: proof that a schema change left the legacy data alone.

Each value is read as the database's own text form (``CAST(... AS TEXT)``), so the hash covers the
stored bytes: NULL differs from the empty string, CRLF from LF, JSON keeps its spelling. Rows are
streamed in primary-key order, so memory stays flat whatever the table size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import Connection, text

from prompt_tool.db.engine import make_engine
from prompt_tool.db.legacy import LEGACY_COLUMNS
from prompt_tool.db.url import redact

__all__ = [
    "LegacyFingerprint",
    "TableFingerprint",
    "changed_tables",
    "fingerprint_connection",
    "fingerprint_legacy_tables",
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

    def by_table(self) -> dict[str, TableFingerprint]:
        return {entry.table: entry for entry in self.tables}


def _fingerprint_table(connection: Connection, table: str) -> TableFingerprint:
    columns = LEGACY_COLUMNS[table]
    select_list = ", ".join(f'CAST("{column}" AS TEXT)' for column in columns)
    result = connection.execution_options(stream_results=True, yield_per=_STREAM_ROWS).execute(
        text(f'SELECT {select_list} FROM "{table}" ORDER BY "id"')
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
        tables=[_fingerprint_table(connection, table) for table in LEGACY_COLUMNS],
    )


def fingerprint_legacy_tables(url: str) -> LegacyFingerprint:
    """Fingerprint every legacy table of the database at ``url``."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return fingerprint_connection(connection, redact(url))
    finally:
        engine.dispose()


def changed_tables(before: LegacyFingerprint, after: LegacyFingerprint) -> list[str]:
    """The legacy tables whose rows differ between two fingerprints (empty: byte-identical)."""
    old, new = before.by_table(), after.by_table()
    return [table for table in LEGACY_COLUMNS if old.get(table) != new.get(table)]
