"""docs/ROLLBACK.md is executable: every `orch-migrate` line of its shell blocks runs, in order, on
a deployment that moved to templates (and wrote new sessions through them), and succeeds; the
legacy data and the dual-written session come out of it intact."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from prompt_tool.cli.orch_migrate import app
from prompt_tool.compat import create_session
from prompt_tool.db import schema
from prompt_tool.db.engine import make_engine, make_session_factory, session_scope
from prompt_tool.db.models import OrchestrationSession, Scope
from prompt_tool.migrate import fingerprint_legacy_tables, load_legacy_sample
from prompt_tool.templates import TemplateAddress, TemplateManager
from prompt_tool.templates.permissions import grant_role

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "ROLLBACK.md"
PROJECT = "project-1"  # the runbook's `acme`
runner = CliRunner()


def runbook_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", RUNBOOK.read_text(), flags=re.DOTALL)
    return [
        line.strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip().startswith("orch-migrate ")
    ]


def orch_migrate(line: str, url: str) -> str:
    """Run one runbook line against ``url``; a `> FILE` redirect writes stdout to FILE."""
    command, _, redirect = line.partition(" > ")
    arguments = shlex.split(command.replace("acme", PROJECT))[1:]
    result = runner.invoke(app, [*arguments, "--db", url])
    assert result.exit_code == 0, f"{line}\n{result.output}"
    if redirect:
        Path(redirect.strip()).write_text(result.stdout)
    return result.stdout


def test_the_runbook_covers_every_step_of_a_rollback() -> None:
    commands = runbook_commands()
    for needed in ("flag set", "verify", "--archive", "fingerprint", "db downgrade", "restore"):
        assert any(needed in c for c in commands), needed
    downgrade = next(c for c in commands if c.startswith("orch-migrate db downgrade"))
    assert commands.index(downgrade) > commands.index("orch-migrate flag set --project acme legacy")


@pytest.fixture
def moved_deployment(empty_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A legacy deployment exported, upgraded, backfilled, verified and switched to templates,
    with one new session written through templates."""
    monkeypatch.chdir(tmp_path)
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=60, projects=3, seed=3)
    for line in (
        "orch-migrate export before-templates/",
        "orch-migrate fingerprint --json > before-templates.json",
        "orch-migrate db upgrade",
        "orch-migrate backfill",
        "orch-migrate verify",
        "orch-migrate flag set --project acme templates",
    ):
        orch_migrate(line, empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            grant_role(session, "ops", "ops", "admin", None)
        manager = TemplateManager(engine)
        manager.create(
            TemplateAddress("planner", Scope.PROJECT, project=PROJECT),
            "Plan {{ goal }} for {{ who }}.",
            actor="ops",
        )
        create_session(
            manager, PROJECT, {"planner": "planner"}, {"goal": "v2", "who": "ops"}, name="new"
        )
    finally:
        engine.dispose()
    return empty_db_url


def test_every_runbook_command_runs_and_nothing_is_lost(moved_deployment: str) -> None:
    url = moved_deployment
    before = fingerprint_legacy_tables(url).tables

    for line in runbook_commands():
        orch_migrate(line, url)

    # The second backfill imported a template for the new session's text (prompts grow); every
    # other legacy table is exactly as it was.
    after = {t.table: t for t in fingerprint_legacy_tables(url).tables}
    for table in before:
        if table.table not in {"prompts", "prompt_versions"}:
            assert after[table.table] == table, table.table
    assert schema.current(url).current == schema.current(url).head
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            planner = connection.execute(
                select(OrchestrationSession.planner_prompt).where(
                    OrchestrationSession.name == "new"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    assert planner == "Plan v2 for ops."
