"""Bulk reading and writing of whole tables, per dialect: what export, restore and
``rehearse --scratch`` share, and the only place in the project that knows how PostgreSQL and
SQLite move many rows (psycopg's binary streaming, SQLite's driver, identity sequences).

Two forms of a row:

* the *portable* form (export and restore): a list of JSON values spelled the same whichever
  database holds the row (see :mod:`prompt_tool.migrate.archive` for the spelling of each
  :class:`ColumnKind`), read as blocks of JSON lines by :meth:`DialectIO.stream_lines`, written
  back with :meth:`DialectIO.binder` and :meth:`DialectIO.insert_sql`;
* the *stored* form (:func:`copy_table`, a copy between two databases of the same kind): each
  value as the database stores it, never interpreted.

Whichever form wrote rows with their ids, :meth:`DialectIO.advance_identity` then moves an
identity sequence past them, and only ever forward: a sequence already past the highest id (ids
handed out, rows deleted since) is left where it is, so no id is ever handed out twice.
"""

from __future__ import annotations

import enum
import itertools
import json
import re
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from psycopg.types.string import ByteaBinaryLoader
from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    column,
    insert,
    literal_column,
    select,
    table,
    text,
    tuple_,
)
from sqlalchemy.sql.expression import ColumnClause, Select

from prompt_tool.db.dialect import text_as_stored
from prompt_tool.errors import InvalidInputError, SchemaError

__all__ = [
    "FLUSH_BYTES",
    "PARALLEL_MIN_BYTES",
    "RANGE_BYTES",
    "RAW",
    "ColumnKind",
    "DialectIO",
    "PostgresIO",
    "SQLiteIO",
    "TableShape",
    "converter",
    "copy_table",
    "dialect_io",
    "kind_of",
    "quoted",
    "update_sql",
]


class ColumnKind(enum.StrEnum):
    INTEGER = "integer"
    TEXT = "text"
    BOOLEAN = "boolean"
    FLOAT = "float"
    TIMESTAMP = "timestamp"
    JSON = "json"


def kind_of(sql_type: Any) -> ColumnKind:
    # Order matters: Text is a String, and the checks go from the most specific.
    for python_type, kind in (
        (JSON, ColumnKind.JSON),
        (Boolean, ColumnKind.BOOLEAN),
        (DateTime, ColumnKind.TIMESTAMP),
        (Float, ColumnKind.FLOAT),
        (Integer, ColumnKind.INTEGER),
        (String, ColumnKind.TEXT),
    ):
        if isinstance(sql_type, python_type):
            return kind
    raise TypeError(f"no export encoding for column type {sql_type!r}")  # a new model type


@dataclass(frozen=True, slots=True)
class TableShape:
    """A table as bulk reads and writes see it: its columns, how each is spelled in the
    portable form, and its primary key (rows are read in its order and fetched by it)."""

    name: str
    columns: tuple[str, ...]
    kinds: tuple[ColumnKind, ...]
    primary_key: tuple[str, ...]

    @property
    def key_positions(self) -> tuple[int, ...]:
        return tuple(self.columns.index(name) for name in self.primary_key)


# --- the portable form: one spelling of each value, whatever the database ---------------------

# SQLite's own spelling of a UTC timestamp (CURRENT_TIMESTAMP and SQLAlchemy's DateTime).
_SQLITE_TIMESTAMP = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2}) ([0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?)"
)
# The same instant in the portable spelling; mapped back to exactly the text above.
_PORTABLE_UTC_TIMESTAMP = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})T([0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?)\+00:00"
)
# {RAW: value}: a value kept verbatim, never parsed (text SQLite holds in a typed column).
RAW: Final = "raw"


def _sqlite_timestamp_to_portable(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str) and (match := _SQLITE_TIMESTAMP.fullmatch(value)):
        return f"{match[1]}T{match[2]}+00:00"
    # Anything else SQLite holds in the column is kept verbatim, marked so it is never parsed.
    return {RAW: value}


def _sqlite_boolean_to_portable(value: Any) -> Any:
    if value is None or value is True or value is False:
        return value
    if type(value) is int and value in (0, 1):
        return value == 1
    return {RAW: value}


def _portable_timestamp_to_sqlite(value: Any) -> Any:
    if isinstance(value, dict):
        return value[RAW]
    if value is None:
        return None
    if match := _PORTABLE_UTC_TIMESTAMP.fullmatch(value):
        return f"{match[1]} {match[2]}"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return value  # 'infinity' and the like: kept as text
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return parsed.strftime("%Y-%m-%d %H:%M:%S.%f")  # SQLAlchemy's own SQLite spelling


def _portable_timestamp_to_postgres(value: Any) -> Any:
    return value[RAW] if isinstance(value, dict) else value


def _portable_float(value: Any) -> Any:
    # PostgreSQL writes NaN and the infinities as strings; float() reads both spellings.
    return None if value is None else float(value)


def _raw_or_value(value: Any) -> Any:
    return value[RAW] if isinstance(value, dict) else value


def _sqlite_text(value: Any) -> Any:
    """Text as SQLite will take it: lone surrogates (bytes that were not UTF-8) as the bytes."""
    if type(value) is not str or value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogatepass")
    return value


def converter(steps: list[tuple[int, Callable[[Any], Any]]]) -> Callable[[Sequence[Any]], Any]:
    """A row (list) with ``function`` applied to the value at each ``position``."""
    if not steps:
        return list

    def convert(row: Sequence[Any]) -> list[Any]:
        values = list(row)
        for position, function in steps:
            values[position] = function(values[position])
        return values

    return convert


def quoted(name: str) -> str:
    """An identifier as SQL spells it. Every name comes from the models or the database's own
    catalog, never from a file."""
    return '"' + name.replace('"', '""') + '"'


def _refuse_unencodable(value: Any) -> Any:
    raise TypeError(f"a {type(value).__name__} value")


def _json_encoder(*, ascii_only: bool) -> Callable[[Any], str]:
    return json.JSONEncoder(
        ensure_ascii=ascii_only,
        separators=(",", ":"),
        allow_nan=True,  # NaN and the infinities as Python writes and reads them
        check_circular=False,
        default=_refuse_unencodable,
    ).encode


# Rows are written as UTF-8, like PostgreSQL's own JSON; a row holding lone surrogates (SQLite
# text that was not UTF-8) is written with \u escapes instead, which keeps the file valid UTF-8.
_encode_json = _json_encoder(ascii_only=False)
_encode_json_ascii = _json_encoder(ascii_only=True)


def _encode_lines(lines: list[str], rows: Sequence[list[Any]]) -> bytes:
    lines.append("")
    try:
        return "\n".join(lines).encode("utf-8")
    except UnicodeEncodeError:
        return "\n".join([*map(_encode_json_ascii, rows), ""]).encode("ascii")


# --- the dialects ---------------------------------------------------------------------------

FLUSH_BYTES = 1 << 20  # write in 1 MiB blocks: few syscalls, bounded memory
# A PostgreSQL table at least this big (with its TOAST) is read in parallel key ranges...
PARALLEL_MIN_BYTES = 32 << 20
# ...of about this much table each: small enough that the few ranges read ahead of the one being
# written stay a few MiB of memory, big enough that a statement per range costs nothing.
RANGE_BYTES = 4 << 20
_SQLITE_ROWS_PER_FETCH = 1_000
_PG_ROWS_PER_CHUNK = 1_000


class DialectIO(Protocol):
    """What export, restore and a scratch copy need from a database, one implementation per
    dialect (:func:`dialect_io`)."""

    name: str
    # Whether text that is not valid UTF-8 can be stored as the same bytes (restore checks).
    stores_any_text_bytes: bool

    def snapshot(self, connection: Connection) -> AbstractContextManager[None]:
        """Every read on ``connection`` inside sees one consistent state of the database."""

    def split(
        self, connection: Connection, spec: TableShape, where: str | None, parts: int
    ) -> list[str] | None:
        """Conditions cutting a big table into key ranges (at least ``parts``, in key order) to
        be read in parallel on :meth:`worker` connections; None: read it in one go."""

    def worker(self, engine: Engine) -> AbstractContextManager[Connection]:
        """Another connection on the same snapshot (only called after :meth:`split` said yes)."""

    def stream_lines(
        self, connection: Connection, spec: TableShape, where: str | None
    ) -> Generator[tuple[bytes, int]]:
        """The table's rows in primary-key order, as blocks of JSON lines and their row counts."""

    def restoring(self, connection: Connection) -> AbstractContextManager[None]:
        """Around a restore, inside its transaction."""

    def fetch_rows(
        self, connection: Connection, spec: TableShape, keys: Sequence[tuple[Any, ...]]
    ) -> list[list[Any]]:
        """The rows with these primary keys, in portable form."""

    def binder(self, spec: TableShape) -> Callable[[Sequence[Any]], list[Any]]:
        """Turn a row in portable form into the parameters this database stores it from."""

    def insert_sql(self, spec: TableShape) -> str:
        """``INSERT`` of one row, parameters ``c0``, ``c1``... in column order."""

    def source_snapshot(self, connection: Connection) -> AbstractContextManager[None]:
        """A consistent view of the database in which nothing can be written, for reading
        rows in stored form (:func:`copy_table`)."""

    def stored_form(self, name: str, columns: Sequence[str]) -> list[Any]:
        """Every column of table ``name`` as the database stores it, to select."""

    def advance_identity(self, connection: Connection, name: str, columns: Sequence[str]) -> None:
        """After rows were inserted into table ``name`` with explicit ids: make later inserts
        get higher ones, moving its sequence only forward (see the module)."""


def _select_list(spec: TableShape) -> list[str]:
    # A json column as its stored text: never parsed and re-encoded.
    return [
        f"CAST({quoted(name)} AS TEXT)" if kind is ColumnKind.JSON else quoted(name)
        for name, kind in zip(spec.columns, spec.kinds, strict=True)
    ]


def _order_by(spec: TableShape) -> str:
    return ", ".join(quoted(name) for name in spec.primary_key)


def _key_filter(spec: TableShape, keys: Sequence[tuple[Any, ...]]) -> Any:
    if len(spec.primary_key) == 1:
        return column(spec.primary_key[0]).in_([key[0] for key in keys])
    return tuple_(*(column(name) for name in spec.primary_key)).in_(keys)


def _insert_sql(spec: TableShape, placeholder: Callable[[int, ColumnKind], str]) -> str:
    names = ", ".join(quoted(name) for name in spec.columns)
    values = ", ".join(placeholder(i, kind) for i, kind in enumerate(spec.kinds))
    return f"INSERT INTO {quoted(spec.name)} ({names}) VALUES ({values})"


def update_sql(spec: TableShape) -> str:
    """``UPDATE`` of every non-key column by primary key, parameters ``c0``.. as for insert."""
    sets = ", ".join(
        f"{quoted(name)} = :c{i}"
        for i, name in enumerate(spec.columns)
        if name not in spec.primary_key
    )
    where = " AND ".join(
        f"{quoted(name)} = :c{spec.columns.index(name)}" for name in spec.primary_key
    )
    return f"UPDATE {quoted(spec.name)} SET {sets} WHERE {where}"


class PostgresIO:
    """PostgreSQL: the server builds each JSON line; Python only joins the lines into blocks.

    Why: per-row work in Python (fetch, convert, ``json.dumps``) runs at about half of COPY's
    throughput. ``json_build_array`` escapes text as JSON requires, spells timestamps in ISO 8601
    (session time zone pinned to UTC) and, fed ``CAST(col AS TEXT)``, embeds a json column's
    exact stored text as a string. Building JSON costs the server about twice what COPY costs, so
    a big table is cut into key ranges read by several backends at once, on one exported snapshot
    (what ``pg_dump --jobs`` does).
    """

    name = "postgresql"
    stores_any_text_bytes = False  # only valid text (SQL_ASCII is refused at connect)

    def __init__(self, *, parallel_min_bytes: int) -> None:
        self.parallel_min_bytes = parallel_min_bytes
        self._snapshot_id: str | None = None

    @staticmethod
    def _begin_read_only(connection: Connection) -> Connection:
        return connection.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )

    @staticmethod
    def _session_settings(connection: Connection) -> None:
        connection.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'")
        connection.exec_driver_sql("SET LOCAL client_encoding TO 'UTF8'")

    @contextmanager
    def snapshot(self, connection: Connection) -> Iterator[None]:
        # What pg_dump does: one REPEATABLE READ, READ ONLY transaction for every table, so a
        # session written mid-export is either wholly in (with its refs) or wholly out.
        self._begin_read_only(connection)
        with connection.begin():
            self._session_settings(connection)
            self._snapshot_id = str(
                connection.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
            )
            try:
                yield
            finally:
                self._snapshot_id = None

    def split(
        self, connection: Connection, spec: TableShape, where: str | None, parts: int
    ) -> list[str] | None:
        # Ranges of the leading key column: a composite key (the references' session_id, role)
        # splits as well as an id, and each range still comes out in key order.
        leading = spec.primary_key[0] if spec.primary_key else None
        if (
            parts < 2
            or leading is None
            or spec.kinds[spec.columns.index(leading)] is not ColumnKind.INTEGER
            or self._snapshot_id is None
        ):
            return None
        size = connection.execute(
            text("SELECT pg_table_size(CAST(:table AS regclass))"), {"table": spec.name}
        ).scalar_one()
        if size is None or int(size) < self.parallel_min_bytes:
            return None
        condition = f" WHERE {where}" if where else ""
        key = quoted(leading)
        low, high = connection.exec_driver_sql(
            f"SELECT min({key}), max({key}) FROM {quoted(spec.name)}{condition}"
        ).one()
        if low is None or high - low < parts:
            return None
        pieces = min(max(parts, -(-int(size) // RANGE_BYTES)), high - low + 1)
        # Identity ids are dense enough that equal id spans are roughly equal work.
        step = -(-(high - low + 1) // pieces)
        bounds = [int(low) + step * k for k in range(1, pieces)]
        ranges = [f"{key} < {bounds[0]}"]
        ranges += [f"{key} >= {a} AND {key} < {b}" for a, b in itertools.pairwise(bounds)]
        ranges.append(f"{key} >= {bounds[-1]}")
        return ranges

    @contextmanager
    def worker(self, engine: Engine) -> Iterator[Connection]:
        snapshot_id = self._snapshot_id
        if snapshot_id is None or not re.fullmatch(r"[0-9A-Fa-f-]+", snapshot_id):
            raise RuntimeError("a worker connection needs the exported snapshot of an export")
        with engine.connect() as connection:
            self._begin_read_only(connection)
            with connection.begin():
                # Must come first in the transaction: from here it sees what the export sees.
                connection.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot_id}'")
                self._session_settings(connection)
                yield connection

    @contextmanager
    def restoring(self, connection: Connection) -> Iterator[None]:
        # Nothing to set: timestamps are compared as instants and bound with their offsets, so
        # the session's time zone (the caller's, when restoring inside its transaction) is moot.
        yield

    def _row_expression(self, spec: TableShape) -> str:
        return f"json_build_array({', '.join(_select_list(spec))})"

    def stream_lines(
        self, connection: Connection, spec: TableShape, where: str | None
    ) -> Generator[tuple[bytes, int]]:
        condition = f" WHERE {where}" if where else ""
        statement = (
            f"SELECT CAST({self._row_expression(spec)} AS TEXT) FROM {quoted(spec.name)}"
            f"{condition} ORDER BY {_order_by(spec)}"
        )
        driver = connection.connection.driver_connection
        assert driver is not None
        # Not COPY: psycopg reads COPY a row per Python call, and CSV output scans every byte
        # again on the server. A plain query streamed in chunks of rows is parsed in C, and in
        # binary form each line arrives as the UTF-8 bytes the server built, never decoded.
        with driver.cursor(binary=True) as cursor:
            cursor.adapters.register_loader("text", ByteaBinaryLoader)
            block: list[bytes] = []
            size = 0
            for (line,) in cursor.stream(statement, size=_PG_ROWS_PER_CHUNK):
                block.append(line)
                size += len(line)
                if size >= FLUSH_BYTES:
                    yield b"\n".join([*block, b""]), len(block)
                    block.clear()
                    size = 0
            if block:
                yield b"\n".join([*block, b""]), len(block)

    def fetch_rows(
        self, connection: Connection, spec: TableShape, keys: Sequence[tuple[Any, ...]]
    ) -> list[list[Any]]:
        query: Select[tuple[Any]] = (
            select(literal_column(f"CAST({self._row_expression(spec)} AS TEXT)"))
            .select_from(table(spec.name))
            .where(_key_filter(spec, keys))
        )
        return [json.loads(line) for line in connection.execute(query).scalars()]

    def binder(self, spec: TableShape) -> Callable[[Sequence[Any]], list[Any]]:
        by_kind: dict[ColumnKind, Callable[[Any], Any]] = {
            ColumnKind.FLOAT: _portable_float,
            ColumnKind.TIMESTAMP: _portable_timestamp_to_postgres,
            ColumnKind.BOOLEAN: _raw_or_value,
        }
        return converter([(i, by_kind[k]) for i, k in enumerate(spec.kinds) if k in by_kind])

    def insert_sql(self, spec: TableShape) -> str:
        # Untyped parameters: PostgreSQL casts each from the column it goes into, so an ISO
        # timestamp string and a json text arrive exactly as written.
        return _insert_sql(spec, lambda i, _kind: f":c{i}")

    @contextmanager
    def source_snapshot(self, connection: Connection) -> Iterator[None]:
        # PostgreSQL itself refuses any write in a READ ONLY transaction.
        with self._begin_read_only(connection).begin():
            yield

    def stored_form(self, name: str, columns: Sequence[str]) -> list[Any]:
        # Its text form: the insert's parameters are untyped, so PostgreSQL parses each text
        # back with the column's own type (timestamps keep their microseconds, json its text).
        return [literal_column(f"CAST({quoted(c)} AS TEXT)").label(c) for c in columns]

    def advance_identity(self, connection: Connection, name: str, columns: Sequence[str]) -> None:
        if "id" not in columns:
            return
        # Only ever forward: a sequence already past max(id) (rows deleted since) stays put.
        connection.execute(
            text(
                "SELECT setval(s.seq, s.top) FROM (SELECT pg_get_serial_sequence(:table, 'id') "
                f"AS seq, (SELECT max(id) FROM {quoted(name)}) AS top) AS s "
                "WHERE s.seq IS NOT NULL AND s.top IS NOT NULL "
                "AND s.top > COALESCE(pg_sequence_last_value(s.seq::regclass), 0)"
            ),
            {"table": quoted(name)},
        )


class SQLiteIO:
    """SQLite: rows are read through the driver and encoded in Python.

    Text that is not valid UTF-8 (SQLite stores whatever bytes it was given) is decoded with
    ``surrogateescape``, so it is carried instead of failing, and written back as the same bytes
    with ``CAST(? AS TEXT)``.
    """

    name = "sqlite"
    stores_any_text_bytes = True

    @staticmethod
    def _begin_in_driver(connection: Connection, statement: str) -> None:
        # pysqlite opens a transaction only before INSERT/UPDATE/DELETE (unless the engine lets
        # SQLAlchemy emit BEGIN, as rehearse's does): open it here, at the start.
        driver = connection.connection.driver_connection
        assert driver is not None
        if not driver.in_transaction:
            connection.exec_driver_sql(statement)

    @contextmanager
    def snapshot(self, connection: Connection) -> Iterator[None]:
        # Without a transaction around them, each table would be read at a different moment; a
        # deferred BEGIN takes SQLite's read lock at the first read and holds it to the end.
        with text_as_stored(connection), connection.begin():
            self._begin_in_driver(connection, "BEGIN")
            yield

    def split(
        self, connection: Connection, spec: TableShape, where: str | None, parts: int
    ) -> list[str] | None:
        # One file, one writer at a time, and reading is never the slow part: no ranges.
        return None

    def worker(self, engine: Engine) -> AbstractContextManager[Connection]:
        raise NotImplementedError("SQLite exports are read on one connection")

    @contextmanager
    def restoring(self, connection: Connection) -> Iterator[None]:
        # The write lock from the start: what is compared is what gets written over.
        self._begin_in_driver(connection, "BEGIN IMMEDIATE")
        with text_as_stored(connection):
            yield

    def _to_portable(self, spec: TableShape) -> Callable[[Sequence[Any]], Any]:
        by_kind: dict[ColumnKind, Callable[[Any], Any]] = {
            ColumnKind.TIMESTAMP: _sqlite_timestamp_to_portable,
            ColumnKind.BOOLEAN: _sqlite_boolean_to_portable,
        }
        return converter([(i, by_kind[k]) for i, k in enumerate(spec.kinds) if k in by_kind])

    def _select(self, spec: TableShape) -> str:
        return f"SELECT {', '.join(_select_list(spec))} FROM {quoted(spec.name)}"

    def stream_lines(
        self, connection: Connection, spec: TableShape, where: str | None
    ) -> Generator[tuple[bytes, int]]:
        condition = f" WHERE {where}" if where else ""
        statement = f"{self._select(spec)}{condition} ORDER BY {_order_by(spec)}"
        to_portable = self._to_portable(spec)
        result = connection.execution_options(
            stream_results=True, yield_per=_SQLITE_ROWS_PER_FETCH
        ).exec_driver_sql(statement)
        for partition in result.partitions():
            rows = [to_portable(row) for row in partition]
            try:
                lines = [_encode_json(row) for row in rows]
            except TypeError as error:
                raise InvalidInputError(
                    f"table {spec.name} holds {error} (a BLOB?) that an export cannot carry; "
                    "fix or remove that value and export again"
                ) from None
            yield _encode_lines(lines, rows), len(rows)

    def fetch_rows(
        self, connection: Connection, spec: TableShape, keys: Sequence[tuple[Any, ...]]
    ) -> list[list[Any]]:
        columns: list[ColumnClause[Any]] = [
            literal_column(expression) for expression in _select_list(spec)
        ]
        query = select(*columns).select_from(table(spec.name)).where(_key_filter(spec, keys))
        to_portable = self._to_portable(spec)
        return [to_portable(row) for row in connection.execute(query)]

    def binder(self, spec: TableShape) -> Callable[[Sequence[Any]], list[Any]]:
        by_kind: dict[ColumnKind, Callable[[Any], Any]] = {
            ColumnKind.FLOAT: _portable_float,
            ColumnKind.TIMESTAMP: _portable_timestamp_to_sqlite,
            ColumnKind.BOOLEAN: _raw_or_value,
            ColumnKind.TEXT: _sqlite_text,
            ColumnKind.JSON: _sqlite_text,
        }
        return converter([(i, by_kind[k]) for i, k in enumerate(spec.kinds) if k in by_kind])

    def insert_sql(self, spec: TableShape) -> str:
        # CAST: text that came as bytes (not valid UTF-8) is stored as TEXT, not as a BLOB.
        return _insert_sql(
            spec,
            lambda i, kind: (
                f"CAST(:c{i} AS TEXT)" if kind in (ColumnKind.TEXT, ColumnKind.JSON) else f":c{i}"
            ),
        )

    @contextmanager
    def source_snapshot(self, connection: Connection) -> Iterator[None]:
        # query_only: SQLite's own refusal of any write, off again before the connection goes
        # back to the pool; BEGIN holds one read lock for every table.
        connection.exec_driver_sql("PRAGMA query_only = ON")
        connection.exec_driver_sql("BEGIN")
        try:
            yield
        finally:
            connection.rollback()
            connection.exec_driver_sql("PRAGMA query_only = OFF")

    def stored_form(self, name: str, columns: Sequence[str]) -> list[Any]:
        return [literal_column(quoted(c)).label(c) for c in columns]

    def advance_identity(self, connection: Connection, name: str, columns: Sequence[str]) -> None:
        # INTEGER PRIMARY KEY hands out max(rowid) + 1: nothing to advance.
        return None


def dialect_io(connection: Connection) -> DialectIO:
    """How bulk reads and writes are done on ``connection``'s database."""
    name = connection.dialect.name
    if name == "postgresql":
        return PostgresIO(parallel_min_bytes=PARALLEL_MIN_BYTES)
    if name == "sqlite":
        return SQLiteIO()
    raise SchemaError(f"export and restore support PostgreSQL and SQLite, not {name}")


def copy_table(
    reader: Connection,
    writer: Connection,
    name: str,
    columns: Sequence[str],
    order: Sequence[str],
    *,
    batch_rows: int = 1_000,
) -> int:
    """Copy every row of table ``name`` (``columns``, read in ``order``) from ``reader`` into
    the same table on ``writer``, a database of the same kind, in stored form, with their ids;
    then advance its identity sequence (only forward). Returns the rows copied.

    ``reader`` should be inside :meth:`DialectIO.source_snapshot`, ``writer`` in a transaction.
    """
    selected = (
        select(*dialect_io(reader).stored_form(name, columns))
        .select_from(table(name))
        .order_by(*(literal_column(quoted(c)) for c in order))
    )
    rows = reader.execute(selected.execution_options(stream_results=True, yield_per=batch_rows))
    statement = insert(table(name, *(column(c) for c in columns)))
    copied = 0
    for batch in rows.partitions():
        writer.execute(statement, [dict(zip(columns, row, strict=True)) for row in batch])
        copied += len(batch)
    dialect_io(writer).advance_identity(writer, name, columns)
    return copied
