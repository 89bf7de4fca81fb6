"""Where PostgreSQL and SQLite differ, in one place: hashing in SQL, upserts, advisory locks,
per-transaction timeouts and planner settings, lock-timeout errors, which file a URL names.
Moving many rows at once (export, restore, scratch copies) is :mod:`prompt_tool.db.bulk_io`'s."""

from __future__ import annotations

import getpass
import hashlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, overload

from sqlalchemy import (
    URL,
    Connection,
    Engine,
    any_,
    bindparam,
    cast,
    event,
    func,
    literal,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import Boolean, DateTime, String, Text, TypeEngine

from prompt_tool.errors import DatabaseUnavailableError

__all__ = [
    "BulkInsert",
    "PairLookup",
    "UnsupportedEncodingError",
    "acquire_advisory_lock",
    "allows_worker_processes",
    "comma_joined",
    "comma_joined_array",
    "database_key",
    "dialect_of",
    "has_added_checks",
    "ids_parameter",
    "insert_for",
    "invalid_indexes",
    "is_lock_timeout",
    "is_retryable",
    "is_statement_timeout",
    "lock_holders",
    "one_of",
    "one_of_ids",
    "read_only",
    "register_sqlite_functions",
    "release_advisory_lock",
    "require_utf8_database",
    "set_local_planner",
    "set_local_timeouts",
    "sha256_hex",
    "stale_statistics",
    "text_as_stored",
    "transaction_began",
    "unreadable_text",
    "wal_insert_position",
    "wall_clock",
    "write_refusal",
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


# To the millisecond, as SQLAlchemy stores datetimes there (CURRENT_TIMESTAMP has seconds: a
# batch's rate measured over a few seconds would be off by a whole second).
_SQLITE_NOW_MS = "strftime('%Y-%m-%d %H:%M:%f', 'now')"


@compiles(wall_clock, "sqlite")
def _wall_clock_sqlite(element: wall_clock, compiler: Any, **kw: Any) -> str:
    return _SQLITE_NOW_MS


class transaction_began(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it is
    """SQL: when the transaction began (PostgreSQL's now()); SQLite knows no such time and
    gives the time now, to the millisecond (its batches say how long they held in their
    ledger counts)."""

    type = DateTime(timezone=True)
    inherit_cache = True


@compiles(transaction_began, "postgresql")
def _transaction_began_postgresql(element: transaction_began, compiler: Any, **kw: Any) -> str:
    return "now()"


@compiles(transaction_began, "sqlite")
def _transaction_began_sqlite(element: transaction_began, compiler: Any, **kw: Any) -> str:
    return _SQLITE_NOW_MS


@compiles(sha256_hex, "postgresql")
def _sha256_postgresql(element: sha256_hex, compiler: Any, **kw: Any) -> str:
    argument = compiler.process(element.clauses, **kw)
    return f"encode(sha256(convert_to({argument}, 'UTF8')), 'hex')"


@compiles(sha256_hex, "sqlite")
def _sha256_sqlite(element: sha256_hex, compiler: Any, **kw: Any) -> str:
    # The stored bytes, not decoded text: a text that is not valid UTF-8 (SQLite keeps whatever
    # bytes it was given) gets the digest of its exact bytes instead of failing the statement;
    # valid text digests as PostgreSQL's sha256(convert_to(text, 'UTF8')) does.
    return f"pt_sha256_hex(CAST({compiler.process(element.clauses, **kw)} AS BLOB))"


class unreadable_text(FunctionElement[bool]):  # noqa: N801 - reads like the SQL function it is
    """SQL: whether a text column's stored bytes are not valid UTF-8 (false for NULL).

    Such text (SQLite stores whatever bytes a raw driver gave it, encoded surrogates included)
    cannot be read into Python; callers name and skip those rows and never change their bytes.
    A PostgreSQL database prompt-tool connects to is never ``SQL_ASCII`` (see
    :func:`require_utf8_database`): its text is always valid, and reaches Python as UTF-8.
    """

    type = Boolean()
    inherit_cache = True


@compiles(unreadable_text, "postgresql")
def _unreadable_text_postgresql(element: unreadable_text, compiler: Any, **kw: Any) -> str:
    return "false"


@compiles(unreadable_text, "sqlite")
def _unreadable_text_sqlite(element: unreadable_text, compiler: Any, **kw: Any) -> str:
    return f"pt_not_utf8(CAST({compiler.process(element.clauses, **kw)} AS BLOB))"


def _surrogate_escaping(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


@contextmanager
def text_as_stored(connection: Connection) -> Iterator[None]:
    """Within: text read on ``connection`` whose stored bytes are not valid UTF-8 (SQLite keeps
    whatever bytes it was given) comes back decoded with ``surrogateescape`` instead of failing
    the read; it encodes back to exactly those bytes. No-op on PostgreSQL, whose text is valid."""
    if connection.dialect.name != "sqlite":
        yield
        return
    driver = connection.connection.driver_connection
    assert driver is not None
    previous = driver.text_factory
    driver.text_factory = _surrogate_escaping
    try:
        yield
    finally:
        driver.text_factory = previous


def _sha256_text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    return hashlib.sha256(value).hexdigest()


def _not_utf8(value: bytes | str | None) -> int:
    if not isinstance(value, bytes):
        return 0
    try:
        value.decode("utf-8")  # strict: encoded surrogates (ED A0 80...) are refused too
    except UnicodeDecodeError:
        return 1
    return 0


def register_sqlite_functions(dbapi_connection: Any) -> None:
    """SQLite has no sha256(); give it the same function PostgreSQL computes."""
    dbapi_connection.create_function("pt_sha256_hex", 1, _sha256_text, deterministic=True)
    dbapi_connection.create_function("pt_not_utf8", 1, _not_utf8, deterministic=True)


class UnsupportedEncodingError(DatabaseUnavailableError):
    """A PostgreSQL database whose encoding is not UTF8: refused at connect, nothing read."""


def require_utf8_database(dbapi_connection: Any) -> None:
    """Refuse, in one line, a PostgreSQL database whose encoding is ``SQL_ASCII``.

    ``SQL_ASCII`` stores text as unchecked bytes: psycopg hands such text back as bytes, a text
    may hold anything, and nothing prompt-tool reads, hashes or renders could be trusted with
    it. Any other server encoding is converted to the client's UTF-8 by the server itself and
    always holds valid text. Checked from the server's own report at connect (no query), before
    SQLAlchemy's first query or any command reads.
    """
    encoding = dbapi_connection.info.parameter_status("server_encoding")
    if encoding is None or encoding.upper() != "SQL_ASCII":
        return
    name = dbapi_connection.info.dbname
    dbapi_connection.close()  # the pool never got it: it would be left open otherwise
    raise UnsupportedEncodingError(
        f'database "{name}" uses encoding {encoding}, which stores text as unchecked bytes; '
        "prompt-tool needs a UTF8 database: create one (CREATE DATABASE ... ENCODING 'UTF8' "
        "TEMPLATE template0), move the data into it (text that is not valid UTF-8 must be "
        "fixed first) and point --db at it; nothing was read or written"
    )


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


def set_local_planner(connection: Connection, *, jit: bool, work_mem_mb: int) -> None:
    """Plan this transaction's queries with or without JIT, sorting and hashing in up to
    ``work_mem_mb`` MB of memory each (PostgreSQL; SQLite has no such settings)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL jit = {'on' if jit else 'off'}")
        connection.exec_driver_sql(f"SET LOCAL work_mem = '{int(work_mem_mb)}MB'")


def dialect_of(db: Engine | Connection) -> str:
    """Which kind of database ``db`` is (``postgresql``, ``sqlite``): for manifests and
    messages, and to tell two databases apart; a behaviour that differs asks a function here."""
    return str(db.dialect.name)


def database_key(db: Engine | URL) -> str:
    """One name per database, whatever engine, spelling of its URL or password reaches it: a
    SQLite file by its resolved absolute path (``./a.db`` and a symlink to it are one)."""
    url = (db.url if isinstance(db, Engine) else db).set(password=None)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        url = url.set(database=str(Path(str(url.database)).resolve()))
    return url.render_as_string(hide_password=True)


def _sqlstate(error: BaseException) -> str | None:
    origin = error.orig if isinstance(error, DBAPIError) else error
    return getattr(origin, "sqlstate", None)


def is_lock_timeout(error: BaseException) -> bool:
    return _sqlstate(error) == "55P03"


def is_statement_timeout(error: BaseException) -> bool:
    """A statement cancelled by ``statement_timeout`` (PostgreSQL's query_canceled)."""
    return _sqlstate(error) == "57014"


def wal_insert_position(connection: Connection) -> int | None:
    """Bytes of WAL the server has inserted so far (PostgreSQL): the difference of two readings
    in one transaction is what that transaction wrote, committed or not. None elsewhere, and on
    a standby."""
    if connection.dialect.name != "postgresql":
        return None
    return connection.execute(
        text(
            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL "
            "ELSE pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint END"
        )
    ).scalar()


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
        # Queueing behind another run is what --wait asks for: no timeout cuts it short.
        connection.exec_driver_sql("SET LOCAL lock_timeout = 0")
        connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        return True
    return bool(
        connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
    )


def lock_holders(connection: Connection, tables: Sequence[str]) -> list[str]:
    """Who else holds locks on ``tables`` that stop writes (SHARE and stronger: ``LOCK TABLE``,
    ``CREATE INDEX``, DDL; PostgreSQL; empty on SQLite): one description per
    backend (pid, lock modes, state, how long its transaction has been open, its query), for a
    message that tells the operator which session to look at."""
    if connection.dialect.name != "postgresql":
        return []
    rows = connection.execute(
        text(
            "SELECT a.pid, string_agg(DISTINCT l.mode, ', ') AS modes, a.state,"
            " extract(epoch FROM clock_timestamp() - a.xact_start) AS open_s,"
            " left(regexp_replace(a.query, '\\s+', ' ', 'g'), 60) AS query"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.granted AND l.pid <> pg_backend_pid() AND l.mode IN ('ShareLock',"
            " 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')"
            " AND l.relation = ANY (SELECT c.oid FROM pg_class c"
            "  WHERE c.relname = ANY (CAST(:tables AS text[]))"
            "  AND c.relnamespace IN (SELECT n.oid FROM pg_namespace n"
            "   WHERE n.nspname = ANY (current_schemas(false))))"
            " GROUP BY a.pid, a.state, a.xact_start, a.query ORDER BY a.xact_start"
        ),
        {"tables": list(tables)},
    )
    return [
        f"backend {row.pid}, {row.modes}, {row.state or 'state unknown'}"
        + (f" in a transaction open {float(row.open_s):.0f} s" if row.open_s is not None else "")
        + f": `{row.query}`"
        for row in rows
    ]


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


def stale_statistics(connection: Connection, tables: Sequence[str]) -> list[str]:
    """Those of ``tables`` the planner has no statistics for (never analysed) or whose rows
    changed by more than a fifth since (a bulk load autovacuum has not caught up with):
    PostgreSQL; SQLite plans without them."""
    if connection.dialect.name != "postgresql":
        return []
    rows = connection.execute(
        text(
            "SELECT c.relname FROM pg_class c"
            " JOIN pg_stat_user_tables s ON s.relid = c.oid"
            " WHERE c.relname = ANY (CAST(:tables AS text[]))"
            " AND c.relnamespace IN (SELECT n.oid FROM pg_namespace n"
            "  WHERE n.nspname = ANY (current_schemas(false)))"
            " AND (c.reltuples < 0 OR (s.last_analyze IS NULL AND s.last_autoanalyze IS NULL)"
            "  OR s.n_mod_since_analyze > 1000 + 0.2 * greatest(c.reltuples, 0))"
            " ORDER BY c.relname"
        ),
        {"tables": list(tables)},
    )
    return [str(name) for name in rows.scalars()]


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


# A write the database refuses here, whatever it would write: the user lacks the privilege
# (insufficient_privilege), or the transaction may not write (read_only_sql_transaction: a hot
# standby, default_transaction_read_only, a READ ONLY transaction).
_NO_PRIVILEGE = "42501"
_READ_ONLY_TRANSACTION = "25006"


def write_refusal(error: BaseException) -> str | None:
    """Why a write failed, when it failed because this database may not be written here:
    "no write privilege" (PostgreSQL 42501), "read-only transaction" (25006: a hot standby,
    ``default_transaction_read_only``), "read-only database" (SQLite opened read-only or with
    ``PRAGMA query_only``). None for any other error."""
    state = _sqlstate(error)
    if state == _NO_PRIVILEGE:
        return "no write privilege"
    if state == _READ_ONLY_TRANSACTION:
        return "read-only transaction"
    origin = error.orig if isinstance(error, DBAPIError) else error
    name = str(getattr(origin, "sqlite_errorname", ""))
    if name.startswith("SQLITE_READONLY") or "readonly database" in str(origin):
        return "read-only database"
    return None


def database_user(connection: Connection) -> str:
    """Who the database sees: PostgreSQL's ``current_user``; for SQLite, which has no users,
    the operating-system user (whose file permissions apply)."""
    if connection.dialect.name == "postgresql":
        return str(connection.execute(text("SELECT current_user")).scalar_one())
    return getpass.getuser()


_QUERY_ONLY = "prompt_tool_query_only"


def _pragma(dbapi_connection: Any, statement: str) -> None:
    # On the driver's connection: through the Connection it would begin a transaction there.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(statement)
    finally:
        cursor.close()


def _query_only_on(connection: Connection) -> None:
    pooled = connection.connection
    if not pooled.info.get(_QUERY_ONLY):
        _pragma(pooled, "PRAGMA query_only = ON")
        pooled.info[_QUERY_ONLY] = True


def _query_only_off(dbapi_connection: Any, record: Any) -> None:
    if record.info.pop(_QUERY_ONLY, False):
        _pragma(dbapi_connection, "PRAGMA query_only = OFF")


@overload
def read_only(db: Engine) -> Engine: ...
@overload
def read_only(db: Connection) -> Connection: ...
@overload
def read_only(db: Engine | Connection) -> Engine | Connection: ...
def read_only(db: Engine | Connection) -> Engine | Connection:
    """``db`` for a command that only reads: an Engine sharing ``db``'s connections whose every
    transaction is read-only, so nothing can be written through it, even by mistake.

    PostgreSQL: each transaction begins ``READ ONLY`` (what a hot standby allows). SQLite: each
    connection runs with ``PRAGMA query_only`` until it goes back to the pool. Nothing to clean
    up: disposing of ``db`` is enough. A Connection is returned as it is: it is in its caller's
    transaction, which this cannot change.
    """
    if not isinstance(db, Engine):
        return db
    if db.dialect.name == "postgresql":
        return db.execution_options(postgresql_readonly=True)
    reading = db.execution_options()
    event.listen(reading, "engine_connect", _query_only_on)
    if not event.contains(db.pool, "checkin", _query_only_off):
        event.listen(db.pool, "checkin", _query_only_off)
    return reading


class PairLookup:
    """Many (a, b) keys looked up at once, each key as one index lookup whatever the planner's
    statistics say (a table a bulk write fills from nothing is otherwise planned as empty).

    PostgreSQL: the keys become a table (two comma-joined arrays, unnested: see
    :class:`BulkInsert`) and ``per_key(a, b)``, a scalar subquery, runs once per key; the
    statement is built once. SQLite plans an ``IN`` list as index lookups: ``matching(keys)``
    is the whole query for the keys given. Both give rows (a, b, value). Keys never hold a comma
    nor are NULL.
    """

    def __init__(
        self,
        types: tuple[TypeEngine[Any], TypeEngine[Any]],
        per_key: Callable[[Any, Any], Any],
        matching: Callable[[list[tuple[Any, Any]]], Any],
    ) -> None:
        keys = (
            func.unnest(
                comma_joined_array("keys_a", types[0]), comma_joined_array("keys_b", types[1])
            )
            .table_valued("a", "b")
            .render_derived()
        )
        self._postgresql = select(keys.c.a, keys.c.b, per_key(keys.c.a, keys.c.b))
        self._matching = matching

    def execute(self, connection: Connection, keys: Sequence[tuple[Any, Any]]) -> Sequence[Any]:
        """The rows (a, b, value) of ``keys`` (at least one)."""
        if connection.dialect.name != "postgresql":
            return connection.execute(self._matching(list(keys))).all()
        firsts, seconds = zip(*keys, strict=True)
        return connection.execute(
            self._postgresql, {"keys_a": comma_joined(firsts), "keys_b": comma_joined(seconds)}
        ).all()


def allows_worker_processes(db: Engine | Connection) -> bool:
    """Whether processes of their own can share one run's writes, each claiming its rows with
    ``FOR UPDATE SKIP LOCKED``: PostgreSQL, reached through an Engine. SQLite has one writer at
    a time and no ``SKIP LOCKED``; a caller's Connection is one transaction of one process."""
    return isinstance(db, Engine) and db.dialect.name == "postgresql"
