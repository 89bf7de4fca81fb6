"""What operators read: tables that never cut a name short, whatever the width, one-line hints,
`--version`, refusals that write nothing, and one form of the database URL everywhere."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import func, select

from prompt_tool import __version__
from prompt_tool.cli import orch_migrate, prompt_tool
from prompt_tool.cli._runtime import table
from prompt_tool.db import schema
from prompt_tool.db.engine import make_engine
from prompt_tool.db.models import OrchestrationSession, Project
from prompt_tool.errors import InvalidInputError
from prompt_tool.migrate import load_legacy_sample
from tests.cli_run import run_cli

LONG_SLUG = "customer-support-emea-production-2026"


def _rendered(renderable: object, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, soft_wrap=True, color_system=None)
    console.print(renderable)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def _count(url: str, model: type[Project] | type[OrchestrationSession]) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(model)).scalar_one())
    finally:
        engine.dispose()


# --- 1. tables: identifying columns whole, at any width ---------------------------------------


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_identifying_columns_are_never_cut_whatever_the_width(width: int) -> None:
    view = table(
        "Verify",
        ["project", "checked", "matched", "mismatched", "unmigrated", "render errors", "note"],
        [(LONG_SLUG, 1200, 1200, 0, 0, 0, "a long remark " * 6), ("(all)", 1200, 1200, 0, 0, 0)],
    )
    shown = _rendered(view, width)
    assert "…" not in shown
    assert LONG_SLUG in shown  # on one line, not wrapped or folded


def test_the_first_column_and_named_columns_keep_whole_values() -> None:
    shown = _rendered(
        table(None, ["when", "who", "details"], [("2026-12-05 10:00:00", "a-very-long-user", "x")]),
        30,
    )
    assert "2026-12-05 10:00:00" in shown
    assert "a-very-long-user" in shown
    assert "…" not in shown


@pytest.mark.parametrize("width", [40, 80])
def test_no_column_vanishes_next_to_long_identifying_values(width: int) -> None:
    columns = ["name", "scope", "project", "owner", "category", "tags", "latest", "labels"]
    row = ("a-rather-long-template-name", "project", LONG_SLUG, "", "", "", 12345, "latest=v1 x")
    shown = _rendered(table("Templates", columns, [row]), width)
    for text in [*columns, "a-rather-long-template-name", LONG_SLUG, "12345", "latest=v1"]:
        assert text in shown


def test_wide_values_fold_instead_of_ending_in_an_ellipsis() -> None:
    value = "y" * 150
    shown = _rendered(table(None, ["id", "text"], [(1, value)]), 60)
    assert "…" not in shown
    assert shown.count("y") == 150


@pytest.mark.parametrize("dialect", ["sqlite"], indirect=True)
def test_piped_tables_keep_slugs_whole(head_db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through CliRunner stdout is not a terminal: the CI-log case, 80 columns before."""
    monkeypatch.delenv("COLUMNS", raising=False)
    for slug in (LONG_SLUG, LONG_SLUG + "-b"):
        code, _, err = run_cli(
            prompt_tool.app, ["prompt-tool", "projects", "create", slug, "--db", head_db_url]
        )
        assert code == 0, err
    code, out, err = run_cli(
        prompt_tool.app, ["prompt-tool", "projects", "list", "--db", head_db_url]
    )
    assert code == 0, err
    assert "…" not in out
    assert LONG_SLUG + "-b" in out
    assert all(len(line) <= 200 for line in out.splitlines())


@pytest.mark.parametrize("dialect", ["sqlite"], indirect=True)
def test_an_explicit_narrow_columns_still_keeps_slugs_whole(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "50")
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=20, projects=2)
    schema.upgrade(empty_db_url)
    assert run_cli(orch_migrate.app, ["orch-migrate", "backfill", "--db", empty_db_url])[0] == 0
    for argv in (["verify"], ["status"]):
        code, out, err = run_cli(orch_migrate.app, ["orch-migrate", *argv, "--db", empty_db_url])
        assert code == 0, err
        assert "…" not in out, argv
        assert "project-1" in out and "project-2" in out, argv


def test_the_demo_runs_without_a_wide_columns_setting() -> None:
    demo = (Path(__file__).parents[2] / "scripts" / "demo").read_text()
    assert "COLUMNS" not in demo
    # The last step has a command under its header.
    last_step = demo.rstrip().rsplit("\nstep ", 1)[1]
    assert "orch-migrate fingerprint --against before.json" in last_step


# --- 2. templates list: say why it is empty ---------------------------------------------------


@pytest.mark.parametrize("dialect", ["sqlite"], indirect=True)
def test_templates_list_tells_a_user_without_a_role_how_to_get_one(
    head_db_url: str, tmp_path: Path
) -> None:
    def cli(*args: str) -> tuple[int, str, str]:
        return run_cli(prompt_tool.app, ["prompt-tool", *args, "--db", head_db_url])

    assert cli("projects", "create", "acme")[0] == 0
    assert cli("roles", "grant", "root", "admin", "--global", "--as", "root")[0] == 0
    source = tmp_path / "t.j2"
    source.write_text("Hello {{ who }}")
    for name in ("one", "two"):
        code, _, err = cli(
            "templates", "create", name, "--project", "acme", "--file", str(source), "--as", "root"
        )
        assert code == 0, err

    code, out, err = cli("templates", "list", "--as", "nobody")
    assert code == 0
    assert "one" not in out
    hint = [line for line in err.splitlines() if line]
    assert len(hint) == 1
    assert "nobody has no template role" in hint[0]
    assert "2 templates are hidden" in hint[0]
    assert "prompt-tool roles grant nobody viewer --project SLUG" in hint[0]

    code, _, err = cli("templates", "list", "--project", "acme", "--as", "nobody")
    assert code == 0
    assert "prompt-tool roles grant nobody viewer --project acme" in err

    code, out, err = cli("templates", "list", "--as", "nobody", "--json")
    assert (code, json.loads(out)) == (0, [])
    assert "no template role" in err  # stdout stays JSON; the hint is on stderr

    assert cli("roles", "grant", "vi", "viewer", "--project", "acme", "--as", "root")[0] == 0
    code, out, err = cli("templates", "list", "--as", "vi")
    assert code == 0 and "one" in out and "two" in out
    assert err == ""
    code, _, err = cli("templates", "list", "--as", "root")
    assert code == 0 and err == ""


@pytest.mark.parametrize("dialect", ["sqlite"], indirect=True)
def test_no_hint_when_there_is_nothing_to_hide(head_db_url: str) -> None:
    code, _, err = run_cli(
        prompt_tool.app, ["prompt-tool", "templates", "list", "--as", "nobody", "--db", head_db_url]
    )
    assert (code, err) == (0, "")


# --- 3. sample-data: never into a database that holds data ------------------------------------


def test_sample_data_refuses_a_database_with_data_and_writes_nothing(empty_db_url: str) -> None:
    def sample(*extra: str) -> tuple[int, str, str]:
        return run_cli(
            orch_migrate.app,
            ["orch-migrate", "sample-data", "--sessions", "15", "--db", empty_db_url, *extra],
        )

    schema.upgrade(empty_db_url, "0001")
    code, out, err = sample()
    assert code == 0, err
    assert "loaded 3 projects" in out

    code, out, err = sample()
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "already holds data" in err and "--force" in err
    assert (_count(empty_db_url, Project), _count(empty_db_url, OrchestrationSession)) == (3, 15)

    code, _, err = sample("--force")
    assert code == 0, err
    assert (_count(empty_db_url, Project), _count(empty_db_url, OrchestrationSession)) == (6, 30)


def test_sample_data_refuses_past_0001_with_data_too(empty_db_url: str) -> None:
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=5, projects=1)
    schema.upgrade(empty_db_url)
    with pytest.raises(InvalidInputError, match="already holds data"):
        load_legacy_sample(empty_db_url, sessions=5, projects=1)
    assert _count(empty_db_url, OrchestrationSession) == 5


def test_sample_data_goes_into_a_new_head_database(head_db_url: str) -> None:
    code, out, err = run_cli(
        orch_migrate.app,
        ["orch-migrate", "sample-data", "--sessions", "5", "--json", "--db", head_db_url],
    )
    assert code == 0, err
    assert json.loads(out)["sessions"] == 5


# --- 4. --version, python -m prompt_tool -----------------------------------------------------


@pytest.mark.parametrize(
    ("app", "program"), [(orch_migrate.app, "orch-migrate"), (prompt_tool.app, "prompt-tool")]
)
def test_version_option(app: object, program: str) -> None:
    code, out, err = run_cli(app, [program, "--version"])  # type: ignore[arg-type]
    assert (code, out, err) == (0, f"{program} {__version__}\n", "")


def test_console_scripts_and_python_m_print_the_version(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPT_TOOL_")}
    bin_dir = Path(sys.executable).parent
    for argv, expected in (
        ([str(bin_dir / "orch-migrate"), "--version"], f"orch-migrate {__version__}"),
        ([str(bin_dir / "prompt-tool"), "--version"], f"prompt-tool {__version__}"),
        ([sys.executable, "-m", "prompt_tool", "--version"], f"prompt-tool {__version__}"),
    ):
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
        assert (done.returncode, done.stdout.strip(), done.stderr) == (0, expected, ""), argv


def test_python_m_prompt_tool_runs_the_commands(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPT_TOOL_")}
    done = subprocess.run(
        [sys.executable, "-m", "prompt_tool", "templates", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "list" in done.stdout and "render" in done.stdout


# --- 5. one form of the URL in every command -------------------------------------------------


@pytest.mark.postgres
def test_every_command_prints_the_url_in_the_same_form(pg_url: str, tmp_path: Path) -> None:
    def printed(*argv: str) -> str:
        code, out, err = run_cli(orch_migrate.app, ["orch-migrate", *argv, "--db", pg_url])
        assert code == 0, err
        return out

    outputs = {
        "db upgrade": printed("db", "upgrade", "0001"),
        "sample-data": printed("sample-data", "--sessions", "5"),
        "db current": printed("db", "upgrade"),
        "export": printed("export", str(tmp_path / "export")),
        "status": printed("status"),
        "restore": printed("restore", "--from", str(tmp_path / "export"), "--dry-run"),
    }
    for command, out in outputs.items():
        assert "postgresql+psycopg://" not in out, command
    assert "postgresql://" in outputs["status"] and "postgresql://" in outputs["restore"]
