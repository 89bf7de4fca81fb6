"""`prompt-tool sessions ...` and `prompt-tool orchestrate run`, through a host app that mounts
the sub-apps the way the main app does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from prompt_tool import flags
from prompt_tool.db.models import Scope
from prompt_tool.templates import TemplateAddress, TemplateManager

from .cli_host import invoke

EXAMPLE = Path(__file__).parents[2] / "examples" / "workflows" / "support-triage.yaml"

FAILING_CLIENT = """
from prompt_tool.orchestration import StepRequest, StepResult

class Broken:
    def complete(self, step: StepRequest) -> StepResult:
        if step.role == "synthesis":
            raise ConnectionError("model endpoint refused the connection")
        return StepResult("planned", model="broken-1")
"""


def _json(*args: str) -> Any:
    code, out, err = invoke(*args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def url(manager: TemplateManager, head_db_url: str) -> str:
    """The database of ``manager``: acme and beta, global system/planner/synthesis templates."""
    return head_db_url


def _create(url: str, *extra: str) -> int:
    created = _json(
        "sessions",
        "create",
        "--project",
        "acme",
        "--name",
        "triage",
        "--system",
        "system",
        "--planner",
        "planner",
        "--synthesis",
        "synthesis",
        "--var",
        "topic=billing",
        "--db",
        url,
        *extra,
    )
    return int(created["session_id"])


def test_create_run_show_and_list_round_trip_as_json(url: str, tmp_path: Path) -> None:
    variables = tmp_path / "vars.json"
    variables.write_text(json.dumps({"topic": "tax", "region": "EU"}))
    session_id = _create(url, "--vars-file", str(variables))

    run = _json("sessions", "run", str(session_id), "--db", url)
    assert (run["status"], run["client"], run["session_id"]) == ("completed", "echo", session_id)
    # --var wins over --vars-file; the echo client answers with its input.
    assert [s["input_text"] for s in run["steps"][:2]] == [
        "The system prompt about billing.\n",
        "The planner prompt about billing.\n",
    ]
    assert run["steps"][1]["output_text"] == run["steps"][1]["input_text"]

    shown = _json("sessions", "show", str(session_id), "--db", url)
    assert (shown["status"], shown["variant"]) == ("completed", "legacy")
    assert shown["variables"] == {"topic": "billing", "region": "EU"}
    assert [(p["role"], p["source"]) for p in shown["prompts"]] == [
        ("system", "legacy"),
        ("planner", "legacy"),
        ("synthesis", "legacy"),
    ]
    assert [s["status"] for s in shown["steps"]] == ["completed"] * 3

    listed = _json("sessions", "list", "--project", "acme", "--limit", "5", "--db", url)
    assert [(s["session_id"], s["status"], s["steps"]) for s in listed] == [
        (session_id, "completed", 3)
    ]


def test_show_reports_template_sources_when_the_project_reads_templates(
    url: str, db_engine: Engine
) -> None:
    session_id = _create(url)
    flags.set_variant(db_engine, "acme", "templates", actor="ops")

    shown = _json("sessions", "show", str(session_id), "--db", url)

    assert shown["variant"] == "templates"
    assert [(p["source"], p["template"], p["version"]) for p in shown["prompts"]] == [
        ("template", "system", 1),
        ("template", "planner", 1),
        ("template", "synthesis", 1),
    ]


def test_run_prints_each_step_with_its_input_and_output_as_text(url: str) -> None:
    session_id = _create(url)

    code, out, err = invoke("sessions", "run", str(session_id), "--db", url)

    assert code == 0, err
    assert f"session {session_id} 'triage' (project acme): completed, client echo" in out
    assert "[2] planner: completed, model echo (legacy)" in out
    assert "  input:\n    The planner prompt about billing.\n  output:\n" in out
    assert "<planner_output>" in out  # square brackets and tags printed as they are


def test_running_a_session_twice_exits_2_until_rerun_is_given(url: str) -> None:
    session_id = _create(url)
    assert invoke("sessions", "run", str(session_id), "--db", url)[0] == 0

    code, out, err = invoke("sessions", "run", str(session_id), "--db", url)
    assert code == 2 and out == ""
    assert err.strip() == (
        f"error: session {session_id} already ran (status completed); pass --rerun to run it "
        "again, which replaces its recorded steps"
    )

    assert invoke("sessions", "run", str(session_id), "--rerun", "--db", url)[0] == 0


def test_a_failing_client_prints_the_steps_then_exits_1_with_the_error(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_llm.py").write_text(FAILING_CLIENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    session_id = _create(url)

    code, out, err = invoke(
        "sessions", "run", str(session_id), "--client", "broken_llm:Broken", "--json", "--db", url
    )

    assert code == 1
    result = json.loads(out)
    assert [(s["role"], s["status"]) for s in result["steps"]] == [
        ("system", "completed"),
        ("planner", "completed"),
        ("synthesis", "failed"),
    ]
    assert result["steps"][2]["error"] == "ConnectionError: model endpoint refused the connection"
    assert len(err.strip().splitlines()) == 1
    assert "failed at step 3 (synthesis)" in err and "--rerun" in err
    assert _json("sessions", "show", str(session_id), "--db", url)["status"] == "failed"


def test_bad_input_exits_2_with_one_line(url: str) -> None:
    cases = [
        (("sessions", "run", "999"), "no orchestration session with id 999"),
        (("sessions", "run", "1", "--client", "gpt-9"), "unknown model client 'gpt-9'"),
        (("sessions", "list", "--project", "nope"), "no project with slug 'nope'"),
        (
            ("sessions", "create", "--project", "acme", "--name", "n"),
            "give at least one template",
        ),
        (
            ("sessions", "create", "--project", "acme", "--name", "n", "--planner", "missing"),
            "no template 'missing'",
        ),
    ]
    for args, message in cases:
        code, out, err = invoke(*args, "--db", url)
        assert (code, out) == (2, ""), (args, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (args, err)


def test_create_resolves_a_users_custom_template_with_as(
    url: str, manager: TemplateManager
) -> None:
    manager.create(
        TemplateAddress("planner", Scope.CUSTOM, project="acme", owner="ed"),
        "Ed plans {{ topic }}.",
        actor="ed",
    )
    session_id = _create(url, "--as", "ed")
    shown = _json("sessions", "show", str(session_id), "--db", url)
    assert shown["prompts"][1]["text"] == "Ed plans billing."


# --- orchestrate run -------------------------------------------------------------------------


def test_orchestrate_runs_the_example_without_a_database_as_text_and_as_json() -> None:
    code, out, err = invoke("orchestrate", "run", str(EXAMPLE))
    assert code == 0, err
    assert "workflow 'support-triage'" in out and ": completed, client echo" in out
    assert "[3] synthesis: completed, model echo (file, template triage/synthesis" in out

    result = _json("orchestrate", "run", str(EXAMPLE), "--var", "customer=Bob")
    assert result["session_id"] is None and result["project"] is None
    assert result["steps"][1]["input_text"].startswith("Plan the answer to Bob, who reports:")


def test_orchestrate_with_db_resolves_names_through_the_hierarchy(
    url: str, manager: TemplateManager, tmp_path: Path
) -> None:
    manager.create(
        TemplateAddress("planner", Scope.PROJECT, project="acme"),
        "Acme plans {{ topic }}.",
        actor="root",
    )
    workflow = tmp_path / "flow.yaml"
    workflow.write_text(
        "name: db-flow\nvariables: {topic: tax}\n"
        "steps: [{role: planner, template: planner}, {role: synthesis, template: synthesis}]\n"
    )

    acme = _json("orchestrate", "run", str(workflow), "--db", url, "--project", "acme")
    plain = _json("orchestrate", "run", str(workflow), "--db", url)

    assert [(p["source"], p["text"]) for p in acme["prompts"]] == [
        ("project", "Acme plans tax."),
        ("global", "The synthesis prompt about tax.\n"),
    ]
    assert acme["project"] == "acme"
    assert plain["prompts"][0]["source"] == "global"
