"""Where PostgreSQL and SQLite differ, in one place: hashing in SQL, upserts, advisory locks,
per-transaction timeouts, lock-timeout errors."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import String

__all__ = [
    "acquire_advisory_lock",
    "insert_for",
    "is_lock_timeout",
    "is_retryable",
    "register_sqlite_functions",
    "release_advisory_lock",
    "set_local_timeouts",
    "sha256_hex",
]


class sha256_hex(FunctionElement[str]):  # noqa: N801 - reads like the SQL function it is
    """SQL: the sha256 hex digest of a text's UTF-8 bytes (equal to ``core.content_hash``)."""

    type = String()
    inherit_cache = True


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


def insert_for(connection: Connection, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that knows ``ON CONFLICT`` on this connection's dialect."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


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
