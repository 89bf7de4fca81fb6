"""`orch-migrate flag ...`, through a Typer app that mounts ``flag_app`` as the main app will."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cli_run import run_cli
from sqlalchemy import Engine
from typer.testing import CliRunner

from prompt_tool.cli._runtime import new_app
from prompt_tool.cli.flag_commands import flag_app

app = new_app("test host for the flag sub-app")
app.add_typer(flag_app, name="flag")
runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    """Run ``orch-migrate flag ...`` through ``run``, the one place errors become exit codes."""
    return run_cli(app, ["orch-migrate", *args])


def cli_json(*args: str) -> Any:
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def url(db: Engine, head_db_url: str) -> str:
    return head_db_url


def test_set_get_list_and_history_round_trip_as_json(url: str) -> None:
    change = cli_json(
        "flag",
        "set",
        "--project",
        "acme",
        "shadow",
        "--sample-rate",
        "0.1",
        "--as",
        "alice",
        "--db",
        url,
    )
    assert change["changed"] is True
    assert (change["old_variant"], change["new_variant"]) == (None, "shadow")
    assert change["shadow_sample_rate"] == 0.1 and change["actor"] == "alice"
    cli_json("flag", "set", "--default", "templates", "--as", "bob", "--db", url)

    status = cli_json("flag", "get", "--project", "acme", "--db", url)
    assert (status["variant"], status["source"], status["sample_rate"]) == (
        "shadow",
        "override",
        0.1,
    )
    beta = cli_json("flag", "get", "--project", "beta", "--db", url)
    assert (beta["variant"], beta["source"]) == ("templates", "default")

    listing = cli_json("flag", "list", "--db", url)
    assert listing["default"]["variant"] == "templates"
    assert [o["project_slug"] for o in listing["overrides"]] == ["acme"]
    assert listing["without_override"] == ["beta", "gamma"]

    cli_json("flag", "unset", "--project", "acme", "--as", "carol", "--db", url)
    history = cli_json("flag", "history", "--db", url)
    assert [(e["project_slug"], e["new_variant"], e["actor"]) for e in history] == [
        ("acme", "shadow", "alice"),
        (None, "templates", "bob"),
        ("acme", None, "carol"),
    ]
    assert all(e["at"] for e in history)
    assert len(cli_json("flag", "history", "--project", "acme", "--db", url)) == 2
    assert len(cli_json("flag", "history", "--limit", "1", "--db", url)) == 1


def test_tables_are_printed_without_json(url: str) -> None:
    code, out, _ = cli(
        "flag", "set", "--project", "acme", "templates", "--as", "alice", "--db", url
    )
    assert code == 0 and "project acme: unset -> templates, by alice" in out

    for args, expected in [
        (("get", "--project", "acme"), "override"),
        (("list",), "acme"),
        (("history",), "alice"),
    ]:
        code, out, err = cli("flag", *args, "--db", url)
        assert code == 0, err
        assert expected in out


def test_the_actor_defaults_to_the_os_user(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("getpass.getuser", lambda: "os-user")

    change = cli_json("flag", "set", "--project", "acme", "legacy", "--db", url)

    assert change["actor"] == "os-user"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("set", "--project", "acme", "template"), "choose legacy, shadow or templates"),
        (("set", "--default", "ON"), "choose legacy, shadow or templates"),
        (("set", "--project", "nope", "templates"), "no project with slug 'nope'"),
        (("get", "--project", "nope"), "no project with slug 'nope'"),
        (("unset", "--project", "nope"), "no project with slug 'nope'"),
        (("history", "--project", "nope"), "no project with slug 'nope'"),
        (("set", "--project", "acme", "shadow", "--sample-rate", "2"), "between 0 and 1"),
        (("set", "templates"), "exactly one of --project SLUG or --default"),
        (("set", "--project", "acme", "--default", "legacy"), "exactly one of"),
        (("unset",), "exactly one of"),
    ],
)
def test_bad_input_is_one_line_exit_2(url: str, args: tuple[str, ...], expected: str) -> None:
    code, out, err = cli("flag", *args, "--db", url)

    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err


def test_setting_what_is_already_set_says_so(url: str) -> None:
    cli_json("flag", "set", "--project", "acme", "templates", "--db", url)

    code, out, _ = cli("flag", "set", "--project", "acme", "templates", "--db", url)

    assert code == 0 and "already is templates: nothing changed" in out


def test_every_command_has_help() -> None:
    for command in ("set", "unset", "get", "list", "history"):
        result = runner.invoke(app, ["flag", command, "--help"])
        assert result.exit_code == 0
        assert "--db" in result.stdout and "--json" in result.stdout
