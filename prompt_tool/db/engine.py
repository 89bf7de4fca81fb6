"""Engines and sessions: one way to connect, with the per-dialect setup done once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from prompt_tool.db.url import normalize_url, redact
from prompt_tool.errors import DatabaseUnavailableError

__all__ = ["check_connection", "make_engine", "make_session_factory", "session_scope"]


def _enable_sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``: psycopg 3 for PostgreSQL, foreign keys on for SQLite."""
    parsed = normalize_url(url)
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _enable_sqlite_foreign_keys)
    return engine


def check_connection(engine: Engine) -> None:
    """Raise :class:`DatabaseUnavailableError` with the reason if ``engine`` can't connect."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise DatabaseUnavailableError(
            f"cannot connect to {redact(engine.url)}: {reason}; check the URL given with --db "
            "or PROMPT_TOOL_DATABASE_URL and that the server is running"
        ) from None


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session
