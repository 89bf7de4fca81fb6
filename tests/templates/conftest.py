from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from prompt_tool.db.engine import make_session_factory, session_scope
from prompt_tool.db.projects import create_project
from prompt_tool.settings import Settings
from prompt_tool.templates import TemplateManager
from prompt_tool.templates.permissions import grant_role


@pytest.fixture
def template_settings() -> Settings:
    return Settings(redis_url=None, name_cache_ttl_s=60.0)


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


@pytest.fixture
def manager(db_engine: Engine, template_settings: Settings) -> Iterator[TemplateManager]:
    yield TemplateManager(db_engine, settings=template_settings)
