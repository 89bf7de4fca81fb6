"""A database with acme's `planner` template in three versions, and a flag service.

From the root conftest: projects acme and beta; root is a global admin, ed an editor and vi a
viewer of acme.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from prompt_tool import ab_testing, flags
from prompt_tool.ab_testing import ABTestInfo, VariantSpec
from prompt_tool.compat import CreatedSession, create_session
from prompt_tool.db.models import Scope
from prompt_tool.settings import Settings
from prompt_tool.templates import TemplateAddress, TemplateManager

PLANNER = TemplateAddress("planner", Scope.PROJECT, "acme")
SYSTEM = TemplateAddress("system", Scope.GLOBAL)
PLANNER_TEXTS = {1: "Plan A for {{ topic }}.", 2: "Plan B for {{ topic }}.", 3: "Plan C."}
CONTROL_AND_CANDIDATE = [VariantSpec("control", 1, 50), VariantSpec("candidate", 2, 50)]


@pytest.fixture(autouse=True)
def _database_flag_provider() -> Iterator[None]:
    """The built-in database provider, whatever the environment says."""
    flags.reset_provider()
    yield
    flags.reset_provider()


@pytest.fixture
def settings() -> Settings:
    return Settings(redis_url=None)


@pytest.fixture
def manager(db_engine: Engine, settings: Settings) -> TemplateManager:
    """acme's project template `planner` v1..v3 (production = v1) and a global `system`."""
    manager = TemplateManager(db_engine, settings=settings)
    manager.create(PLANNER, PLANNER_TEXTS[1], actor="ed")
    for number in (2, 3):
        manager.update(PLANNER, PLANNER_TEXTS[number], actor="ed")
    manager.create(SYSTEM, "You help with {{ topic }}.", actor="root")
    return manager


@pytest.fixture
def flag_service(db_engine: Engine, settings: Settings) -> Iterator[flags.FlagService]:
    # Evaluated in the caller's thread: the answer never depends on how fast a worker starts.
    service = flags.FlagService(db_engine, settings, evaluation_timeout_s=None)
    yield service
    service.close()


@pytest.fixture
def running_test(db_engine: Engine, manager: TemplateManager) -> ABTestInfo:
    """A running test of acme's planner: control (v1) against candidate (v2), 50/50."""
    created = ab_testing.create_ab_test(
        db_engine, PLANNER, "planner", CONTROL_AND_CANDIDATE, name="wording", actor="ed"
    )
    return ab_testing.start_ab_test(db_engine, created.id, actor="ed")


@pytest.fixture
def new_session(
    manager: TemplateManager, flag_service: flags.FlagService
) -> Callable[..., CreatedSession]:
    """Create an acme session using the planner (and system) templates, with the flag service."""

    def create(unit_key: str | None = None, **kwargs: Any) -> CreatedSession:
        return create_session(
            manager,
            "acme",
            {"planner": "planner", "system": "system"},
            {"topic": "billing"},
            name="s",
            flags=kwargs.pop("flags", flag_service),
            unit_key=unit_key,
            **kwargs,
        )

    return create
