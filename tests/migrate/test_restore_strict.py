"""`orch-migrate restore` is strict: it refuses an export whose manifest lost a table or whose
directory holds a file the manifest does not list, and it never overwrites or leaves behind a row
changed after the export without being told which (refuse by default, --dry-run to see them,
--keep-current or --overwrite to choose). Real SQLite and PostgreSQL databases throughout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select, text
from typer.testing import CliRunner

from prompt_tool.db import schema
from prompt_tool.db.engine import make_engine
from prompt_tool.db.models import OrchestrationSession, OrchestrationStep
from prompt_tool.migrate.archive import (
    TABLES_AT_REVISION,
    InvalidExportError,
    existing_table_specs,
)
from prompt_tool.migrate.restore import (
    DifferingRows,
    DifferingRowsError,
    RestoreOutcome,
    RestoreResult,
    restore,
)
from tests.migrate.test_export_restore import (
    _all_text,
    _cli,
    _counts,
    _export,
    _load_rich_data,
    _new_head_db,
    _restore,
    _runs,
)

runner = CliRunner()
# What the issue saw: these entries removed from manifest.json, their files left in place.
LOST_TABLES = ["orchestration_sessions", "session_prompt_refs", "ab_assignments", "template_events"]
CHANGED = "changed by the old application after the export"


@pytest.fixture
def source_url(head_db_url: str) -> str:
    _load_rich_data(head_db_url)
    return head_db_url


@pytest.fixture
def target_url(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _new_head_db(dialect, request, tmp_path, "target")


def _state(url: str) -> tuple[Any, ...]:
    """Every row of every archived table, and how many rows the run ledger holds."""
    return _all_text(url), _counts(url)


def _edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def _lose_tables(manifest: dict[str, Any]) -> None:
    manifest["files"] = [f for f in manifest["files"] if f["table"] not in LOST_TABLES]


# --- the manifest lists every table of its revision, and the directory nothing else -------------


def test_a_manifest_that_lost_tables_is_refused_naming_them_and_nothing_is_written(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _export(source_url, tmp_path / "export")
    _edit_manifest(tmp_path / "export", _lose_tables)
    before = _state(target_url)

    with pytest.raises(InvalidExportError) as refused:
        _restore(target_url, tmp_path / "export")

    message = str(refused.value)
    assert refused.value.exit_code == 2
    assert "\n" not in message
    assert all(table in message for table in LOST_TABLES), message
    assert f"schema revision {schema.history()[-1].revision}" in message
    assert _state(target_url) == before  # not a row, not even a ledger row


def test_a_file_the_manifest_does_not_list_is_refused_naming_it(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _export(source_url, tmp_path / "export")
    (tmp_path / "export" / "notes.txt").write_text("mine", encoding="utf-8")
    before = _state(target_url)

    with pytest.raises(
        InvalidExportError, match=r"holds notes\.txt, which manifest\.json does not list"
    ):
        _restore(target_url, tmp_path / "export")

    assert _state(target_url) == before


def test_a_manifest_listing_a_table_its_revision_does_not_have_is_refused(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _export(source_url, tmp_path / "export")
    _edit_manifest(tmp_path / "export", lambda manifest: manifest.update(alembic_revision="0001"))

    with pytest.raises(InvalidExportError, match=r"session_prompt_refs.*revision 0001"):
        _restore(target_url, tmp_path / "export")


@pytest.mark.parametrize(
    ("revision", "message"),
    [
        ("0099", "'0099' is not one this prompt-tool knows \\(0001, 0002, 0003\\)"),
        (None, "names no"),
    ],
    ids=["unknown", "none"],
)
def test_a_manifest_of_a_revision_this_version_does_not_know_is_refused(
    source_url: str, target_url: str, tmp_path: Path, revision: str | None, message: str
) -> None:
    _export(source_url, tmp_path / "export")
    _edit_manifest(tmp_path / "export", lambda m: m.update(alembic_revision=revision))
    before = _state(target_url)

    with pytest.raises(InvalidExportError, match=message):
        _restore(target_url, tmp_path / "export")

    assert _state(target_url) == before


def test_a_project_export_still_lists_every_table_of_its_revision(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    result = _export(source_url, tmp_path / "export", projects=["project-2"])

    assert [t.table for t in result.tables] == list(
        TABLES_AT_REVISION[schema.history()[-1].revision]
    )
    assert result.row_counts["ab_assignments"] == 0  # listed even with no rows
    assert _restore(target_url, tmp_path / "export").inserted == result.rows


def test_each_revision_lists_exactly_the_archived_tables_a_database_at_it_has(
    empty_db_url: str,
) -> None:
    revisions = [revision.revision for revision in schema.history()]
    assert list(TABLES_AT_REVISION) == revisions, (
        "every schema revision needs its line in archive.TABLES_AT_REVISION"
    )
    engine = make_engine(empty_db_url)
    try:
        for revision in revisions:
            schema.upgrade(empty_db_url, revision)
            with engine.connect() as connection:
                present = [spec.name for spec in existing_table_specs(connection)]
            assert present == list(TABLES_AT_REVISION[revision]), revision
    finally:
        engine.dispose()


def test_cli_refuses_a_manifest_that_lost_tables_in_one_line_with_exit_2(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _export(source_url, tmp_path / "export")
    _edit_manifest(tmp_path / "export", _lose_tables)

    result = runner.invoke(
        _cli(), ["restore", "--from", str(tmp_path / "export"), "--db", target_url]
    )

    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "orchestration_sessions" in result.stderr and "Traceback" not in result.stderr


# --- rows changed after the export --------------------------------------------------------------


def _changed_after_the_export(source_url: str, target_url: str, directory: Path) -> list[int]:
    """The export restored into the target, then, as an older application would: three
    sessions' system prompt changed and the steps deleted (rows the restore has to insert)."""
    _export(source_url, directory)
    _restore(target_url, directory)
    engine = make_engine(target_url)
    try:
        with engine.begin() as connection:
            ids = list(
                connection.execute(
                    select(OrchestrationSession.id).order_by(OrchestrationSession.id).limit(3)
                ).scalars()
            )
            connection.execute(
                text("UPDATE orchestration_sessions SET system_prompt = :text WHERE id = :id"),
                [{"text": CHANGED, "id": session_id} for session_id in ids],
            )
            connection.execute(delete(OrchestrationStep))
    finally:
        engine.dispose()
    return ids


def _table(result: RestoreResult, name: str) -> Any:
    return next(t for t in result.tables if t.table == name)


def _system_prompts(url: str, ids: list[int]) -> list[str | None]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(
                connection.execute(
                    select(OrchestrationSession.system_prompt)
                    .where(OrchestrationSession.id.in_(ids))
                    .order_by(OrchestrationSession.id)
                ).scalars()
            )
    finally:
        engine.dispose()


def test_rows_changed_after_the_export_refuse_the_restore_and_nothing_is_written(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    ids = _changed_after_the_export(source_url, target_url, tmp_path / "export")
    before = _state(target_url)

    with pytest.raises(DifferingRowsError) as refused:
        _restore(target_url, tmp_path / "export")

    message = str(refused.value)
    assert refused.value.exit_code == 1
    assert "\n" not in message
    assert message.startswith("3 rows in orchestration_sessions differ from the export")
    assert f"id {ids[0]}, {ids[1]}, {ids[2]}" in message
    assert "--dry-run" in message and "--keep-current" in message and "--overwrite" in message
    result = refused.value.result
    assert result.outcome is RestoreOutcome.REFUSED
    assert (result.different, result.missing, result.inserted) == (3, 2, 0)
    assert _state(target_url) == before  # the steps were not inserted, no ledger row either


def test_a_row_changed_in_the_last_table_undoes_what_was_inserted_before_it(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _export(source_url, tmp_path / "export")
    _restore(target_url, tmp_path / "export")
    engine = make_engine(target_url)
    try:
        with engine.begin() as connection:
            connection.execute(delete(OrchestrationStep))
            connection.execute(text("UPDATE template_events SET note = 'edited'"))
    finally:
        engine.dispose()
    before = _state(target_url)

    with pytest.raises(DifferingRowsError, match=r"^2 rows in template_events differ"):
        _restore(target_url, tmp_path / "export")

    assert _state(target_url) == before


def test_a_dry_run_lists_what_would_be_inserted_identical_and_differing_and_writes_nothing(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    ids = _changed_after_the_export(source_url, target_url, tmp_path / "export")
    before = _state(target_url)

    result = _restore(target_url, tmp_path / "export", dry_run=True)

    assert _state(target_url) == before
    assert result.outcome is RestoreOutcome.DRY_RUN
    assert (result.inserted, result.overwritten, result.kept, result.run_id) == (0, 0, 0, None)
    sessions = _table(result, "orchestration_sessions")
    assert (sessions.different, sessions.different_keys) == (3, [[i] for i in ids])
    assert sessions.identical == sessions.rows - 3
    assert (_table(result, "orchestration_steps").missing, result.missing) == (2, 2)
    assert result.identical == result.rows - 5
    assert result.refusal is not None
    assert result.refusal.startswith("a restore would be refused: 3 rows in orchestration_sessions")
    # With a choice made, the same comparison says it would go through.
    chosen = _restore(
        target_url, tmp_path / "export", dry_run=True, differing=DifferingRows.OVERWRITE
    )
    assert (chosen.refusal, chosen.different, chosen.overwritten) == (None, 3, 0)
    assert _state(target_url) == before


def test_a_dry_run_inside_the_callers_transaction_leaves_it_usable_and_unchanged(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _changed_after_the_export(source_url, target_url, tmp_path / "export")
    before = _state(target_url)
    engine = make_engine(target_url)
    try:
        with engine.begin() as connection:
            result = restore(connection, tmp_path / "export", dry_run=True)
            steps = connection.execute(select(func.count()).select_from(OrchestrationStep))
            assert steps.scalar_one() == 0
    finally:
        engine.dispose()

    assert (result.outcome, result.different, result.missing) == (RestoreOutcome.DRY_RUN, 3, 2)
    assert _state(target_url) == before


def test_keep_current_restores_the_rest_and_leaves_the_changed_rows_as_they_are(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    ids = _changed_after_the_export(source_url, target_url, tmp_path / "export")

    result = _restore(target_url, tmp_path / "export", differing=DifferingRows.KEEP_CURRENT)

    assert result.outcome is RestoreOutcome.RESTORED
    assert (result.inserted, result.kept, result.overwritten, result.refusal) == (2, 3, 0, None)
    assert _table(result, "orchestration_sessions").kept == 3
    assert _system_prompts(target_url, ids) == [CHANGED] * 3
    assert (
        _all_text(target_url)["orchestration_steps"] == _all_text(source_url)["orchestration_steps"]
    )
    kind, status, summary = _runs(target_url)[-1]
    assert (kind, status, summary["differing"]) == ("restore", "completed", "keep-current")
    assert summary["tables"]["orchestration_sessions"]["kept"] == 3


def test_overwrite_replaces_the_changed_rows_and_says_how_many_of_which_table(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _changed_after_the_export(source_url, target_url, tmp_path / "export")

    result = _restore(target_url, tmp_path / "export", differing=DifferingRows.OVERWRITE)

    assert (result.inserted, result.overwritten, result.kept) == (2, 3, 0)
    assert {t.table: t.overwritten for t in result.tables if t.overwritten} == {
        "orchestration_sessions": 3
    }
    assert _all_text(target_url) == _all_text(source_url)
    kind, status, summary = _runs(target_url)[-1]
    assert (kind, status) == ("restore", "completed")
    assert summary["tables"]["orchestration_sessions"]["overwritten"] == 3
    assert _restore(target_url, tmp_path / "export").identical == result.rows


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_refuses_changed_rows_in_one_line_exit_1_and_json_says_nothing_was_written(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    ids = _changed_after_the_export(source_url, target_url, tmp_path / "export")
    restore_from = ["restore", "--from", str(tmp_path / "export"), "--db", target_url]
    before = _state(target_url)

    plain = runner.invoke(_cli(), restore_from)
    as_json = runner.invoke(_cli(), [*restore_from, "--json"])

    assert plain.exit_code == as_json.exit_code == 1
    assert plain.stdout == ""
    (line,) = plain.stderr.strip().splitlines()
    assert "3 rows in orchestration_sessions differ" in line and f"id {ids[0]}" in line
    report = json.loads(as_json.stdout)
    assert (report["outcome"], report["inserted"], report["different"]) == ("refused", 0, 3)
    assert report["refusal"] in line
    assert _state(target_url) == before


def test_cli_dry_run_lists_the_changed_rows_and_exits_as_the_restore_would(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    ids = _changed_after_the_export(source_url, target_url, tmp_path / "export")
    restore_from = ["restore", "--from", str(tmp_path / "export"), "--db", target_url]
    before = _state(target_url)

    dry = runner.invoke(_cli(), [*restore_from, "--dry-run"])
    dry_json = runner.invoke(_cli(), [*restore_from, "--dry-run", "--json"])
    dry_chosen = runner.invoke(_cli(), [*restore_from, "--dry-run", "--keep-current"])

    assert dry.exit_code == dry_json.exit_code == 1
    assert "nothing written" in dry.stdout
    assert f"id {ids[0]}, {ids[1]}, {ids[2]}" in dry.stdout
    assert "would be refused" in dry.stderr
    report = json.loads(dry_json.stdout)
    assert (report["outcome"], report["missing"], report["different"]) == ("dry-run", 2, 3)
    assert dry_chosen.exit_code == 0, dry_chosen.output
    assert "it would keep them as they are" in dry_chosen.stdout
    assert _state(target_url) == before


def test_cli_overwrite_names_how_many_rows_of_which_table_it_replaced(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _changed_after_the_export(source_url, target_url, tmp_path / "export")
    restore_from = ["restore", "--from", str(tmp_path / "export"), "--db", target_url]

    both = runner.invoke(_cli(), [*restore_from, "--overwrite", "--keep-current"])
    replaced = runner.invoke(_cli(), [*restore_from, "--overwrite"])

    assert both.exit_code == 2 and "contradict" in both.stderr
    assert replaced.exit_code == 0, replaced.output
    assert "3 differing overwritten with the export's (orchestration_sessions 3)" in (
        " ".join(replaced.stdout.split())
    )
    assert _all_text(target_url) == _all_text(source_url)
