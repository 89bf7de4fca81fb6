"""`orch-migrate status`: per project, sessions migrated / unmigrated / stale (hashed in SQL), the
flag, the last export/backfill/verify covering it, and whether it may be switched to templates."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, update
from statements import statements_run
from typer.testing import CliRunner

from prompt_tool import flags
from prompt_tool.cli._runtime import new_app
from prompt_tool.cli.readiness_commands import status_command
from prompt_tool.db import schema
from prompt_tool.db.engine import make_session_factory, session_scope
from prompt_tool.db.models import (
    MigrationRun,
    OrchestrationSession,
    Project,
    PromptRole,
    PromptVersion,
    SessionPromptRef,
)
from prompt_tool.db.projects import create_project
from prompt_tool.errors import NotFoundError
from prompt_tool.migrate import load_legacy_sample
from prompt_tool.migrate.backfill import BackfillOptions, backfill
from prompt_tool.migrate.runs import MigrationRunStatus, RunKind, finish_run, start_run
from prompt_tool.migrate.status import ProjectStatus, readiness, status
from prompt_tool.migrate.verify import VerifyOptions, verify

app = new_app("test host for status")
app.command("status")(status_command)
app.command("other")(lambda: None)  # a second command keeps `status` a subcommand
runner = CliRunner()


def _by_project(engine: Engine) -> dict[str, ProjectStatus]:
    return {p.project: p for p in status(engine).projects}


def _expected_counts(engine: Engine) -> dict[str, tuple[int, int, int, int]]:
    """(sessions, migrated, unmigrated, stale) per project, computed row by row in Python."""
    with engine.connect() as connection:
        slugs = {pid: slug for pid, slug in connection.execute(select(Project.id, Project.slug))}
        refs = {
            (session_id, role): digest
            for session_id, role, digest in connection.execute(
                select(
                    SessionPromptRef.session_id, SessionPromptRef.role, SessionPromptRef.legacy_hash
                )
            )
        }
        counts = {slug: [0, 0, 0, 0] for slug in slugs.values()}
        for row in connection.execute(select(OrchestrationSession)).mappings():
            stale = unmigrated = False
            for role in PromptRole:
                legacy = row[role.legacy_column]
                digest = None if legacy is None else hashlib.sha256(legacy.encode()).hexdigest()
                if (row["id"], role.value) in refs:
                    stale |= refs[(row["id"], role.value)] != digest
                elif legacy is not None:
                    unmigrated = True
            entry = counts[slugs[row["project_id"]]]
            entry[0] += 1
            entry[3 if stale else 2 if unmigrated else 1] += 1
    return {slug: (s, m, u, st) for slug, (s, m, u, st) in counts.items()}


def test_a_legacy_deployment_at_0001_is_all_unmigrated_and_not_ready(
    empty_db_url: str, engine_for: Any
) -> None:
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=40, projects=2, seed=3)

    report = status(engine_for(empty_db_url))

    head = schema.history()[-1].revision
    assert (report.revision, report.head, report.templates_schema) == ("0001", head, False)
    assert sum(p.sessions for p in report.projects) == 40
    for project in report.projects:
        assert project.migrated == project.stale == 0
        assert project.unmigrated <= project.sessions
        assert project.flag == "legacy"
        assert not project.readiness.ready
        assert "orch-migrate db upgrade" in project.readiness.reasons[0]


def test_sessions_are_partitioned_into_migrated_unmigrated_and_stale(
    legacy_engine: Engine,
) -> None:
    backfill(legacy_engine, BackfillOptions(projects=["project-1", "project-2"]))
    with legacy_engine.begin() as connection:
        first, second, third = connection.execute(
            select(OrchestrationSession.id)
            .join(Project)
            .where(Project.slug == "project-1")
            .order_by(OrchestrationSession.id)
            .limit(3)
        ).scalars()
        # An edit by an old application version: the reference is now stale.
        connection.execute(
            update(OrchestrationSession)
            .where(OrchestrationSession.id == first)
            .values(planner_prompt="edited after the backfill")
        )
        # A text set to NULL after it was linked: its reference is stale too.
        connection.execute(
            update(OrchestrationSession)
            .where(OrchestrationSession.id == second)
            .values(system_prompt=None, planner_prompt="also edited")
        )
        # A reference removed by hand: that text is unmigrated again.
        connection.execute(
            SessionPromptRef.__table__.delete().where(SessionPromptRef.session_id == third)
        )

    found = _by_project(legacy_engine)

    expected = _expected_counts(legacy_engine)
    assert {
        slug: (p.sessions, p.migrated, p.unmigrated, p.stale) for slug, p in found.items()
    } == expected
    assert found["project-1"].stale == 2 and found["project-1"].unmigrated == 1
    assert found["project-3"].migrated == 0 and found["project-3"].unmigrated > 0


def test_a_project_is_ready_only_when_backfilled_and_verified_after_its_last_backfill(
    legacy_engine: Engine,
) -> None:
    def reasons() -> str:
        return " | ".join(readiness(legacy_engine, "project-1").reasons)

    assert "orch-migrate backfill --project project-1" in reasons()
    assert "no verify has checked it" in reasons()

    backfill(legacy_engine, BackfillOptions(projects=["project-1"]))
    assert reasons() == "no verify has checked it: run `orch-migrate verify --project project-1`"

    verify(legacy_engine, VerifyOptions(projects=["project-1"]))
    assert readiness(legacy_engine, "project-1").ready
    assert not readiness(legacy_engine, "project-2").ready

    backfill(legacy_engine, BackfillOptions(projects=["project-1"]))  # a newer backfill run
    assert "older than its last backfill" in reasons()

    verify(legacy_engine, VerifyOptions(projects=["project-1"]))
    assert readiness(legacy_engine, "project-1").ready

    with legacy_engine.begin() as connection:
        connection.execute(
            update(OrchestrationSession)
            .where(
                OrchestrationSession.project_id
                == select(Project.id).where(Project.slug == "project-1").scalar_subquery()
            )
            .where(OrchestrationSession.system_prompt.is_not(None))
            .values(system_prompt=OrchestrationSession.system_prompt + "!")
        )
    assert "stale sessions: run `orch-migrate backfill --project project-1`" in reasons()


def test_a_failed_sampled_or_unfinished_verify_does_not_make_a_project_ready(
    legacy_engine: Engine,
) -> None:
    backfill(legacy_engine, BackfillOptions(projects=["project-1"]))
    verify(legacy_engine, VerifyOptions(projects=["project-1"], sample=5))
    assert "checked a sample only" in readiness(legacy_engine, "project-1").reasons[0]

    with legacy_engine.begin() as connection:
        version_id = connection.execute(
            select(SessionPromptRef.prompt_version_id)
            .join(OrchestrationSession)
            .join(Project)
            .where(Project.slug == "project-1")
            .limit(1)
        ).scalar_one()
        connection.execute(
            update(PromptVersion)
            .where(PromptVersion.id == version_id)
            .values(content=PromptVersion.content + "tampered")
        )
    assert not verify(legacy_engine, VerifyOptions(projects=["project-1"])).passed
    assert "found differences" in readiness(legacy_engine, "project-1").reasons[0]

    running = start_run(legacy_engine, RunKind.VERIFY, params={"scope": "*"})
    assert f"(run {running}) is running" in readiness(legacy_engine, "project-1").reasons[0]
    finish_run(legacy_engine, running, MigrationRunStatus.FAILED, error="killed")
    assert f"(run {running}) is failed" in readiness(legacy_engine, "project-1").reasons[0]


def test_a_run_over_all_projects_counts_for_each_and_the_latest_run_wins(
    legacy_engine: Engine,
) -> None:
    backfill(legacy_engine)
    verify(legacy_engine, VerifyOptions(projects=["project-1"]))
    first = _by_project(legacy_engine)
    assert first["project-1"].last_verify is not None
    assert not first["project-1"].last_verify.all_projects
    assert first["project-2"].last_verify is None
    assert all(p.last_backfill is not None and p.last_backfill.all_projects for p in first.values())

    everything = verify(legacy_engine)
    after = _by_project(legacy_engine)

    assert {p.last_verify.id for p in after.values() if p.last_verify} == {everything.run_id}
    assert all(p.readiness.ready for p in after.values())


def test_a_run_over_named_projects_counts_only_for_those(legacy_engine: Engine) -> None:
    backfill(legacy_engine)
    named = verify(legacy_engine, VerifyOptions(projects=["project-1", "project-2"]))

    found = _by_project(legacy_engine)

    assert found["project-1"].last_verify is not None
    assert found["project-1"].last_verify.id == named.run_id
    assert found["project-3"].last_verify is None
    assert not found["project-3"].readiness.ready


def test_an_export_run_is_reported_for_the_projects_it_covered(legacy_engine: Engine) -> None:
    run = start_run(legacy_engine, RunKind.EXPORT, params={"directory": "/x", "projects": None})
    finish_run(legacy_engine, run, MigrationRunStatus.COMPLETED, summary={})

    found = _by_project(legacy_engine)

    assert {p.last_export.id for p in found.values() if p.last_export} == {run}
    assert found["project-1"].last_export is not None
    assert found["project-1"].last_export.describe().startswith(f"#{run} completed")


def test_a_project_without_sessions_is_ready_with_nothing_to_verify(
    head_db_url: str, engine_for: Any
) -> None:
    engine: Engine = engine_for(head_db_url)
    with session_scope(make_session_factory(engine)) as session:
        create_project(session, "empty")

    assert readiness(engine, "empty").ready
    (project,) = status(engine).projects
    assert (project.sessions, project.migrated, project.unmigrated, project.stale) == (0, 0, 0, 0)


def test_the_flag_variant_and_where_it_comes_from_are_reported(legacy_engine: Engine) -> None:
    flags.set_default(legacy_engine, "shadow", actor="ops")
    flags.set_variant(legacy_engine, "project-2", "legacy", actor="ops")

    found = _by_project(legacy_engine)

    assert (found["project-1"].flag, found["project-1"].flag_source) == ("shadow", "default")
    assert (found["project-2"].flag, found["project-2"].flag_source) == ("legacy", "override")


def test_status_counts_in_a_fixed_number_of_queries_whatever_the_sessions(
    legacy_engine: Engine,
) -> None:
    backfill(legacy_engine)
    with statements_run(legacy_engine) as statements:
        status(legacy_engine)
    few = len(statements)
    with legacy_engine.begin() as connection:
        project_id = connection.execute(select(Project.id).limit(1)).scalar_one()
        connection.execute(
            insert(OrchestrationSession),
            [
                {"project_id": project_id, "name": f"more-{n}", "system_prompt": f"text {n}"}
                for n in range(500)
            ],
        )
    with statements_run(legacy_engine) as statements:
        report = status(legacy_engine)

    assert len(statements) == few
    assert sum(p.unmigrated for p in report.projects) == 500
    # One grouped count, and one pass for versions changed in the database behind our back.
    counted = [s for s in statements if "orchestration_sessions" in s]
    assert len(counted) == 2
    assert "GROUP BY" in counted[0] and "DISTINCT" in counted[1]


def test_an_unknown_project_is_not_found(legacy_engine: Engine) -> None:
    with pytest.raises(NotFoundError, match="no project with slug 'nope'"):
        readiness(legacy_engine, "nope")


def test_the_command_prints_a_table_and_readiness_lines_or_the_same_data_as_json(
    legacy_url: str, legacy_engine: Engine
) -> None:
    backfill(legacy_engine, BackfillOptions(projects=["project-1"]))
    verify(legacy_engine, VerifyOptions(projects=["project-1"]))

    shown = runner.invoke(app, ["status", "--db", legacy_url])
    as_json = runner.invoke(app, ["status", "--db", legacy_url, "--json"])

    assert shown.exit_code == 0, shown.output
    assert f"at revision {schema.history()[-1].revision}" in shown.output
    assert "project-1: ready for templates" in shown.output
    assert "project-2: not ready for templates:" in shown.output
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["revision"] == data["head"] == schema.history()[-1].revision
    first = data["projects"][0]
    assert first["project"] == "project-1"
    assert first["readiness"] == {"ready": True, "reasons": []}
    assert first["last_verify"]["passed"] is True
    assert set(first) >= {"sessions", "migrated", "unmigrated", "stale", "flag", "last_export"}


def test_the_command_says_what_is_wrong_in_one_line(legacy_url: str, tmp_path: Any) -> None:
    unknown = runner.invoke(app, ["status", "--project", "nope", "--db", legacy_url])
    empty = tmp_path / "nothing-here.db"
    empty.touch()
    no_tables = runner.invoke(app, ["status", "--db", f"sqlite:///{empty}"])

    assert unknown.exit_code == 2 and "no project with slug 'nope'" in unknown.output
    assert no_tables.exit_code == 2 and "orch-migrate db upgrade" in no_tables.output
    for result in (unknown, no_tables):
        assert len(result.output.strip().splitlines()) == 1


def test_runs_of_other_kinds_do_not_count(legacy_engine: Engine) -> None:
    with legacy_engine.begin() as connection:
        connection.execute(
            insert(MigrationRun).values(kind=RunKind.RESTORE.value, status="completed")
        )

    assert all(
        (p.last_export, p.last_backfill, p.last_verify) == (None, None, None)
        for p in status(legacy_engine).projects
    )


def test_legacy_ab_tests_of_orchestration_prompts_are_reported_for_the_selected_projects(
    legacy_url: str, legacy_engine: Engine
) -> None:
    everything = status(legacy_engine).legacy_ab_tests
    one = status(legacy_engine, projects=["project-2"]).legacy_ab_tests
    shown = runner.invoke(app, ["status", "--db", legacy_url])

    assert sorted(t.project for t in everything) == ["project-1", "project-2", "project-3"]
    assert [t.project for t in one] == ["project-2"]
    assert shown.exit_code == 0, shown.output
    assert "legacy A/B test" in shown.output
    assert "prompt-tool ab create" in shown.output
