"""`prompt_tool.migrate.commands`, the library face `orch-migrate` is thin over: each command
takes a URL or an Engine, its options and a progress callback, and returns the data that
``--json`` prints."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import Engine

from prompt_tool.cli._runtime import _to_jsonable
from prompt_tool.cli.orch_migrate import app
from prompt_tool.db import schema
from prompt_tool.db.engine import make_engine
from prompt_tool.migrate import (
    BackfillOptions,
    BackfillProgress,
    ExportOptions,
    RestoreOptions,
    SampleDataOptions,
    StatusOptions,
    VerifyOptions,
    commands,
)
from tests.cli_run import run_cli


def _jsonable(report: object) -> object:
    """``report`` as ``--json`` prints it."""
    return json.loads(json.dumps(_to_jsonable(report)))


def test_every_command_takes_a_url_or_an_engine_and_returns_what_json_prints(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'library.db'}"
    schema.upgrade(url)
    commands.sample_data(url, SampleDataOptions(sessions=30, projects=2))
    seen: list[BackfillProgress] = []
    summary = commands.backfill(url, BackfillOptions(batch_size=10), progress=seen.append)
    assert summary.sessions_scanned == 30 and seen and seen[-1].done == 30

    engine: Engine = make_engine(url)
    try:
        checked: list[tuple[int, int]] = []
        report = commands.verify(
            engine, VerifyOptions(), progress=lambda done, total: checked.append((done, total))
        )
        assert report.passed and checked
        # A given Engine is the caller's: still usable after the command.
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()

    status = commands.status(url, StatusOptions())
    code, out, _err = run_cli(app, ["orch-migrate", "status", "--db", url, "--json"])
    assert code == 0
    assert json.loads(out) == _jsonable(status)

    exported = commands.export(url, ExportOptions(tmp_path / "export"))
    assert exported.rows > 0
    restored = commands.restore(url, RestoreOptions(tmp_path / "export", dry_run=True))
    assert restored.missing == 0 and restored.different == 0
