"""A fingerprint of every legacy table: proof that a schema change left the legacy data alone.

Each value is read as the database's own text form (``CAST(... AS TEXT)``), so the hash covers the
stored bytes: NULL differs from the empty string, CRLF from LF, JSON keeps its spelling. Rows are
streamed in primary-key order, so memory stays flat whatever the table size.

Each table's fingerprint also records its highest id then (``max_id``). Compared with a saved
fingerprint (``orch-migrate fingerprint --against FILE``), the rows that existed then (``id <=
max_id``) must be byte-identical, and rows added since are counted, not held against the
database: sessions created through templates stay behind a downgrade as ordinary legacy rows.
The rows then and the whole table now come from one pass over the table (one statement, so one
consistent view). A file saved before ``max_id`` was recorded compares whole tables.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, inspect, text

from prompt_tool.db.dialect import text_as_stored
from prompt_tool.db.engine import connect, make_engine
from prompt_tool.db.legacy import LEGACY_COLUMNS
from prompt_tool.db.url import redact
from prompt_tool.errors import InvalidInputError

__all__ = [
    "LegacyFingerprint",
    "TableComparison",
    "TableFingerprint",
    "changed_tables",
    "compare_table",
    "fingerprint_connection",
    "fingerprint_legacy_tables",
    "fingerprint_rows",
    "fingerprint_table",
    "load_fingerprint",
]

_STREAM_ROWS = 5_000


@dataclass(frozen=True, slots=True)
class TableFingerprint:
    table: str
    rows: int
    sha256: str
    # The highest id among the rows hashed (0: none). None: read from a file saved before it
    # was recorded, or a table without a single integer key.
    max_id: int | None = None


@dataclass(frozen=True, slots=True)
class TableComparison:
    """One table now against its saved fingerprint."""

    table: str
    now: TableFingerprint
    # The rows that existed when the saved one was taken (id <= its max_id), as they are now;
    # None when the saved fingerprint has no max_id (the whole table is compared).
    then: TableFingerprint | None
    # Rows that existed then changed or vanished (or, compared whole, the table differs).
    changed: bool
    # Rows added since (id above the saved max_id); None when compared whole.
    added: int | None


@dataclass(frozen=True, slots=True)
class LegacyFingerprint:
    database: str
    tables: list[TableFingerprint]
    # Filled when compared with a saved fingerprint: the tables whose rows that existed then
    # differ (changed or vanished), ...
    changed: list[str] | None = None
    # ... and per table, the rows added since (tables the saved file gives a max_id for).
    added: dict[str, int] | None = None

    def by_table(self) -> dict[str, TableFingerprint]:
        return {entry.table: entry for entry in self.tables}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Digest:
    """Rows hashed in order; length-prefixed values, so no value can forge a boundary."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.rows = 0
        self.max_id = 0

    def add(self, values: Sequence[Any], row_id: int | None) -> None:
        self.rows += 1
        # NULL has its own marker.
        self.hash.update(
            "".join(
                "\x00N" if value is None else f"\x00{len(value)}:{value}" for value in values
            ).encode("utf-8", "surrogatepass")
        )
        self.hash.update(b"\x1e")
        if row_id is not None:
            self.max_id = max(self.max_id, row_id)

    def copy(self) -> _Digest:
        twin = _Digest()
        twin.hash, twin.rows, twin.max_id = self.hash.copy(), self.rows, self.max_id
        return twin

    def result(self, table: str, *, with_id: bool) -> TableFingerprint:
        return TableFingerprint(
            table, self.rows, self.hash.hexdigest(), self.max_id if with_id else None
        )


def _stream(  # noqa: PLR0913 - a SELECT's parts, the optional ones keyword-only
    connection: Connection,
    table: str,
    columns: Sequence[str],
    order: Sequence[str],
    *,
    where: Iterable[str] = (),
    params: dict[str, Any] | None = None,
    with_id: bool,
) -> Iterator[Any]:
    """The rows of ``table`` in ``order``: each column's text form, then the raw id if asked."""
    quoted = _quote(table)
    select_list = [f"CAST({_quote(column)} AS TEXT)" for column in columns]
    if with_id:
        select_list.append(f"{quoted}.{_quote('id')}")
    conditions = [f"({condition})" for condition in where]
    clause = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    # Qualified: a bare "id" would name the text-cast output column and sort as text. The
    # streaming options go on the statement: set on the connection they would stick to it.
    ordering = ", ".join(f"{quoted}.{_quote(column)}" for column in order)
    statement = text(f"SELECT {', '.join(select_list)} FROM {quoted}{clause} ORDER BY {ordering}")
    # Text that is not valid UTF-8 (SQLite) is hashed as the bytes it is, not a failed read.
    with text_as_stored(connection):
        yield from connection.execute(
            statement.execution_options(stream_results=True, yield_per=_STREAM_ROWS),
            params or {},
        )


def fingerprint_table(
    connection: Connection,
    table: str,
    *,
    up_to_id: int | None = None,
    where: str | None = None,
) -> TableFingerprint:
    """Rows, sha256 and highest id of one legacy table (or of its rows with ``id <= up_to_id``,
    or meeting ``where``, an SQL condition on the table's columns written by the caller)."""
    conditions = [] if where is None else [where]
    if up_to_id is not None:
        conditions.append(f"{_quote(table)}.{_quote('id')} <= :bound")
    digest = _Digest()
    for row in _stream(
        connection,
        table,
        LEGACY_COLUMNS[table],
        ["id"],
        where=conditions,
        params=None if up_to_id is None else {"bound": up_to_id},
        with_id=True,
    ):
        digest.add(row[:-1], int(row[-1]))
    return digest.result(table, with_id=True)


def compare_table(
    connection: Connection, saved: TableFingerprint, *, where: str | None = None
) -> TableComparison:
    """One legacy table now against ``saved``, in one pass over it.

    With the saved ``max_id``: the rows with ``id <= max_id`` must hash as ``saved`` did, and
    the rows above it are counted as added. Without it: the whole table is compared.
    """
    table = saved.table
    bound = saved.max_id
    digest = _Digest()
    then: _Digest | None = None
    for row in _stream(
        connection,
        table,
        LEGACY_COLUMNS[table],
        ["id"],
        where=[] if where is None else [where],
        with_id=True,
    ):
        row_id = int(row[-1])
        if bound is not None and then is None and row_id > bound:
            then = digest.copy()  # ids ascend: every row from here on was added since
        digest.add(row[:-1], row_id)
    now = digest.result(table, with_id=True)
    if bound is None:
        return TableComparison(
            table, now, None, (now.rows, now.sha256) != (saved.rows, saved.sha256), None
        )
    earlier = (then or digest).result(table, with_id=True)
    return TableComparison(
        table,
        now,
        earlier,
        (earlier.rows, earlier.sha256) != (saved.rows, saved.sha256),
        now.rows - earlier.rows,
    )


def fingerprint_rows(
    connection: Connection, table: str, *, where: str | None = None
) -> TableFingerprint:
    """Rows and sha256 of any table, every column, in primary-key order (or the rows meeting
    ``where``); ``max_id`` when its key is a single ``id``."""
    inspector = inspect(connection)
    columns = [column["name"] for column in inspector.get_columns(table)]
    key = list(inspector.get_pk_constraint(table).get("constrained_columns") or []) or columns
    with_id = key == ["id"]
    digest = _Digest()
    for row in _stream(
        connection, table, columns, key, where=[] if where is None else [where], with_id=with_id
    ):
        digest.add(row[:-1] if with_id else row, int(row[-1]) if with_id else None)
    return digest.result(table, with_id=with_id)


def fingerprint_connection(connection: Connection, database: str = "") -> LegacyFingerprint:
    return LegacyFingerprint(
        database=database,
        tables=[fingerprint_table(connection, table) for table in LEGACY_COLUMNS],
    )


def fingerprint_legacy_tables(url: str, against: Path | None = None) -> LegacyFingerprint:
    """Fingerprint every legacy table of the database at ``url``.

    With ``against`` (a saved fingerprint), ``changed`` lists the tables whose rows that existed
    then differ from it (changed or vanished; compared whole when the file has no ``max_id``),
    and ``added`` counts per table the rows added since.
    """
    saved = load_fingerprint(against) if against is not None else None
    engine = make_engine(url)
    try:
        with connect(engine) as connection:
            if saved is None:
                return fingerprint_connection(connection, redact(url))
            before = saved.by_table()
            tables: list[TableFingerprint] = []
            changed: list[str] = []
            added: dict[str, int] = {}
            for table in LEGACY_COLUMNS:
                if table not in before:
                    tables.append(fingerprint_table(connection, table))
                    changed.append(table)
                    continue
                comparison = compare_table(connection, before[table])
                tables.append(comparison.now)
                if comparison.changed:
                    changed.append(table)
                if comparison.added is not None:
                    added[table] = comparison.added
    finally:
        engine.dispose()
    return replace(
        LegacyFingerprint(database=redact(url), tables=tables), changed=changed, added=added
    )


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


def load_fingerprint(path: Path) -> LegacyFingerprint:
    """Read a fingerprint saved with ``orch-migrate fingerprint --json`` (with or without each
    table's ``max_id``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LegacyFingerprint(
            database=str(data.get("database", "")),
            tables=[
                TableFingerprint(
                    str(t["table"]),
                    int(t["rows"]),
                    str(t["sha256"]),
                    _optional_int(t.get("max_id")),
                )
                for t in data["tables"]
            ],
        )
    except FileNotFoundError:
        raise InvalidInputError(f"no fingerprint file at {path}") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{path} is a directory, not a fingerprint file") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidInputError(
            f"{path} is not a fingerprint; save one with `orch-migrate fingerprint --json > FILE`"
        ) from None


def changed_tables(before: LegacyFingerprint, after: LegacyFingerprint) -> list[str]:
    """The legacy tables whose rows differ between two fingerprints (empty: byte-identical)."""
    old = {t.table: (t.rows, t.sha256) for t in before.tables}
    new = {t.table: (t.rows, t.sha256) for t in after.tables}
    return [table for table in LEGACY_COLUMNS if old.get(table) != new.get(table)]
