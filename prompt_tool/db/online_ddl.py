"""Online-safe DDL for the migration scripts: the PostgreSQL-specific rules live here.

On a live PostgreSQL every migration runs with ``lock_timeout`` and ``statement_timeout`` so a
statement that would queue behind a long transaction gives up instead of blocking every writer;
indexes on existing tables are built ``CONCURRENTLY`` outside a transaction; constraints on
existing tables are added ``NOT VALID`` and validated in a separate transaction, which only takes a
``SHARE UPDATE EXCLUSIVE`` lock. On SQLite (a single-writer embedded file) the same calls fall back
to plain DDL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress

from alembic import op
from sqlalchemy import Column, inspect, text
from sqlalchemy.engine import Connection

from prompt_tool.db.dialect import invalid_indexes
from prompt_tool.errors import MigrationRefusedError, PromptToolError
from prompt_tool.settings import get_settings

__all__ = [
    "add_check_not_valid",
    "add_column",
    "batches_outside_transaction",
    "concurrent_ddl",
    "create_index_concurrently",
    "drop_check",
    "drop_column",
    "drop_index_concurrently",
    "drop_index_in_transaction",
    "lock_in_order",
    "migration_argument",
    "migration_timeouts",
    "refusals_for_alembic",
    "refuse_unless_asked",
    "single_transaction",
    "timeout_statements",
    "validate_constraint",
]


def timeout_statements(backend: str, *, local: bool = False) -> list[str]:
    """The ``SET`` statements that bound every migration statement on PostgreSQL."""
    if backend != "postgresql":
        return []
    settings = get_settings()
    scope = "LOCAL " if local else ""
    return [
        f"SET {scope}lock_timeout = {int(settings.migration_lock_timeout_ms)}",
        f"SET {scope}statement_timeout = {int(settings.migration_statement_timeout_ms)}",
    ]


@contextmanager
def migration_timeouts(connection: Connection) -> Iterator[None]:
    """Bound lock waits and statements on ``connection`` for the duration of the migration.

    A connection already inside the caller's transaction gets ``SET LOCAL`` (gone with that
    transaction); otherwise the settings are session-level, so they also cover the autocommit
    blocks, and are reset afterwards.
    """
    backend = connection.dialect.name
    if backend != "postgresql":
        yield
        return
    external = connection.in_transaction()
    for statement in timeout_statements(backend, local=external):
        connection.exec_driver_sql(statement)
    if external:
        yield
        return
    connection.commit()
    try:
        yield
    finally:
        connection.exec_driver_sql("RESET lock_timeout")
        connection.exec_driver_sql("RESET statement_timeout")
        connection.commit()


def _is_postgres() -> bool:
    return bool(op.get_context().dialect.name == "postgresql")


def single_transaction() -> bool:
    """Whether the whole run is inside one caller's transaction (``rehearse --rollback``).

    Then nothing may commit: no autocommit blocks, and indexes are built plainly (inside the
    transaction, on a database nobody else sees the result of, because it is rolled back).
    """
    config = op.get_context().config
    return bool(config is not None and config.attributes.get("single_transaction"))


@contextmanager
def concurrent_ddl() -> Iterator[None]:
    """Run the enclosed DDL outside a transaction (``CONCURRENTLY`` and ``VALIDATE`` need that).

    ``statement_timeout`` is lifted inside: a concurrent index build or a validation scans the
    whole table but holds no lock that blocks reads or writes, so it may take as long as it needs;
    ``lock_timeout`` stays, bounding the brief lock each one takes at start and end.
    """
    # SQLite has no CONCURRENTLY: there the DDL stays inside the revision's one transaction, so
    # a killed upgrade leaves nothing behind.
    if single_transaction() or not _is_postgres():
        yield
        return
    with op.get_context().autocommit_block():
        op.execute("SET statement_timeout = 0")
        try:
            yield
        finally:
            op.execute(
                f"SET statement_timeout = {int(get_settings().migration_statement_timeout_ms)}"
            )


def migration_argument(name: str) -> str | None:
    """An option given to this run: by the caller (``orch-migrate db ... --archive DIR`` sets
    ``config.attributes``), else on plain Alembic's command line (``-x archive=DIR``)."""
    config = op.get_context().config
    if config is None:
        return None
    if config.attributes.get(name) is not None:
        return str(config.attributes[name])
    for item in getattr(config.cmd_opts, "x", None) or []:
        key, _, value = str(item).partition("=")
        if key.strip() == name:
            return value.strip()
    return None


@contextmanager
def _short_transaction() -> Iterator[None]:
    connection = op.get_bind()
    connection.exec_driver_sql("BEGIN")
    try:
        yield
    except BaseException:
        # Best effort: after a Ctrl-C the connection may be unusable, and the server rolls the
        # batch back anyway when it goes; the original error is the one to report.
        with suppress(Exception):
            connection.exec_driver_sql("ROLLBACK")
        raise
    connection.exec_driver_sql("COMMIT")


@contextmanager
def batches_outside_transaction() -> Iterator[Callable[[], AbstractContextManager[None]]]:
    """Run data batches before the revision's own transaction, each in a short one of its own.

    Yields the factory of one batch's transaction. On PostgreSQL each batch commits on its own
    (under the session's ``lock_timeout``), so no lock is held from one batch to the next; on
    SQLite (one writer) and inside a caller's single transaction the batches simply run in the
    revision's transaction.
    """
    if single_transaction() or not _is_postgres():
        yield nullcontext
        return
    with op.get_context().autocommit_block():
        yield _short_transaction


def _drop_invalid_leftover(name: str) -> None:
    """A ``CREATE INDEX CONCURRENTLY`` that was interrupted leaves an INVALID index behind."""
    if op.get_context().as_sql:
        return
    if name in invalid_indexes(op.get_bind()):  # always empty on SQLite
        op.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')


def create_index_concurrently(
    name: str,
    table: str,
    columns: Sequence[str],
    *,
    unique: bool = False,
    where: str | None = None,
) -> None:
    """Build an index without blocking writes; use inside :func:`concurrent_ddl`."""
    _drop_invalid_leftover(name)
    predicate = (
        {} if where is None else {"postgresql_where": text(where), "sqlite_where": text(where)}
    )
    op.create_index(
        name,
        table,
        list(columns),
        unique=unique,
        if_not_exists=True,
        postgresql_concurrently=not single_transaction(),
        **predicate,  # type: ignore[arg-type]
    )


def drop_index_concurrently(name: str, table: str) -> None:
    """Drop an index without blocking writes; use inside :func:`concurrent_ddl`."""
    op.drop_index(
        name, table_name=table, if_exists=True, postgresql_concurrently=not single_transaction()
    )


def drop_index_in_transaction(name: str, table: str) -> None:
    """Drop an index inside the revision's transaction, so the drop commits (or rolls back)
    with the rest of the step: a plain DROP INDEX is a catalog change whose brief ACCESS
    EXCLUSIVE lock is bounded by ``lock_timeout``; CONCURRENTLY would commit on its own and
    leave the schema half-removed when a later statement gives up."""
    op.drop_index(name, table_name=table, if_exists=True)


def lock_in_order(tables: Sequence[str]) -> None:
    """Take every table's ACCESS EXCLUSIVE lock at once, in the order given, before the DDL.

    DDL takes its locks one statement at a time, each on a different set of tables (a DROP TABLE
    also locks the tables its foreign keys point at), in an order that crosses the application's
    (an INSERT locks its table, then the parent its foreign key checks). Against a busy writer
    that order waits in a cycle until ``lock_timeout``; one LOCK in child-to-parent order, the
    order writers lock in, does not. PostgreSQL only: SQLite has one writer.
    """
    if _is_postgres():
        quoted = ", ".join(f'"{table}"' for table in tables)
        op.execute(f"LOCK TABLE {quoted} IN ACCESS EXCLUSIVE MODE")


def add_check_not_valid(name: str, table: str, condition: str) -> None:
    """Add a CHECK that new rows must meet, without scanning the existing ones yet.

    SQLite cannot add a constraint to an existing table without rebuilding it (which would
    rewrite the legacy rows), so there the rule is enforced by the application only.
    """
    if _is_postgres():
        # PostgreSQL has no ADD CONSTRAINT IF NOT EXISTS; dropping a leftover keeps a re-run safe.
        drop_check(name, table)
        op.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" CHECK ({condition}) NOT VALID')


def validate_constraint(name: str, table: str) -> None:
    """Check existing rows against a ``NOT VALID`` constraint; use inside :func:`concurrent_ddl`."""
    if _is_postgres():
        op.execute(f'ALTER TABLE "{table}" VALIDATE CONSTRAINT "{name}"')


def drop_check(name: str, table: str) -> None:
    if _is_postgres():
        op.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT IF EXISTS "{name}"')


def _has_column(table: str, column: str) -> bool:
    return any(c["name"] == column for c in inspect(op.get_bind()).get_columns(table))


def add_column(table: str, column: Column[object]) -> None:
    """Add a nullable (or constant-default) column, tolerating one left by an interrupted run."""
    if _is_postgres():
        op.add_column(table, column, if_not_exists=True)
    elif op.get_context().as_sql or not _has_column(table, column.name):
        # SQLite has no ADD COLUMN IF NOT EXISTS.
        op.add_column(table, column)


def drop_column(table: str, column: str) -> None:
    if _is_postgres():
        op.drop_column(table, column, if_exists=True)
    elif op.get_context().as_sql or _has_column(table, column):
        op.drop_column(table, column)


@contextmanager
def refusals_for_alembic() -> Iterator[None]:
    """Let a refusal raised inside a migration reach plain ``alembic`` as one line too (it prints
    only its own ``CommandError`` without a traceback)."""
    try:
        yield
    except MigrationRefusedError:
        raise
    except PromptToolError as error:
        raise MigrationRefusedError(str(error)) from None


def refuse_unless_asked(option: str, refusal: str) -> None:
    """Stop a destructive step unless ``option`` was given (``-x OPTION`` or by the caller)."""
    if op.get_context().as_sql or migration_argument(option) is not None:
        return
    raise MigrationRefusedError(refusal)
