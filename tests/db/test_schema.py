"""The schema library behind `orch-migrate db`: right answers and one-line, actionable errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from prompt_tool.db import schema
from prompt_tool.errors import DatabaseUnavailableError, SchemaError

HEAD = "0003"


def test_history_is_one_line_from_legacy_to_head() -> None:
    revisions = schema.history()
    assert [r.revision for r in revisions] == ["0001", "0002", "0003"]
    assert [r.down_revision for r in revisions] == [None, "0001", "0002"]
    assert [r.is_head for r in revisions] == [False, False, True]


def test_upgrade_downgrade_and_current_report_where_the_database_stands(empty_db_url: str) -> None:
    assert schema.current(empty_db_url).current is None
    up = schema.upgrade(empty_db_url)
    assert (up.previous, up.current, up.head) == (None, HEAD, HEAD)
    down = schema.downgrade(empty_db_url)
    assert (down.previous, down.current) == ("0003", "0002")
    down = schema.downgrade(empty_db_url)
    assert (down.previous, down.current) == ("0002", "0001")
    assert schema.current(empty_db_url).current == "0001"


def test_unknown_revision_is_refused_and_points_at_history(empty_db_url: str) -> None:
    with pytest.raises(SchemaError, match="db history"):
        schema.upgrade(empty_db_url, "not-a-revision")


def test_downgrading_a_database_not_under_alembic_is_refused(empty_db_url: str) -> None:
    with pytest.raises(SchemaError, match="not under Alembic"):
        schema.downgrade(empty_db_url)


def test_legacy_tables_without_alembic_are_adopted_by_stamp(
    empty_db_url: str, engine_for: Any
) -> None:
    schema.upgrade(empty_db_url, "0001")
    with engine_for(empty_db_url).begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))

    with pytest.raises(SchemaError, match="db stamp 0001"):
        schema.upgrade(empty_db_url)

    assert schema.stamp(empty_db_url, "0001").current == "0001"
    assert schema.upgrade(empty_db_url).current == HEAD


def test_missing_sqlite_file_is_not_created_by_read_commands(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    with pytest.raises(DatabaseUnavailableError, match="db upgrade"):
        schema.current(f"sqlite:///{path}")
    assert not path.exists()


def test_unreachable_server_says_what_to_check() -> None:
    with pytest.raises(DatabaseUnavailableError, match=r"cannot connect .* --db"):
        schema.current("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")


def test_migration_scripts_are_found_from_a_checkout() -> None:
    assert (schema.script_location() / "versions").is_dir()
