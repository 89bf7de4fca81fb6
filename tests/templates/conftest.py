from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from prompt_tool.settings import Settings
from prompt_tool.templates import TemplateManager


@pytest.fixture
def template_settings() -> Settings:
    return Settings(redis_url=None, name_cache_ttl_s=60.0)


@pytest.fixture
def manager(db_engine: Engine, template_settings: Settings) -> Iterator[TemplateManager]:
    yield TemplateManager(db_engine, settings=template_settings)
