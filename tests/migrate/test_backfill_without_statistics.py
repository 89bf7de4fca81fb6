"""A backfill over tables the planner knows nothing about (a bulk load autovacuum has not
reached): it refreshes the statistics first, and its batches follow the primary key whatever
they say (PostgreSQL: SQLite plans without statistics). The key windows themselves are tested
in test_backfill_batches."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from prompt_tool.db import schema
from prompt_tool.migrate import load_legacy_sample
from prompt_tool.migrate.backfill import BackfillOptions, backfill

pytestmark = pytest.mark.postgres


def _forget_statistics(connection: Connection, table: str) -> None:
    """As after a bulk load into a new table: no pg_statistic rows, reltuples unknown (-1)."""
    connection.execute(
        text("DELETE FROM pg_statistic WHERE starelid = CAST(:t AS regclass)"), {"t": table}
    )
    connection.execute(
        text("UPDATE pg_class SET reltuples = -1 WHERE oid = CAST(:t AS regclass)"), {"t": table}
    )


@pytest.fixture
def unanalysed_engine(pg_url: str, engine_for: Any) -> Engine:
    schema.upgrade(pg_url, "0001")
    engine: Engine = engine_for(pg_url)
    with engine.begin() as connection:
        connection.execute(
            text("ALTER TABLE orchestration_sessions SET (autovacuum_enabled = false)")
        )
    load_legacy_sample(pg_url, sessions=3000, projects=4, seed=3)
    schema.upgrade(pg_url)
    with engine.begin() as connection:
        _forget_statistics(connection, "orchestration_sessions")
    return engine


def _has_statistics(engine: Engine, table: str) -> bool:
    with engine.connect() as connection:
        return bool(
            connection.execute(
                text("SELECT count(*) FROM pg_stats WHERE tablename = :t"), {"t": table}
            ).scalar()
        )


def test_backfill_refreshes_missing_statistics_first_and_says_so(
    unanalysed_engine: Engine,
) -> None:
    assert not _has_statistics(unanalysed_engine, "orchestration_sessions")
    summary = backfill(unanalysed_engine, BackfillOptions(projects=("project-1", "project-2")))
    assert "orchestration_sessions" in summary.statistics_refreshed
    assert "planner statistics refreshed first" in summary.describe()
    assert _has_statistics(unanalysed_engine, "orchestration_sessions")
    again = backfill(unanalysed_engine, BackfillOptions(projects=("project-1", "project-2")))
    assert again.statistics_refreshed == []
    assert not again.changed
