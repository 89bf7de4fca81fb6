"""`orch-migrate export` / `restore`: a deployment's data to a directory and back, byte for byte,
checked before anything is written, idempotent, on SQLite and PostgreSQL and across them."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import Engine, Text, cast, event, func, insert, select, text
from typer.testing import CliRunner

from prompt_tool.cli._runtime import new_app
from prompt_tool.cli.transfer_commands import export_command, restore_command
from prompt_tool.db import bulk_io, schema
from prompt_tool.db.engine import make_engine
from prompt_tool.db.models import (
    ABAssignment,
    ABTest,
    ABTestVariant,
    Base,
    MigrationRun,
    OrchestrationSession,
    OrchestrationStep,
    Project,
    Prompt,
    PromptVersion,
    TemplateEvent,
    TemplateLabel,
)
from prompt_tool.errors import NotFoundError, PromptToolError
from prompt_tool.migrate import load_legacy_sample
from prompt_tool.migrate.archive import (
    ARCHIVED_TABLES,
    ExportRevisionMismatchError,
    InvalidExportError,
    TableSpec,
)
from prompt_tool.migrate.backfill import backfill
from prompt_tool.migrate.export import export
from prompt_tool.migrate.fingerprint import fingerprint_legacy_tables
from prompt_tool.migrate.restore import (
    DifferingRows,
    DifferingRowsError,
    RestoreConflictError,
    RestoreOutcome,
    restore,
    verify_export,
)

runner = CliRunner()
LONG_TEXT = "long step input " + "y" * 100_000
TRICKY_JSON = '{"b": 1,  "a": [1, 2.50, "x\\u00e9"],\n "z": null}'


# --- databases --------------------------------------------------------------------------------


def _new_head_db(dialect: str, request: pytest.FixtureRequest, tmp_path: Path, name: str) -> str:
    """Another fresh database at head, like conftest's ``head_db_url``."""
    if dialect == "sqlite":
        template: Path = request.getfixturevalue("sqlite_head_template")
        path = tmp_path / f"{name}.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    server = request.getfixturevalue("pg_server")
    template_name: str = request.getfixturevalue("pg_head_template")
    return str(server.url_for(server.create_database(name, template=template_name)))


def _load_rich_data(url: str, *, sessions: int = 80) -> None:
    """The legacy sample, backfilled (references, imported templates), plus rows in every new
    table with the values that are easy to get wrong: NULL vs empty, CRLF, unicode, 100 KB
    texts, JSON with odd spacing and key order, microsecond timestamps, floats, booleans."""
    load_legacy_sample(url, sessions=sessions, projects=3, seed=11)
    engine = make_engine(url)
    try:
        backfill(engine)
        postgres = engine.dialect.name == "postgresql"
        with engine.begin() as connection:
            project_id = connection.execute(
                select(Project.id).where(Project.slug == "project-1")
            ).scalar_one()
            session_ids = list(
                connection.execute(
                    select(OrchestrationSession.id)
                    .where(OrchestrationSession.project_id == project_id)
                    .order_by(OrchestrationSession.id)
                    .limit(3)
                ).scalars()
            )
            tricky = session_ids[0]
            connection.execute(
                text(
                    "UPDATE orchestration_sessions SET system_prompt = NULL, planner_prompt = '', "
                    "synthesis_prompt = :synthesis, variables = :variables WHERE id = :id"
                ),
                {
                    "synthesis": "line one\r\n日本語 🚀 {{ x }}\r\n",
                    "variables": TRICKY_JSON,
                    "id": tricky,
                },
            )
            stamp = "2026-01-31 23:59:59.123456+05:30" if postgres else "2026-01-31 18:29:59.123456"
            connection.execute(
                text("UPDATE orchestration_sessions SET created_at = :at WHERE id = :id"),
                {"at": stamp, "id": tricky},
            )
            template_id = connection.execute(
                insert(Prompt)
                .values(
                    project_id=None,
                    name="tmpl/greeting",
                    content="Hello {{ name }}\r\n",
                    prompt_type="orchestration_template",
                    scope="global",
                    description="",
                )
                .returning(Prompt.id)
            ).scalar_one()
            connection.execute(
                text(
                    "UPDATE prompts SET tags = :tags, declared_variables = :declared WHERE id = :id"
                ),
                {
                    "tags": '[ "b",  "a" ]',
                    "declared": '{"name":{"required":true}}',
                    "id": template_id,
                },
            )
            versions = [
                connection.execute(
                    insert(PromptVersion)
                    .values(
                        prompt_id=template_id,
                        version=number,
                        content=f"Hello {{{{ name }}}} take {number} ü\r\n",
                        created_by=None if number == 1 else "ed",
                        change_note="" if number == 1 else None,
                    )
                    .returning(PromptVersion.id)
                ).scalar_one()
                for number in (1, 2)
            ]
            connection.execute(
                insert(TemplateLabel).values(
                    prompt_id=template_id, label="production", prompt_version_id=versions[1]
                )
            )
            connection.execute(
                insert(TemplateEvent),
                [
                    {
                        "prompt_id": template_id,
                        "action": "publish",
                        "label": None,
                        "from_version_id": None,
                        "to_version_id": versions[0],
                        "actor": "ed",
                        "note": None,
                    },
                    {
                        "prompt_id": template_id,
                        "action": "move_label",
                        "label": "production",
                        "from_version_id": versions[0],
                        "to_version_id": versions[1],
                        "actor": "root",
                        "note": "why:\r\n  ünïcode — and a tab\t",
                    },
                ],
            )
            connection.execute(
                insert(OrchestrationStep),
                [
                    {
                        "session_id": tricky,
                        "position": 1,
                        "role": "planner",
                        "input_text": LONG_TEXT,
                        "output_text": None,
                        "model": "m-1",
                        "status": "running",
                        "error": None,
                    },
                    {
                        "session_id": tricky,
                        "position": 2,
                        "role": "synthesis",
                        "input_text": "",
                        "output_text": "",
                        "model": None,
                        "status": "failed",
                        "error": "timeout\n",
                    },
                ],
            )
            test_id, variant_id = connection.execute(
                select(ABTest.id, ABTestVariant.id)
                .join(ABTestVariant, ABTestVariant.ab_test_id == ABTest.id)
                .where(ABTest.project_id == project_id)
                .order_by(ABTestVariant.id)
                .limit(1)
            ).one()
            outcome = datetime(2026, 2, 1, 8, 30, 0, 654321, tzinfo=UTC)
            assignments: list[dict[str, Any]] = [
                {"success": True, "metric": 0.1, "outcome_at": outcome},
                {"success": None, "metric": None, "outcome_at": None},
                {
                    "success": False,
                    "metric": float("nan") if postgres else 1e300,
                    "outcome_at": None,
                },
            ]
            connection.execute(
                insert(ABAssignment),
                [
                    {
                        "ab_test_id": test_id,
                        "session_id": session,
                        "variant_id": variant_id,
                        "unit_key": f"user-{session}",
                        **values,
                    }
                    for session, values in zip(session_ids, assignments, strict=True)
                ],
            )
    finally:
        engine.dispose()


@pytest.fixture
def source_url(head_db_url: str) -> str:
    _load_rich_data(head_db_url)
    return head_db_url


@pytest.fixture
def target_url(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _new_head_db(dialect, request, tmp_path, "target")


@pytest.fixture
def engines() -> Iterator[Callable[[str], Engine]]:
    made: list[Engine] = []

    def make(url: str) -> Engine:
        engine = make_engine(url)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


def _export(url: str, target: Path, **options: Any) -> Any:
    engine = make_engine(url)
    try:
        return export(engine, target, **options)
    finally:
        engine.dispose()


def _restore(url: str, source: Path, **options: Any) -> Any:
    engine = make_engine(url)
    try:
        return restore(engine, source, **options)
    finally:
        engine.dispose()


# --- comparing databases ------------------------------------------------------------------


def _table_text(url: str, table: str) -> list[tuple[Any, ...]]:
    """Every row as the database's own text of each value: exact bytes, NULL kept apart."""
    model = Base.metadata.tables[table]
    columns = [cast(column, Text) for column in model.columns]
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(*columns).order_by(*model.primary_key.columns)).all()
    finally:
        engine.dispose()
    return [tuple(row) for row in rows]


def _all_text(url: str) -> dict[str, list[tuple[Any, ...]]]:
    return {table: _table_text(url, table) for table in ARCHIVED_TABLES}


def _comparable(value: Any) -> Any:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else value.hex()
    return value


def _typed_rows(url: str, table: str) -> list[tuple[Any, ...]]:
    """Rows as typed values (instants, floats, booleans) and JSON columns as their stored text:
    what must be equal across dialects, whose text spellings of a time or a boolean differ."""
    model = Base.metadata.tables[table]
    columns = [
        cast(column, Text) if column.type.__class__.__name__ == "JSON" else column
        for column in model.columns
    ]
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(*columns).order_by(*model.primary_key.columns)).all()
    finally:
        engine.dispose()
    return [tuple(_comparable(value) for value in row) for row in rows]


def _counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return {
                table: connection.execute(
                    select(func.count()).select_from(Base.metadata.tables[table])
                ).scalar_one()
                for table in (*ARCHIVED_TABLES, "migration_runs")
            }
    finally:
        engine.dispose()


def _runs(url: str) -> list[tuple[str, str, Any]]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(MigrationRun.kind, MigrationRun.status, MigrationRun.summary)
                .where(MigrationRun.kind.in_(["export", "restore"]))
                .order_by(MigrationRun.id)
            ).all()
    finally:
        engine.dispose()
    return [tuple(row) for row in rows]


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_round_trip_restores_every_row_byte_for_byte(
    source_url: str, target_url: str, tmp_path: Path, compress: bool
) -> None:
    exported = _export(source_url, tmp_path / "export", compress=compress)
    restored = _restore(target_url, tmp_path / "export")

    assert (
        fingerprint_legacy_tables(target_url).tables == fingerprint_legacy_tables(source_url).tables
    )
    assert _all_text(target_url) == _all_text(source_url)
    assert {t.table: t.inserted for t in restored.tables} == exported.row_counts
    assert exported.row_counts["orchestration_steps"] == 2
    assert exported.row_counts["ab_assignments"] == 3
    assert exported.row_counts["session_prompt_refs"] > 0
    assert restored.identical == restored.different == 0


def test_export_files_are_json_lines_described_by_the_manifest(
    source_url: str, tmp_path: Path
) -> None:
    result = _export(source_url, tmp_path / "export")
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text(encoding="utf-8"))

    head = schema.history()[-1].revision
    assert manifest["alembic_revision"] == schema.current(source_url).current == head
    assert manifest["tool_version"] == result.tool_version
    assert datetime.fromisoformat(manifest["created_at"]).tzinfo is not None
    files = {f["table"]: f for f in manifest["files"]}
    assert list(files) == list(ARCHIVED_TABLES)
    sessions = files["orchestration_sessions"]
    lines = (tmp_path / "export" / sessions["file"]).read_bytes().splitlines()
    assert len(lines) == sessions["rows"] == result.row_counts["orchestration_sessions"]
    rows = [json.loads(line) for line in lines]
    by_column = [dict(zip(sessions["columns"], row, strict=True)) for row in rows]
    tricky = next(r for r in by_column if r["variables"] == TRICKY_JSON)
    assert tricky["system_prompt"] is None
    assert tricky["planner_prompt"] == ""
    assert tricky["synthesis_prompt"] == "line one\r\n日本語 🚀 {{ x }}\r\n"
    assert tricky["created_at"] == "2026-01-31T18:29:59.123456+00:00"
    assert all(datetime.fromisoformat(r["updated_at"]).tzinfo is not None for r in by_column)
    assert [r["id"] for r in by_column] == sorted(r["id"] for r in by_column)


def test_restoring_twice_changes_nothing_the_second_time(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _export(source_url, tmp_path / "export")
    first = _restore(target_url, tmp_path / "export")
    after_first = _all_text(target_url)

    second = _restore(target_url, tmp_path / "export")

    assert _all_text(target_url) == after_first
    assert second.inserted == second.different == 0
    assert second.identical == first.inserted


def test_later_inserts_after_a_restore_get_new_ids(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _export(source_url, tmp_path / "export")
    _restore(target_url, tmp_path / "export")
    engine = make_engine(target_url)
    try:
        with engine.begin() as connection:
            top = connection.execute(select(func.max(OrchestrationSession.id))).scalar_one()
            project_id = connection.execute(select(func.min(Project.id))).scalar_one()
            new_id = connection.execute(
                insert(OrchestrationSession)
                .values(project_id=project_id, name="after restore")
                .returning(OrchestrationSession.id)
            ).scalar_one()
    finally:
        engine.dispose()
    assert new_id > top


def test_one_project_brings_its_sessions_every_global_prompt_and_what_they_reference(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    result = _export(source_url, tmp_path / "export", projects=["project-2"])
    assert result.projects == ["project-2"]
    _restore(target_url, tmp_path / "export")

    engine = make_engine(target_url)
    try:
        with engine.connect() as connection:
            slugs = set(connection.execute(select(Project.slug)).scalars())
            session_projects = set(
                connection.execute(select(OrchestrationSession.project_id).distinct()).scalars()
            )
            global_prompts = connection.execute(
                select(func.count()).select_from(Prompt).where(Prompt.project_id.is_(None))
            ).scalar_one()
            test_projects = set(connection.execute(select(ABTest.project_id)).scalars())
    finally:
        engine.dispose()
    source = make_engine(source_url)
    try:
        with source.connect() as connection:
            project_id = connection.execute(
                select(Project.id).where(Project.slug == "project-2")
            ).scalar_one()
            wanted_sessions = connection.execute(
                select(func.count())
                .select_from(OrchestrationSession)
                .where(OrchestrationSession.project_id == project_id)
            ).scalar_one()
            source_globals = connection.execute(
                select(func.count()).select_from(Prompt).where(Prompt.project_id.is_(None))
            ).scalar_one()
    finally:
        source.dispose()

    assert slugs == {"project-2"}
    assert session_projects == {project_id}
    assert result.row_counts["orchestration_sessions"] == wanted_sessions
    assert global_prompts == source_globals
    assert test_projects == {project_id}
    assert result.row_counts["ab_assignments"] == 0  # the assignments belong to project-1


def test_an_unknown_project_is_refused_before_anything_is_written(
    source_url: str, tmp_path: Path
) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        _export(source_url, tmp_path / "export", projects=["project-1", "nope"])
    assert not (tmp_path / "export").exists()
    assert _runs(source_url) == []


# --- refusing what cannot be restored -------------------------------------------------------


def _edit_a_byte(directory: Path) -> None:
    path = directory / "orchestration_sessions.jsonl"
    data = bytearray(path.read_bytes())
    position = data.index(b"session-")
    data[position] = ord("S")
    path.write_bytes(bytes(data))


def _remove_a_line(directory: Path) -> None:
    path = directory / "prompt_versions.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))


def _remove_a_file(directory: Path) -> None:
    (directory / "ab_assignments.jsonl").unlink()


def _remove_the_manifest(directory: Path) -> None:
    (directory / "manifest.json").unlink()


def _miscount_rows(directory: Path) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["files"][0]["rows"] += 1
    path.write_text(json.dumps(manifest), encoding="utf-8")


def _garble_the_manifest(directory: Path) -> None:
    (directory / "manifest.json").write_text("{not json", encoding="utf-8")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_edit_a_byte, "does not match its checksum"),
        (_remove_a_line, "does not match its checksum"),
        (_remove_a_file, "is missing"),
        (_remove_the_manifest, "has no manifest.json"),
        (_miscount_rows, "manifest.json says"),
        (_garble_the_manifest, "not a valid export manifest"),
    ],
    ids=["edited-byte", "line-removed", "file-missing", "no-manifest", "row-count", "garbled"],
)
def test_a_damaged_export_is_refused_with_exit_2_and_nothing_written(
    source_url: str,
    target_url: str,
    tmp_path: Path,
    damage: Callable[[Path], None],
    message: str,
) -> None:
    _export(source_url, tmp_path / "export")
    damage(tmp_path / "export")
    before = (_all_text(target_url), _counts(target_url))

    with pytest.raises(InvalidExportError, match=message) as refused:
        _restore(target_url, tmp_path / "export")

    assert refused.value.exit_code == 2
    assert "\n" not in str(refused.value)
    assert (_all_text(target_url), _counts(target_url)) == before


def test_a_truncated_gzip_file_is_refused(source_url: str, target_url: str, tmp_path: Path) -> None:
    _export(source_url, tmp_path / "export", compress=True)
    path = tmp_path / "export" / "orchestration_sessions.jsonl.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InvalidExportError):
        _restore(target_url, tmp_path / "export")
    assert _counts(target_url)["orchestration_sessions"] == 0


def test_an_export_from_another_revision_is_refused_and_says_what_to_do(
    source_url: str, dialect: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    _export(source_url, tmp_path / "export")
    older = _new_head_db(dialect, request, tmp_path, "older")
    schema.downgrade(older, "0001")

    with pytest.raises(ExportRevisionMismatchError) as refused:
        _restore(older, tmp_path / "export")

    message = str(refused.value)
    assert refused.value.exit_code == 2
    head = schema.history()[-1].revision
    assert head in message and "0001" in message and "orch-migrate db upgrade" in message
    assert _table_text(older, "orchestration_sessions") == []


def test_a_restore_the_target_refuses_writes_nothing(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _export(source_url, tmp_path / "export")
    engine = make_engine(target_url)
    try:
        with engine.begin() as connection:  # same slug, another id: a unique-key clash
            connection.execute(insert(Project).values(id=999, slug="project-3", name="mine"))
    finally:
        engine.dispose()
    before = _all_text(target_url)

    with pytest.raises(RestoreConflictError, match="projects") as refused:
        _restore(target_url, tmp_path / "export")

    assert refused.value.exit_code == 2
    assert _all_text(target_url) == before
    assert _runs(target_url)[-1][:2] == ("restore", "failed")


# --- differing rows -------------------------------------------------------------------------


def test_a_row_changed_after_the_export_is_never_overwritten_or_left_silently(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _export(source_url, tmp_path / "export")
    _restore(target_url, tmp_path / "export")
    engine = make_engine(target_url)
    try:
        with engine.begin() as connection:
            session_id = connection.execute(select(func.min(OrchestrationSession.id))).scalar_one()
            connection.execute(
                text("UPDATE orchestration_sessions SET planner_prompt = 'edited' WHERE id = :id"),
                {"id": session_id},
            )
    finally:
        engine.dispose()
    edited = _all_text(target_url)

    with pytest.raises(DifferingRowsError) as refused:
        _restore(target_url, tmp_path / "export")
    assert refused.value.result.outcome is RestoreOutcome.REFUSED
    assert (refused.value.result.different, refused.value.result.inserted) == (1, 0)
    assert _all_text(target_url) == edited

    kept = _restore(target_url, tmp_path / "export", differing=DifferingRows.KEEP_CURRENT)
    assert (kept.different, kept.kept, kept.overwritten, kept.inserted) == (1, 1, 0, 0)
    sessions = next(t for t in kept.tables if t.table == "orchestration_sessions")
    assert sessions.different_keys == [[session_id]]
    assert _all_text(target_url) == edited

    replaced = _restore(target_url, tmp_path / "export", differing=DifferingRows.OVERWRITE)
    assert (replaced.different, replaced.overwritten, replaced.kept) == (1, 1, 0)
    assert _all_text(target_url) == _all_text(source_url)

    again = _restore(target_url, tmp_path / "export")
    assert again.different == again.inserted == 0


# --- an export is complete or absent --------------------------------------------------------


class _InterruptedError(Exception):
    pass


def _raise_midway(after: int) -> Callable[[str, int, int | None], None]:
    calls = 0

    def progress(table: str, done: int, total: int | None) -> None:
        nonlocal calls
        calls += 1
        if calls > after:
            raise _InterruptedError(table)

    return progress


def _complete_looking(parent: Path) -> list[Path]:
    return [path for path in parent.iterdir() if (path / "manifest.json").exists()]


def test_an_interrupted_export_leaves_no_directory_that_looks_complete(
    source_url: str, tmp_path: Path
) -> None:
    parent = tmp_path / "exports"
    parent.mkdir()
    with pytest.raises(_InterruptedError):
        _export(source_url, parent / "export", progress=_raise_midway(5))

    assert list(parent.iterdir()) == []
    assert _runs(source_url)[-1][:2] == ("export", "failed")


def test_an_interrupted_forced_export_keeps_the_old_one(source_url: str, tmp_path: Path) -> None:
    target = tmp_path / "exports" / "export"
    _export(source_url, target)
    old = {path.name: path.read_bytes() for path in target.iterdir()}

    with pytest.raises(_InterruptedError):
        _export(source_url, target, force=True, compress=True, progress=_raise_midway(5))

    assert {path.name: path.read_bytes() for path in target.iterdir()} == old
    assert _complete_looking(target.parent) == [target]
    assert [p.name for p in target.parent.iterdir()] == ["export"]


def test_a_non_empty_target_needs_force_which_replaces_it_once_complete(
    source_url: str, tmp_path: Path
) -> None:
    target = tmp_path / "exports" / "export"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(PromptToolError, match="--force") as refused:
        _export(source_url, target)
    assert refused.value.exit_code == 2
    assert (target / "notes.txt").exists()

    _export(source_url, target, force=True)

    assert not (target / "notes.txt").exists()
    verify_export(target)
    assert [p.name for p in target.parent.iterdir()] == ["export"]


def test_force_never_replaces_the_directory_it_runs_in(
    source_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "work"
    here.mkdir()
    (here / "keep.txt").write_text("mine", encoding="utf-8")
    monkeypatch.chdir(here)

    with pytest.raises(PromptToolError, match="current or home directory"):
        _export(source_url, here, force=True)
    assert (here / "keep.txt").exists()


def test_export_and_restore_are_recorded_as_migration_runs(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    exported = _export(source_url, tmp_path / "export", projects=["project-1"])
    restored = _restore(target_url, tmp_path / "export")

    (kind, status, summary), *_ = _runs(source_url)
    assert (kind, status) == ("export", "completed")
    assert summary["rows"] == exported.row_counts
    (kind, status, summary), *_ = _runs(target_url)
    assert (kind, status) == ("restore", "completed")
    sessions = next(t for t in restored.tables if t.table == "orchestration_sessions")
    assert summary["tables"]["orchestration_sessions"]["inserted"] == sessions.inserted > 0
    assert exported.run_id is not None and restored.run_id is not None


# --- memory ---------------------------------------------------------------------------------


def _export_peak(url: str, target: Path) -> int:
    engine = make_engine(url)
    try:
        tracemalloc.start()
        try:
            export(engine, target)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        engine.dispose()


def test_export_memory_does_not_grow_with_the_row_count(
    head_db_url: str, dialect: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    small = head_db_url
    large = _new_head_db(dialect, request, tmp_path, "large")
    load_legacy_sample(small, sessions=5_000, projects=3, seed=3)
    load_legacy_sample(large, sessions=20_000, projects=3, seed=3)

    small_peak = _export_peak(small, tmp_path / "small")
    large_peak = _export_peak(large, tmp_path / "large")
    large_bytes = sum(p.stat().st_size for p in (tmp_path / "large").iterdir())

    peaks = f"peak {small_peak >> 10} KiB for 5k sessions, {large_peak >> 10} KiB for 20k"
    assert large_bytes > 32 << 20  # the data is far bigger than what may be held
    assert large_peak < 8 << 20, peaks
    assert large_peak < 1.5 * small_peak + (2 << 20), peaks


# --- across dialects and versions -------------------------------------------------------------


@pytest.mark.postgres
def test_a_sqlite_export_restores_into_postgresql_and_back(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    sqlite_source = _new_head_db("sqlite", request, tmp_path, "source")
    _load_rich_data(sqlite_source)
    postgres = _new_head_db("postgresql", request, tmp_path, "postgres")
    sqlite_again = _new_head_db("sqlite", request, tmp_path, "again")

    _export(sqlite_source, tmp_path / "from-sqlite")
    _restore(postgres, tmp_path / "from-sqlite")
    _export(postgres, tmp_path / "from-postgres", compress=True)
    _restore(sqlite_again, tmp_path / "from-postgres")

    for table in ARCHIVED_TABLES:
        assert _typed_rows(postgres, table) == _typed_rows(sqlite_source, table), table
    # Back in SQLite, even the stored text of every value is what it was.
    assert _all_text(sqlite_again) == _all_text(sqlite_source)
    assert _restore(postgres, tmp_path / "from-postgres").identical == sum(
        _counts(postgres)[table] for table in ARCHIVED_TABLES
    )


@pytest.mark.postgres
def test_a_postgresql_export_restores_into_sqlite(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    postgres = _new_head_db("postgresql", request, tmp_path, "source")
    _load_rich_data(postgres)
    sqlite_target = _new_head_db("sqlite", request, tmp_path, "target")

    _export(postgres, tmp_path / "export")
    _restore(sqlite_target, tmp_path / "export")

    for table in ARCHIVED_TABLES:
        if table == "ab_assignments":  # SQLite has no NaN: it stores NULL for it
            continue
        assert _typed_rows(sqlite_target, table) == _typed_rows(postgres, table), table
    compared = _restore(sqlite_target, tmp_path / "export", dry_run=True)
    assert compared.different == 1  # that NaN
    assert compared.refusal is not None and "ab_assignments" in compared.refusal


def test_a_legacy_database_at_0001_exports_its_tables_and_restores(
    empty_db_url: str, dialect: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=50, projects=2)
    target = _new_head_db(dialect, request, tmp_path, "legacy-target")
    schema.downgrade(target, "0001")

    result = _export(empty_db_url, tmp_path / "export")
    _restore(target, tmp_path / "export")

    assert result.alembic_revision == "0001"
    assert [t.table for t in result.tables] == [
        "projects",
        "prompts",
        "prompt_versions",
        "orchestration_sessions",
        "ab_tests",
        "ab_test_variants",
    ]
    assert (
        fingerprint_legacy_tables(target).tables == fingerprint_legacy_tables(empty_db_url).tables
    )


def _sqlalchemy_owns_sqlite_transactions(engine: Engine) -> None:
    """pysqlite commits on releasing a savepoint it began itself: let SQLAlchemy emit BEGIN."""

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


def test_a_restore_inside_the_callers_transaction_goes_with_it(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    _export(source_url, tmp_path / "export")
    engine = make_engine(target_url)
    if engine.dialect.name == "sqlite":
        _sqlalchemy_owns_sqlite_transactions(engine)
    try:
        with engine.connect() as connection:
            transaction = connection.begin()
            result = restore(connection, tmp_path / "export")
            assert result.inserted > 0
            transaction.rollback()
    finally:
        engine.dispose()
    assert _counts(target_url)["orchestration_sessions"] == 0


@pytest.mark.postgres
def test_a_restore_leaves_statistics_for_the_tables_it_filled(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source = _new_head_db("postgresql", request, tmp_path, "source")
    _load_rich_data(source, sessions=50)
    target = _new_head_db("postgresql", request, tmp_path, "target")
    _export(source, tmp_path / "export")

    _restore(target, tmp_path / "export")

    engine = make_engine(target)
    try:
        with engine.connect() as connection:
            estimated = connection.execute(
                text(
                    "SELECT relname, reltuples FROM pg_class WHERE relname IN "
                    "('orchestration_sessions', 'session_prompt_refs')"
                )
            ).all()
    finally:
        engine.dispose()
    # -1: never analysed; the planner would guess instead.
    assert {name: tuples > 0 for name, tuples in estimated} == {
        "orchestration_sessions": True,
        "session_prompt_refs": True,
    }


# --- PostgreSQL: big tables are read in parallel key ranges ---------------------------------


@pytest.mark.postgres
def test_parallel_key_ranges_write_exactly_what_one_reader_writes(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _new_head_db("postgresql", request, tmp_path, "source")
    _load_rich_data(source, sessions=300)
    target = _new_head_db("postgresql", request, tmp_path, "target")

    one = _export(source, tmp_path / "one", jobs=1)
    monkeypatch.setattr(bulk_io, "PARALLEL_MIN_BYTES", 0)
    parallel = _export(source, tmp_path / "parallel", jobs=3)
    parallel_gzip = _export(source, tmp_path / "parallel-gzip", jobs=3, compress=True)

    assert parallel.tables == one.tables  # same rows, same bytes, same checksums
    with gzip.open(tmp_path / "parallel-gzip" / "orchestration_sessions.jsonl.gz") as file:
        assert file.read() == (tmp_path / "one" / "orchestration_sessions.jsonl").read_bytes()
    assert parallel_gzip.row_counts == one.row_counts
    _restore(target, tmp_path / "parallel-gzip")
    assert _all_text(target) == _all_text(source)


class _RangeReadFailedError(Exception):
    pass


@pytest.fixture
def read_in_many_ranges(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A PostgreSQL source whose every table is read in key ranges of a few rows each."""
    source = _new_head_db("postgresql", request, tmp_path, "source")
    _load_rich_data(source, sessions=120)
    monkeypatch.setattr(bulk_io, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(bulk_io, "RANGE_BYTES", 1)
    return source


@pytest.mark.postgres
def test_a_range_reader_that_fails_fails_the_export_and_leaves_nothing(
    read_in_many_ranges: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream_lines = bulk_io.PostgresIO.stream_lines
    calls = iter(range(1_000_000))

    def fails_on_the_fifth_range(self: Any, connection: Any, spec: Any, where: Any) -> Any:
        if where and next(calls) == 4:
            raise _RangeReadFailedError("the connection went away")
        return stream_lines(self, connection, spec, where)

    monkeypatch.setattr(bulk_io.PostgresIO, "stream_lines", fails_on_the_fifth_range)
    threads_before = threading.active_count()
    parent = tmp_path / "exports"
    parent.mkdir()

    with pytest.raises(_RangeReadFailedError):
        _export(read_in_many_ranges, parent / "export", jobs=2)

    assert list(parent.iterdir()) == []
    assert threading.active_count() == threads_before  # every reader joined


@pytest.mark.postgres
def test_an_export_stopped_while_ranges_are_read_stops_its_readers(
    read_in_many_ranges: str, tmp_path: Path
) -> None:
    threads_before = threading.active_count()
    parent = tmp_path / "exports"
    parent.mkdir()

    with pytest.raises(_InterruptedError):
        _export(read_in_many_ranges, parent / "export", jobs=2, progress=_raise_midway(5))

    assert list(parent.iterdir()) == []
    assert threading.active_count() == threads_before


@pytest.mark.postgres
def test_a_table_keyed_by_session_and_role_is_split_on_its_session_ids(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _new_head_db("postgresql", request, tmp_path, "source")
    _load_rich_data(source, sessions=30)
    monkeypatch.setattr(bulk_io, "PARALLEL_MIN_BYTES", 0)
    engine = make_engine(source)
    try:
        with engine.connect() as connection:
            dialect = bulk_io.dialect_io(connection)
            with dialect.snapshot(connection):
                ranges = dialect.split(
                    connection, TableSpec.from_model("session_prompt_refs"), None, 3
                )
    finally:
        engine.dispose()

    assert ranges is not None and len(ranges) == 3
    assert all('"session_id"' in condition for condition in ranges)


# --- SQLite: text that is not UTF-8 ------------------------------------------------------------


def test_sqlite_text_that_is_not_utf8_comes_back_as_the_same_bytes(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source = _new_head_db("sqlite", request, tmp_path, "source")
    load_legacy_sample(source, sessions=10, projects=1)
    engine = make_engine(source)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "UPDATE orchestration_sessions SET system_prompt = "
                    "CAST(X'FF41EDA080C3A9' AS TEXT) WHERE id = 1"
                )
            )
    finally:
        engine.dispose()
    target = _new_head_db("sqlite", request, tmp_path, "target")

    _export(source, tmp_path / "export")
    _restore(target, tmp_path / "export")
    second = _restore(target, tmp_path / "export")

    def stored(url: str) -> list[tuple[Any, ...]]:
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                return [
                    tuple(row)
                    for row in connection.execute(
                        text(
                            "SELECT id, hex(system_prompt), typeof(system_prompt) "
                            "FROM orchestration_sessions ORDER BY id"
                        )
                    )
                ]
        finally:
            engine.dispose()

    assert stored(target) == stored(source)
    assert stored(target)[0][1:] == ("FF41EDA080C3A9", "text")
    assert second.different == 0
    (tmp_path / "export" / "orchestration_sessions.jsonl").read_bytes().decode("utf-8")


# --- the CLI ------------------------------------------------------------------------------------


def _cli() -> typer.Typer:
    app = new_app("test app")
    app.command("export")(export_command)
    app.command("restore")(restore_command)
    return app


def test_cli_export_then_restore_as_json(source_url: str, target_url: str, tmp_path: Path) -> None:
    app = _cli()
    directory = str(tmp_path / "export")
    exported = runner.invoke(
        app,
        [
            *("export", directory, "--project", "project-1", "-p", "project-3", "--gzip"),
            *("--db", source_url, "--json"),
        ],
    )
    assert exported.exit_code == 0, exported.output
    summary = json.loads(exported.stdout)
    assert summary["projects"] == ["project-1", "project-3"]
    assert summary["compression"] == "gzip"

    restored = runner.invoke(app, ["restore", "--from", directory, "--db", target_url, "--json"])
    assert restored.exit_code == 0, restored.output
    report = json.loads(restored.stdout)
    assert report["inserted"] == summary["rows"]
    assert {t["table"] for t in report["tables"]} == set(ARCHIVED_TABLES)

    table_view = runner.invoke(app, ["restore", "--from", directory, "--db", target_url])
    assert table_view.exit_code == 0
    assert "identical" in table_view.stdout


def test_cli_exit_codes_refused_export_is_2_and_differing_rows_1(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    app = _cli()
    directory = tmp_path / "export"
    runner.invoke(app, ["export", str(directory), "--db", source_url])
    refused = runner.invoke(app, ["export", str(directory), "--db", source_url])
    assert refused.exit_code == 2
    assert "--force" in refused.output

    runner.invoke(app, ["restore", "--from", str(directory), "--db", target_url])
    engine = make_engine(target_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE projects SET name = 'renamed'"))
    finally:
        engine.dispose()
    differing = runner.invoke(app, ["restore", "--from", str(directory), "--db", target_url])
    assert differing.exit_code == 1
    assert "--overwrite" in differing.output and "--keep-current" in differing.output

    _edit_a_byte(directory)
    damaged = runner.invoke(app, ["restore", "--from", str(directory), "--db", target_url])
    assert damaged.exit_code == 2
    assert "checksum" in damaged.output
    assert "Traceback" not in damaged.output
