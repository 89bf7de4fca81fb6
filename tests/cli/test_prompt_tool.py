"""`prompt-tool`: projects, templates and roles from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prompt_tool.cli.prompt_tool import app

runner = CliRunner()


@pytest.fixture
def cli(head_db_url: str) -> object:
    def invoke(*args: str, input: str | None = None, user: str | None = "alice") -> object:
        takes_as = args[0] != "projects" and args[:2] != ("roles", "list")
        acting = ["--as", user] if user and takes_as else []
        return runner.invoke(app, [*args, "--db", head_db_url, *acting], input=input)

    assert invoke("projects", "create", "acme").exit_code == 0
    assert invoke("roles", "grant", "alice", "admin", "--global").exit_code == 0
    assert invoke("roles", "grant", "bob", "viewer", "--project", "acme").exit_code == 0
    return invoke


def test_create_from_stdin_then_render_with_variables(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    created = cli(
        "templates",
        "create",
        "system",
        "--project",
        "acme",
        "--variable",
        "topic:string",
        "--json",
        input="Help with {{ topic }} for {{ who }}.",
    )
    assert created.exit_code == 1  # `who` is used but not declared
    assert "who" in created.output

    created = cli(
        "templates",
        "create",
        "system",
        "--project",
        "acme",
        "--json",
        input="Help with {{ topic }} for {{ who }}.",
    )
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout)["version"] == 1

    variables = tmp_path / "vars.json"
    variables.write_text(json.dumps({"who": "Ada"}))
    rendered = cli(
        "templates",
        "render",
        "system",
        "--project",
        "acme",
        "--var",
        "topic=billing",
        "--vars-file",
        str(variables),
    )
    assert rendered.exit_code == 0, rendered.output
    assert rendered.stdout == "Help with billing for Ada."


def test_update_history_diff_label_and_rollback(cli) -> None:  # type: ignore[no-untyped-def]
    cli("templates", "create", "planner", input="step one\n")
    unchanged = cli("templates", "update", "planner", input="step one\n")
    assert "unchanged" in unchanged.stdout
    assert (
        cli("templates", "update", "planner", "--note", "more", input="step two\n").exit_code == 0
    )

    diff = cli("templates", "diff", "planner", "1", "2")
    assert "-step one" in diff.stdout and "+step two" in diff.stdout

    moved = cli("templates", "label", "planner", "production", "2", "--json")
    assert json.loads(moved.stdout)["to_version"] == 2
    rolled = cli("templates", "rollback", "planner")
    assert "rolled back production from v2 to v1" in rolled.stdout

    history = json.loads(cli("templates", "history", "planner", "--json").stdout)
    assert [entry["action"] for entry in history][-2:] == ["label_moved", "rollback"]
    assert cli("templates", "render", "planner").stdout == "step one\n"


def test_list_and_show_as_json(cli) -> None:  # type: ignore[no-untyped-def]
    cli(
        "templates",
        "create",
        "synth",
        "--project",
        "acme",
        "--category",
        "output",
        "--tag",
        "core",
        input="done",
    )
    listed = json.loads(cli("templates", "list", "--project", "acme", "--json").stdout)
    assert [(t["name"], t["category"], t["tags"]) for t in listed] == [
        ("synth", "output", ["core"])
    ]
    shown = json.loads(cli("templates", "show", "synth", "--project", "acme", "--json").stdout)
    assert shown["source"] == "done"
    assert shown["summary"]["labels"] == {"latest": 1, "production": 1}


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message"),
    [
        (("templates", "validate", "x"), "{% if %}", 1, "line 1"),
        (("templates", "show", "nope"), None, 2, "does not exist"),
        (("templates", "render", "nope", "--project", "acme"), None, 2, "looked in custom"),
        (("templates", "render", "x", "--var", "novalue"), None, 2, "KEY=VALUE"),
        (("templates", "create", "x", "--scope", "custom"), "t", 2, "needs --project"),
        (("roles", "grant", "carol", "overlord", "--global"), None, 2, "viewer, editor or admin"),
        (("roles", "grant", "carol", "viewer"), None, 2, "exactly one of --project"),
        (("projects", "create", "acme"), None, 2, "already exists"),
    ],
)
def test_bad_input_is_one_line_with_the_documented_exit_code(  # type: ignore[no-untyped-def]
    cli, args: tuple[str, ...], stdin: str | None, code: int, message: str
) -> None:
    result = cli(*args, input=stdin)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_permission_denied_exits_2_and_writes_nothing(cli) -> None:  # type: ignore[no-untyped-def]
    denied = cli("templates", "create", "p", "--project", "acme", input="x", user="bob")
    assert denied.exit_code == 2
    assert "bob may not edit" in denied.output
    assert json.loads(cli("templates", "list", "--json").stdout) == []


def test_roles_list(cli) -> None:  # type: ignore[no-untyped-def]
    roles = json.loads(cli("roles", "list", "--json").stdout)
    assert {(r["user"], r["role"], r["project"]) for r in roles} == {
        ("alice", "admin", None),
        ("bob", "viewer", "acme"),
    }
