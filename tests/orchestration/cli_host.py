"""The sub-apps mounted on a small Typer app, as the main `prompt-tool` app will mount them."""

from __future__ import annotations

from cli_run import run_cli
from typer.testing import CliRunner

from prompt_tool.cli._runtime import new_app
from prompt_tool.cli.session_commands import orchestrate_app, sessions_app

app = new_app("test host for the sessions and orchestrate sub-apps")
app.add_typer(sessions_app, name="sessions")
app.add_typer(orchestrate_app, name="orchestrate")
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    """``prompt-tool ARGS`` through ``run``, the one place errors become exit codes:
    (exit code, stdout, stderr)."""
    return run_cli(app, ["prompt-tool", *args])
