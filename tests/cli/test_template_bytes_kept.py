"""Stored template text keeps every byte, whether it comes from a file or from stdin: CRLF, a
lone CR, a BOM, trailing whitespace, a final newline or its absence survive create, update,
show --json, render, and an export restored into a fresh database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from prompt_tool.cli.prompt_tool import app
from prompt_tool.db import schema
from prompt_tool.db.models import PromptVersion
from prompt_tool.migrate.export import export
from prompt_tool.migrate.restore import restore

runner = CliRunner()

TEXTS = {
    "crlf": "line one\r\nline two\r\n",
    "lone-cr": "before\rafter",
    "bom": "\ufeffstarts with a BOM\n",
    "trailing-space": "ends in spaces   \n\t\n",
    "no-final-newline": "no newline at the end",
    "mixed": "a\r\nb\nc\rd\r\n\r\n",
}


@pytest.fixture
def cli(head_db_url: str) -> Any:
    def invoke(*args: str, input: bytes | None = None) -> Any:
        takes_as = args[0] != "projects"
        acting = ["--as", "alice"] if takes_as else []
        return runner.invoke(app, [*args, "--db", head_db_url, *acting], input=input)

    assert invoke("projects", "create", "acme").exit_code == 0
    assert invoke("roles", "grant", "alice", "admin", "--global").exit_code == 0
    return invoke


def _stored(cli: Any, name: str, version: int = 1) -> str:
    shown = cli("templates", "show", name, "--version", str(version), "--json")
    assert shown.exit_code == 0, shown.output
    return str(json.loads(shown.stdout)["source"])


@pytest.mark.parametrize("how", ["file", "stdin"])
@pytest.mark.parametrize("kind", list(TEXTS))
def test_create_update_show_and_render_keep_every_byte(
    cli: Any, tmp_path: Path, kind: str, how: str
) -> None:
    text = TEXTS[kind]
    raw = text.encode("utf-8")
    path = tmp_path / "template.txt"
    path.write_bytes(raw)

    def given(*args: str) -> Any:
        if how == "file":
            return cli(*args, "-f", str(path))
        return cli(*args, input=raw)

    assert given("templates", "validate", "t").exit_code == 0
    created = given("templates", "create", "t")
    assert created.exit_code == 0, created.output
    assert _stored(cli, "t") == text
    assert cli("templates", "render", "t").stdout_bytes == raw

    path.write_bytes(raw + b"v2" + raw)
    updated = (
        cli("templates", "update", "t", "-f", str(path))
        if how == "file"
        else cli("templates", "update", "t", input=raw + b"v2" + raw)
    )
    assert updated.exit_code == 0, updated.output
    assert _stored(cli, "t", version=2) == text + "v2" + text


def test_an_export_restored_elsewhere_keeps_every_byte(
    cli: Any, head_db_url: str, engine_for: Any, tmp_path: Path, empty_db_url: str
) -> None:
    for index, text in enumerate(TEXTS.values()):
        assert cli("templates", "create", f"t{index}", input=text.encode()).exit_code == 0
    export(engine_for(head_db_url), tmp_path / "backup")
    schema.upgrade(empty_db_url)
    restore(engine_for(empty_db_url), tmp_path / "backup")
    with engine_for(empty_db_url).connect() as connection:
        restored = set(connection.execute(select(PromptVersion.content)).scalars())
    assert set(TEXTS.values()) <= restored
