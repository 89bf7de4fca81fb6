"""`prompt-tool`: the developer's tool for prompts, templates and sessions."""

from __future__ import annotations

from prompt_tool import __version__
from prompt_tool.cli._runtime import JsonOption, emit, new_app, run

app = new_app("Prompts, orchestration templates and sessions, kept in a database.")


@app.command("version")
def version(as_json: JsonOption = False) -> None:
    """Show the installed version."""
    emit({"version": __version__}, as_json=as_json, render=lambda data: data["version"])


def main() -> None:
    run(app)
