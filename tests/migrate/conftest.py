from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine

from prompt_tool.db import schema
from prompt_tool.migrate import load_legacy_sample


@pytest.fixture
def legacy_url(empty_db_url: str) -> str:
    """A legacy deployment (sample data loaded at 0001) upgraded to head, not yet backfilled."""
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=600, projects=3, seed=5)
    schema.upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture
def legacy_engine(legacy_url: str, engine_for: Any) -> Engine:
    engine: Engine = engine_for(legacy_url)
    return engine
