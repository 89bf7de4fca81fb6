"""Database URL handling: which database a command talks to, and in which driver."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from prompt_tool.errors import ConfigurationError
from prompt_tool.settings import get_settings

__all__ = ["normalize_url", "redact", "resolve_url"]

_SUPPORTED = ("sqlite", "postgresql")


def resolve_url(explicit: str | None = None) -> str:
    """``--db URL`` if given, else ``PROMPT_TOOL_DATABASE_URL``, else the embedded SQLite file."""
    return explicit or get_settings().database_url


def normalize_url(raw: str) -> URL:
    """Parse ``raw`` and pin the driver: ``postgresql://`` always means psycopg 3.

    Raises :class:`ConfigurationError` for anything that is not a SQLite or PostgreSQL URL.
    """
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigurationError(
            f"cannot parse database URL {raw!r}; use sqlite:///path.db or "
            "postgresql://user@host:5432/dbname"
        ) from None
    backend = url.get_backend_name()
    if backend not in _SUPPORTED:
        raise ConfigurationError(
            f"unsupported database {backend!r} in {redact(url)}; "
            "prompt-tool runs on sqlite:/// or postgresql:// URLs"
        )
    if backend == "postgresql" and url.drivername != "postgresql+psycopg":
        url = url.set(drivername="postgresql+psycopg")
    return url


def redact(url: URL | str) -> str:
    """The URL as it may be printed: the password hidden."""
    parsed = url if isinstance(url, URL) else make_url(url)
    return parsed.render_as_string(hide_password=True)
