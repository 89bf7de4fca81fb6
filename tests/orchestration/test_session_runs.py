"""The integrated orchestrator: sessions read through the shim, steps recorded, statuses moved.

Every test here runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine, insert, select, text, update

from prompt_tool.compat import PromptSource
from prompt_tool.db.models import OrchestrationSession, OrchestrationStep, Scope
from prompt_tool.errors import InvalidInputError, NotFoundError
from prompt_tool.orchestration import (
    Orchestrator,
    RunFailedError,
    RunStatus,
    SessionStateError,
    StepRequest,
    StepStatus,
)
from prompt_tool.templates import TemplateAddress, TemplateManager

from .conftest import ROLES
from .fakes import ScriptedClient

ALL_ROLES = {role: role for role in ROLES}
SYSTEM = "The system prompt about billing.\n"
PLANNER = "The planner prompt about billing.\n"
SYNTHESIS = "The synthesis prompt about billing.\n"


def _session(orchestrator: Orchestrator, project: str = "acme", name: str = "s") -> int:
    return orchestrator.create_session(
        project, ALL_ROLES, {"topic": "billing"}, name=name
    ).session_id


def _legacy_session(engine: Engine, texts: dict[str, str | None], project: str = "acme") -> int:
    with engine.begin() as connection:
        project_id = connection.execute(
            text("SELECT id FROM projects WHERE slug = :slug"), {"slug": project}
        ).scalar_one()
        return int(
            connection.execute(
                insert(OrchestrationSession)
                .values(project_id=project_id, name="legacy", **texts)
                .returning(OrchestrationSession.id)
            ).scalar_one()
        )


def _status(engine: Engine, session_id: int) -> str:
    with engine.connect() as connection:
        return str(
            connection.execute(
                select(OrchestrationSession.status).where(OrchestrationSession.id == session_id)
            ).scalar_one()
        )


def _rows(engine: Engine, session_id: int) -> list[tuple[object, ...]]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                select(
                    OrchestrationStep.position,
                    OrchestrationStep.role,
                    OrchestrationStep.status,
                    OrchestrationStep.input_text,
                    OrchestrationStep.output_text,
                    OrchestrationStep.model,
                    OrchestrationStep.error,
                )
                .where(OrchestrationStep.session_id == session_id)
                .order_by(OrchestrationStep.position)
            )
        ]


def test_a_run_records_every_step_with_the_exact_input_the_client_was_sent(
    db_engine: Engine, orchestrator: Orchestrator
) -> None:
    session_id = _session(orchestrator)
    client = ScriptedClient()

    result = orchestrator.run(session_id, client)

    assert result.status is RunStatus.COMPLETED
    synthesis_input = f"{SYNTHESIS}\n<planner_output>\nanswer from planner\n</planner_output>"
    assert _rows(db_engine, session_id) == [
        (1, "system", "completed", SYSTEM, None, None, None),
        (2, "planner", "completed", PLANNER, "answer from planner", "scripted-1", None),
        (3, "synthesis", "completed", synthesis_input, "answer from synthesis", "scripted-1", None),
    ]
    assert [r.input_text for r in client.requests] == [PLANNER, synthesis_input]
    assert {r.system for r in client.requests} == {SYSTEM}
    assert client.requests[0].variables == {"topic": "billing"}
    assert all(s.finished_at is not None and s.started_at is not None for s in result.steps)


@pytest.mark.parametrize("variant", ["legacy", "shadow", "templates"])
def test_every_flag_variant_gives_the_same_step_inputs_for_a_dual_written_session(
    db_engine: Engine,
    orchestrator: Orchestrator,
    set_flag: Callable[[str, str], None],
    variant: str,
) -> None:
    session_id = _session(orchestrator)
    set_flag("acme", variant)

    result = orchestrator.run(session_id, ScriptedClient())

    expected_source = "template" if variant == "templates" else "legacy"
    assert {p.source for p in result.prompts} == {expected_source}
    assert [row[3] for row in _rows(db_engine, session_id)] == [
        SYSTEM,
        PLANNER,
        f"{SYNTHESIS}\n<planner_output>\nanswer from planner\n</planner_output>",
    ]


def test_the_session_is_running_during_the_model_calls_and_completed_after(
    db_engine: Engine, orchestrator: Orchestrator
) -> None:
    session_id = _session(orchestrator)
    seen: list[tuple[str, list[object]]] = []

    def look(step: StepRequest) -> None:
        seen.append((_status(db_engine, session_id), [r[2] for r in _rows(db_engine, session_id)]))

    assert _status(db_engine, session_id) == "pending"
    orchestrator.run(session_id, ScriptedClient(during_call=look))

    assert seen == [
        ("running", ["completed", "running"]),
        ("running", ["completed", "completed", "running"]),
    ]
    assert _status(db_engine, session_id) == "completed"


def test_a_failing_client_records_its_step_as_failed_with_the_error_and_fails_the_session(
    db_engine: Engine, orchestrator: Orchestrator
) -> None:
    session_id = _session(orchestrator)

    result = orchestrator.run(session_id, ScriptedClient(fail_on=("synthesis",)))

    assert result.status is RunStatus.FAILED
    assert _status(db_engine, session_id) == "failed"
    last = _rows(db_engine, session_id)[-1]
    assert last[:3] == (3, "synthesis", "failed")
    assert last[4:] == (None, None, "RuntimeError: the model is overloaded")
    with pytest.raises(RunFailedError, match=r"failed at step 3 \(synthesis\): RuntimeError") as e:
        result.raise_for_status()
    assert e.value.exit_code == 1


def test_an_interrupted_run_leaves_the_session_and_its_step_failed_not_running(
    db_engine: Engine, orchestrator: Orchestrator
) -> None:
    session_id = _session(orchestrator)
    with pytest.raises(KeyboardInterrupt):
        orchestrator.run(
            session_id, ScriptedClient(fail_on=("planner",), error=KeyboardInterrupt())
        )
    assert _status(db_engine, session_id) == "failed"
    planner = _rows(db_engine, session_id)[1]
    assert (planner[2], planner[6]) == ("failed", "run interrupted: KeyboardInterrupt")


def test_a_role_whose_prompt_is_null_is_recorded_as_skipped_and_not_sent(
    db_engine: Engine, orchestrator: Orchestrator
) -> None:
    created = orchestrator.create_session(
        "acme", {"planner": "planner", "synthesis": None}, {"topic": "x"}, name="only-plan"
    )
    client = ScriptedClient()

    orchestrator.run(created.session_id, client)

    assert [(r[1], r[2], r[3]) for r in _rows(db_engine, created.session_id)] == [
        ("system", "skipped", ""),
        ("planner", "completed", "The planner prompt about x.\n"),
        ("synthesis", "skipped", ""),
    ]
    assert [(r.role, r.system) for r in client.requests] == [("planner", None)]


def test_a_session_that_already_ran_is_refused_without_rerun(
    db_engine: Engine, orchestrator: Orchestrator
) -> None:
    session_id = _session(orchestrator)
    orchestrator.run(session_id)
    before = _rows(db_engine, session_id)

    with pytest.raises(SessionStateError, match="already ran \\(status completed\\); pass --rerun"):
        orchestrator.run(session_id)

    assert _rows(db_engine, session_id) == before
    assert _status(db_engine, session_id) == "completed"


@pytest.mark.parametrize("first_run_fails", [False, True])
def test_rerun_replaces_the_recorded_steps_with_the_new_run(
    db_engine: Engine, orchestrator: Orchestrator, first_run_fails: bool
) -> None:
    session_id = _session(orchestrator)
    orchestrator.run(session_id, ScriptedClient(fail_on=("planner",) if first_run_fails else ()))

    result = orchestrator.run(session_id, "echo", rerun=True)

    assert result.status is RunStatus.COMPLETED and result.client == "echo"
    rows = _rows(db_engine, session_id)
    assert [(r[0], r[2], r[5]) for r in rows] == [
        (1, "completed", None),
        (2, "completed", "echo"),
        (3, "completed", "echo"),
    ]
    assert rows[1][4] == PLANNER  # echo answers with its input
    assert _status(db_engine, session_id) == "completed"


def test_a_running_session_is_refused_even_with_rerun(
    db_engine: Engine, orchestrator: Orchestrator
) -> None:
    session_id = _session(orchestrator)
    with db_engine.begin() as connection:
        connection.execute(
            update(OrchestrationSession)
            .where(OrchestrationSession.id == session_id)
            .values(status="running")
        )
    with pytest.raises(SessionStateError, match="is running"):
        orchestrator.run(session_id, rerun=True)
    assert _rows(db_engine, session_id) == []


def test_running_a_session_that_does_not_exist_is_not_found(orchestrator: Orchestrator) -> None:
    with pytest.raises(NotFoundError, match="no orchestration session with id 999"):
        orchestrator.run(999)


def test_a_legacy_session_never_backfilled_runs_from_its_text_columns(
    db_engine: Engine, orchestrator: Orchestrator, set_flag: Callable[[str, str], None]
) -> None:
    session_id = _legacy_session(
        db_engine, {"system_prompt": "old system", "planner_prompt": "old {{ plan }}"}
    )
    set_flag("acme", "templates")

    result = orchestrator.run(session_id, ScriptedClient())

    assert [p.source for p in result.prompts[:2]] == [PromptSource.UNMIGRATED] * 2
    assert result.prompts[2].text is None
    assert [(r[1], r[2], r[3]) for r in _rows(db_engine, session_id)] == [
        ("system", "completed", "old system"),
        ("planner", "completed", "old {{ plan }}"),
        ("synthesis", "skipped", ""),
    ]


def test_show_serves_the_prompts_through_the_shim_with_their_sources_and_the_steps(
    manager: TemplateManager, orchestrator: Orchestrator, set_flag: Callable[[str, str], None]
) -> None:
    manager.update(
        TemplateAddress("planner", Scope.GLOBAL), "v2 {{ topic }}", actor="root", promote=True
    )
    session_id = _session(orchestrator, name="triage")
    set_flag("acme", "templates")
    orchestrator.run(session_id, ScriptedClient())

    detail = orchestrator.show(session_id)

    assert (detail.name, detail.project, detail.status, detail.variant) == (
        "triage",
        "acme",
        "completed",
        "templates",
    )
    assert detail.variables == {"topic": "billing"}
    planner = detail.prompts[1]
    assert (planner.role, planner.text, planner.source) == ("planner", "v2 billing", "template")
    assert (planner.template, planner.version) == ("planner", 2)
    assert [s.status for s in detail.steps] == [StepStatus.COMPLETED] * 3
    assert detail.steps[1].started_at is not None and detail.steps[1].started_at.tzinfo is not None


def test_list_gives_a_projects_sessions_newest_first_with_their_step_counts(
    orchestrator: Orchestrator,
) -> None:
    first = _session(orchestrator, name="first")
    second = _session(orchestrator, name="second")
    _session(orchestrator, project="beta", name="elsewhere")
    orchestrator.run(first)

    listed = orchestrator.list_sessions("acme")

    assert [(s.session_id, s.name, s.status, s.steps) for s in listed] == [
        (second, "second", "pending", 0),
        (first, "first", "completed", 3),
    ]
    assert [s.name for s in orchestrator.list_sessions(limit=1)] == ["elsewhere"]
    with pytest.raises(NotFoundError, match="no project with slug 'nope'"):
        orchestrator.list_sessions("nope")


def test_creating_a_session_needs_at_least_one_template(orchestrator: Orchestrator) -> None:
    with pytest.raises(InvalidInputError, match="at least one template"):
        orchestrator.create_session("acme", {"system": None}, name="empty")
