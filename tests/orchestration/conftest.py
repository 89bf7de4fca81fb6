"""Fixtures for the orchestrators: global templates, a reader with a fresh flag, an orchestrator.

Every database fixture here runs on SQLite and PostgreSQL (through ``db_engine``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from prompt_tool import flags
from prompt_tool.compat import SessionReader
from prompt_tool.db.models import Scope
from prompt_tool.orchestration import Orchestrator
from prompt_tool.settings import Settings
from prompt_tool.templates import TemplateAddress, TemplateManager

ROLES = ("system", "planner", "synthesis")


@pytest.fixture
def settings() -> Settings:
    # No flag cache: a test that flips the flag reads the new variant at once.
    return Settings(redis_url=None, flag_cache_ttl_s=0)


@pytest.fixture
def manager(db_engine: Engine, settings: Settings) -> TemplateManager:
    """Global templates system, planner and synthesis, each reading ``topic``."""
    manager = TemplateManager(db_engine, settings=settings)
    for role in ROLES:
        manager.create(
            TemplateAddress(role, Scope.GLOBAL),
            f"The {role} prompt about {{{{ topic }}}}.\n",
            actor="root",
        )
    return manager


@pytest.fixture
def orchestrator(
    db_engine: Engine, manager: TemplateManager, settings: Settings
) -> Iterator[Orchestrator]:
    service = flags.FlagService(db_engine, settings)
    reader = SessionReader(db_engine, flags=service, manager=manager)
    yield Orchestrator(db_engine, reader=reader)
    service.close()
