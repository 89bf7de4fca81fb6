"""A test's life: draft -> running <-> paused -> stopped, frozen variants, one running at a time,
the template's edit permission for every change, and every change in the template's history."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from prompt_tool import ab_testing
from prompt_tool.ab_testing import (
    ABTestConflictError,
    ABTestFrozenError,
    ABTestInfo,
    ABTestStateError,
    ABTestStatus,
    VariantSpec,
)
from prompt_tool.core.errors import PermissionDenied, TemplateNotFound
from prompt_tool.db.dialect import is_retryable
from prompt_tool.db.models import ABTest, ABTestVariant, Project, Prompt, PromptVersion
from prompt_tool.errors import InvalidInputError, NotFoundError
from prompt_tool.templates import TemplateManager

from .conftest import CONTROL_AND_CANDIDATE, PLANNER, SYSTEM


def _create(engine: Engine, name: str = "wording", role: str = "planner", **kw: Any) -> ABTestInfo:
    return ab_testing.create_ab_test(
        engine,
        PLANNER,
        role,
        kw.pop("variants", CONTROL_AND_CANDIDATE),
        name=name,
        actor=kw.pop("actor", "ed"),
        **kw,
    )


def test_a_new_test_is_a_draft_with_its_variants_and_shares(
    db_engine: Engine, manager: TemplateManager
) -> None:
    info = _create(
        db_engine, variants=[VariantSpec("control", 1, 3), VariantSpec("candidate", 2, 1)]
    )
    assert info.status is ABTestStatus.DRAFT
    assert (info.project, info.template, info.role) == ("acme", PLANNER, "planner")
    assert [(v.name, v.version, v.weight, v.share) for v in info.variants] == [
        ("control", 1, 3, 0.75),
        ("candidate", 2, 1, 0.25),
    ]
    assert ab_testing.get_ab_test(db_engine, info.id) == info
    assert ab_testing.get_ab_test(db_engine, "wording") == info


def test_status_moves_through_running_paused_and_stopped(
    db_engine: Engine, manager: TemplateManager
) -> None:
    test_id = _create(db_engine).id
    started = ab_testing.start_ab_test(db_engine, test_id, actor="ed")
    assert (started.status, started.changed) == (ABTestStatus.RUNNING, True)
    again = ab_testing.start_ab_test(db_engine, test_id, actor="ed")
    assert (again.status, again.changed) == (ABTestStatus.RUNNING, False)
    assert ab_testing.pause_ab_test(db_engine, test_id, actor="ed").status is ABTestStatus.PAUSED
    assert ab_testing.start_ab_test(db_engine, test_id, actor="ed").status is ABTestStatus.RUNNING
    assert ab_testing.stop_ab_test(db_engine, test_id, actor="ed").status is ABTestStatus.STOPPED
    with pytest.raises(ABTestStateError, match="stopped and cannot start"):
        ab_testing.start_ab_test(db_engine, test_id, actor="ed")


def test_a_draft_cannot_be_paused(db_engine: Engine, manager: TemplateManager) -> None:
    with pytest.raises(ABTestStateError, match="draft and cannot pause"):
        ab_testing.pause_ab_test(db_engine, _create(db_engine).id, actor="ed")


def test_a_draft_may_change_its_variants(db_engine: Engine, manager: TemplateManager) -> None:
    test_id = _create(db_engine).id
    changed = ab_testing.set_variants(
        db_engine, test_id, [VariantSpec("a", 2, 1), VariantSpec("b", 3, 4)], actor="ed"
    )
    assert [(v.name, v.version, v.weight) for v in changed.variants] == [("a", 2, 1), ("b", 3, 4)]


@pytest.mark.parametrize("then", ["running", "paused", "stopped"])
def test_variants_and_weights_are_frozen_once_the_test_has_run(
    db_engine: Engine, manager: TemplateManager, then: str
) -> None:
    test_id = _create(db_engine).id
    ab_testing.start_ab_test(db_engine, test_id, actor="ed")
    if then == "paused":
        ab_testing.pause_ab_test(db_engine, test_id, actor="ed")
    if then == "stopped":
        ab_testing.stop_ab_test(db_engine, test_id, actor="ed")
    before = ab_testing.get_ab_test(db_engine, test_id).variants

    with pytest.raises(ABTestFrozenError, match=r"frozen.*create a new test"):
        ab_testing.set_variants(
            db_engine, test_id, [VariantSpec("control", 1, 90), VariantSpec("x", 3, 10)], actor="ed"
        )
    assert ab_testing.get_ab_test(db_engine, test_id).variants == before


def test_only_one_test_runs_per_template_and_role(
    db_engine: Engine, manager: TemplateManager
) -> None:
    first = _create(db_engine, "first").id
    second = _create(db_engine, "second").id
    other_role = _create(db_engine, "system role", role="system").id
    ab_testing.start_ab_test(db_engine, first, actor="ed")

    with pytest.raises(ABTestConflictError, match=f"A/B test {first} already runs"):
        ab_testing.start_ab_test(db_engine, second, actor="ed")
    assert ab_testing.get_ab_test(db_engine, second).status is ABTestStatus.DRAFT
    ab_testing.start_ab_test(db_engine, other_role, actor="ed")  # another role: no conflict

    ab_testing.pause_ab_test(db_engine, first, actor="ed")
    assert ab_testing.start_ab_test(db_engine, second, actor="ed").status is ABTestStatus.RUNNING


def test_concurrent_starts_of_two_tests_of_one_template_let_exactly_one_run(
    db_engine: Engine, manager: TemplateManager
) -> None:
    ids = [_create(db_engine, f"t{n}").id for n in range(4)]
    barrier = threading.Barrier(len(ids))
    outcomes: dict[int, ABTestStatus | Exception] = {}

    def start(test_id: int) -> None:
        barrier.wait()
        try:
            outcomes[test_id] = ab_testing.start_ab_test(db_engine, test_id, actor="ed").status
        except Exception as error:
            outcomes[test_id] = error

    threads = [threading.Thread(target=start, args=(test_id,)) for test_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [i for i, o in outcomes.items() if o is ABTestStatus.RUNNING]
    assert len(winners) == 1, outcomes
    for test_id, outcome in outcomes.items():
        if test_id not in winners:
            # SQLite may refuse a second writer outright ("database is locked"): also a loss.
            assert isinstance(outcome, Exception), outcome
            assert isinstance(outcome, ABTestConflictError) or is_retryable(outcome), outcome
    statuses = [ab_testing.get_ab_test(db_engine, i).status for i in ids]
    assert statuses.count(ABTestStatus.RUNNING) == 1


def test_changes_need_the_right_to_edit_the_template(
    db_engine: Engine, manager: TemplateManager
) -> None:
    with pytest.raises(PermissionDenied, match="vi may not edit template 'planner'"):
        _create(db_engine, actor="vi")
    test_id = _create(db_engine).id
    for change in (ab_testing.start_ab_test, ab_testing.stop_ab_test):
        with pytest.raises(PermissionDenied, match="needs role editor"):
            change(db_engine, test_id, actor="vi")
    assert ab_testing.get_ab_test(db_engine, test_id, actor="vi").status is ABTestStatus.DRAFT
    with pytest.raises(PermissionDenied, match="may not view"):
        ab_testing.get_ab_test(db_engine, test_id, actor="stranger")


def test_list_shows_only_tests_of_templates_the_user_may_view(
    db_engine: Engine, manager: TemplateManager
) -> None:
    acme = _create(db_engine).id
    global_test = ab_testing.create_ab_test(
        db_engine,
        SYSTEM,
        "system",
        _system_variants(manager),
        name="g",
        actor="root",
        project="beta",
    ).id
    assert [t.id for t in ab_testing.list_ab_tests(db_engine)] == [global_test, acme]
    assert [t.id for t in ab_testing.list_ab_tests(db_engine, actor="stranger")] == [global_test]
    assert [t.id for t in ab_testing.list_ab_tests(db_engine, project="acme")] == [acme]
    running = ab_testing.list_ab_tests(db_engine, status=ABTestStatus.RUNNING)
    assert running == []


def _system_variants(manager: TemplateManager) -> list[VariantSpec]:
    manager.update(SYSTEM, "You help, briefly, with {{ topic }}.", actor="root")
    return [VariantSpec("a", 1), VariantSpec("b", 2)]


def test_a_global_template_test_names_the_project_whose_sessions_it_enrols(
    db_engine: Engine, manager: TemplateManager
) -> None:
    variants = _system_variants(manager)
    with pytest.raises(InvalidInputError, match="--project SLUG"):
        ab_testing.create_ab_test(db_engine, SYSTEM, "system", variants, name="g", actor="root")
    info = ab_testing.create_ab_test(
        db_engine, SYSTEM, "system", variants, name="g", actor="root", project="beta"
    )
    assert (info.project, info.template) == ("beta", SYSTEM)
    with pytest.raises(PermissionDenied, match="global admin"):
        ab_testing.create_ab_test(
            db_engine, SYSTEM, "system", variants, name="g", actor="ed", project="acme"
        )


@pytest.mark.parametrize(
    ("variants", "error", "message"),
    [
        ([VariantSpec("only", 1)], InvalidInputError, "at least two variants"),
        ([VariantSpec("a", 1), VariantSpec("a", 2)], InvalidInputError, "two variants are named"),
        ([VariantSpec("a", 1), VariantSpec("b", 1)], InvalidInputError, "test version 1"),
        ([VariantSpec("a", 1), VariantSpec("b", 2, 0)], InvalidInputError, "weight 0"),
        ([VariantSpec("a", 1), VariantSpec("b b", 2)], InvalidInputError, "variant name"),
        ([VariantSpec("a", 1), VariantSpec("b", 9)], TemplateNotFound, "no version 9"),
    ],
)
def test_bad_variants_are_refused_with_what_to_do(
    db_engine: Engine,
    manager: TemplateManager,
    variants: list[VariantSpec],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        _create(db_engine, variants=variants)
    assert ab_testing.list_ab_tests(db_engine) == []


def test_unknown_role_template_or_test_is_refused(
    db_engine: Engine, manager: TemplateManager
) -> None:
    with pytest.raises(InvalidInputError, match="unknown session role 'critic'"):
        _create(db_engine, role="critic")
    with pytest.raises(NotFoundError, match="no A/B test 'nope'"):
        ab_testing.get_ab_test(db_engine, "nope")
    with pytest.raises(NotFoundError, match="no A/B test 99"):
        ab_testing.start_ab_test(db_engine, 99, actor="ed")


def test_two_tests_with_one_name_are_named_by_id(
    db_engine: Engine, manager: TemplateManager
) -> None:
    first, second = _create(db_engine).id, _create(db_engine).id
    with pytest.raises(InvalidInputError, match=f"ids {first}, {second}"):
        ab_testing.get_ab_test(db_engine, "wording")


def test_legacy_tests_of_plain_prompts_are_left_alone(
    db_engine: Engine, manager: TemplateManager
) -> None:
    with db_engine.begin() as connection:
        prompt_id = connection.execute(
            insert(Prompt).values(name="old", content="x").returning(Prompt.id)
        ).scalar_one()
        version_id = connection.execute(
            insert(PromptVersion)
            .values(prompt_id=prompt_id, version=1, content="x")
            .returning(PromptVersion.id)
        ).scalar_one()
        project_id = connection.execute(
            select(Project.id).where(Project.slug == "acme")
        ).scalar_one()
        test_id = connection.execute(
            insert(ABTest)
            .values(project_id=project_id, prompt_id=prompt_id, name="legacy", status="running")
            .returning(ABTest.id)
        ).scalar_one()
        connection.execute(
            insert(ABTestVariant).values(ab_test_id=test_id, prompt_version_id=version_id, name="a")
        )
    with pytest.raises(InvalidInputError, match="legacy test of a plain prompt"):
        ab_testing.stop_ab_test(db_engine, test_id, actor="root")
    assert ab_testing.list_ab_tests(db_engine) == []


def test_every_change_is_in_the_template_history(
    db_engine: Engine, manager: TemplateManager
) -> None:
    test_id = _create(db_engine).id
    ab_testing.start_ab_test(db_engine, test_id, actor="ed")
    ab_testing.start_ab_test(db_engine, test_id, actor="ed")  # no change: not recorded
    ab_testing.stop_ab_test(db_engine, test_id, actor="root")
    entries = [e for e in manager.history(PLANNER) if e.action.startswith("ab_test")]
    assert [(e.action, e.actor) for e in entries] == [
        ("ab_test_created", "ed"),
        ("ab_test_started", "ed"),
        ("ab_test_stopped", "root"),
    ]
    assert entries[0].note == (
        f"A/B test {test_id} 'wording' (role planner): control=v1:50, candidate=v2:50"
    )
    assert entries[2].note == f"A/B test {test_id} 'wording' (role planner): running -> stopped"
