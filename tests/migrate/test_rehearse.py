"""`orch-migrate rehearse`: the rollback rehearsal passes on sound migrations, leaves the database
exactly as it was with --rollback, only reads the source with --scratch, and fails, naming the
table, when a downgrade loses or changes legacy data."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, inspect, text
from typer.testing import CliRunner

from prompt_tool import flags
from prompt_tool.cli._runtime import new_app
from prompt_tool.cli.readiness_commands import rehearse_command
from prompt_tool.db import schema
from prompt_tool.db.engine import make_engine, make_session_factory, session_scope
from prompt_tool.db.legacy import LEGACY_COLUMNS
from prompt_tool.migrate import fingerprint_legacy_tables, load_legacy_sample
from prompt_tool.migrate.backfill import backfill
from prompt_tool.migrate.rehearse import RehearsalRefusedError, RehearsalReport, rehearse
from prompt_tool.migrate.verify import verify
from prompt_tool.settings import get_settings
from prompt_tool.templates.permissions import grant_role

app = new_app("test host for rehearse")
app.command("rehearse")(rehearse_command)
app.command("other")(lambda: None)  # a second command keeps `rehearse` a subcommand
runner = CliRunner()

# --rollback: the downgrade discards what people made (rolled back anyway, never committed).
HEAD = schema.history()[-1].revision
JOURNEY = [
    "refresh_statistics",
    "fingerprint",
    "upgrade",
    "backfill",
    "verify",
    "create_sessions",
    "downgrade",
    "legacy_intact",
    "new_sessions_intact",
    "upgrade_again",
    "backfill_again",
    "verify_again",
]
# In place and on a scratch copy: the downgrade archives it, and it is restored and compared.
ARCHIVED_JOURNEY = [
    *JOURNEY[: JOURNEY.index("upgrade_again") + 1],
    "restore",
    "restored_intact",
    *JOURNEY[JOURNEY.index("upgrade_again") + 1 :],
]


@pytest.fixture
def legacy_url(empty_db_url: str) -> str:
    """A legacy deployment at revision 0001 with sample data (3 projects)."""
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=60, projects=3, seed=13)
    return empty_db_url


@pytest.fixture
def migrated_url(legacy_url: str) -> str:
    """The same deployment already migrated: at head, backfilled, verified, a flag set, and a
    global admin of its own."""
    schema.upgrade(legacy_url)
    engine = make_engine(legacy_url)
    try:
        backfill(engine)
        assert verify(engine).passed
        flags.set_variant(engine, "project-1", "shadow", actor="ops")
        with session_scope(make_session_factory(engine)) as session:
            grant_role(session, "root", "root", "admin", None)
    finally:
        engine.dispose()
    return legacy_url


@pytest.fixture
def scratch_url(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A second, empty database of the same kind."""
    if dialect == "sqlite":
        return f"sqlite:///{tmp_path / 'scratch.db'}"
    server = request.getfixturevalue("pg_server")
    return str(server.url_for(server.create_database("scratch")))


def _state(url: str) -> dict[str, Any]:
    """Everything --rollback must leave as it found: revision, tables, columns, indexes, row
    counts of every table, legacy fingerprint."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            tables = sorted(inspector.get_table_names())
            shape = {
                name: (
                    sorted(c["name"] for c in inspector.get_columns(name)),
                    sorted(str(i["name"]) for i in inspector.get_indexes(name)),
                    connection.execute(text(f'SELECT count(*) FROM "{name}"')).scalar_one(),
                )
                for name in tables
            }
    finally:
        engine.dispose()
    return {
        "revision": schema.current(url).current,
        "tables": shape,
        "legacy": fingerprint_legacy_tables(url).tables,
    }


def _legacy_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every legacy row in its text form, by table."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return {
                name: [
                    tuple(row)
                    for row in connection.execute(
                        text(
                            "SELECT "
                            + ", ".join(f'CAST("{c}" AS TEXT)' for c in columns)
                            + f' FROM "{name}" ORDER BY "{name}".id'
                        )
                    )
                ]
                for name, columns in LEGACY_COLUMNS.items()
            }
    finally:
        engine.dispose()


def _failed(report: RehearsalReport) -> dict[str, list[str]]:
    return {step.name: step.differences for step in report.failures()}


def test_a_rehearsal_in_place_from_0001_passes_and_ends_where_it_started(legacy_url: str) -> None:
    before = _legacy_rows(legacy_url)

    report = rehearse(legacy_url)

    assert report.passed, report.failures()
    assert [s.name for s in report.steps] == [
        *ARCHIVED_JOURNEY,
        "return_to_start",
        "legacy_intact_at_end",
    ]
    assert (report.start_revision, report.end_revision, report.head) == ("0001", "0001", HEAD)
    assert all(s.duration_s >= 0 and s.details for s in report.steps)
    assert len(report.sessions_created) == 3
    after = _legacy_rows(legacy_url)
    # Exactly as before the migration, row for row; the only new rows are the three sessions
    # created through templates (they dual-wrote their legacy text).
    for name, rows in before.items():
        if name == "orchestration_sessions":
            assert after[name][: len(rows)] == rows
            assert [int(row[0]) for row in after[name][len(rows) :]] == report.sessions_created
        else:
            assert after[name] == rows, name
    assert report.archive is None


def test_what_people_made_round_trips_through_the_downgrades_archive(
    legacy_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    archives: list[Path] = []
    real_downgrade = schema.downgrade

    def downgrade(url: str, revision: str = "-1", **options: Any) -> schema.SchemaState:
        if options.get("archive") is not None:
            archives.append(Path(options["archive"]))
        return real_downgrade(url, revision, **options)

    monkeypatch.setattr(schema, "downgrade", downgrade)

    report = rehearse(legacy_url)

    assert report.passed, report.failures()
    steps = {s.name: s for s in report.steps}
    assert "what people made archived in a temporary directory" in steps["downgrade"].details
    assert "3 templates" in steps["downgrade"].details
    # Templates, versions, audit events and the sessions' links came back, every column.
    restored = steps["restored_intact"].details
    for what in ("3 templates", "3 versions", "audit events", "9 sessions' links"):
        assert what in restored, restored
    assert "rows back from the downgrade's archive" in steps["restore"].details
    # One archive (return_to_start discards the rehearsal's own templates), deleted once it
    # round-tripped.
    assert len(archives) == 1 and not archives[0].parent.exists()


def test_a_restore_that_does_not_bring_back_what_people_made_fails_and_keeps_the_archive(
    legacy_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prompt_tool.migrate import rehearse as rehearse_module

    real_restore = rehearse_module.restore

    def sloppy_restore(db: Any, source: Any, **options: Any) -> Any:
        result = real_restore(db, source, **options)
        with db.begin() as connection:
            connection.execute(text("UPDATE template_events SET note = 'edited afterwards'"))
        return result

    monkeypatch.setattr(rehearse_module, "restore", sloppy_restore)

    report = rehearse(legacy_url)

    assert not report.passed
    failed = _failed(report)
    assert list(failed) == ["restored_intact"]
    assert all(d.startswith("template_events:") for d in failed["restored_intact"])
    assert report.archive is not None
    assert (Path(report.archive) / "manifest.json").is_file()
    shutil.rmtree(Path(report.archive).parent)


def test_rollback_leaves_the_database_exactly_as_it_was(legacy_url: str) -> None:
    before = _state(legacy_url)

    report = rehearse(legacy_url, rollback=True)

    assert report.passed, report.failures()
    assert [s.name for s in report.steps] == [*JOURNEY, "rolled_back_exactly"]
    assert _state(legacy_url) == before
    assert report.end_revision == "0001"


def test_rollback_of_an_already_migrated_database_leaves_it_exactly_as_it_was(
    migrated_url: str,
) -> None:
    before = _state(migrated_url)

    report = rehearse(migrated_url, rollback=True)

    assert report.passed, report.failures()
    assert report.start_revision == report.end_revision == HEAD
    # Another global admin exists: the rehearsal takes no permission, it makes its own
    # custom templates.
    created = next(s for s in report.steps if s.name == "create_sessions")
    assert "custom templates" in created.details
    assert _state(migrated_url) == before
    assert before["tables"]["session_prompt_refs"][2] > 0


def test_in_place_is_refused_when_the_downgrade_would_drop_data_it_did_not_make(
    migrated_url: str,
) -> None:
    before = _state(migrated_url)

    with pytest.raises(RehearsalRefusedError, match="--scratch") as refused:
        rehearse(migrated_url)

    assert "session_prompt_refs" in str(refused.value)
    assert _state(migrated_url) == before


def test_scratch_rehearses_a_copy_and_only_reads_the_source(
    migrated_url: str, scratch_url: str
) -> None:
    before = _state(migrated_url)

    report = rehearse(migrated_url, scratch=scratch_url)

    assert report.passed, report.failures()
    assert [s.name for s in report.steps] == [
        "copy_to_scratch",
        *ARCHIVED_JOURNEY,
        "legacy_intact_at_end",
    ]
    assert "legacy fingerprint as the source's" in report.steps[0].details
    assert report.source is not None and report.database != report.source
    assert _state(migrated_url) == before
    assert schema.current(scratch_url).current == HEAD
    assert len(_legacy_rows(scratch_url)["orchestration_sessions"]) == 60 + 3


def test_scratch_with_rollback_leaves_the_copy_as_copied(legacy_url: str, scratch_url: str) -> None:
    report = rehearse(legacy_url, scratch=scratch_url, rollback=True)

    assert report.passed, report.failures()
    assert fingerprint_legacy_tables(scratch_url).tables == (
        fingerprint_legacy_tables(legacy_url).tables
    )
    assert schema.current(scratch_url).current == "0001"


def test_scratch_is_refused_unless_it_is_another_empty_database(
    legacy_url: str, scratch_url: str
) -> None:
    with pytest.raises(RehearsalRefusedError, match="source database itself"):
        rehearse(legacy_url, scratch=legacy_url)
    schema.upgrade(scratch_url, "0001")
    with pytest.raises(RehearsalRefusedError, match="is not empty"):
        rehearse(legacy_url, scratch=scratch_url)


@pytest.mark.postgres
def test_scratch_of_another_kind_of_database_is_refused(tmp_path: Path, pg_url: str) -> None:
    source = f"sqlite:///{tmp_path / 'legacy.db'}"
    schema.upgrade(source, "0001")

    with pytest.raises(RehearsalRefusedError, match="same kind of database"):
        rehearse(source, scratch=pg_url)


def test_a_database_without_legacy_tables_or_revision_is_refused(
    empty_db_url: str, legacy_url: str
) -> None:
    with pytest.raises(RehearsalRefusedError, match="no legacy tables"):
        rehearse(_other_empty(empty_db_url))
    engine = make_engine(legacy_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
    engine.dispose()
    with pytest.raises(RehearsalRefusedError, match="db stamp 0001"):
        rehearse(legacy_url)


def _other_empty(url: str) -> str:
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///")).with_name("nothing.db")
        path.touch()
        return f"sqlite:///{path}"
    return url.rsplit("/", 1)[0] + "/postgres"  # the maintenance database has no tables


def _delete_session_one(connection: Connection) -> None:
    connection.execute(text("DELETE FROM orchestration_sessions WHERE id = 1"))


def test_a_legacy_row_lost_after_the_downgrade_fails_the_rehearsal_naming_the_table(
    legacy_url: str,
) -> None:
    before = _state(legacy_url)

    report = rehearse(legacy_url, rollback=True, after_downgrade=_delete_session_one)

    assert not report.passed
    failed = _failed(report)
    assert list(failed) == ["legacy_intact"]
    assert any(d.startswith("orchestration_sessions:") for d in failed["legacy_intact"])
    assert all("prompts" not in d for d in failed["legacy_intact"])
    # The sabotage happened inside the rehearsal's transaction: rolled back with it.
    assert _state(legacy_url) == before


def test_a_legacy_text_changed_after_the_downgrade_fails_the_rehearsal_naming_the_table(
    legacy_url: str,
) -> None:
    def edit_a_prompt(connection: Connection) -> None:
        connection.execute(text("UPDATE prompts SET content = content || ' ' WHERE id = 1"))

    report = rehearse(legacy_url, rollback=True, after_downgrade=edit_a_prompt)

    assert not report.passed
    differences = _failed(report)["legacy_intact"]
    assert {d.split(":", 1)[0] for d in differences} == {"prompts"}


def test_a_template_left_behind_by_the_downgrade_fails_the_rehearsal_naming_the_tables(
    legacy_url: str,
) -> None:
    """Only the sessions created through templates may be new after the downgrade: a prompt and
    its version left behind (an imported template, say) are differences, not the rehearsal's."""

    def leave_a_template(connection: Connection) -> None:
        prompt_id = connection.execute(
            text(
                "INSERT INTO prompts (project_id, name, content, category, is_template) "
                "VALUES (NULL, 'imported/system/abc', 'left behind', 'imported', TRUE) RETURNING id"
            )
        ).scalar_one()
        connection.execute(
            text(
                "INSERT INTO prompt_versions (prompt_id, version, content, created_by) "
                "VALUES (:id, 1, 'left behind', 'backfill')"
            ),
            {"id": prompt_id},
        )

    report = rehearse(legacy_url, rollback=True, after_downgrade=leave_a_template)

    assert not report.passed
    differences = _failed(report)["legacy_intact"]
    assert {d.split(":", 1)[0] for d in differences} == {"prompts", "prompt_versions"}
    assert any("1 rows more than at the start" in d for d in differences)


def test_a_downgrade_that_deletes_a_session_is_caught_and_the_command_exits_1(
    legacy_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_downgrade = schema.downgrade

    def losing_downgrade(url: str, revision: str = "-1", **options: Any) -> schema.SchemaState:
        state = real_downgrade(url, revision, **options)
        engine = make_engine(url)
        with engine.begin() as connection:
            _delete_session_one(connection)
        engine.dispose()
        return state

    monkeypatch.setattr(schema, "downgrade", losing_downgrade)

    result = runner.invoke(app, ["rehearse", "--db", legacy_url])

    assert result.exit_code == 1, result.output
    assert "FAILED" in result.stdout
    assert "legacy_intact (orchestration_sessions)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_downgrade_that_deletes_a_session_is_caught_in_a_rolled_back_rehearsal(
    legacy_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_migrate_on = schema.migrate_on

    def losing_migrate_on(
        connection: Connection, action: str, revision: str, options: Any = None
    ) -> str | None:
        reached = real_migrate_on(connection, action, revision, options)
        if action == "downgrade":
            _delete_session_one(connection)
        return reached

    monkeypatch.setattr(schema, "migrate_on", losing_migrate_on)
    before = _state(legacy_url)

    report = rehearse(legacy_url, rollback=True)

    assert not report.passed
    assert any(d.startswith("orchestration_sessions:") for d in _failed(report)["legacy_intact"])
    assert _state(legacy_url) == before


def test_the_command_prints_every_step_or_the_same_report_as_json(legacy_url: str) -> None:
    shown = runner.invoke(app, ["rehearse", "--rollback", "--sessions", "2", "--db", legacy_url])
    as_json = runner.invoke(app, ["rehearse", "--rollback", "--json", "--db", legacy_url])

    assert shown.exit_code == 0, shown.output
    assert "rehearsal passed" in shown.stdout
    for name in JOURNEY:
        assert name in shown.stdout
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["passed"] is True and data["rollback"] is True
    assert [step["name"] for step in data["steps"]] == [*JOURNEY, "rolled_back_exactly"]
    assert set(data["steps"][0]) == {
        "name",
        "ok",
        "duration_s",
        "details",
        "differences",
        "stopped_by",
    }
    assert data["archive"] is None


def test_a_refusal_is_one_line_and_exit_2(migrated_url: str) -> None:
    result = runner.invoke(app, ["rehearse", "--db", migrated_url])

    assert result.exit_code == 2
    assert "would drop the rows of" in result.output
    assert len(result.output.strip().splitlines()) == 1


# --- repeated rehearsals, timeouts -----------------------------------------------------------


@pytest.fixture
def rehearsal_url(empty_db_url: str) -> str:
    """A legacy deployment at 0001 with 300 sessions."""
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=300, projects=3, seed=21)
    return empty_db_url


def test_ten_rolled_back_rehearsals_in_a_row_pass_as_the_first_does(rehearsal_url: str) -> None:
    before = _state(rehearsal_url)
    durations = []

    for attempt in range(10):
        report = rehearse(rehearsal_url, rollback=True)
        assert report.passed, (attempt, report.failures())
        durations.append(report.elapsed_s)

    assert _state(rehearsal_url) == before
    # Nothing accumulates from one rehearsal to the next that makes the later ones slower
    # (generous: a loaded machine may stall one run).
    assert max(durations[5:]) < 5 * max(durations[0], 1.0), durations


def _planner_rows(url: str) -> dict[str, float]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return {
                str(name): float(rows)
                for name, rows in connection.execute(
                    text(
                        "SELECT relname, reltuples FROM pg_class WHERE relkind = 'r' "
                        "AND relname IN ('projects', 'prompts', 'prompt_versions', "
                        "'orchestration_sessions')"
                    )
                )
            }
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgresql"], indirect=True)
def test_a_rolled_back_rehearsal_leaves_the_planner_the_rows_as_they_are(
    rehearsal_url: str,
) -> None:
    """PostgreSQL keeps the table sizes an ANALYZE inside a transaction measured even when the
    transaction rolls back: the rehearsal measures the legacy tables before it starts and again
    after its rollback, so the next one (and everything else) is planned for the real rows, not
    for the thousands of imported templates that never were."""
    rows = {name: len(table_rows) for name, table_rows in _legacy_rows(rehearsal_url).items()}

    for _ in range(2):
        report = rehearse(rehearsal_url, rollback=True)
        assert report.passed, report.failures()
        assert report.steps[0].details.startswith("planner statistics")

    planned = _planner_rows(rehearsal_url)
    for name in ("projects", "prompts", "prompt_versions", "orchestration_sessions"):
        assert planned[name] == rows[name], (name, planned[name], rows[name])


@pytest.fixture
def tiny_statement_timeout(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """PROMPT_TOOL_STATEMENT_TIMEOUT_MS=1, as an operator would set it (read once, so the
    settings are read again for this test and afterwards)."""
    monkeypatch.setenv("PROMPT_TOOL_STATEMENT_TIMEOUT_MS", "1")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("PROMPT_TOOL_STATEMENT_TIMEOUT_MS")
    get_settings.cache_clear()


def _sleep(connection: Connection) -> None:
    """A statement longer than the timeout, whichever step the rehearsal reached."""
    connection.execute(text("SELECT pg_sleep(0.2)"))


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgresql"], indirect=True)
def test_a_statement_timeout_in_the_rehearsal_is_reported_as_a_timeout(
    rehearsal_url: str, tiny_statement_timeout: None
) -> None:
    before = _state(rehearsal_url)

    report = rehearse(rehearsal_url, rollback=True, after_downgrade=_sleep)

    assert not report.passed
    failed = report.failures()
    assert len(failed) == 1, failed
    step = failed[0]
    assert step.stopped_by == "statement_timeout"
    assert step.details.startswith("timed out:")
    assert "PROMPT_TOOL_STATEMENT_TIMEOUT_MS (1 ms)" in step.details
    assert step.differences == []
    # The rehearsal stopped there; nothing it did is left.
    assert report.steps[-1].name == "rolled_back_exactly" and report.steps[-1].ok
    assert _state(rehearsal_url) == before


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgresql"], indirect=True)
def test_the_command_reports_a_timeout_in_one_line_never_as_differences(
    rehearsal_url: str, tiny_statement_timeout: None
) -> None:
    result = runner.invoke(app, ["rehearse", "--rollback", "--db", rehearsal_url])

    assert result.exit_code == 1, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "timed out" in result.stderr
    assert "PROMPT_TOOL_STATEMENT_TIMEOUT_MS" in result.stderr
    assert "differences" not in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.postgres
@pytest.mark.parametrize("dialect", ["postgresql"], indirect=True)
def test_a_statement_failing_after_a_timeout_still_reports_the_timeout(
    rehearsal_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What happened in verify on 200,000 sessions: the statement timed out, and the next
    statement of the aborted transaction (the run's ledger row) failed with
    InFailedSqlTransaction. The step is reported as the timeout it was."""
    monkeypatch.setenv("PROMPT_TOOL_STATEMENT_TIMEOUT_MS", "2000")
    get_settings.cache_clear()

    def time_out_then_carry_on(connection: Connection) -> None:
        try:
            connection.execute(text("SELECT pg_sleep(5)"))
        finally:
            connection.execute(text("SELECT 1"))  # in the aborted transaction: fails too

    try:
        report = rehearse(rehearsal_url, rollback=True, after_downgrade=time_out_then_carry_on)
    finally:
        monkeypatch.delenv("PROMPT_TOOL_STATEMENT_TIMEOUT_MS")
        get_settings.cache_clear()

    assert [s.name for s in report.failures()] == ["downgrade"]
    step = report.failures()[0]
    assert step.stopped_by == "statement_timeout", step.details
    assert "PROMPT_TOOL_STATEMENT_TIMEOUT_MS (2,000 ms)" in step.details
