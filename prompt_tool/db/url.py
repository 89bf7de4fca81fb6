"""Database URL handling: which database a command talks to, and in which driver."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from prompt_tool.errors import ConfigurationError, DatabaseUnavailableError
from prompt_tool.settings import get_settings

__all__ = ["normalize_url", "redact", "require_existing_sqlite_file", "resolve_url"]

_SUPPORTED = ("sqlite", "postgresql")


def resolve_url(explicit: str | None = None, *, create: bool = False) -> str:
    """``--db URL`` if given, else ``PROMPT_TOOL_DATABASE_URL``, else the embedded SQLite file.

    A SQLite file that does not exist is refused unless ``create`` (only ``db upgrade`` and
    ``db stamp`` make a database): SQLite would otherwise create an empty file for any command
    given a mistyped path, and the command would fail on the empty file instead.
    """
    if explicit is not None and not explicit.strip():
        raise ConfigurationError(
            "--db is empty; give a database URL (sqlite:///path.db or "
            "postgresql://user@host:5432/dbname), or leave --db out to use "
            "PROMPT_TOOL_DATABASE_URL, else sqlite:///prompt_tool.db"
        )
    url = explicit or get_settings().database_url
    if not create:
        # A URL that does not parse is left to normalize_url, which says what it accepts.
        with suppress(ArgumentError):
            require_existing_sqlite_file(make_url(url))
    return url


def require_existing_sqlite_file(url: URL) -> None:
    """Refuse a SQLite file that does not exist: connecting would create an empty one."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return
    if database.startswith("file:") or Path(database).exists():
        return
    raise DatabaseUnavailableError(
        f"no database file at {Path(database).resolve()}; run `orch-migrate db upgrade` to "
        "create it, or pass --db (or PROMPT_TOOL_DATABASE_URL) with the right path"
    )


def normalize_url(raw: str) -> URL:
    """Parse ``raw`` and pin the driver: ``postgresql://`` always means psycopg 3.

    ``postgres://`` (what Heroku, Render, Fly.io, Supabase... hand out) means the same.
    Raises :class:`ConfigurationError` for anything that is not a SQLite or PostgreSQL URL.
    """
    if not raw.strip():
        raise ConfigurationError(
            "the database URL is empty; use sqlite:///path.db or postgresql://user@host:5432/dbname"
        )
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigurationError(
            f"cannot parse database URL {raw!r}; use sqlite:///path.db or "
            "postgresql://user@host:5432/dbname"
        ) from None
    backend = url.get_backend_name()
    if backend == "postgres":  # the alias SQLAlchemy dropped in 1.4; hosted platforms use it
        url = url.set(drivername="postgresql+psycopg")
        backend = "postgresql"
    if backend not in _SUPPORTED:
        raise ConfigurationError(
            f"unsupported database {backend!r} in {redact(url)}; "
            "prompt-tool runs on sqlite:/// or postgresql:// URLs"
        )
    if backend == "postgresql" and url.drivername != "postgresql+psycopg":
        url = url.set(drivername="postgresql+psycopg")
    return url


def redact(url: URL | str) -> str:
    """The URL as it may be printed: the password hidden, and the driver left out
    (postgresql://, as users type it), whether given the user's URL or an engine's."""
    parsed = url if isinstance(url, URL) else make_url(url)
    if parsed.get_backend_name() in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql")
    return parsed.render_as_string(hide_password=True)
