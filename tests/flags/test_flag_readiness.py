"""`orch-migrate flag set ... templates` refuses a project that is not ready (fully backfilled and
verified since), in one line that says what is missing and what to run; `--force` overrides.
The check is the ``guard=`` that ``set_variant`` calls before it writes anything."""

from __future__ import annotations

from typing import Any

import pytest
from cli_run import run_cli
from sqlalchemy import Engine
from typer.testing import CliRunner

from prompt_tool import flags
from prompt_tool.cli._runtime import new_app
from prompt_tool.cli.flag_commands import flag_app
from prompt_tool.db import schema
from prompt_tool.migrate import load_legacy_sample
from prompt_tool.migrate.backfill import BackfillOptions, backfill
from prompt_tool.migrate.status import NotReadyError, readiness_guard
from prompt_tool.migrate.verify import VerifyOptions, verify

app = new_app("test host for the flag sub-app")
app.add_typer(flag_app, name="flag")
runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    """Run ``orch-migrate flag ...`` through ``run``, the one place errors become exit codes."""
    return run_cli(app, ["orch-migrate", "flag", *args])


@pytest.fixture
def url(empty_db_url: str) -> str:
    """Legacy data (3 projects) upgraded to head, nothing backfilled."""
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=90, projects=3, seed=11)
    schema.upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture
def engine(url: str, engine_for: Any) -> Engine:
    made: Engine = engine_for(url)
    return made


def _migrate(engine: Engine, *projects: str) -> None:
    backfill(engine, BackfillOptions(projects=list(projects)))
    verify(engine, VerifyOptions(projects=list(projects)))


def _variant(engine: Engine, project: str) -> str:
    return flags.get_variant(engine, project).variant.value


def test_a_project_that_is_not_ready_is_refused_in_one_line_saying_what_to_run(
    url: str, engine: Engine
) -> None:
    code, _, err = cli("set", "--project", "project-1", "templates", "--db", url)

    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "project project-1 is not ready for templates" in err
    assert "unmigrated sessions: run `orch-migrate backfill --project project-1`" in err
    assert "run `orch-migrate verify --project project-1`" in err
    assert "--force" in err
    assert _variant(engine, "project-1") == "legacy"
    assert flags.flag_history(engine) == []


def test_a_backfilled_but_unverified_project_is_refused_asking_for_verify(
    url: str, engine: Engine
) -> None:
    backfill(engine, BackfillOptions(projects=["project-1"]))

    code, _, err = cli("set", "--project", "project-1", "templates", "--db", url)

    assert code == 2
    assert "backfill" not in err.split("not ready for templates:", 1)[1]
    assert "no verify has checked it: run `orch-migrate verify --project project-1`" in err


def test_a_ready_project_is_switched(url: str, engine: Engine) -> None:
    _migrate(engine, "project-1")

    code, out, err = cli("set", "--project", "project-1", "templates", "--as", "ops", "--db", url)

    assert code == 0, err
    assert "project project-1: unset -> templates, by ops" in out
    assert _variant(engine, "project-1") == "templates"


def test_force_switches_a_project_that_is_not_ready(url: str, engine: Engine) -> None:
    code, _, err = cli("set", "--project", "project-2", "templates", "--force", "--db", url)

    assert code == 0, err
    assert _variant(engine, "project-2") == "templates"


@pytest.mark.parametrize("variant", ["legacy", "shadow"])
def test_other_variants_are_never_held_back(url: str, engine: Engine, variant: str) -> None:
    code, _, err = cli("set", "--project", "project-3", variant, "--db", url)

    assert code == 0, err
    assert _variant(engine, "project-3") == variant


def test_the_default_becomes_templates_only_when_every_project_following_it_is_ready(
    url: str, engine: Engine
) -> None:
    _migrate(engine, "project-1")

    code, _, err = cli("set", "--default", "templates", "--db", url)
    assert code == 2
    assert "the default (followed by project-1, project-2, project-3)" in err
    assert "project-2: " in err and "project-3: " in err and "project-1: " not in err

    for project in ("project-2", "project-3"):
        flags.set_variant(engine, project, "legacy", actor="ops")
    code, _, err = cli("set", "--default", "templates", "--db", url)
    assert code == 0, err
    assert _variant(engine, "project-1") == "templates"
    assert _variant(engine, "project-2") == "legacy"


def test_the_guard_refuses_before_anything_is_written(engine: Engine) -> None:
    with pytest.raises(NotReadyError, match="project project-1 is not ready"):
        flags.set_variant(
            engine, "project-1", "templates", actor="ops", guard=readiness_guard(engine)
        )

    assert flags.flag_history(engine) == []
    _migrate(engine, "project-1")
    change = flags.set_variant(
        engine, "project-1", "templates", actor="ops", guard=readiness_guard(engine)
    )
    assert change.changed and change.new_variant == "templates"


def test_a_project_that_went_stale_after_its_verify_is_refused_again(
    url: str, engine: Engine
) -> None:
    _migrate(engine, "project-1")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE orchestration_sessions SET planner_prompt = 'edited by an old app' "
            "WHERE id = (SELECT min(s.id) FROM orchestration_sessions s "
            "JOIN projects p ON p.id = s.project_id WHERE p.slug = 'project-1')"
        )

    code, _, err = cli("set", "--project", "project-1", "templates", "--db", url)

    assert code == 2
    assert "1 stale session: run `orch-migrate backfill --project project-1`" in err
