from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from prompt_tool import flags
from prompt_tool.db.engine import make_session_factory, session_scope
from prompt_tool.db.projects import create_project
from prompt_tool.flags import config as flag_config
from prompt_tool.settings import Settings, get_settings

EXAMPLE_FLAGD_FILE = (
    Path(__file__).resolve().parents[2] / "examples" / "flagd-orchestration-templates.json"
)


class FakeClock:
    """A monotonic clock the test moves by hand: cache expiry without sleeping."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _database_provider_in_every_test() -> Iterator[None]:
    """Each test starts on the built-in database provider, whatever the environment says, and
    leaves no process-wide replacement behind."""
    flags.reset_provider()
    yield
    flags.reset_provider()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings() -> Settings:
    return Settings(templates_enabled=True, flag_cache_ttl_s=5.0)


def add_projects(engine: Engine, *slugs: str) -> dict[str, int]:
    with session_scope(make_session_factory(engine)) as session:
        return {slug: create_project(session, slug).id for slug in slugs}


@pytest.fixture
def example_flagd_file() -> Path:
    return EXAMPLE_FLAGD_FILE


@pytest.fixture
def fresh_process_env(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[dict[str, str]], None]]:
    """Call with environment variables (``PROMPT_TOOL_FLAG_PROVIDER``, ...): they are set in a
    process that has not read its flag configuration yet, as in a fresh ``orch-migrate``
    process started with them."""

    def switch(env: dict[str, str]) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        monkeypatch.setattr(flag_config._process, "configured", False)

    yield switch
    flags.reset_provider()
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def flagd_by_env(
    fresh_process_env: Callable[[dict[str, str]], None], example_flagd_file: Path
) -> Callable[[], Path]:
    """Call to start reading the flag from the example flagd file, configured by environment
    (``PROMPT_TOOL_FLAG_PROVIDER=flagd-file``, ``PROMPT_TOOL_FLAGD_FILE``); returns the file."""

    def switch() -> Path:
        fresh_process_env(
            {
                "PROMPT_TOOL_FLAG_PROVIDER": "flagd-file",
                "PROMPT_TOOL_FLAGD_FILE": str(example_flagd_file),
            }
        )
        return example_flagd_file

    return switch


@pytest.fixture
def projects_in() -> Callable[..., dict[str, int]]:
    """Create projects by slug in a database; returns their ids."""
    return add_projects


@pytest.fixture
def db(head_db_url: str, engine_for: Any) -> Engine:
    """A database at head with projects acme, beta and gamma."""
    engine: Engine = engine_for(head_db_url)
    add_projects(engine, "acme", "beta", "gamma")
    return engine


@pytest.fixture
def other_head_db_url(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A second, independent database at head, of the same dialect as ``head_db_url``."""
    if dialect == "sqlite":
        template: Path = request.getfixturevalue("sqlite_head_template")
        path = tmp_path / "other.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    server = request.getfixturevalue("pg_server")
    template_name: str = request.getfixturevalue("pg_head_template")
    return str(server.url_for(server.create_database("flags_other", template=template_name)))


@pytest.fixture
def snapshot_queries() -> Callable[[Engine], list[str]]:
    """Record the flag-cache loads (one query each) an engine runs."""

    def watch(engine: Engine) -> list[str]:
        seen: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if "FROM feature_flag_states LEFT OUTER JOIN projects" in statement:
                seen.append(statement)

        event.listen(engine, "before_cursor_execute", record)
        return seen

    return watch
