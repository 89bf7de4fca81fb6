"""Sessions created through templates join the running test of their template, by the flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, select

from prompt_tool import ab_testing
from prompt_tool.ab_testing import ABTestInfo, VariantSpec, choose_variant
from prompt_tool.compat import CreatedSession, SessionReader, create_session
from prompt_tool.core.errors import TemplateRenderError
from prompt_tool.db.models import ABAssignment, OrchestrationSession, SessionPromptRef
from prompt_tool.errors import InvalidInputError
from prompt_tool.flags import FlagService
from prompt_tool.templates import TemplateManager

from .conftest import PLANNER, PLANNER_TEXTS, SYSTEM

NewSession = Callable[..., CreatedSession]


def _stored(engine: Engine, session_id: int) -> dict[str, Any]:
    with engine.connect() as connection:
        assignments = connection.execute(
            select(ABAssignment.ab_test_id, ABAssignment.variant_id, ABAssignment.unit_key).where(
                ABAssignment.session_id == session_id
            )
        ).all()
        refs = dict(
            connection.execute(
                select(SessionPromptRef.role, SessionPromptRef.prompt_version_id).where(
                    SessionPromptRef.session_id == session_id
                )
            ).all()
        )
        planner = connection.execute(
            select(OrchestrationSession.planner_prompt).where(OrchestrationSession.id == session_id)
        ).scalar_one()
    return {"assignments": [tuple(a) for a in assignments], "refs": refs, "planner": planner}


@pytest.mark.parametrize("variant", ["templates", "shadow"])
def test_a_session_joins_the_running_test_and_references_its_variant(
    db_engine: Engine,
    running_test: ABTestInfo,
    new_session: NewSession,
    set_flag: Any,
    variant: str,
) -> None:
    set_flag("acme", variant)

    created = new_session()

    (assignment,) = created.assignments.values()
    index = choose_variant(running_test.id, str(created.session_id), [50, 50])
    chosen = running_test.variants[index]
    assert (assignment.test_id, assignment.variant, assignment.unit_key) == (
        running_test.id,
        chosen.name,
        str(created.session_id),
    )
    expected_text = PLANNER_TEXTS[chosen.version].replace("{{ topic }}", "billing")
    assert created.texts["planner"] == expected_text
    assert created.versions["planner"] == chosen.version
    stored = _stored(db_engine, created.session_id)
    assert stored["assignments"] == [(running_test.id, chosen.id, str(created.session_id))]
    assert stored["refs"]["planner"] == chosen.version_id
    assert stored["planner"] == expected_text  # the dual-written legacy text follows


def test_over_many_sessions_both_variants_are_used_and_read_back_as_assigned(
    db_engine: Engine,
    manager: TemplateManager,
    running_test: ABTestInfo,
    new_session: NewSession,
    flag_service: FlagService,
    set_flag: Any,
) -> None:
    set_flag("acme", "templates")
    created = [new_session() for _ in range(12)]
    used = {c.assignments["planner"].variant for c in created}
    assert used == {"control", "candidate"}
    reader = SessionReader(db_engine, flags=flag_service, manager=manager)
    for session in created:
        assert reader.read(session.session_id).planner.text == session.texts["planner"]


def test_sessions_are_not_enrolled_while_the_flag_is_legacy(
    db_engine: Engine, running_test: ABTestInfo, new_session: NewSession, set_flag: Any
) -> None:
    set_flag("acme", "legacy")
    created = new_session(unit_key="user-1")
    assert created.assignments == {}
    assert created.versions["planner"] == 1  # production, untouched
    assert _stored(db_engine, created.session_id)["assignments"] == []


def test_sessions_are_not_enrolled_without_a_flag_service(
    db_engine: Engine, running_test: ABTestInfo, new_session: NewSession, set_flag: Any
) -> None:
    set_flag("acme", "templates")
    created = new_session(flags=None)
    assert created.assignments == {}
    assert _stored(db_engine, created.session_id)["assignments"] == []


def test_paused_and_draft_tests_enrol_nobody(
    db_engine: Engine, running_test: ABTestInfo, new_session: NewSession, set_flag: Any
) -> None:
    set_flag("acme", "templates")
    ab_testing.pause_ab_test(db_engine, running_test.id, actor="ed")
    assert new_session().assignments == {}


def test_other_projects_sessions_are_not_enrolled(
    manager: TemplateManager,
    running_test: ABTestInfo,
    flag_service: FlagService,
    set_flag: Any,
) -> None:
    set_flag("beta", "templates")
    created = create_session(
        manager, "beta", {"system": "system"}, {"topic": "x"}, name="b", flags=flag_service
    )
    assert created.assignments == {}


def test_one_unit_key_always_gets_one_variant_across_sessions(
    running_test: ABTestInfo, new_session: NewSession, set_flag: Any
) -> None:
    set_flag("acme", "templates")
    for user in ("alice", "bob", "carol"):
        variants = {new_session(unit_key=user).assignments["planner"].variant for _ in range(3)}
        expected = running_test.variants[choose_variant(running_test.id, user, [50, 50])].name
        assert variants == {expected}


def test_stored_assignments_are_recomputed_identically_by_another_process(
    db_engine: Engine, running_test: ABTestInfo, new_session: NewSession, set_flag: Any
) -> None:
    set_flag("acme", "templates")
    created = [new_session(unit_key=f"user-{n}") for n in range(8)] + [new_session()]
    with db_engine.connect() as connection:
        stored = connection.execute(
            select(ABAssignment.unit_key, ABAssignment.variant_id)
            .where(ABAssignment.ab_test_id == running_test.id)
            .order_by(ABAssignment.session_id)
        ).all()
    assert len(stored) == len(created)
    script = (
        "import json, sys\n"
        "from prompt_tool.ab_testing import choose_variant\n"
        "test_id, keys = json.load(sys.stdin)\n"
        "print(json.dumps([choose_variant(test_id, key, [50, 50]) for key in keys]))\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([running_test.id, [key for key, _ in stored]]),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "987"},
    )
    variant_ids = [v.id for v in running_test.variants]
    assert [variant_ids[i] for i in json.loads(other.stdout)] == [v for _, v in stored]


def test_a_variant_that_fails_to_render_leaves_no_session_behind(
    db_engine: Engine, manager: TemplateManager, new_session: NewSession, set_flag: Any
) -> None:
    set_flag("acme", "templates")
    broken = manager.update(PLANNER, "Plan {{ (topic | length) / 0 }}", actor="ed").version
    test = ab_testing.create_ab_test(
        db_engine,
        PLANNER,
        "planner",
        [VariantSpec("control", 1), VariantSpec("broken", broken)],
        name="risky",
        actor="ed",
    )
    ab_testing.start_ab_test(db_engine, test.id, actor="ed")
    key = next(f"k{n}" for n in range(100) if choose_variant(test.id, f"k{n}", [1, 1]) == 1)
    with db_engine.connect() as connection:
        before = connection.execute(select(OrchestrationSession.id)).all()

    with pytest.raises(TemplateRenderError, match="division by zero"):
        new_session(unit_key=key)

    with db_engine.connect() as connection:
        assert connection.execute(select(OrchestrationSession.id)).all() == before
        assert connection.execute(select(ABAssignment.session_id)).all() == []


def test_a_unit_key_must_fit_its_column(new_session: NewSession) -> None:
    with pytest.raises(InvalidInputError, match="unit key"):
        new_session(unit_key="")
    with pytest.raises(InvalidInputError, match="unit key"):
        new_session(unit_key="x" * 201)


def test_a_test_of_a_global_template_enrols_only_its_own_projects_sessions(
    db_engine: Engine,
    manager: TemplateManager,
    flag_service: FlagService,
    set_flag: Any,
) -> None:
    manager.update(SYSTEM, "You help, briefly, with {{ topic }}.", actor="root")
    test = ab_testing.create_ab_test(
        db_engine,
        SYSTEM,
        "system",
        [VariantSpec("long", 1), VariantSpec("brief", 2)],
        name="brevity",
        actor="root",
        project="beta",
    )
    ab_testing.start_ab_test(db_engine, test.id, actor="root")
    set_flag("acme", "templates")
    set_flag("beta", "templates")

    def system_session(project: str) -> CreatedSession:
        return create_session(
            manager, project, {"system": "system"}, {"topic": "x"}, name="s", flags=flag_service
        )

    assert system_session("acme").assignments == {}
    beta = system_session("beta")
    assert beta.assignments["system"].test_id == test.id
