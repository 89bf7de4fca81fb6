"""Engines and sessions: one way to connect, with the per-dialect setup done once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from prompt_tool.db.dialect import register_sqlite_functions, require_utf8_database
from prompt_tool.db.url import normalize_url, redact
from prompt_tool.errors import DatabaseUnavailableError

__all__ = [
    "Connectable",
    "begin",
    "bounded_waits",
    "check_connection",
    "connect",
    "connected",
    "make_engine",
    "make_session_factory",
    "on_every_begin",
    "session_scope",
    "transactional_ddl",
]

# Library functions take either: an Engine (each unit of work in its own transaction), or a
# Connection already inside the caller's transaction (each unit of work becomes a savepoint),
# which is how `orch-migrate rehearse --rollback` runs everything in one transaction.
Connectable = Engine | Connection


def _prepare_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # Readers keep going while a backfill batch writes.
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
    register_sqlite_functions(dbapi_connection)


def _prepare_postgresql(dbapi_connection: Any, _record: Any) -> None:
    require_utf8_database(dbapi_connection)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``: psycopg 3 for PostgreSQL, foreign keys on for SQLite."""
    parsed = normalize_url(url)
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _prepare_sqlite)
    elif parsed.get_backend_name() == "postgresql":
        # First, before SQLAlchemy's own first queries: a SQL_ASCII database is refused in one
        # line instead of failing later, somewhere, on text psycopg hands back as bytes.
        event.listen(engine, "connect", _prepare_postgresql, insert=True)
    return engine


@contextmanager
def connected(db: Engine | str) -> Iterator[Engine]:
    """``db`` as an Engine: an Engine as it is (never disposed here), or a URL's engine made for
    the block and disposed after it, whatever the block raised."""
    if isinstance(db, Engine):
        yield db
        return
    engine = make_engine(db)
    try:
        yield engine
    finally:
        engine.dispose()


def transactional_ddl(engine: Engine) -> Engine:
    """Let SQLAlchemy, not pysqlite, open SQLite transactions, so DDL commits or rolls back with
    the rest (a schema step, a rolled-back rehearsal). No-op on PostgreSQL.

    pysqlite only opens a transaction before INSERT/UPDATE/DELETE, so a CREATE, DROP or ALTER
    that comes first is committed on its own (a killed downgrade left 0002 recorded with its
    tables gone); with its handling off and BEGIN emitted here, every statement is inside the
    transaction (and SAVEPOINT works).
    """
    if engine.dialect.name != "sqlite":
        return engine

    @event.listens_for(engine, "connect")
    def _driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


def check_connection(engine: Engine) -> None:
    """Raise :class:`DatabaseUnavailableError` with the reason if ``engine`` can't connect."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        if engine.dialect.name == "sqlite":
            database = engine.url.database or ""
            where = str(Path(database).resolve()) if database else "an in-memory database"
            raise DatabaseUnavailableError(
                f"cannot open the SQLite database {where}: {reason}; check that the path given "
                "with --db or PROMPT_TOOL_DATABASE_URL is right, that its directory exists, and "
                "that the file is a SQLite database you may read and write"
            ) from None
        raise DatabaseUnavailableError(
            f"cannot connect to {redact(engine.url)}: {reason}; check the URL given with --db "
            "or PROMPT_TOOL_DATABASE_URL and that the server is running"
        ) from None


def bounded_waits(db: Connectable, lock_timeout_ms: int, statement_timeout_ms: int) -> Connectable:
    """``db`` with every transaction it begins bounded in its lock waits and statements
    (PostgreSQL ``SET LOCAL lock_timeout`` / ``statement_timeout``; SQLite has one writer and
    its busy timeout). A run's very first query then gives up on a lock held since before it
    started, as its batches do, instead of waiting without a word. The engine is a copy sharing
    the pool: the application's own connections are untouched. A caller's Connection is inside
    the caller's transaction: the bounds are set on it, for the rest of that transaction."""
    if db.dialect.name != "postgresql":
        return db

    def bound(connection: Connection) -> None:
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}")

    if isinstance(db, Connection):
        bound(db)
        return db
    return on_every_begin(db, bound)


_ROOT = "_prompt_tool_root"
_SETUPS = "_prompt_tool_begin_setups"


def on_every_begin(db: Engine, setup: Callable[[Connection], None]) -> Engine:
    """A copy of ``db`` sharing its pool whose every transaction starts with ``setup`` (after
    those ``db`` already runs, when it is such a copy itself).

    One listener on one copy of the root engine: SQLAlchemy before 2.0.37 takes no event
    listener on a copy of a copy, so copies compose here instead of nesting."""
    root: Engine = getattr(db, _ROOT, db)
    setups: tuple[Callable[[Connection], None], ...] = (*getattr(db, _SETUPS, ()), setup)

    def run_all(connection: Connection) -> None:
        for each in setups:
            each(connection)

    copy = root.execution_options()
    event.listen(copy, "begin", run_all)
    setattr(copy, _ROOT, root)
    setattr(copy, _SETUPS, setups)
    return copy


def make_session_factory(db: Connectable) -> sessionmaker[Session]:
    return sessionmaker(db, expire_on_commit=False, join_transaction_mode="create_savepoint")


@contextmanager
def connect(db: Connectable) -> Iterator[Connection]:
    """A connection for reading: a new one from an Engine, or the caller's own."""
    if isinstance(db, Connection):
        yield db
        return
    with db.connect() as connection:
        yield connection


@contextmanager
def begin(db: Connectable) -> Iterator[Connection]:
    """One unit of work: a transaction on an Engine, a savepoint on the caller's Connection."""
    if isinstance(db, Connection):
        with db.begin_nested():
            yield db
        return
    with db.begin() as connection:
        yield connection


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session
