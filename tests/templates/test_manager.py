"""The template manager on SQLite and PostgreSQL: hierarchy, versions, labels, audit, caches."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, func, select

from prompt_tool.core.errors import TemplateNotFound, TemplateValidationError
from prompt_tool.db.models import Prompt, PromptVersion, Scope, TemplateEvent
from prompt_tool.errors import InvalidInputError
from prompt_tool.settings import Settings
from prompt_tool.templates import TemplateAddress, TemplateManager

GLOBAL = TemplateAddress("planner", Scope.GLOBAL)
ACME = TemplateAddress("planner", Scope.PROJECT, project="acme")
ED_CUSTOM = TemplateAddress("planner", Scope.CUSTOM, project="acme", owner="ed")


def _count(engine: Engine, model: type) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(model)).scalar_one())


def test_names_resolve_custom_then_project_then_global(manager: TemplateManager) -> None:
    manager.create(GLOBAL, "global plan", actor="root")
    assert manager.resolve("planner", project="acme", user="ed").scope == "global"

    manager.create(ACME, "acme plan", actor="ed")
    assert manager.resolve("planner", project="acme", user="ed").source == "acme plan"
    assert manager.resolve("planner", project="beta", user="ed").source == "global plan"

    manager.create(ED_CUSTOM, "ed's plan", actor="ed")
    resolved = manager.resolve("planner", project="acme", user="ed")
    assert (resolved.scope, resolved.source) == ("custom", "ed's plan")
    assert manager.resolve("planner", project="acme", user="vi").scope == "project"


def test_unknown_name_says_where_it_looked(manager: TemplateManager) -> None:
    with pytest.raises(TemplateNotFound, match="looked in custom, project and global"):
        manager.resolve("nope", project="acme")


def test_storing_identical_text_creates_nothing_and_says_so(
    manager: TemplateManager, db_engine: Engine
) -> None:
    manager.create(ACME, "plan {{ goal }}", actor="ed")
    versions_before = _count(db_engine, PromptVersion)
    result = manager.update(ACME, "plan {{ goal }}", actor="ed")
    assert result.created is False
    assert "unchanged" in result.describe()
    assert _count(db_engine, PromptVersion) == versions_before


def test_every_change_is_a_new_version_with_author_time_note_and_hash(
    manager: TemplateManager,
) -> None:
    manager.create(ACME, "v1 text", actor="ed", note="first")
    result = manager.update(ACME, "v2 text", actor="root", note="sharper")
    assert (result.created, result.version) == (True, 2)
    versions = manager.versions(ACME)
    assert [(v.version, v.created_by, v.change_note) for v in versions] == [
        (1, "ed", "first"),
        (2, "root", "sharper"),
    ]
    assert versions[0].content_hash != versions[1].content_hash
    assert manager.show(ACME, version=1).source == "v1 text"


def test_update_moves_latest_and_production_only_when_promoted(manager: TemplateManager) -> None:
    manager.create(ACME, "one", actor="ed")
    manager.update(ACME, "two", actor="ed")
    assert manager.resolve("planner", project="acme").source == "one"
    assert manager.resolve("planner", project="acme", label="latest").source == "two"
    manager.update(ACME, "three", actor="ed", promote=True)
    assert manager.resolve("planner", project="acme").source == "three"


def test_new_version_is_visible_at_once_despite_the_name_cache(manager: TemplateManager) -> None:
    manager.create(ACME, "cached", actor="ed")
    assert manager.resolve("planner", project="acme").source == "cached"
    manager.update(ACME, "fresh", actor="ed", promote=True)
    assert manager.resolve("planner", project="acme").source == "fresh"


def test_rollback_moves_the_label_back_and_is_recorded(manager: TemplateManager) -> None:
    manager.create(ACME, "good", actor="ed")
    manager.update(ACME, "bad", actor="ed", promote=True)
    result = manager.rollback(ACME, actor="ed", note="bad output")
    assert (result.label, result.from_version, result.to_version) == ("production", 2, 1)
    assert manager.resolve("planner", project="acme").source == "good"
    last = manager.history(ACME)[-1]
    assert (last.action, last.label, last.from_version, last.to_version, last.actor) == (
        "rollback",
        "production",
        2,
        1,
        "ed",
    )


def test_rollback_without_an_earlier_version_is_refused(manager: TemplateManager) -> None:
    manager.create(ACME, "only", actor="ed")
    with pytest.raises(InvalidInputError, match="no earlier version"):
        manager.rollback(ACME, actor="ed")


def test_history_is_the_audit_trail(manager: TemplateManager) -> None:
    manager.create(ACME, "a", actor="ed")
    manager.update(ACME, "b", actor="root")
    manager.move_label(ACME, "staging", 2, actor="ed", note="try it")
    actions = [
        (h.action, h.label, h.from_version, h.to_version, h.actor) for h in manager.history(ACME)
    ]
    assert actions == [
        ("version_created", None, None, 1, "ed"),
        ("label_moved", "latest", None, 1, "ed"),
        ("label_moved", "production", None, 1, "ed"),
        ("version_created", None, None, 2, "root"),
        ("label_moved", "latest", 1, 2, "root"),
        ("label_moved", "staging", None, 2, "ed"),
    ]


def test_diff_between_two_versions(manager: TemplateManager) -> None:
    manager.create(ACME, "line one\nline two\n", actor="ed")
    manager.update(ACME, "line one\nline 2\n", actor="ed")
    diff = manager.diff(ACME, 1, 2)
    assert "-line two\n" in diff
    assert "+line 2\n" in diff
    assert diff.startswith("--- planner@v1")


def test_invalid_template_is_refused_with_its_line_and_nothing_stored(
    manager: TemplateManager, db_engine: Engine
) -> None:
    with pytest.raises(TemplateValidationError, match="line 2"):
        manager.create(ACME, "fine\n{% if %}\n", actor="ed")
    assert _count(db_engine, Prompt) == 0


def test_includes_resolve_through_the_hierarchy(manager: TemplateManager) -> None:
    manager.create(TemplateAddress("tone", Scope.GLOBAL), "Be kind.", actor="root")
    manager.create(
        TemplateAddress("system", Scope.PROJECT, project="acme"),
        '{% include "tone" %} Help with {{ topic }}.',
        actor="ed",
    )
    rendered = manager.render("system", {"topic": "billing"}, project="acme")
    assert rendered.text == "Be kind. Help with billing."

    manager.create(TemplateAddress("tone", Scope.PROJECT, project="acme"), "Be brief.", actor="ed")
    assert manager.render("system", {"topic": "x"}, project="acme").text == "Be brief. Help with x."


def test_include_of_a_template_that_does_not_exist_is_refused(manager: TemplateManager) -> None:
    with pytest.raises(TemplateNotFound):
        manager.create(ACME, '{% include "missing" %}', actor="ed")


def test_declared_variables_are_checked(manager: TemplateManager) -> None:
    manager.create(
        ACME,
        "Plan for {{ goal }}",
        actor="ed",
        variables=[{"name": "goal", "type": "string", "required": True}],
    )
    assert manager.render("planner", {"goal": "x"}, project="acme").text == "Plan for x"
    with pytest.raises(Exception, match="goal"):
        manager.render("planner", {}, project="acme")


def test_listing_filters_by_scope_category_tag_and_text(manager: TemplateManager) -> None:
    manager.create(GLOBAL, "g", actor="root", category="planning", tags=["core"])
    manager.create(ACME, "a", actor="ed", category="planning", tags=["beta"], description="Acme's")
    manager.create(
        TemplateAddress("synth", Scope.PROJECT, project="acme"), "s", actor="ed", category="output"
    )
    names = lambda items: sorted((t.name, t.scope) for t in items)  # noqa: E731
    assert names(manager.list_templates(project="acme", category="planning")) == [
        ("planner", "global"),
        ("planner", "project"),
    ]
    assert names(manager.list_templates(tag="beta")) == [("planner", "project")]
    assert names(manager.list_templates(scope=Scope.GLOBAL)) == [("planner", "global")]
    assert names(manager.list_templates(search="acme's")) == [("planner", "project")]
    summary = manager.list_templates(project="acme", scope=Scope.PROJECT, category="output")[0]
    assert summary.labels == {"latest": 1, "production": 1}


def test_fallback_text_only_when_the_database_cannot_be_reached(
    tmp_path: object, template_settings: Settings
) -> None:
    unreachable = TemplateManager.from_url(
        "sqlite:////nonexistent-dir/never.db", settings=template_settings
    )
    resolved = unreachable.resolve("planner", project=None, fallback="Plan carefully.")
    assert (resolved.scope, resolved.source) == ("fallback", "Plan carefully.")
    with pytest.raises(Exception):  # noqa: B017 - any "cannot reach the database" error
        unreachable.resolve("planner", project=None)


def test_events_are_never_deleted_by_new_versions(
    manager: TemplateManager, db_engine: Engine
) -> None:
    manager.create(ACME, "a", actor="ed")
    before = _count(db_engine, TemplateEvent)
    manager.update(ACME, "b", actor="ed")
    assert _count(db_engine, TemplateEvent) > before
