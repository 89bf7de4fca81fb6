"""`prompt-tool ab ...`: the library through the command line, as JSON or tables."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner, Result

from prompt_tool.ab_testing import choose_variant
from prompt_tool.cli.ab_commands import ab_app
from prompt_tool.cli.prompt_tool import app
from prompt_tool.compat import CreatedSession
from prompt_tool.templates import TemplateManager

from .conftest import PLANNER

runner = CliRunner()
Invoke = Callable[..., Result]


@pytest.fixture
def ab(head_db_url: str, manager: TemplateManager) -> Invoke:
    def invoke(*args: str, user: str | None = "ed") -> Result:
        acting = ["--as", user] if user and args[0] != "record" else []
        return runner.invoke(ab_app, [*args, "--db", head_db_url, *acting])

    return invoke


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _create(ab: Invoke) -> int:
    created = _json(
        ab(
            "create",
            "wording",
            "--template",
            "planner",
            "--project",
            "acme",
            "--role",
            "planner",
            "--variant",
            "control=1:50",
            "--variant",
            "candidate=v2:50",
            "--json",
        )
    )
    return int(created["id"])


def test_create_start_show_and_list_a_test(ab: Invoke) -> None:
    test_id = _create(ab)
    started = _json(ab("start", str(test_id), "--json"))
    assert started["status"] == "running"
    assert [(v["name"], v["version"], v["share"]) for v in started["variants"]] == [
        ("control", 1, 0.5),
        ("candidate", 2, 0.5),
    ]
    assert started["template"] == {
        "name": "planner",
        "scope": "project",
        "project": "acme",
        "owner": None,
    }
    shown = _json(ab("show", "wording", "--json", user="vi"))
    assert shown["id"] == test_id
    listed = _json(ab("list", "--status", "running", "--json"))
    assert [t["id"] for t in listed] == [test_id]
    table = ab("list")
    assert table.exit_code == 0 and "wording" in table.stdout


def test_pause_and_stop_say_what_happened(ab: Invoke) -> None:
    test_id = str(_create(ab))
    assert ab("start", test_id).exit_code == 0
    again = ab("start", test_id)
    assert again.exit_code == 0 and "nothing changed" in again.stdout
    assert _json(ab("pause", test_id, "--json"))["status"] == "paused"
    assert _json(ab("stop", test_id, "--json"))["status"] == "stopped"


def test_record_results_and_promote(
    ab: Invoke,
    db_engine: Engine,
    manager: TemplateManager,
    new_session: Callable[..., CreatedSession],
    set_flag: Any,
) -> None:
    test_id = _create(ab)
    ab("start", str(test_id))
    set_flag("acme", "templates")
    sessions = [new_session(unit_key=f"user-{n}") for n in range(6)]
    for session in sessions:
        recorded = ab("record", str(session.session_id), "--success", "--metric", "2.5", "--json")
        assert _json(recorded)[0]["success"] is True
    failed = ab("record", str(sessions[0].session_id), "--failure", "--test", "wording", "--json")
    assert _json(failed)[0]["success"] is False

    results = _json(ab("results", str(test_id), "--json"))
    by_name = {v["name"]: v for v in results["variants"]}
    expected = sum(
        choose_variant(test_id, f"user-{n}", [50, 50]) == 0 for n in range(6)
    )  # sessions on control
    assert by_name["control"]["sessions"] == expected
    assert sum(v["sessions"] for v in results["variants"]) == 6
    assert sum(v["successes"] for v in results["variants"]) == 5
    assert results["comparisons"][0]["variant"] == "candidate"
    assert set(results["comparisons"][0]["test"]) >= {"p_value", "ci_low", "ci_high", "z"}
    assert ab("results", str(test_id)).exit_code == 0  # the table renders too

    promoted = _json(ab("promote", str(test_id), "candidate", "--note", "better", "--json"))
    assert (promoted["to_version"], promoted["label_moved"]) == (2, True)
    assert manager.show(PLANNER).summary.labels["production"] == 2
    assert manager.history(PLANNER)[-2].note.endswith(": better")


@pytest.mark.parametrize(
    ("args", "user", "message"),
    [
        (("start", "1"), "vi", "vi may not edit"),
        (("show", "42"), "ed", "no A/B test 42"),
        (("record", "42", "--success"), None, "no orchestration session with id 42"),
        (("results", "1", "--confidence", "95"), "ed", "between 0 and 1"),
        (
            ("create", "t", "-t", "planner", "-p", "acme", "--role", "planner", "--variant", "x"),
            "ed",
            "NAME=VERSION",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    ab: Invoke, args: tuple[str, ...], user: str | None, message: str
) -> None:
    _create(ab)
    result = ab(*args, user=user)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sessions_created_on_the_command_line_are_enrolled_unless_the_flag_is_legacy(
    head_db_url: str, running_test: Any, set_flag: Callable[[str, str], None]
) -> None:
    def create(name: str, *extra: str) -> Result:
        arguments = f"sessions create --project acme --name {name} --planner planner"
        return runner.invoke(
            app, [*arguments.split(), "--var", "topic=x", "--as", "ed", "--db", head_db_url, *extra]
        )

    legacy = _json(create("under-legacy", "--json"))
    set_flag("acme", "shadow")
    enrolled = _json(create("under-shadow", "--unit-key", "user-7", "--json"))
    shown = create("shown")

    assert legacy["assignments"] == {}
    assignment = enrolled["assignments"]["planner"]
    expected = choose_variant(running_test.id, "user-7", [50, 50])
    assert assignment["variant"] == ["control", "candidate"][expected]
    assert assignment["unit_key"] == "user-7"
    assert enrolled["versions"]["planner"] == assignment["version"]
    assert shown.exit_code == 0, shown.output
    assert "in A/B test" in shown.stdout
