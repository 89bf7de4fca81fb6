"""The test harness: real databases, created for this run and dropped afterwards.

PostgreSQL is found in this order: ``PROMPT_TOOL_TEST_DATABASE_URL``; a server answering at
``postgresql://postgres@127.0.0.1:5432``; testcontainers' ``PostgresContainer`` when a Docker daemon
answers; otherwise the PostgreSQL tests are skipped with a loud reason, or fail when
``PROMPT_TOOL_REQUIRE_POSTGRES=1`` (CI). Tests only ever touch databases they created, all named
``pt_test_<run id>_*``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from pytest_alembic.config import Config as PytestAlembicConfig
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from prompt_tool import flags
from prompt_tool.db import schema
from prompt_tool.db.engine import make_engine, make_session_factory, session_scope
from prompt_tool.db.projects import create_project
from prompt_tool.templates.permissions import grant_role

DIALECTS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]
LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
RUN_ID = uuid.uuid4().hex[:8]


def _require_postgres() -> bool:
    return os.environ.get("PROMPT_TOOL_REQUIRE_POSTGRES", "") in {"1", "true", "yes"}


def _libpq(url: str) -> str:
    """A SQLAlchemy URL as psycopg wants it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(_libpq(url), connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _docker_answers() -> bool:
    try:
        import docker  # installed with testcontainers

        docker.from_env(timeout=2).ping()
    except Exception:  # no daemon, no socket, no permission: all mean "no Docker here"
        return False
    return True


@dataclass
class PostgresServer:
    """A PostgreSQL server this run may create databases on."""

    admin_url: str
    origin: str
    created: list[str] = field(default_factory=list)

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(_libpq(self.admin_url), autocommit=True)

    def url_for(self, name: str) -> str:
        url = make_url(self.admin_url).set(database=name, drivername="postgresql")
        return url.render_as_string(hide_password=False)

    def create_database(self, label: str, template: str | None = None) -> str:
        name = f"pt_test_{RUN_ID}_{label}_{len(self.created)}"
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self._admin() as admin:
            admin.execute(statement)
        self.created.append(name)
        return name

    def drop_all(self) -> None:
        with self._admin() as admin:
            for name in reversed(self.created):
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self.created.clear()


def _find_postgres() -> tuple[PostgresServer | None, str, Any]:
    explicit = os.environ.get("PROMPT_TOOL_TEST_DATABASE_URL")
    if explicit:
        if not _answers(explicit):
            return None, f"PROMPT_TOOL_TEST_DATABASE_URL={explicit} does not answer", None
        return PostgresServer(explicit, "PROMPT_TOOL_TEST_DATABASE_URL"), "", None
    if _answers(LOCAL_SERVER):
        return PostgresServer(LOCAL_SERVER, "local server at 127.0.0.1:5432"), "", None
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16-alpine", driver=None)
        container.start()
        url = container.get_connection_url()
        return PostgresServer(url, "testcontainers PostgresContainer"), "", container
    return (
        None,
        "no PostgreSQL: PROMPT_TOOL_TEST_DATABASE_URL is unset, nothing answers at "
        "127.0.0.1:5432 and no Docker daemon answers for testcontainers",
        None,
    )


_FOUND: dict[str, Any] = {}


def _discover() -> tuple[PostgresServer | None, str]:
    if "server" not in _FOUND:
        server, reason, container = _find_postgres()
        _FOUND.update(server=server, reason=reason, container=container)
    return _FOUND["server"], _FOUND["reason"]


def pytest_report_header(config: pytest.Config) -> str:
    server, reason = _discover()
    if server is not None:
        return f"prompt-tool: PostgreSQL from {server.origin}; run id {RUN_ID}"
    verdict = "FAILING" if _require_postgres() else "SKIPPING"
    return f"prompt-tool: {verdict} PostgreSQL tests: {reason}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    server = _FOUND.get("server")
    if server is not None:
        server.drop_all()
    container = _FOUND.get("container")
    if container is not None:
        container.stop()


@pytest.fixture(scope="session")
def pg_server() -> PostgresServer:
    server, reason = _discover()
    if server is None:
        if _require_postgres():
            pytest.fail(f"PROMPT_TOOL_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    return server


@pytest.fixture(scope="session")
def pg_head_template(pg_server: PostgresServer) -> str:
    """A database at head, cloned (fast, file-level) for every test that wants one."""
    name = pg_server.create_database("head_template")
    schema.upgrade(pg_server.url_for(name))
    return name


@pytest.fixture(scope="session")
def sqlite_head_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "head.db"
    schema.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A new, empty PostgreSQL database."""
    return pg_server.url_for(pg_server.create_database("empty"))


@pytest.fixture(params=DIALECTS)
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def empty_db_url(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database (no tables) on each dialect."""
    if dialect == "sqlite":
        path = tmp_path / "empty.db"
        path.touch()  # an empty file is an empty SQLite database
        return f"sqlite:///{path}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.url_for(server.create_database("empty"))


@pytest.fixture
def head_db_url(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new database at the head revision, with no rows, on each dialect."""
    if dialect == "sqlite":
        template: Path = request.getfixturevalue("sqlite_head_template")
        path = tmp_path / "head.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    template_name: str = request.getfixturevalue("pg_head_template")
    return server.url_for(server.create_database("head", template=template_name))


@pytest.fixture
def engine_for() -> Iterator[Any]:
    """Make engines that are disposed of when the test ends."""
    engines: list[Engine] = []

    def make(url: str) -> Engine:
        engine = make_engine(url)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def db_engine(head_db_url: str, engine_for: Any) -> Engine:
    """A database at head with projects acme and beta, a global admin root, and acme's team:
    ed (editor) and vi (viewer)."""
    engine: Engine = engine_for(head_db_url)
    with session_scope(make_session_factory(engine)) as session:
        create_project(session, "acme", "Acme")
        create_project(session, "beta", "Beta")
        grant_role(session, "root", "root", "admin", None)
        grant_role(session, "root", "ed", "editor", "acme")
        grant_role(session, "root", "vi", "viewer", "acme")
    return engine


# pytest-alembic: its built-in tests run against a fresh database of each dialect.
@pytest.fixture
def alembic_engine(empty_db_url: str, engine_for: Any) -> Engine:
    engine: Engine = engine_for(empty_db_url)
    return engine


@pytest.fixture
def alembic_config() -> Any:
    # Its checks walk down to base, which 0001 refuses unless asked in so many words.
    config = schema.alembic_config()
    config.attributes["i-understand-this-drops-legacy-tables"] = "yes"
    return PytestAlembicConfig(alembic_config=config)


@pytest.fixture
def set_flag(db_engine: Engine) -> Any:
    """Set a project's orchestration-templates flag, as an operator would."""

    def apply(project: str, variant: str, sample_rate: float | None = None) -> None:
        flags.set_variant(db_engine, project, variant, actor="ops", sample_rate=sample_rate)

    return apply
