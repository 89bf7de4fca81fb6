"""Alembic environment for prompt-tool, shared by the `alembic` CLI and `orch-migrate db`.

Where the database comes from, in order: a connection handed over by the caller
(``config.attributes["connection"]``: orch-migrate, the tests), ``-x db=URL``, ``sqlalchemy.url``
in the ini, ``PROMPT_TOOL_DATABASE_URL``, the embedded SQLite default.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection, Engine

from prompt_tool.db.engine import make_engine, transactional_ddl
from prompt_tool.db.models import Base
from prompt_tool.db.online_ddl import migration_timeouts, timeout_statements
from prompt_tool.db.url import normalize_url, resolve_url

config = context.config
target_metadata = Base.metadata

# The `alembic` CLI wants its log lines; orch-migrate and the tests configure logging themselves.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    explicit = context.get_x_argument(as_dictionary=True).get("db")
    return explicit or config.get_main_option("sqlalchemy.url") or resolve_url(create=True)


def run_migrations_offline() -> None:
    """``--sql``: print the DDL instead of running it (what squawk lints)."""
    url = normalize_url(_database_url())
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transaction_per_migration=True,
    )
    for statement in timeout_statements(url.get_backend_name()):
        context.execute(statement)
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        transaction_per_migration=True,
    )
    with migration_timeouts(connection), context.begin_transaction():
        context.run_migrations()


def _run_with_engine(engine: Engine) -> None:
    with engine.connect() as connection:
        _run_on(connection)
        connection.commit()


def run_migrations_online() -> None:
    handed_over = config.attributes.get("connection")
    if isinstance(handed_over, Connection):
        _run_on(handed_over)
    elif isinstance(handed_over, Engine):  # pytest-alembic hands over an engine at times
        _run_with_engine(handed_over)
    else:
        engine = transactional_ddl(make_engine(_database_url()))
        try:
            _run_with_engine(engine)
        finally:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
