"""Where PostgreSQL and SQLite differ, in one place: hashing in SQL, upserts, advisory locks,
per-transaction timeouts, lock-timeout errors."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, any_, bindparam, cast, func, literal, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import DateTime, String, Text, TypeEngine

__all__ = [
    "BulkInsert",
    "acquire_advisory_lock",
    "comma_joined",
    "comma_joined_array",
    "has_added_checks",
    "ids_parameter",
    "insert_for",
    "invalid_indexes",
    "is_lock_timeout",
    "is_retryable",
    "one_of",
    "one_of_ids",
    "register_sqlite_functions",
    "release_advisory_lock",
    "set_local_timeouts",
    "sha256_hex",
    "wall_clock",
]


class sha256_hex(FunctionElement[str]):  # noqa: N801 - reads like the SQL function it is
    """SQL: the sha256 hex digest of a text's UTF-8 bytes (equal to ``core.content_hash``)."""

    type = String()
    inherit_cache = True


class wall_clock(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it is
    """SQL: the time now, not when the transaction began (PostgreSQL's now() is the latter).

    A batch records ``started_at`` (transaction start) and ``finished_at`` (this), so the
    difference is how long the batch held its locks, measured by the database itself.
    """

    type = DateTime(timezone=True)
    inherit_cache = True


@compiles(wall_clock, "postgresql")
def _wall_clock_postgresql(element: wall_clock, compiler: Any, **kw: Any) -> str:
    return "clock_timestamp()"


@compiles(wall_clock, "sqlite")
def _wall_clock_sqlite(element: wall_clock, compiler: Any, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(sha256_hex, "postgresql")
def _sha256_postgresql(element: sha256_hex, compiler: Any, **kw: Any) -> str:
    argument = compiler.process(element.clauses, **kw)
    return f"encode(sha256(convert_to({argument}, 'UTF8')), 'hex')"


@compiles(sha256_hex, "sqlite")
def _sha256_sqlite(element: sha256_hex, compiler: Any, **kw: Any) -> str:
    return f"pt_sha256_hex({compiler.process(element.clauses, **kw)})"


def _sha256_text(value: str | None) -> str | None:
    if value is None:
        return None
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def register_sqlite_functions(dbapi_connection: Any) -> None:
    """SQLite has no sha256(); give it the same function PostgreSQL computes."""
    dbapi_connection.create_function("pt_sha256_hex", 1, _sha256_text, deterministic=True)


def comma_joined_array(
    name: str | None, type_: TypeEngine[Any], values: Iterable[Any] | None = None
) -> Any:
    """PostgreSQL: the array bound as ``name``, sent as one comma-joined string (see
    :class:`BulkInsert` for why); bind it with :func:`comma_joined`, or give its ``values``
    now (``name`` None: an anonymous parameter)."""
    value = None if values is None else comma_joined(values)
    split = func.string_to_array(bindparam(name, value, type_=Text()), literal(","))
    return cast(split, postgresql.ARRAY(type_))


def comma_joined(values: Iterable[Any]) -> str:
    """Values that never hold a comma nor are NULL (integers, hex digests, keywords), joined."""
    return ",".join(map(str, values))


class BulkInsert:
    """One INSERT of many rows given as Python tuples, in the fastest form of each dialect.

    PostgreSQL: ``INSERT ... SELECT ... FROM unnest(:a, :b, ...)``, one bound array per
    column: one statement of a few parameters, built and parsed once, whatever the row count
    (a multi-row ``VALUES`` is compiled, and parsed by psycopg, anew for each row count).
    SQLite has no arrays: an executemany of the same INSERT, in-process, with no round trips.
    ``constants`` fill the other columns; ``finish`` adds ``ON CONFLICT``/``RETURNING`` to both.

    Columns named in ``commaless`` (integers, hex digests, keywords: never NULL, never a comma)
    travel to PostgreSQL as one comma-joined string split by ``string_to_array``: psycopg
    escapes each element of a text array in Python, which cost more than the INSERT itself.
    """

    def __init__(
        self,
        table: Any,
        columns: Sequence[tuple[str, TypeEngine[Any]]],
        constants: Mapping[str, Any] | None = None,
        finish: Callable[[Any], Any] = lambda statement: statement,
        commaless: Collection[str] = (),
    ) -> None:
        constants = dict(constants or {})
        self.names = tuple(name for name, _ in columns)
        self._joined = frozenset(commaless)

        def array(name: str, type_: TypeEngine[Any]) -> Any:
            if name in self._joined:
                return comma_joined_array(name, type_)
            return bindparam(name, type_=postgresql.ARRAY(type_))

        arrays = (
            func.unnest(*(array(name, type_) for name, type_ in columns))
            .table_valued(*self.names)
            .render_derived()
        )
        filled = [literal(value, type_=table.c[name].type) for name, value in constants.items()]
        self._postgresql = finish(
            postgresql.insert(table).from_select(
                [*self.names, *constants], select(*arrays.c, *filled)
            )
        )
        self._sqlite = finish(
            sqlite.insert(table).values(
                {**{name: bindparam(name) for name in self.names}, **constants}
            )
        )

    def execute(self, connection: Connection, rows: Sequence[Sequence[Any]]) -> Any:
        """Insert ``rows`` (tuples in the order of ``columns``); the cursor result."""
        if connection.dialect.name == "postgresql":
            columns = list(zip(*rows, strict=True)) if rows else [()] * len(self.names)
            return connection.execute(
                self._postgresql,
                {
                    name: comma_joined(values) if name in self._joined else list(values)
                    for name, values in zip(self.names, columns, strict=True)
                },
            )
        return connection.execute(
            self._sqlite, [dict(zip(self.names, row, strict=True)) for row in rows]
        )


def insert_for(connection: Connection, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that knows ``ON CONFLICT`` on this connection's dialect."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def one_of(
    connection: Connection,
    column: ColumnElement[Any] | QueryableAttribute[Any],
    values: Sequence[Any],
) -> ColumnElement[bool]:
    """``column IN values`` for a batch of keys, in the form this dialect handles fastest.

    PostgreSQL gets ``column = ANY(:array)``: one bound array instead of one bound parameter
    per value, which for 1,000 keys is a third of the time of ``IN (...)`` (SQLAlchemy and
    psycopg process each parameter in Python; the server plans the same index scan). SQLite
    has no arrays and keeps ``IN``.
    """
    element = column.expression if isinstance(column, QueryableAttribute) else column
    if connection.dialect.name != "postgresql":
        return element.in_(values)
    if all(type(value) is int for value in values):
        # Integer keys as one comma-joined string: psycopg dumps a list element by element in
        # Python, 1.6 ms of a 1,000-key lookup; the server splits the string in microseconds.
        return element == any_(comma_joined_array(None, element.type, values))
    return element == any_(bindparam(None, list(values), type_=postgresql.ARRAY(element.type)))


def one_of_ids(
    dialect: str, column: ColumnElement[Any] | QueryableAttribute[Any], name: str
) -> ColumnElement[bool]:
    """:func:`one_of` for integer keys bound later as ``name`` (with :func:`ids_parameter`),
    for a statement built once and executed for every batch: SQLAlchemy then neither builds
    it nor computes its cache key again, a millisecond per execution of a small select."""
    element = column.expression if isinstance(column, QueryableAttribute) else column
    if dialect != "postgresql":
        return element.in_(bindparam(name, expanding=True))
    return element == any_(comma_joined_array(name, element.type))


def ids_parameter(dialect: str, ids: Sequence[int]) -> Any:
    """The value of a :func:`one_of_ids` parameter."""
    return comma_joined(ids) if dialect == "postgresql" else list(ids)


def set_local_timeouts(
    connection: Connection, lock_timeout_ms: int, statement_timeout_ms: int
) -> None:
    """Bound this transaction's lock waits and statements (PostgreSQL; SQLite has one writer)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}")


def _sqlstate(error: BaseException) -> str | None:
    origin = error.orig if isinstance(error, DBAPIError) else error
    return getattr(origin, "sqlstate", None)


def is_lock_timeout(error: BaseException) -> bool:
    return _sqlstate(error) == "55P03"


def is_retryable(error: BaseException) -> bool:
    """Lock timeouts, serialization failures and deadlocks: worth a retry after a pause.

    SQLite's "database is locked" (another writer) is retryable too.
    """
    if _sqlstate(error) in {"55P03", "40001", "40P01"}:
        return True
    return isinstance(error, DBAPIError) and "database is locked" in str(error.orig)


def acquire_advisory_lock(connection: Connection, key: int, *, wait: bool) -> bool:
    """Take a session-level advisory lock on PostgreSQL; SQLite (one writer) always succeeds."""
    if connection.dialect.name != "postgresql":
        return True
    if wait:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        return True
    return bool(
        connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
    )


def release_advisory_lock(connection: Connection, key: int) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})


def refresh_statistics(connection: Connection, tables: Sequence[str]) -> bool:
    """``ANALYZE`` tables a bulk write just filled, so the next queries are planned for their
    real size (autovacuum gets there too, a minute or more later). Best effort: without the
    privilege it is skipped (False), and the caller's work stands."""
    try:
        with connection.begin_nested():
            for table in tables:
                connection.exec_driver_sql(f'ANALYZE "{table}"')
    except DBAPIError:
        return False
    return True


def invalid_indexes(connection: Connection) -> set[str]:
    """Indexes left INVALID by an interrupted ``CREATE INDEX CONCURRENTLY`` (PostgreSQL only)."""
    if connection.dialect.name != "postgresql":
        return set()
    rows = connection.execute(
        text(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE NOT i.indisvalid AND n.nspname = current_schema()"
        )
    )
    return {str(row[0]) for row in rows}


def has_added_checks(connection: Connection) -> bool:
    """Whether CHECK constraints are added to existing tables here (SQLite cannot without a
    table rebuild, so the migrations add them on PostgreSQL only)."""
    return connection.dialect.name == "postgresql"


def backend_pid(connection: Connection) -> int | None:
    """The server process serving ``connection`` (PostgreSQL's ``pg_backend_pid()``); None on
    SQLite, which runs in the calling process."""
    if connection.dialect.name != "postgresql":
        return None
    return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def backends_alive(connection: Connection, pids: Collection[int]) -> set[int] | None:
    """Which of ``pids`` (from :func:`backend_pid`) are still connected; None on SQLite."""
    if connection.dialect.name != "postgresql":
        return None
    if not pids:
        return set()
    rows = connection.execute(
        text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids)"), {"pids": list(pids)}
    )
    return {int(row[0]) for row in rows}
