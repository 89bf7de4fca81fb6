"""The schema history as a library: upgrade, downgrade, stamp, current, history.

`orch-migrate db ...` calls these; so can an application at start-up. They work from a checkout
(the ``alembic/`` folder at the repo root) and from an installed wheel (which carries the same
scripts as ``prompt_tool/_alembic``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, inspect
from sqlalchemy.exc import DBAPIError, OperationalError

from prompt_tool.db.engine import check_connection, make_engine
from prompt_tool.db.url import normalize_url, redact, require_existing_sqlite_file
from prompt_tool.errors import DatabaseUnavailableError, SchemaError

__all__ = [
    "HEAD",
    "Revision",
    "SchemaState",
    "alembic_config",
    "current",
    "downgrade",
    "history",
    "migrate_on",
    "script_location",
    "stamp",
    "upgrade",
]

HEAD = "head"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Revision:
    revision: str
    down_revision: str | None
    description: str
    is_head: bool


@dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a database stands, before and after a schema command."""

    database: str
    previous: str | None
    current: str | None
    head: str


def script_location() -> Path:
    """The migration scripts: inside the installed package, else the checkout's ``alembic/``."""
    for candidate in (_PACKAGE_DIR / "_alembic", _PACKAGE_DIR.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError(
        f"migration scripts not found next to {_PACKAGE_DIR}; reinstall prompt-tool "
        "(the wheel carries them as prompt_tool/_alembic)"
    )


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["configure_logger"] = False
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the schema history has exactly one head"
    return head


def history() -> list[Revision]:
    """Every revision, oldest first."""
    scripts = ScriptDirectory.from_config(alembic_config())
    heads = set(scripts.get_heads())
    revisions = [
        Revision(
            revision=script.revision,
            down_revision=script.down_revision if isinstance(script.down_revision, str) else None,
            description=script.doc.splitlines()[0] if script.doc else "",
            is_head=script.revision in heads,
        )
        for script in scripts.walk_revisions()
    ]
    return list(reversed(revisions))


def _current_on(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _require_existing_sqlite_file(url: str) -> None:
    require_existing_sqlite_file(normalize_url(url))


@contextmanager
def _connected(url: str) -> Iterator[Connection]:
    engine = make_engine(url)
    try:
        check_connection(engine)
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def current(url: str) -> SchemaState:
    """The revision ``url`` is at (``None``: not under Alembic)."""
    _require_existing_sqlite_file(url)
    with _connected(url) as connection:
        revision = _current_on(connection)
    return SchemaState(redact(url), revision, revision, _head())


def _run(url: str, action: str, revision: str, *, allow_unversioned: bool) -> SchemaState:
    with _connected(url) as connection:
        before = _current_on(connection)
        if before is None and not allow_unversioned:
            raise SchemaError(
                f"{redact(url)} is not under Alembic (no alembic_version table); nothing to "
                "downgrade. Run `orch-migrate db upgrade` first"
            )
        if before is None and action == "upgrade" and inspect(connection).has_table("projects"):
            raise SchemaError(
                f"{redact(url)} already has the legacy tables but no alembic_version; if they "
                "match the legacy schema, run `orch-migrate db stamp 0001`, then `db upgrade`"
            )
        connection.commit()
        config = alembic_config(connection)
        try:
            getattr(command, action)(config, revision)
        except CommandError as error:
            raise SchemaError(
                f"{action} to {revision!r} failed: {error}; `orch-migrate db history` lists the "
                "revisions"
            ) from None
        except DBAPIError as error:
            _raise_database_error(url, action, error)
        connection.commit()
        after = _current_on(connection)
    return SchemaState(redact(url), before, after, _head())


def _raise_database_error(url: str, action: str, error: DBAPIError) -> None:
    sqlstate = getattr(error.orig, "sqlstate", None)
    first_line = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
    if sqlstate == "55P03":  # lock_not_available: lock_timeout expired
        raise SchemaError(
            f"{action} gave up waiting for a table lock ({first_line}); a long transaction holds "
            "it. Nothing was left half-done: retry when it ends, or raise "
            "PROMPT_TOOL_LOCK_TIMEOUT_MS"
        ) from None
    if isinstance(error, OperationalError):
        raise DatabaseUnavailableError(f"{action} on {redact(url)} failed: {first_line}") from None
    raise SchemaError(f"{action} on {redact(url)} failed: {first_line}") from None


def migrate_on(connection: Connection, action: str, revision: str) -> str | None:
    """Run ``upgrade``/``downgrade`` on a connection inside the caller's transaction.

    Nothing commits: the caller decides (``rehearse --rollback`` rolls everything back, which
    PostgreSQL's transactional DDL makes exact). Returns the revision reached.
    """
    if action not in {"upgrade", "downgrade"}:
        raise ValueError(action)
    config = alembic_config(connection)
    config.attributes["single_transaction"] = True
    try:
        getattr(command, action)(config, revision)
    except CommandError as error:
        raise SchemaError(f"{action} to {revision!r} failed: {error}") from None
    return _current_on(connection)


def upgrade(url: str, revision: str = HEAD) -> SchemaState:
    """Bring ``url`` up to ``revision`` (default: head); creates a SQLite file if needed."""
    return _run(url, "upgrade", revision, allow_unversioned=True)


def downgrade(url: str, revision: str = "-1") -> SchemaState:
    """Step ``url`` back to ``revision`` (default: one step)."""
    _require_existing_sqlite_file(url)
    return _run(url, "downgrade", revision, allow_unversioned=False)


def stamp(url: str, revision: str) -> SchemaState:
    """Record ``revision`` as current without running anything (adopting an existing database)."""
    _require_existing_sqlite_file(url)
    with _connected(url) as connection:
        before = _current_on(connection)
        connection.commit()
        try:
            command.stamp(alembic_config(connection), revision)
        except CommandError as error:
            raise SchemaError(
                f"stamp {revision!r} failed: {error}; `orch-migrate db history` lists the revisions"
            ) from None
        connection.commit()
        after = _current_on(connection)
    return SchemaState(redact(url), before, after, _head())
