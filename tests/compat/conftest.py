from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from prompt_tool import flags
from prompt_tool.compat import SessionReader, ShadowEvent
from prompt_tool.db.models import Scope
from prompt_tool.settings import Settings
from prompt_tool.templates import TemplateAddress, TemplateManager


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[ShadowEvent] = []

    def publish(self, event: ShadowEvent) -> None:
        self.events.append(event)


@pytest.fixture
def settings() -> Settings:
    return Settings(redis_url=None)


@pytest.fixture
def manager(db_engine: Engine, settings: Settings) -> TemplateManager:
    """acme and beta; global templates system/planner/synthesis owned by root."""
    manager = TemplateManager(db_engine, settings=settings)
    for role in ("system", "planner", "synthesis"):
        manager.create(
            TemplateAddress(role, Scope.GLOBAL),
            f"The {role} prompt about {{{{ topic }}}}.\r\n"
            "Be exact: {{ '{{' }}raw{{ '}}' }}",
            actor="root",
        )
    return manager


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def reader(
    db_engine: Engine, manager: TemplateManager, publisher: RecordingPublisher, settings: Settings
) -> Iterator[SessionReader]:
    service = flags.FlagService(db_engine, settings)
    yield SessionReader(db_engine, flags=service, manager=manager, publisher=publisher)
    service.close()
