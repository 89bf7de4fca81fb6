"""`orch-migrate fingerprint --against FILE`: a fingerprint taken before `db upgrade` passes after
upgrade, backfill, sessions created through templates and downgrade; a row that existed then and
changed or vanished fails it, naming the table; rows added since are counted, never failed; a
file saved before fingerprints recorded each table's highest id compares whole tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from prompt_tool.cli.orch_migrate import app as orch_migrate
from prompt_tool.compat.writes import create_session
from prompt_tool.db import schema
from prompt_tool.db.engine import make_engine, make_session_factory, session_scope
from prompt_tool.db.legacy import LEGACY_TABLES
from prompt_tool.db.models import Scope
from prompt_tool.db.revisions import BASELINE
from prompt_tool.migrate import load_legacy_sample
from prompt_tool.migrate.backfill import backfill
from prompt_tool.migrate.fingerprint import fingerprint_legacy_tables, load_fingerprint
from prompt_tool.templates import TemplateAddress, TemplateManager
from prompt_tool.templates.permissions import grant_role
from tests.cli_run import run_cli


@pytest.fixture
def legacy_url(empty_db_url: str) -> str:
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=80, projects=2, seed=11)
    return empty_db_url


def _fingerprint(url: str, *args: str) -> tuple[int, str, str]:
    return run_cli(orch_migrate, ["orch-migrate", "fingerprint", *args, "--db", url])


def _save(url: str, path: Path) -> dict[str, Any]:
    code, out, err = _fingerprint(url, "--json")
    assert code == 0, err
    path.write_text(out, encoding="utf-8")
    saved: dict[str, Any] = json.loads(out)
    return saved


def _execute(url: str, statement: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


def _sessions_through_templates(url: str, count: int) -> list[int]:
    """As a person would: a global template, and sessions created through it (dual write)."""
    engine = make_engine(url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            grant_role(session, "ops", "ops", "admin", None)
        manager = TemplateManager(engine)
        manager.create(
            TemplateAddress("planner", Scope.GLOBAL), "Plan {{ goal }}.\r\n", actor="ops"
        )
        return [
            create_session(
                manager, "project-1", {"planner": "planner"}, {"goal": f"step {n}"}, name=f"s{n}"
            ).session_id
            for n in range(count)
        ]
    finally:
        engine.dispose()


def test_a_saved_fingerprint_records_each_tables_highest_id(
    legacy_url: str, tmp_path: Path
) -> None:
    saved = _save(legacy_url, tmp_path / "before.json")

    by_table = {t["table"]: t for t in saved["tables"]}
    assert list(by_table) == list(LEGACY_TABLES)
    assert by_table["orchestration_sessions"]["max_id"] == 80
    assert by_table["orchestration_sessions"]["rows"] == 80
    assert all(isinstance(t["max_id"], int) for t in saved["tables"])
    assert load_fingerprint(tmp_path / "before.json").by_table()["projects"].max_id == 2


@pytest.mark.parametrize("keep", ["archive", "discard"])
def test_a_fingerprint_from_before_the_upgrade_passes_after_the_whole_journey_and_its_downgrade(
    legacy_url: str, tmp_path: Path, keep: str
) -> None:
    _save(legacy_url, tmp_path / "before.json")
    schema.upgrade(legacy_url)
    engine = make_engine(legacy_url)
    try:
        assert backfill(engine).templates_created > 0
    finally:
        engine.dispose()
    created = _sessions_through_templates(legacy_url, 2)

    schema.downgrade(
        legacy_url,
        BASELINE,
        archive=tmp_path / "archive" if keep == "archive" else None,
        discard_user_templates=keep == "discard",
    )
    shown = _fingerprint(legacy_url, "--against", str(tmp_path / "before.json"))
    as_json = _fingerprint(legacy_url, "--against", str(tmp_path / "before.json"), "--json")

    code, out, err = shown
    assert code == 0, err
    assert err == ""
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ ")}
    assert "same, +2 new" in lines["orchestration_sessions"]
    for name in LEGACY_TABLES:
        if name != "orchestration_sessions":
            assert "same" in lines[name] and "new" not in lines[name], lines[name]
    data = json.loads(as_json[1])
    assert as_json[0] == 0
    assert data["changed"] == []
    assert data["added"] == {
        name: 2 if name == "orchestration_sessions" else 0 for name in LEGACY_TABLES
    }
    assert created == [81, 82]


@pytest.mark.parametrize(
    ("change", "table"),
    [
        ("DELETE FROM orchestration_sessions WHERE id = 7", "orchestration_sessions"),
        ("UPDATE prompts SET content = content || ' ' WHERE id = 1", "prompts"),
        (
            "UPDATE orchestration_sessions SET planner_prompt = NULL WHERE id = 80",
            "orchestration_sessions",
        ),
        (
            "DELETE FROM ab_test_variants WHERE id = (SELECT max(id) FROM ab_test_variants)",
            "ab_test_variants",
        ),
    ],
)
def test_a_row_that_existed_then_and_changed_or_vanished_fails_naming_the_table(
    legacy_url: str, tmp_path: Path, change: str, table: str
) -> None:
    _save(legacy_url, tmp_path / "before.json")
    _execute(
        legacy_url,
        "INSERT INTO projects (slug, name) VALUES ('added-later', 'Added later')",
    )
    _execute(legacy_url, change)

    code, out, err = _fingerprint(legacy_url, "--against", str(tmp_path / "before.json"))

    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"legacy tables differ from {tmp_path / 'before.json'}: {table} (" in err
    assert "changed or vanished" in err
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ ")}
    assert "CHANGED" in lines[table]
    assert "same, +1 new" in lines["projects"]


def test_rows_added_since_are_counted_not_failed(legacy_url: str, tmp_path: Path) -> None:
    _save(legacy_url, tmp_path / "before.json")
    _execute(legacy_url, "INSERT INTO projects (slug, name) VALUES ('p3', 'Three')")
    _execute(
        legacy_url,
        "INSERT INTO orchestration_sessions (project_id, name, status) VALUES (1, 'n1', 'pending')",
    )
    _execute(
        legacy_url,
        "INSERT INTO orchestration_sessions (project_id, name, status) VALUES (1, 'n2', 'pending')",
    )

    result = fingerprint_legacy_tables(legacy_url, tmp_path / "before.json")

    assert result.changed == []
    assert result.added is not None
    assert result.added["projects"] == 1
    assert result.added["orchestration_sessions"] == 2
    assert result.by_table()["orchestration_sessions"].rows == 82


def test_an_old_fingerprint_without_highest_ids_compares_whole_tables(
    legacy_url: str, tmp_path: Path
) -> None:
    saved = _save(legacy_url, tmp_path / "new.json")
    for entry in saved["tables"]:
        del entry["max_id"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(saved), encoding="utf-8")

    same = _fingerprint(legacy_url, "--against", str(old))
    _execute(legacy_url, "INSERT INTO projects (slug, name) VALUES ('p3', 'Three')")
    grown = _fingerprint(legacy_url, "--against", str(old))
    with_ids = _fingerprint(legacy_url, "--against", str(tmp_path / "new.json"))

    assert same[0] == 0, same[2]
    assert "compared whole" in same[1]
    # Without the highest id a new row cannot be told from a changed one: as before, it fails.
    assert grown[0] == 1
    assert "legacy tables differ from" in grown[2] and ": projects (" in grown[2]
    assert with_ids[0] == 0, with_ids[2]
    data = json.loads(_fingerprint(legacy_url, "--against", str(old), "--json")[1])
    assert data["changed"] == ["projects"] and data["added"] == {}


def test_a_file_that_is_not_a_fingerprint_is_refused_in_one_line(
    legacy_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"tables": [{"table": "projects", "rows": 2, "sha256": "x", "max_id": "2"}]})
    )

    code, _, err = _fingerprint(legacy_url, "--against", str(bad))

    assert code == 2
    assert err.count("\n") == 1 and "is not a fingerprint" in err
