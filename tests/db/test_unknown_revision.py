"""A database at a revision this prompt-tool does not know (a newer one upgraded it, an older one
is pointed at it): every command that writes refuses in one line before it writes anything,
verify refuses too, `status` and `db current` say what is wrong, and `db stamp REV --purge`
recovers. Below the revision a command needs, it says to upgrade."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import Engine, event, func, select, text

from prompt_tool import flags
from prompt_tool.cli import orch_migrate, prompt_tool
from prompt_tool.db import schema
from prompt_tool.db.models import (
    FeatureFlagEvent,
    FeatureFlagState,
    MigrationRun,
    Project,
    Prompt,
    Scope,
    SessionPromptRef,
    TemplatePermission,
)
from prompt_tool.errors import SchemaError, UnknownRevisionError
from prompt_tool.migrate import load_legacy_sample
from prompt_tool.migrate.backfill import backfill
from prompt_tool.migrate.export import export
from prompt_tool.migrate.restore import restore
from prompt_tool.migrate.verify import verify
from prompt_tool.templates import TemplateManager
from prompt_tool.templates.types import TemplateAddress
from tests.cli_run import run_cli

FUTURE = "9f3a_future"
HEAD = schema.history()[-1].revision
# Every table a refused command could have written to.
_COUNTED = (
    MigrationRun,
    FeatureFlagState,
    FeatureFlagEvent,
    Prompt,
    SessionPromptRef,
    TemplatePermission,
    Project,
)


def _record(engine: Engine, *revisions: str) -> None:
    """What a newer prompt-tool leaves behind: ``alembic_version`` rows these scripts lack."""
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM alembic_version"))
        for revision in revisions:
            connection.execute(
                text("INSERT INTO alembic_version (version_num) VALUES (:r)"), {"r": revision}
            )


def _rows(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return {
            model.__tablename__: connection.execute(
                select(func.count()).select_from(model)
            ).scalar_one()
            for model in _COUNTED
        }


@pytest.fixture
def deployment(empty_db_url: str, engine_for: Callable[[str], Engine], tmp_path: Path) -> Engine:
    """A legacy deployment upgraded to head (not backfilled), with an export of it taken at
    head in ``tmp_path / "taken"``, then stamped with a revision from the future."""
    schema.upgrade(empty_db_url, "0001")
    load_legacy_sample(empty_db_url, sessions=12, projects=2, seed=3)
    schema.upgrade(empty_db_url)
    exporting = engine_for(empty_db_url)  # an engine of its own: it remembers head
    export(exporting, tmp_path / "taken")
    engine = engine_for(empty_db_url)
    _record(engine, FUTURE)
    return engine


def _recorded(engine: Engine) -> tuple[str, ...]:
    with engine.connect() as connection:
        return schema.recorded_revisions(connection)


def _address() -> TemplateAddress:
    return TemplateAddress(name="greeting", scope=Scope.GLOBAL)


_LIBRARY: dict[str, Callable[[Engine, Path], Any]] = {
    "backfill": lambda engine, _: backfill(engine),
    "verify": lambda engine, _: verify(engine),
    "export": lambda engine, tmp: export(engine, tmp / "out"),
    "restore": lambda engine, tmp: restore(engine, tmp / "taken"),
    "set_variant": lambda engine, _: flags.set_variant(engine, "project-1", "shadow", actor="o"),
    "set_default": lambda engine, _: flags.set_default(engine, "shadow", actor="o"),
    "unset_default": lambda engine, _: flags.unset_default(engine, actor="o"),
    "create_template": lambda engine, _: TemplateManager(engine).create(
        _address(), "hi", actor="root"
    ),
    "grant": lambda engine, _: TemplateManager(engine).grant("root", "root", "admin", None),
    "create_project": lambda engine, _: TemplateManager(engine).create_project("new"),
}


@pytest.mark.parametrize("call", list(_LIBRARY))
def test_every_library_entry_point_refuses_an_unknown_revision_in_one_line_writing_nothing(
    call: str, deployment: Engine, tmp_path: Path
) -> None:
    before = _rows(deployment)

    with pytest.raises(UnknownRevisionError) as raised:
        _LIBRARY[call](deployment, tmp_path)

    message = str(raised.value)
    assert FUTURE in message and "db stamp REV --purge" in message and "\n" not in message
    assert _rows(deployment) == before
    # No export folder, not even a hidden staging one.
    assert not [p.name for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(".")]


_ORCH_MIGRATE = [
    ["backfill"],
    ["verify"],
    ["export", "{tmp}/out"],
    ["restore", "--from", "{tmp}/taken"],
    ["flag", "set", "shadow", "--project", "project-1"],
    ["flag", "unset", "--default"],
    ["db", "upgrade"],
    ["db", "downgrade"],
    ["db", "check"],
]
_PROMPT_TOOL = [
    ["templates", "create", "greeting", "--file", "{tmp}/greeting.txt", "--as", "root"],
    ["roles", "grant", "root", "admin", "--global", "--as", "root"],
    ["projects", "create", "new"],
    [
        "ab",
        "create",
        "t1",
        "--template",
        "greeting",
        "--role",
        "system",
        "--variant",
        "a=1",
        "--variant",
        "b=1",
        "--scope",
        "global",
        "--as",
        "root",
    ],
]


def _refused(app: typer.Typer, program: str, args: list[str], url: str, tmp: Path) -> str:
    (tmp / "greeting.txt").write_text("hi", encoding="utf-8")
    argv = [program, *(arg.format(tmp=tmp) for arg in args), "--db", url]
    code, stdout, stderr = run_cli(app, argv)
    assert code == 2, (stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    return stderr


@pytest.mark.parametrize("args", _ORCH_MIGRATE, ids=" ".join)
def test_orch_migrate_refuses_an_unknown_revision_in_one_line_exit_2_writing_nothing(
    args: list[str], deployment: Engine, tmp_path: Path
) -> None:
    url = deployment.url.render_as_string(hide_password=False)
    before = _rows(deployment)

    stderr = _refused(orch_migrate.app, "orch-migrate", args, url, tmp_path)

    assert FUTURE in stderr and "--purge" in stderr
    assert _rows(deployment) == before
    assert not (tmp_path / "out").exists()
    assert _recorded(deployment) == (FUTURE,)


@pytest.mark.parametrize("args", _PROMPT_TOOL, ids=" ".join)
def test_prompt_tool_writes_refuse_an_unknown_revision_in_one_line_exit_2(
    args: list[str], deployment: Engine, tmp_path: Path
) -> None:
    url = deployment.url.render_as_string(hide_password=False)
    before = _rows(deployment)

    stderr = _refused(prompt_tool.app, "prompt-tool", args, url, tmp_path)

    assert FUTURE in stderr and "--purge" in stderr
    assert _rows(deployment) == before


@pytest.mark.parametrize("command", [["status"], ["db", "current"]], ids=" ".join)
def test_status_and_db_current_show_the_unknown_revision_and_say_what_to_do(
    command: list[str], deployment: Engine
) -> None:
    url = deployment.url.render_as_string(hide_password=False)

    code, stdout, stderr = run_cli(orch_migrate.app, ["orch-migrate", *command, "--db", url])

    assert code == 1
    assert FUTURE in stdout
    assert len(stderr.strip().splitlines()) == 1 and "db stamp REV --purge" in stderr
    code, stdout, _ = run_cli(orch_migrate.app, ["orch-migrate", *command, "--db", url, "--json"])
    assert code == 1 and FUTURE in stdout and '"problem"' in stdout


def test_several_recorded_revisions_are_refused_and_shown(deployment: Engine) -> None:
    _record(deployment, "0001", "0002")
    url = deployment.url.render_as_string(hide_password=False)

    with pytest.raises(UnknownRevisionError, match=r"several revisions at once \(0001, 0002\)"):
        backfill(deployment)
    code, stdout, stderr = run_cli(orch_migrate.app, ["orch-migrate", "db", "current", "--db", url])
    assert code == 1 and "0001,0002" in stdout and "several revisions" in stderr


def test_db_stamp_without_purge_says_to_add_purge_and_changes_nothing(deployment: Engine) -> None:
    url = deployment.url.render_as_string(hide_password=False)

    code, _, stderr = run_cli(
        orch_migrate.app, ["orch-migrate", "db", "stamp", "0002", "--db", url]
    )

    assert code == 2 and "`orch-migrate db stamp 0002 --purge`" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert _recorded(deployment) == (FUTURE,)


def test_db_stamp_purge_recovers_and_the_commands_work_again(
    deployment: Engine, tmp_path: Path
) -> None:
    url = deployment.url.render_as_string(hide_password=False)
    with pytest.raises(UnknownRevisionError):
        backfill(deployment)  # refused, and not remembered as refused

    code, stdout, stderr = run_cli(
        orch_migrate.app, ["orch-migrate", "db", "stamp", HEAD, "--purge", "--db", url]
    )

    assert code == 0, stderr
    assert f"{FUTURE} -> {HEAD}" in stdout
    assert schema.current(url).problem is None
    assert backfill(deployment).references_created > 0
    assert verify(deployment).passed
    assert flags.set_variant(deployment, "project-1", "shadow", actor="o").changed
    for args in (["status"], ["db", "current"], ["export", str(tmp_path / "out")]):
        code, _, stderr = run_cli(orch_migrate.app, ["orch-migrate", *args, "--db", url])
        assert code == 0, (args, stderr)


@pytest.mark.parametrize("call", ["backfill", "verify", "set_variant", "create_template"])
def test_below_the_revision_a_command_needs_it_says_to_upgrade(
    call: str, deployment: Engine, tmp_path: Path
) -> None:
    _record(deployment, "0001")  # the 0002 tables are still there: only the refusal stops it
    before = _rows(deployment)
    needs = "0003" if call == "backfill" else "0002"  # backfill writes 0003's quarantine

    with pytest.raises(SchemaError, match=rf"needs schema revision {needs} .* at 0001.*db upgrade"):
        _LIBRARY[call](deployment, tmp_path)

    assert _rows(deployment) == before


def test_template_writes_check_the_revision_once_per_engine(deployment: Engine) -> None:
    _record(deployment, "0002")
    manager = TemplateManager(deployment)
    manager.grant("root", "root", "admin", None)
    asked: list[str] = []

    @event.listens_for(deployment, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "alembic_version" in statement:
            asked.append(statement)

    for number in range(3):
        manager.create(TemplateAddress(name=f"t{number}", scope=Scope.GLOBAL), "hi", actor="root")
        flags.set_default(deployment, "shadow", actor="o")

    assert asked == []


def test_a_schema_command_in_this_process_makes_engines_check_again(deployment: Engine) -> None:
    _record(deployment, HEAD)
    url = deployment.url.render_as_string(hide_password=False)
    schema.downgrade(url, "0002")
    flags.set_default(deployment, "shadow", actor="o")  # checked and remembered: 0002
    deployment.dispose()
    schema.downgrade(url, "0001", discard_user_templates=True)

    with pytest.raises(SchemaError, match="needs schema revision 0002"):
        flags.set_default(deployment, "legacy", actor="o")
