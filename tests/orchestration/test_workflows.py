"""The standalone orchestrator: workflow files, templates on disk or resolved in the database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine

from prompt_tool.core import TemplateNotFound
from prompt_tool.db.models import Scope
from prompt_tool.orchestration import (
    Orchestrator,
    RunStatus,
    StepStatus,
    Workflow,
    WorkflowError,
    load_workflow,
    parse_workflow,
    run_workflow,
)
from prompt_tool.templates import TemplateAddress, TemplateManager

from .cli_host import invoke
from .fakes import ScriptedClient

EXAMPLE = Path(__file__).parents[2] / "examples" / "workflows" / "support-triage.yaml"
TONE = "Be brief and exact; never promise a date you cannot keep.\n"


def _workflow(tmp_path: Path, body: str, *, name: str = "flow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def _templates(tmp_path: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        path = tmp_path / "templates" / f"{name}.j2"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)


STEPS = """
steps:
  - {role: system, template: system}
  - {role: planner, template: planner}
  - {role: synthesis, template: synthesis}
"""


# --- templates on disk, no database ----------------------------------------------------------


def test_the_shipped_example_runs_from_its_template_files_with_includes_resolved_on_disk() -> None:
    client = ScriptedClient()

    result = run_workflow(EXAMPLE, client)

    assert (result.name, result.status, result.project) == (
        "support-triage",
        RunStatus.COMPLETED,
        None,
    )
    assert [(p.source, p.template) for p in result.prompts] == [
        ("file", "triage/system"),
        ("file", "triage/planner"),
        ("file", "triage/synthesis"),
    ]
    assert [s.input_text for s in result.steps] == [
        f"You are the support triage assistant for Acme Cloud.\n{TONE}",
        "Plan the answer to Ada, who reports: Invoices from March show the wrong VAT rate.\n"
        "Look at these areas first: billing, tax rules.\nList the steps, one per line.\n",
        f"Write the reply to Ada following the plan.\n{TONE}"
        "\n<planner_output>\nanswer from planner\n</planner_output>",
    ]
    assert {r.system for r in client.requests} == {result.steps[0].input_text}


def test_a_json_workflow_runs_like_a_yaml_one_and_given_variables_override_its_own(
    tmp_path: Path,
) -> None:
    _templates(tmp_path, {"planner": "Plan {{ topic }} for {{ who }}."})
    path = _workflow(
        tmp_path,
        json.dumps(
            {
                "name": "j",
                "variables": {"topic": "tax", "who": "Ada"},
                "steps": [{"role": "planner", "template": "planner"}],
            }
        ),
        name="flow.json",
    )

    result = run_workflow(path, variables={"who": "Bob"})

    assert [(s.role, s.status, s.input_text, s.output_text) for s in result.steps] == [
        ("planner", StepStatus.COMPLETED, "Plan tax for Bob.", "Plan tax for Bob.")
    ]


def test_a_missing_template_file_is_not_found_before_any_step_runs(tmp_path: Path) -> None:
    _templates(tmp_path, {"system": "s", "planner": "p"})
    client = ScriptedClient()
    with pytest.raises(TemplateNotFound, match=r"no template file .*synthesis\.j2") as caught:
        run_workflow(_workflow(tmp_path, "name: w" + STEPS), client)
    assert caught.value.exit_code == 2
    assert client.requests == []


def test_includes_on_disk_cannot_reach_outside_the_templates_directory(tmp_path: Path) -> None:
    (tmp_path / "secret.j2").write_text("the secret")
    _templates(tmp_path, {"planner": '{% include "../secret" %}'})
    path = _workflow(tmp_path, "name: w\nsteps: [{role: planner, template: planner}]")
    with pytest.raises(TemplateNotFound):
        run_workflow(path)


def test_a_failing_client_fails_the_workflow_run_at_its_step(tmp_path: Path) -> None:
    _templates(tmp_path, {"system": "s", "planner": "p", "synthesis": "y"})
    result = run_workflow(
        _workflow(tmp_path, "name: w" + STEPS), ScriptedClient(fail_on=("planner",))
    )
    assert result.status is RunStatus.FAILED
    assert [s.status for s in result.steps] == [StepStatus.COMPLETED, StepStatus.FAILED]


# --- invalid workflow files ------------------------------------------------------------------

INVALID = [
    pytest.param("steps: []\n", "field 'name' is required", id="no-name"),
    pytest.param("name: w\n", "field 'steps' is required", id="no-steps"),
    pytest.param("name: w\nsteps: {role: system}\n", "field 'steps' must be", id="steps-not-list"),
    pytest.param(
        "name: w\nsteps: [{role: plan, template: p}]\n",
        "field 'steps[0].role' must be one of system, planner, synthesis, not 'plan'",
        id="unknown-role",
    ),
    pytest.param(
        "name: w\nsteps: [{role: planner}]\n",
        "field 'steps[0].template' is required",
        id="no-template",
    ),
    pytest.param(
        "name: w\nsteps: [{role: synthesis, template: a}, {role: planner, template: b}]\n",
        "field 'steps[1].role' 'planner' is out of order",
        id="out-of-order",
    ),
    pytest.param(
        "name: w\nsteps: [{role: planner, template: a}, {role: planner, template: b}]\n",
        "field 'steps[1].role' 'planner' appears twice",
        id="duplicate-role",
    ),
    pytest.param(
        "name: w\nsteps: [{role: planner, template: ../etc/passwd}]\n",
        "field 'steps[0].template'",
        id="template-escapes",
    ),
    pytest.param(
        "name: w\nstep: []\n", "field 'step' is not part of the schema", id="unknown-field"
    ),
    pytest.param(
        "name: w\nsteps: [{role: planner, template: a, model: x}]\n",
        "field 'steps[0].model' is not part of the schema",
        id="unknown-step-field",
    ),
    pytest.param(
        "name: w\nvariables: [1, 2]\nsteps: [{role: planner, template: a}]\n",
        "field 'variables' must be a mapping",
        id="variables-not-mapping",
    ),
    pytest.param(
        "name: w\nvariables: {day: 2025-01-01}\nsteps: [{role: planner, template: a}]\n",
        "field 'variables' is not JSON data",
        id="yaml-date-variable",
    ),
    pytest.param("name: w\nsteps: {role: ]}\n", "line 2: not valid YAML", id="bad-yaml"),
    pytest.param("- just\n- a list\n", "the top level must be a mapping", id="not-a-mapping"),
]


@pytest.mark.parametrize(("body", "message"), INVALID)
def test_an_invalid_workflow_exits_2_with_one_line_naming_the_field(
    tmp_path: Path, body: str, message: str
) -> None:
    path = _workflow(tmp_path, body)

    code, out, err = invoke("orchestrate", "run", str(path))

    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert message in " ".join(err.split()), err
    with pytest.raises(WorkflowError):
        load_workflow(path)


def test_a_workflow_file_that_does_not_exist_exits_2(tmp_path: Path) -> None:
    code, _, err = invoke("orchestrate", "run", str(tmp_path / "nope.yaml"))
    assert code == 2 and "no workflow file at" in err


def test_invalid_json_names_its_line(tmp_path: Path) -> None:
    path = _workflow(tmp_path, '{"name": "w",\n "steps": [}', name="flow.json")
    with pytest.raises(WorkflowError, match=r"line 2: not valid JSON"):
        load_workflow(path)


# --- templates from the database (--db) ------------------------------------------------------


def _db_workflow(project: str | None = None) -> Workflow:
    return parse_workflow(
        {
            "name": "from-db",
            "project": project,
            "variables": {"topic": "billing"},
            "steps": [
                {"role": "system", "template": "system"},
                {"role": "planner", "template": "planner"},
                {"role": "synthesis", "template": "synthesis"},
            ],
        }
    )


def test_with_a_database_a_project_template_overrides_the_global_one(
    manager: TemplateManager,
) -> None:
    manager.create(TemplateAddress("tone", Scope.GLOBAL), "Stay calm.", actor="root")
    manager.create(
        TemplateAddress("planner", Scope.PROJECT, project="acme"),
        'Acme plans {{ topic }}. {% include "tone" %}',
        actor="root",
    )

    acme = run_workflow(_db_workflow("acme"), ScriptedClient(), manager=manager)
    beta = run_workflow(_db_workflow("acme"), ScriptedClient(), manager=manager, project="beta")

    assert [(p.source, p.text) for p in acme.prompts] == [
        ("global", "The system prompt about billing.\n"),
        ("project", "Acme plans billing. Stay calm."),
        ("global", "The synthesis prompt about billing.\n"),
    ]
    assert acme.project == "acme"
    assert [p.source for p in beta.prompts] == ["global"] * 3
    assert beta.steps[1].input_text == "The planner prompt about billing.\n"


def test_with_a_database_a_users_custom_template_wins_for_that_user_only(
    manager: TemplateManager,
) -> None:
    manager.create(
        TemplateAddress("synthesis", Scope.CUSTOM, project="acme", owner="ed"),
        "Ed's synthesis of {{ topic }}.",
        actor="ed",
    )
    as_ed = run_workflow(_db_workflow("acme"), ScriptedClient(), manager=manager, user="ed")
    as_vi = run_workflow(_db_workflow("acme"), ScriptedClient(), manager=manager, user="vi")
    assert (as_ed.prompts[2].source, as_ed.prompts[2].text) == (
        "custom",
        "Ed's synthesis of billing.",
    )
    assert as_vi.prompts[2].source == "global"


def test_a_name_missing_from_the_database_is_not_found(manager: TemplateManager) -> None:
    flow = load_workflow(EXAMPLE)
    with pytest.raises(TemplateNotFound, match="no template 'triage/system'"):
        run_workflow(flow, manager=manager)


def test_both_orchestrators_send_the_same_inputs_for_the_same_templates(
    db_engine: Engine, manager: TemplateManager, orchestrator: Orchestrator
) -> None:
    manager.create(
        TemplateAddress("planner", Scope.PROJECT, project="acme"), "Acme: {{ topic }}", actor="root"
    )
    created = orchestrator.create_session(
        "acme",
        {"system": "system", "planner": "planner", "synthesis": "synthesis"},
        {"topic": "billing"},
        name="same",
    )
    session_client, workflow_client = ScriptedClient(), ScriptedClient()

    session_run = orchestrator.run(created.session_id, session_client)
    workflow_run = run_workflow(_db_workflow("acme"), workflow_client, manager=manager)

    assert [s.input_text for s in session_run.steps] == [s.input_text for s in workflow_run.steps]
    assert [(r.system, r.input_text) for r in session_client.requests] == [
        (r.system, r.input_text) for r in workflow_client.requests
    ]
