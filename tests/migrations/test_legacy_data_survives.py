"""Upgrading to head and stepping back leaves every legacy row byte for byte as it was."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import inspect, text

from prompt_tool.db import schema
from prompt_tool.db.legacy import SESSION_PROMPT_COLUMNS
from prompt_tool.migrate import changed_tables, fingerprint_legacy_tables, load_legacy_sample
from prompt_tool.migrate.sample import TRICKY_TEXTS


@pytest.fixture
def legacy_db_url(empty_db_url: str) -> str:
    """A database at 0001 holding the realistic legacy data set."""
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=400, projects=3, seed=11)
    return empty_db_url


def _session_texts(url: str, engine_for: Any) -> list[str | None]:
    with engine_for(url).connect() as connection:
        rows = connection.execute(
            text(f"SELECT {', '.join(SESSION_PROMPT_COLUMNS)} FROM orchestration_sessions")
        )
        return [value for row in rows for value in row]


def test_sample_holds_the_hard_cases(legacy_db_url: str, engine_for: Any) -> None:
    texts = _session_texts(legacy_db_url, engine_for)
    assert None in texts
    assert "" in texts
    for marker in ("{{", "{%", "{#", "{% raw %}", "\r\n", "🚀", "e\u0301"):
        assert any(marker in t for t in texts if t), marker
    assert max(len(t) for t in texts if t) >= 100_000
    assert len(set(TRICKY_TEXTS) & set(texts)) >= len(TRICKY_TEXTS) - 2


def test_upgrade_then_downgrade_leaves_legacy_rows_byte_identical(legacy_db_url: str) -> None:
    before = fingerprint_legacy_tables(legacy_db_url)

    schema.upgrade(legacy_db_url)
    at_head = fingerprint_legacy_tables(legacy_db_url)
    schema.downgrade(legacy_db_url, "-1")
    after_downgrade = fingerprint_legacy_tables(legacy_db_url)
    schema.upgrade(legacy_db_url)
    after_second_upgrade = fingerprint_legacy_tables(legacy_db_url)

    assert changed_tables(before, at_head) == []
    assert changed_tables(before, after_downgrade) == []
    assert changed_tables(before, after_second_upgrade) == []
    assert {t.table: t.rows for t in before.tables}["orchestration_sessions"] == 400


def test_downgrade_removes_every_trace_of_the_expand_step(
    legacy_db_url: str, engine_for: Any
) -> None:
    def columns_by_table(url: str) -> dict[str, list[str]]:
        inspector = inspect(engine_for(url))
        return {
            table: [c["name"] for c in inspector.get_columns(table)]
            for table in inspector.get_table_names()
        }

    at_0001 = columns_by_table(legacy_db_url)
    schema.upgrade(legacy_db_url)
    schema.downgrade(legacy_db_url, "0001")
    assert columns_by_table(legacy_db_url) == at_0001


def test_fingerprint_notices_a_single_changed_byte(legacy_db_url: str, engine_for: Any) -> None:
    before = fingerprint_legacy_tables(legacy_db_url)
    with engine_for(legacy_db_url).begin() as connection:
        connection.execute(
            text(
                "UPDATE orchestration_sessions SET planner_prompt = 'line one\nline two\n' "
                "WHERE planner_prompt = 'line one\r\nline two\r\n'"
            )
        )
    assert changed_tables(before, fingerprint_legacy_tables(legacy_db_url)) == [
        "orchestration_sessions"
    ]


def test_fingerprint_tells_null_from_empty_text(legacy_db_url: str, engine_for: Any) -> None:
    before = fingerprint_legacy_tables(legacy_db_url)
    with engine_for(legacy_db_url).begin() as connection:
        changed = connection.execute(
            text(
                "UPDATE orchestration_sessions SET system_prompt = '' "
                "WHERE id = (SELECT min(id) FROM orchestration_sessions "
                "WHERE system_prompt IS NULL)"
            )
        ).rowcount
    assert changed == 1
    assert changed_tables(before, fingerprint_legacy_tables(legacy_db_url)) == [
        "orchestration_sessions"
    ]
