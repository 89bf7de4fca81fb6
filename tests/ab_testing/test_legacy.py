"""Legacy A/B tests of orchestration prompts are found for `orch-migrate status` to report."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, insert, select

from prompt_tool import ab_testing
from prompt_tool.ab_testing import LegacyABTest
from prompt_tool.db import schema
from prompt_tool.db.models import ABTest, Project, Prompt
from prompt_tool.migrate.backfill import backfill
from prompt_tool.migrate.fingerprint import fingerprint_legacy_tables
from prompt_tool.migrate.sample import load_legacy_sample
from prompt_tool.templates import TemplateManager

from .conftest import CONTROL_AND_CANDIDATE, PLANNER


def test_legacy_tests_of_orchestration_prompts_are_listed_and_nothing_else(
    head_db_url: str, db_engine: Engine, manager: TemplateManager
) -> None:
    load_legacy_sample(head_db_url, sessions=5, projects=2, force=True)
    # Neither a test of a plain prompt nor one of a template is a legacy orchestration test.
    with db_engine.begin() as connection:
        acme = connection.execute(select(Project.id).where(Project.slug == "acme")).scalar_one()
        other = connection.execute(
            insert(Prompt).values(name="email", content="x", category="marketing")
        ).inserted_primary_key
        assert other is not None
        connection.execute(insert(ABTest).values(project_id=acme, prompt_id=other[0], name="mail"))
    ab_testing.create_ab_test(
        db_engine, PLANNER, "planner", CONTROL_AND_CANDIDATE, name="new", actor="ed"
    )

    found = ab_testing.legacy_orchestration_ab_tests(db_engine)

    assert [(t.project, t.name, t.status, t.prompt_name, t.variants) for t in found] == [
        ("project-3", "planner wording", "draft", "planner-prompt", 2),
        ("project-4", "planner wording", "draft", "planner-prompt", 2),
    ]
    assert all(isinstance(t, LegacyABTest) for t in found)
    assert "recreate it on the imported template" in found[0].describe()


def test_legacy_tests_are_found_before_the_expand_step_too(
    empty_db_url: str, engine_for: object
) -> None:
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=3, projects=1)
    engine = engine_for(empty_db_url)  # type: ignore[operator]
    (found,) = ab_testing.legacy_orchestration_ab_tests(engine)
    assert (found.project, found.prompt_name, found.variants) == ("project-1", "planner-prompt", 2)


def test_a_database_without_legacy_tests_reports_none(db_engine: Engine) -> None:
    assert ab_testing.legacy_orchestration_ab_tests(db_engine) == []


def test_backfill_and_a_round_trip_leave_legacy_tests_and_their_versions_as_they_were(
    empty_db_url: str, engine_for: Any
) -> None:
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=30, projects=2)
    before = ab_testing.legacy_orchestration_ab_tests(engine_for(empty_db_url))
    tables = {t.table: t for t in fingerprint_legacy_tables(empty_db_url).tables}
    schema.upgrade(empty_db_url)
    engine = engine_for(empty_db_url)

    backfill(engine)
    engine.dispose()
    schema.downgrade(empty_db_url, "-1")

    after = {t.table: t for t in fingerprint_legacy_tables(empty_db_url).tables}
    assert ab_testing.legacy_orchestration_ab_tests(engine_for(empty_db_url)) == before
    assert after["ab_tests"] == tables["ab_tests"]
    assert after["ab_test_variants"] == tables["ab_test_variants"]
