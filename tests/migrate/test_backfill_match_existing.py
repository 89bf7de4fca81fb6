"""`orch-migrate backfill --match-existing`: a session whose legacy text an existing template
renders exactly (with the session's variables) is linked to that template; only the rest is
imported, and the templates path still gives every text back byte for byte."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, text
from typer.testing import CliRunner

from prompt_tool.cli.orch_migrate import app
from prompt_tool.db.engine import make_session_factory, session_scope
from prompt_tool.db.models import OrchestrationSession, Project, Scope, SessionPromptRef
from prompt_tool.migrate.backfill import BackfillOptions, backfill
from prompt_tool.migrate.matching import SOURCE_MATCH
from prompt_tool.migrate.verify import verify
from prompt_tool.templates import TemplateAddress, TemplateManager
from prompt_tool.templates.permissions import grant_role

PLANNER = "Plan the work for {{ goal }}.\n{% for s in steps %}- {{ s }}\n{% endfor %}"


def _rendered(goal: str, steps: list[str]) -> str:
    return f"Plan the work for {goal}.\n" + "".join(f"- {s}\n" for s in steps)


@pytest.fixture
def matching_engine(legacy_engine: Engine) -> Engine:
    """project-1 has a planner template; four of its sessions hold texts that it renders (two
    of them with identical variables), one holds a text it does not render."""
    with session_scope(make_session_factory(legacy_engine)) as session:
        grant_role(session, "root", "root", "admin", None)
    manager = TemplateManager(legacy_engine)
    address = TemplateAddress("planner", Scope.PROJECT, project="project-1")
    manager.create(address, "An older planner: {{ goal }}", actor="root")
    manager.update(address, PLANNER, actor="root")
    with legacy_engine.begin() as connection:
        project_id = connection.execute(
            select(Project.id).where(Project.slug == "project-1")
        ).scalar_one()
        sessions: list[tuple[str, dict[str, Any] | None, str]] = [
            ("a", {"goal": "the launch", "steps": ["draft", "ship"]}, ""),
            ("b", {"goal": "the launch", "steps": ["draft", "ship"]}, ""),
            ("c", {"goal": "café ☕", "steps": []}, ""),
            ("d", {"goal": "x", "steps": ["y"]}, "edited by hand afterwards"),
            ("e", None, ""),
        ]
        for name, variables, suffix in sessions:
            planner = (
                _rendered(variables["goal"], variables["steps"]) + suffix
                if variables
                else "no variables recorded"
            )
            connection.execute(
                insert(OrchestrationSession).values(
                    project_id=project_id,
                    name=f"match-{name}",
                    planner_prompt=planner,
                    variables=variables,
                )
            )
    return legacy_engine


def _planner_refs(engine: Engine) -> dict[str, tuple[str, str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT s.name, r.source, p.name, r.variables FROM session_prompt_refs r "
                "JOIN orchestration_sessions s ON s.id = r.session_id "
                "JOIN prompt_versions v ON v.id = r.prompt_version_id "
                "JOIN prompts p ON p.id = v.prompt_id "
                "WHERE r.role = 'planner' AND s.name LIKE 'match-%'"
            )
        ).all()
    return {session: (source, template, variables) for session, source, template, variables in rows}


def test_sessions_an_existing_template_renders_are_linked_to_it(matching_engine: Engine) -> None:
    summary = backfill(matching_engine, BackfillOptions(match_existing=True, batch_size=64))

    refs = _planner_refs(matching_engine)
    for name in ("match-a", "match-b", "match-c"):
        source, template, variables = refs[name]
        assert (source, template) == (SOURCE_MATCH, "planner"), name
        assert variables is not None
    assert refs["match-d"][0] == "backfill"
    assert refs["match-d"][1].startswith("imported/planner/")
    assert refs["match-e"][1].startswith("imported/planner/")
    assert summary.references_matched == 3
    report = verify(matching_engine)
    assert report.passed, report.mismatches
    assert report.totals().matched == report.totals().checked


def test_without_the_option_everything_is_imported(matching_engine: Engine) -> None:
    summary = backfill(matching_engine)

    assert summary.references_matched == 0
    assert {source for source, _, _ in _planner_refs(matching_engine).values()} == {"backfill"}


def test_a_second_run_with_matching_changes_nothing(matching_engine: Engine) -> None:
    backfill(matching_engine, BackfillOptions(match_existing=True))
    before = _planner_refs(matching_engine)

    again = backfill(matching_engine, BackfillOptions(match_existing=True))

    assert not again.changed
    assert _planner_refs(matching_engine) == before


def test_a_matched_text_edited_later_is_relinked_next_run(matching_engine: Engine) -> None:
    backfill(matching_engine, BackfillOptions(match_existing=True))
    with matching_engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE orchestration_sessions SET planner_prompt = 'changed' "
                "WHERE name = 'match-a'"
            )
        )

    summary = backfill(matching_engine, BackfillOptions(match_existing=True))

    assert summary.references_relinked == 1
    assert _planner_refs(matching_engine)["match-a"][1].startswith("imported/planner/")
    assert verify(matching_engine).passed


def test_a_dry_run_with_matching_counts_and_writes_nothing(matching_engine: Engine) -> None:
    summary = backfill(matching_engine, BackfillOptions(match_existing=True, dry_run=True))

    assert summary.references_matched == 3
    with matching_engine.connect() as connection:
        assert connection.execute(select(SessionPromptRef.session_id)).first() is None


def test_the_cli_option_reports_the_matches(matching_engine: Engine) -> None:
    url = matching_engine.url.render_as_string(hide_password=False)

    result = CliRunner().invoke(app, ["backfill", "--match-existing", "--json", "--db", url])

    assert result.exit_code == 0, result.output
    assert '"references_matched": 3' in result.output
